"""`fastonestep bench loader`: a CPU smoke run writes one provenance-tagged row per loader, never a claim."""
import csv

from fastonestep.cli import main
from fastonestep.data.dali import dali_available


def test_loader_bench_writes_tagged_rows(tmp_path, capsys):
    out = tmp_path / "loader.csv"
    assert main(["bench", "loader", "--images", "16", "--batch", "8", "--batches", "1", "--workers", "1",
                 "--out", str(out)]) == 0
    rows = list(csv.DictReader(open(out, newline="")))
    expected = {"torch", "dali"} if dali_available()[0] else {"torch"}
    assert {r["loader"] for r in rows} >= expected
    for r in rows:
        if r["status"] == "ok":
            assert float(r["images_per_sec"]) > 0
        assert r["is_claim"] == "false" and r["commit"] and r["date"] and r["torch"]
