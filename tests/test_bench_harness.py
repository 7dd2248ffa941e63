"""The kernel benchmark harness on CPU: rows, CSV, bytes/GB/s bookkeeping and reports. No timing assertions."""
import csv
import math
import subprocess
import sys
import time
import warnings

import pytest
import torch

from fastonestep.benchmark import kernels as K


@pytest.fixture(scope="module")
def quick_csv(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "results" / "kernels.csv"
    rows = K.run(quick=True, out_csv=str(path), providers=["eager"], device="cpu", log=lambda *_: None)
    return path, rows


def test_csv_has_header_and_complete_rows(quick_csv):
    path, rows = quick_csv
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == K.COLUMNS
        written = list(reader)
    assert len(written) == len(rows)
    # one copy-bandwidth row, then every loss at every mode it has
    assert written[0]["loss"] == "copy" and float(written[0]["gbps"]) > 0
    expected = {(loss, mode) for loss in K.LOSSES for mode in K.modes_of(loss)}
    assert {(r["loss"], r["mode"]) for r in written[1:]} == expected
    for r in written:
        assert r["is_claim"] == "false"
        assert r["device_type"] == "cpu" and r["device"].startswith("cpu")
        assert r["torch"] == torch.__version__ and r["commit"] and r["date"] and r["triton"]
        assert r["status"] == "ok"
        assert r["peak_mem_mb"] == ""  # no memory numbers on CPU
        for col in ("median_ms", "p20_ms", "p80_ms", "bytes", "gbps", "pct_copy_bw"):
            assert r[col] != "", col
        assert float(r["p20_ms"]) <= float(r["median_ms"]) <= float(r["p80_ms"])
    for r in written[1:]:
        assert r["provider"] == "eager" and float(r["speedup_vs_eager"]) == 1.0 and r["speedup_vs_compile"] == ""


def test_gbps_is_bytes_over_median_time(quick_csv):
    path, _ = quick_csv
    with open(path, newline="") as f:
        written = list(csv.DictReader(f))
    copy_gbps = float(written[0]["gbps"])
    for r in written:
        gbps = int(r["bytes"]) / (float(r["median_ms"]) * 1e-3) / 1e9
        assert math.isclose(float(r["gbps"]), gbps, rel_tol=1e-9)
        assert math.isclose(float(r["pct_copy_bw"]), 100 * gbps / copy_gbps, rel_tol=1e-9)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bytes_moved_matches_the_documented_formulas(dtype):
    B, shape = 4, (4, 4, 16, 16)
    N, s = math.prod(shape), torch.finfo(dtype).bits // 8
    formulas = {  # the table in kernels.py / bench/README.md: N elements of s bytes, per-sample fp32, fp32 loss
        "add_noise": {"forward": 3 * N * s + 8 * B},
        "add_noise_seeded": {"forward": 2 * N * s + 8 * B},
        "denoising_loss": {"forward": 3 * N * s + 8 * B, "backward": 2 * N * s + 4 * B, "full": 4 * N * s + 12 * B},
        "dmd_loss": {"forward": 3 * N * s + 4, "backward": 2 * N * s + 4, "full": 4 * N * s + 8},
        "ratio_generator_loss": {"forward": N * s + 8 * B + 4, "backward": 2 * N * s + 4,
                                 "full": 2 * N * s + 8 * B + 8},
        "ratio_classifier_loss": {"forward": 2 * B * s + 4 * B + 4, "backward": 4 * B * s + 4,
                                  "full": 4 * B * s + 4 * B + 8},
    }
    for loss, modes in formulas.items():
        assert set(modes) == set(K.modes_of(loss))
        t = K._make_tensors(loss, shape, dtype, torch.device("cpu"))
        out = K.run_once(loss, K.make_call(loss, "eager"), t)[0]
        for mode, want in modes.items():
            assert K.bytes_moved(loss, mode, t, out) == want, (loss, mode)


def test_bytes_moved_table():
    # dmd_loss full: read x, x_real_hat, x_fake_hat and the scalar grad_out; write the scalar loss and grad x.
    t = K._make_tensors("dmd_loss", (4, 4, 16, 16), torch.float32, torch.device("cpu"))
    out = torch.zeros(())
    n = 4 * 4 * 16 * 16
    assert K.bytes_moved("dmd_loss", "full", t, out) == 4 * n * 4 + 8
    assert K.bytes_moved("dmd_loss", "forward", t, out) == 3 * n * 4 + 4
    # ratio_generator_loss never reads x: logit_grad, logits, weight in; loss and grad x out.
    t = K._make_tensors("ratio_generator_loss", (4, 4, 16, 16), torch.bfloat16, torch.device("cpu"))
    assert K.bytes_moved("ratio_generator_loss", "full", t, out) == 2 * n * 2 + 8 * 4 + 8
    # add_noise: x0 and noise in, x_t out (plus the per-sample fp32 alpha, sigma).
    t = K._make_tensors("add_noise", (4, 4, 16, 16), torch.float32, torch.device("cpu"))
    assert K.bytes_moved("add_noise", "forward", t, t["x0"]) == 3 * n * 4 + 2 * 4 * 4


@pytest.mark.parametrize("failure", ["raises", "warns"])
def test_rows_append_and_unavailable_providers_are_recorded(tmp_path, monkeypatch, failure):
    real = K._impl_call

    def fake(loss, impl):
        if impl != "triton":
            return real(loss, impl)

        def broken(*args):
            if failure == "raises":
                raise NotImplementedError("no triton kernel here")
            warnings.warn("triton kernel unavailable, falling back to eager", RuntimeWarning)
            return real(loss, "torch")(*args)
        return broken

    # triton "available" but failing on its first call; ext reported unavailable before any call (no build in CI)
    monkeypatch.setattr(K, "_impl_call", fake)
    monkeypatch.setattr(K, "availability", lambda provider, device: "not built here" if provider == "ext" else None)
    path = tmp_path / "k.csv"
    for _ in range(2):  # a second run appends below the first, one header
        rows = K.run(quick=True, losses=["dmd_loss"], out_csv=str(path), providers=["eager", "triton", "ext"],
                     device="cpu", modes=["full"], log=lambda *_: None)
    by = {r["provider"]: r for r in rows if r["loss"] == "dmd_loss"}
    expected = "NotImplementedError" if failure == "raises" else "falling back"
    assert by["triton"]["status"] == "skipped" and expected in by["triton"]["note"]
    assert by["ext"]["status"] == "skipped" and by["ext"]["note"] == "not built here"
    assert by["triton"]["median_ms"] is None and by["eager"]["status"] == "ok"
    text = path.read_text()
    assert text.count("loss,provider,mode") == 1
    assert len(list(csv.DictReader(text.splitlines()))) == 2 * len(rows)


def test_markdown_table_and_plot(quick_csv, tmp_path):
    path, _ = quick_csv
    table = K.markdown_table(path)
    assert "not a performance claim" in table
    assert "| loss | size | dtype | eager ms | compile ms | triton ms | ext ms |" in table
    for loss in K.LOSSES:
        assert f"| {loss} | cpu-tiny-4x4x16x16 | fp32 |" in table
    png = tmp_path / "kernels.png"
    K.plot(path, png)
    assert png.stat().st_size > 1000 and png.read_bytes()[:4] == b"\x89PNG"


def test_cli_report_only(quick_csv, capsys, tmp_path):
    path, _ = quick_csv
    png = tmp_path / "k.png"
    assert K.main(["kernels", "--no-run", "--out", str(path), "--plot", str(png)]) == 0
    assert "| dmd_loss |" in capsys.readouterr().out and png.exists()
    with pytest.raises(ValueError, match="unknown provider"):
        K.run(quick=True, providers=["fused"], out_csv=None, log=lambda *_: None)


def test_reports_prefer_gpu_rows(quick_csv, tmp_path):
    path, rows = quick_csv
    gpu_csv = tmp_path / "mixed.csv"
    gpu_rows = []
    for r in rows:  # the same rows as if measured on a GPU, at another commit, with a fused provider
        for provider, scale in (("eager", 1.0), ("triton", 0.25)):
            g = dict(r, device="NVIDIA H100 80GB HBM3", device_type="cuda", is_claim=True, commit="abc1234",
                     size="B32-4x64x64", provider=provider, peak_mem_mb=1.5)
            g["median_ms"] = r["median_ms"] * scale
            g["speedup_vs_eager"] = 1.0 / scale
            gpu_rows.append(g)
    K.append_rows(gpu_csv, gpu_rows)
    K.append_rows(gpu_csv, rows)  # CPU rows appended later still do not displace the GPU rows
    table = K.markdown_table(gpu_csv)
    assert "not a performance claim" not in table and "NVIDIA H100" in table and "abc1234" in table
    assert "| dmd_loss | B32-4x64x64 | fp32 |" in table and "4.00x" in table
    K.plot(gpu_csv, tmp_path / "gpu.png")
    assert (tmp_path / "gpu.png").stat().st_size > 1000


def test_commit_tag_comes_from_the_environment_where_git_cannot_tell(tmp_path, monkeypatch):
    # A device machine gets the working tree without .git: the caller names the commit.
    monkeypatch.setenv(K.COMMIT_ENV, "0123abc-dirty")
    assert K.git_commit() == "0123abc-dirty"
    rows = K.run(quick=True, losses=["dmd_loss"], providers=["eager"], modes=["full"], device="cpu",
                 out_csv=None, log=lambda *_: None)
    assert {r["commit"] for r in rows} == {"0123abc-dirty"}


def test_commit_tag_marks_uncommitted_changes(tmp_path, monkeypatch):
    import subprocess

    monkeypatch.delenv(K.COMMIT_ENV, raising=False)
    repo = tmp_path / "repo"
    repo.mkdir()
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(repo)]
    subprocess.run(git + ["init", "-q"], check=True)
    (repo / "f.txt").write_text("a\n")
    subprocess.run(git + ["add", "f.txt"], check=True)
    subprocess.run(git + ["commit", "-q", "-m", "x"], check=True)
    head = subprocess.run(git + ["rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert K._git(repo, "rev-parse", "--short", "HEAD") == head
    monkeypatch.setattr(K, "_checkout_dirs", lambda: (repo,))  # the package "lives" in this repo
    assert K.git_commit() == head
    (repo / "f.txt").write_text("b\n")
    assert K.git_commit() == head + "-dirty"


def test_cases_run_dtype_then_size_then_loss():
    # A run cut short keeps every loss at the first dtype, realistic and large size alike.
    sizes = [("B32-4x64x64", K.GPU_SIZES["B32-4x64x64"]), ("large", K.GPU_SIZES["large-256x4x128x128"])]
    order = K.case_order(list(K.LOSSES), sizes, ["fp32", "bf16"])
    first_half = order[: len(order) // 2]
    assert {d for _, _, d in first_half} == {"fp32"}
    assert {(loss, label) for loss, (label, _), _ in first_half} == {(l, s) for l in K.LOSSES for s, _ in sizes}


def test_a_spent_budget_skips_the_remaining_cases_with_a_row_each(tmp_path):
    path = tmp_path / "k.csv"
    rows = K.run(quick=True, losses=["dmd_loss", "ratio_classifier_loss"], providers=["eager"], device="cpu",
                 out_csv=str(path), max_seconds=1e-9, log=lambda *_: None)
    assert rows[0]["loss"] == "copy" and rows[0]["status"] == "ok"
    skipped = rows[1:]
    assert [r["loss"] for r in skipped] == ["dmd_loss", "ratio_classifier_loss"]
    for r in skipped:
        assert r["status"] == "skipped" and "--max-seconds" in r["note"] and r["median_ms"] is None
    assert len(K.read_rows(path)) == len(rows)
    assert "| dmd_loss |" not in K.markdown_table(path)  # nothing measured, nothing claimed


def test_the_budget_counts_from_the_process_start(tmp_path):
    # A process that spent 3 s before the run (as imports and CUDA start-up do) has nothing left of a 2 s budget.
    code = ("import time; time.sleep(3); from fastonestep.benchmark import kernels as K; "
            "rows = K.run(quick=True, losses=['dmd_loss'], providers=['eager'], device='cpu', out_csv=None, "
            "max_seconds=2.0, log=lambda *_: None); print(rows[1]['status'])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert out.stdout.split()[-1] == "skipped"
    assert 0 <= time.time() - K.process_start_time() < 3600
