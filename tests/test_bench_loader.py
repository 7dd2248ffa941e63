"""`fastonestep bench loader`: CPU smoke runs write provenance-tagged rows per loader (never claims); the synthetic
latent dataset is one `dataset encode` would write; every loader delivers the batches training gets; the
loader / step ratio picks the right step row."""
import csv
import os

import numpy as np
import pytest
import torch

from fastonestep.benchmark import loader as L
from fastonestep.cli import main
from fastonestep.data.dali import dali_available
from fastonestep.data.datasets import make_dataset
from fastonestep.data.files import scan_latent_folder
from fastonestep.data.latents import EDM2_FINAL_STD, FORMAT

HAVE_DALI = dali_available()[0]
SHAPE = (4, 8, 8)  # a small latent: C x H x W


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_loader_bench_writes_tagged_rows(tmp_path, capsys):
    out = tmp_path / "loader.csv"
    assert main(["bench", "loader", "--images", "16", "--batch", "8", "--batches", "1", "--workers", "1",
                 "--out", str(out)]) == 0
    rows = _rows(out)
    expected = {"torch", "dali"} if HAVE_DALI else {"torch"}
    assert {r["loader"] for r in rows} >= expected
    for r in rows:
        assert r["data"] == "images" and r["sample_shape"] == "3x64x64"
        if r["status"] == "ok":
            assert float(r["images_per_sec"]) > 0
        assert r["is_claim"] == "false" and r["commit"] and r["date"] and r["torch"]


def test_synthetic_latents_are_a_dataset_encode_folder(tmp_path):
    n = 5
    L.write_synthetic_latents(str(tmp_path), n, SHAPE, num_classes=2)
    # the layout `dataset encode` writes (fastonestep/data/latents.py): DIR/00000/img-mean-std-<8 digits>.npy
    names = sorted(os.path.relpath(os.path.join(d, f), tmp_path) for d, _, fs in os.walk(tmp_path) for f in fs
                   if f.endswith(".npy"))
    assert names == [os.path.join("00000", f"img-mean-std-{i:08d}.npy") for i in range(n)]
    files = scan_latent_folder(str(tmp_path))
    assert (len(files), files.shape, files.stored_shape) == (n, SHAPE, (2 * SHAPE[0], *SHAPE[1:]))
    assert files.info["format"] == FORMAT and files.info["latent_channels"] == SHAPE[0]
    assert files.labels.tolist() == [i % 2 for i in range(n)] and files.num_classes == 2
    moments = make_dataset("latent", path=str(tmp_path)).data  # what the in-memory loader reads
    assert moments.dtype == torch.float32 and tuple(moments.shape) == (n, 2 * SHAPE[0], *SHAPE[1:])
    assert (moments[:, SHAPE[0]:] > 0).all()  # the std half
    for i, name in enumerate(names):
        np.testing.assert_array_equal(np.load(tmp_path / name), moments[i].numpy())


@pytest.fixture(scope="module")
def latent_config(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("latents"))
    L.write_synthetic_latents(root, 16, SHAPE)
    return L.bench_config("latents", root, "auto", batch=4, workers=0)


def _kinds():
    return ["torch", "memory"] + (["dali"] if HAVE_DALI else [])


def test_every_loader_delivers_the_same_sampled_latents(latent_config):
    """As training gets them: float32 latents (not moments) in batches of train.batch_size, identical across
    loaders (same order, same z), with the EDM2 scaling applied."""
    batches = {}
    for kind in _kinds():
        _, rate, x = L.time_loader(L.with_loader(latent_config, kind), torch.device("cpu"), warmup=1, batches=2)
        assert rate > 0 and x.dtype == torch.float32 and tuple(x.shape) == (4, *SHAPE), kind
        batches[kind] = x
    for kind, x in batches.items():
        torch.testing.assert_close(x, batches["torch"], msg=kind)
    # the moments follow the raw SD-VAE channel statistics; EDM2's scale and bias map them to mean 0, std 0.5
    x = batches["torch"]
    assert x.mean(dim=(0, 2, 3)).abs().max() < 0.2
    torch.testing.assert_close(x.std(dim=(0, 2, 3)), torch.full((SHAPE[0],), EDM2_FINAL_STD), atol=0.1, rtol=0)


def test_auto_times_memory_only_where_training_would_use_it(latent_config, monkeypatch):
    assert L.choose_loaders(["auto"], latent_config) == ["torch", "dali", "memory"]  # 16 small files fit
    monkeypatch.setattr("fastonestep.data.loaders.AUTO_MEMORY_BYTES", 0)
    assert L.choose_loaders(["auto"], latent_config) == ["torch", "dali"]
    assert L.choose_loaders(["memory"], latent_config) == ["memory"]


def test_latents_cli_rows_and_dali_skip(tmp_path, monkeypatch):
    out = tmp_path / "loader.csv"
    args = ["bench", "loader", "--data", "latents", "--latent-shape", "4x8x8", "--images", "16", "--batch", "4",
            "--batches", "2", "--workers", "0", "--device", "cpu", "--out", str(out)]
    assert main(args) == 0
    rows = {r["loader"]: r for r in _rows(out)}
    assert set(rows) == {"torch", "dali", "memory"}
    for kind in _kinds():
        r = rows[kind]
        assert r["status"] == "ok" and r["data"] == "latents" and r["sample_shape"] == "4x8x8", r["note"]
        assert float(r["images_per_sec"]) > 0 and r["is_claim"] == "false"
    # the GPU machine has no DALI: its row says so, and the run still succeeds
    monkeypatch.setattr("fastonestep.data.dali.dali_available", lambda: (False, "no module named nvidia"))
    out.unlink()
    assert main(args + ["--loaders", "dali"]) == 0
    (row,) = _rows(out)
    assert row["status"] == "skipped" and row["note"].startswith("DALI not installed")


def _step_row(rate, device_type="cuda", shape="4x64x64", world=1, status="ok", method="dmd", old=False):
    row = {"method": method, "size": "s", "backend": "single", "world_size": str(world), "batch_per_gpu": "32",
           "latent_shape": shape, "images_per_s": str(rate if old else rate / 6),  # DMD2: 6 real batches
           "data_images_per_s": "" if old else str(rate),
           "device": "H200", "device_type": device_type, "commit": "abc", "is_claim": "true", "status": status}
    return row


STEP_ROWS = [
    _step_row(500.0),                       # DiffRatio-like
    _step_row(1600.0, world=2),             # 800 per GPU: the fastest consumer on cuda at 4x64x64
    _step_row(700.0, old=True),             # an older row: generator images/s only
    _step_row(5000.0, status="error"),      # not measured
    _step_row(9000.0, shape="4x8x8"),       # another latent shape
    _step_row(10000.0, device_type="cpu"),  # another device type
]


def _loader_row(rate, data="latents", device_type="cuda"):
    return {"data": data, "loader": "torch", "images_per_sec": str(rate), "sample_shape": "4x64x64",
            "device_type": device_type, "status": "ok", "note": ""}


def test_step_ratio_uses_the_fastest_matching_step_row():
    step_per_gpu = max(500.0 / 1, 1600.0 / 2, 700.0 / 1)
    for loader_rate in (3000.0, 2000.0):
        got = L.compare_with_step(_loader_row(loader_rate), STEP_ROWS)
        ratio = loader_rate / step_per_gpu
        assert float(got["step_images_per_sec"]) == pytest.approx(step_per_gpu)
        assert float(got["loader_over_step"]) == pytest.approx(ratio, abs=0.005)
        assert got["meets_target"] == str(ratio >= 3.0).lower()
        assert got["step_case"].startswith("dmd/s/singlex2/b32")
    cpu = L.compare_with_step(_loader_row(20000.0, device_type="cpu"), STEP_ROWS)
    assert float(cpu["loader_over_step"]) == pytest.approx(20000.0 / 10000.0)
    old_only = L.compare_with_step(_loader_row(2100.0), [_step_row(700.0, old=True)])
    assert float(old_only["loader_over_step"]) == pytest.approx(3.0) and old_only["meets_target"] == "true"
    assert "generator images/s" in old_only["note"]
    assert "loader_over_step" not in L.compare_with_step(_loader_row(1.0, data="images"), STEP_ROWS)
    assert "no ok step row" in L.compare_with_step(_loader_row(1.0), STEP_ROWS[3:])["note"]
    # rows of the loader's own commit (measured in the same run) win over faster older ones
    newer = dict(_step_row(100.0), commit="new")
    same_run = L.compare_with_step(dict(_loader_row(600.0), commit="new"), STEP_ROWS + [newer])
    assert float(same_run["loader_over_step"]) == pytest.approx(600.0 / 100.0)


def test_step_csv_ratio_end_to_end(tmp_path):
    step_csv = tmp_path / "step.csv"
    from fastonestep.benchmark.kernels import append_rows
    from fastonestep.benchmark.step import COLUMNS as STEP_COLUMNS

    append_rows(step_csv, [_step_row(40.0, device_type="cpu", shape="4x8x8"),
                           _step_row(90.0, device_type="cpu", shape="4x8x8", world=3)], STEP_COLUMNS)
    out = tmp_path / "loader.csv"
    assert main(["bench", "loader", "--data", "latents", "--latent-shape", "4x8x8", "--images", "8", "--batch", "4",
                 "--batches", "1", "--workers", "0", "--loaders", "torch", "--device", "cpu",
                 "--step-csv", str(step_csv), "--out", str(out)]) == 0
    (row,) = _rows(out)
    step_per_gpu = max(40.0, 90.0 / 3)
    assert float(row["step_images_per_sec"]) == pytest.approx(step_per_gpu)
    ratio = float(row["images_per_sec"]) / step_per_gpu
    assert float(row["loader_over_step"]) == pytest.approx(ratio, rel=0.01)
    assert row["meets_target"] == str(float(row["loader_over_step"]) >= 3.0).lower()
    assert row["is_claim"] == "false"
