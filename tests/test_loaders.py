"""Streaming loaders: the torch fallback and the DALI CPU pipelines give the same batches as each other (and as
an independent reading of the files), resume mid-epoch exactly, and shard disjointly across ranks."""
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fastonestep.config import load_config
from fastonestep.data import DataError
from fastonestep.data.files import scan_image_folder, scan_latent_folder
from fastonestep.data.loaders import make_loader, open_dataset
from fastonestep.data.order import EpochOrder
from fastonestep.data.torch_loader import TorchLoader
from fastonestep.engine.loader import EpochLoader

from fastonestep.data.dali import DaliLoader, dali_available

needs_dali = pytest.mark.skipif(not dali_available()[0], reason="DALI is an optional extra (pip install '.[dali]')")


def _write_png(path, pixels):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(pixels).save(path)


@pytest.fixture(scope="module")
def png_folder(tmp_path_factory):
    """10 RGB PNGs in two class folders, at the target resolution 16 on the shorter side (some 16x17 / 17x16,
    so the centre crop has an odd margin) -> no resize happens. Returns (root, {path: pixels})."""
    root = tmp_path_factory.mktemp("pngs")
    rng = np.random.default_rng(0)
    pixels = {}
    for i in range(10):
        h, w = [(16, 16), (16, 17), (17, 16)][i % 3]
        path = str(root / ("cat" if i < 5 else "dog") / f"{i:02d}.png")
        pixels[path] = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        _write_png(path, pixels[path])
    return str(root), pixels


@pytest.fixture(scope="module")
def latent_folder(tmp_path_factory):
    """12 latent files whose moments are filled with the file's index (so a batch tells which files it holds)."""
    root = tmp_path_factory.mktemp("latents")
    rng = np.random.default_rng(1)
    labels = []
    for i in range(12):
        name = f"00000/img-mean-std-{i:08d}.npy"
        os.makedirs(root / "00000", exist_ok=True)
        arr = rng.normal(size=(8, 4, 4)).astype(np.float32)
        arr[0, 0, 0] = i  # the file's identity
        np.save(root / name, arr)
        labels.append([name, i % 3])
    (root / "dataset.json").write_text(json.dumps({"labels": labels, "class_names": ["a", "b", "c"]}))
    return str(root)


def _draw(loader, n):
    return [loader.next() for _ in range(n)]


def _assert_same(batches_a, batches_b, atol=0.0):
    assert len(batches_a) == len(batches_b)
    for (xa, ya), (xb, yb) in zip(batches_a, batches_b):
        assert xa.shape == xb.shape and xa.dtype == xb.dtype == torch.float32
        torch.testing.assert_close(xa, xb, rtol=0, atol=atol)
        assert (ya is None and yb is None) or torch.equal(ya, yb)


@needs_dali
def test_dali_and_torch_give_the_same_image_batches(png_folder):
    root, pixels = png_folder
    ds = scan_image_folder(root, 16)
    assert ds.shape == (3, 16, 16) and ds.num_classes == 2
    torch_batches = _draw(TorchLoader(ds, 4, seed=3, flip=True), 6)  # 2 batches per epoch: 3 epochs
    dali_batches = _draw(DaliLoader(ds, 4, seed=3, flip=True), 6)
    _assert_same(torch_batches, dali_batches, atol=1e-6)  # (x - 127.5) / 127.5 vs DALI's normalise: 1 ulp

    # Independent reading: batch k holds files order.batch(k), centre-cropped (odd pixel before the window),
    # mapped to [-1, 1], mirrored where the flip flag says.
    order, flipped = EpochOrder(10, 4, seed=3, flip=True), 0
    for k, (x, y) in enumerate(torch_batches):
        _, idx, flips = order.batch(k)
        for j, i in enumerate(idx):
            img = pixels[ds.files[i]]
            top, left = (img.shape[0] - 15) // 2, (img.shape[1] - 15) // 2
            ref = img[top:top + 16, left:left + 16].astype(np.float32) / 127.5 - 1
            ref = ref[:, ::-1] if flips[j] else ref
            np.testing.assert_allclose(x[j].permute(1, 2, 0).numpy(), ref, atol=1e-6)
            assert y[j] == (0 if "cat" in ds.files[i] else 1)
        flipped += int(flips.sum())
    assert 0 < flipped < 24  # flips are drawn, not constant


@needs_dali
def test_dali_resize_path_close_to_pil(tmp_path):
    """Images that need resizing: DALI's Lanczos and PIL's agree to about one 8-bit level on average."""
    rng = np.random.default_rng(2)
    for i, (h, w) in enumerate([(40, 30), (33, 50), (24, 24), (64, 96)]):
        yy, xx = np.mgrid[0:h, 0:w]
        smooth = np.stack([127 + 100 * np.sin(xx / 5 + c) * np.cos(yy / 7) for c in range(3)], -1)
        _write_png(str(tmp_path / f"{i}.png"), np.clip(smooth + rng.normal(0, 8, smooth.shape), 0, 255).astype(np.uint8))
    ds = scan_image_folder(str(tmp_path), 16)
    (xt, _), = _draw(TorchLoader(ds, 4, seed=0), 1)
    (xd, _), = _draw(DaliLoader(ds, 4, seed=0), 1)
    diff = (xt - xd).abs()
    assert diff.mean() < 2.5 / 127.5, diff.mean()  # measured ~1 level
    assert diff.max() < 16 / 127.5, diff.max()  # measured <= 7 levels


@needs_dali
def test_dali_torch_and_memory_give_equal_latent_moments(latent_folder):
    ds = scan_latent_folder(latent_folder)
    assert ds.shape == (4, 4, 4) and ds.stored_shape == (8, 4, 4) and ds.num_classes == 3
    a = _draw(TorchLoader(ds, 5, seed=1), 5)
    b = _draw(DaliLoader(ds, 5, seed=1), 5)
    cfg = load_config(None, ["data.kind=latent", f"data.path={latent_folder}", "data.loader=memory",
                             "train.batch_size=5", "seed=1"])
    mem = open_dataset(cfg)
    c = _draw(EpochLoader(mem.data, mem.labels, 5, seed=1), 5)
    _assert_same(a, b)  # exactly equal
    _assert_same(a, c)
    order = EpochOrder(12, 5, seed=1)
    for k, (x, _) in enumerate(a):
        assert x[:, 0, 0, 0].long().tolist() == order.batch(k)[1].tolist()


@pytest.mark.parametrize("kind", ["memory", "torch", pytest.param("dali", marks=needs_dali)])
def test_resume_mid_epoch_gives_the_same_batches(kind, latent_folder, monkeypatch):
    ds = scan_latent_folder(latent_folder)
    cfg = load_config(None, ["data.kind=latent", f"data.path={latent_folder}", f"data.loader={kind}",
                             "train.batch_size=5", "seed=4"])

    def fresh():
        return make_loader(cfg, ds if kind != "memory" else open_dataset(cfg), "cpu").loader  # unwrap sampling

    full = _draw(fresh(), 7)  # 2 batches per epoch: crosses 3 epoch boundaries
    first = fresh()
    _draw(first, 3)  # stops mid-epoch 1
    state = first.state_dict()
    assert state["epoch"] == 1 and state["position"] == 5 and state["seed"] == 4
    resumed = fresh()
    if kind == "torch":  # the skipped batches' files are never read
        import fastonestep.data.torch_loader as tl

        read = []
        original = tl.read_sample
        monkeypatch.setattr(tl, "read_sample", lambda d, i: read.append(i) or original(d, i))
    resumed.load_state_dict(state)
    _assert_same(full[3:], _draw(resumed, 4))
    if kind == "torch":
        order = EpochOrder(12, 5, seed=4)
        assert read == [i for k in range(3, 7) for i in order.batch(k)[1]]


@pytest.mark.parametrize("cls", [TorchLoader, pytest.param(DaliLoader, marks=needs_dali)])
def test_two_ranks_get_disjoint_shards_covering_the_epoch(cls, latent_folder):
    ds = scan_latent_folder(latent_folder)  # 12 files, 2 ranks x 6, batch 3: 2 batches per rank and epoch
    seen = {}
    for rank in (0, 1):
        batches = _draw(cls(ds, 3, seed=5, rank=rank, world_size=2), 4)
        seen[rank] = [x[:, 0, 0, 0].long().tolist() for x, _ in batches]
    for epoch in (0, 1):
        r0 = sum(seen[0][2 * epoch:2 * epoch + 2], [])
        r1 = sum(seen[1][2 * epoch:2 * epoch + 2], [])
        assert not set(r0) & set(r1)
        assert sorted(r0 + r1) == list(range(12))
    assert seen[0][:2] != seen[0][2:]  # a new permutation each epoch


def test_memory_loader_keeps_its_historic_order_and_shards():
    data = torch.arange(20.0).reshape(20, 1)
    got = [x[:, 0].long().tolist() for x, _ in _draw(EpochLoader(data, None, 8, seed=7), 3)]
    perm0 = torch.randperm(20, generator=torch.Generator().manual_seed(7 * 1_000_003)).tolist()
    perm1 = torch.randperm(20, generator=torch.Generator().manual_seed(7 * 1_000_003 + 1)).tolist()
    assert got == [perm0[:8], perm0[8:16], perm1[:8]]
    shards = [sum((x[:, 0].long().tolist() for x, _ in _draw(EpochLoader(data, None, 5, 7, rank=r, world_size=2), 2)), [])
              for r in (0, 1)]
    assert sorted(shards[0] + shards[1]) == list(range(20))


@needs_dali
def test_factory_picks_loaders_and_explains_bad_choices(png_folder, latent_folder):
    root, _ = png_folder

    def loader_for(*overrides):
        cfg = load_config(None, ["train.batch_size=4", *overrides])
        return make_loader(cfg, open_dataset(cfg), "cpu")

    assert isinstance(loader_for(), EpochLoader)  # toy2d: memory
    assert isinstance(loader_for("data.kind=folder", f"data.path={root}", "data.resolution=16"), EpochLoader)
    assert isinstance(loader_for("data.kind=folder", f"data.path={root}", "data.resolution=16",
                                 "data.loader=torch"), TorchLoader)
    assert isinstance(loader_for("data.kind=folder", f"data.path={root}", "data.resolution=16",
                                 "data.loader=dali"), DaliLoader)
    sampled = loader_for("data.kind=latent", f"data.path={latent_folder}", "data.loader=dali")
    assert isinstance(sampled.loader, DaliLoader)
    x, y = sampled.next()
    assert x.shape == (4, 4, 4, 4) and y.shape == (4,)  # moments (8 channels) became latents (4)
    with pytest.raises(DataError, match="data.loader"):
        loader_for("data.loader=torch")  # a toy cannot stream
    with pytest.raises(DataError, match="data.latent_scale"):
        loader_for("data.kind=latent", f"data.path={latent_folder}", "data.latent_scale=[1, 2]").next()
    with pytest.raises(DataError, match="dataset.json"):
        loader_for("data.kind=latent", f"data.path={root}")


@pytest.mark.parametrize("kind", ["torch", pytest.param("dali", marks=needs_dali)])
def test_training_on_a_streaming_loader_resumes_exactly(kind, latent_folder, tmp_path):
    """The loop saves the streaming loader's data position (and the latent draws) and a re-run resumes there."""
    from safetensors.torch import load_file

    from fastonestep.engine.loop import train

    def cfg(steps):
        return load_config(None, ["method=edm", "data.kind=latent", f"data.path={latent_folder}",
                                  f"data.loader={kind}", "network.kind=unet", "network.channels=8",
                                  "network.channel_mult=[1, 2]", f"train.steps={steps}", "train.batch_size=5",
                                  "train.log_every=1", "train.checkpoint_every=3", "eval.num_samples=4",
                                  "eval.batch_size=4", "eval.grid=2", "diffusion.sample_steps=2",
                                  "train.ema_halflife_kimg=0"])

    quiet = dict(progress=False, log=lambda *_: None)
    train(cfg(5), str(tmp_path / "full"), **quiet)
    train(cfg(3), str(tmp_path / "split"), **quiet)  # stops mid-epoch 1 (2 batches per epoch)
    train(cfg(5), str(tmp_path / "split"), **quiet)
    full, split = (load_file(str(tmp_path / r / "model.safetensors")) for r in ("full", "split"))
    assert full.keys() == split.keys() and all(torch.equal(full[k], split[k]) for k in full)


@pytest.mark.parametrize("kind", ["memory", "torch", pytest.param("dali", marks=needs_dali)])
def test_ranks_together_draw_what_one_process_draws(kind, latent_folder):
    """Global-batch semantics: rank r gets rows [r*L, (r+1)*L) of the single-process batch (latents sampled
    included), every rank saves the same data position, and a run may resume on another number of ranks."""
    cfg = load_config(None, ["data.kind=latent", f"data.path={latent_folder}", f"data.loader={kind}",
                             "train.batch_size=6", "seed=2"])
    single = _draw(make_loader(cfg, open_dataset(cfg), "cpu"), 3)
    shards = [make_loader(cfg, open_dataset(cfg), "cpu", rank=r, world_size=2) for r in (0, 1)]
    drawn = [_draw(s, 3) for s in shards]
    for k in range(3):
        assert torch.equal(torch.cat([drawn[0][k][0], drawn[1][k][0]]), single[k][0])
        assert torch.equal(torch.cat([drawn[0][k][1], drawn[1][k][1]]), single[k][1])
    state = shards[0].state_dict()
    assert state == shards[1].state_dict()
    resumed = make_loader(cfg, open_dataset(cfg), "cpu")  # 2 processes -> 1
    resumed.load_state_dict(state)
    first = make_loader(cfg, open_dataset(cfg), "cpu")
    _assert_same(_draw(first, 5)[3:], _draw(resumed, 2))


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_torch_loader_readers_outlive_a_stop_signal(sig, latent_folder):
    """A signal sent to the whole process group (Ctrl-C, a scheduler) reaches the reader processes too; they leave it
    to the training process (engine/stop.py), which still needs them to finish its step."""
    import signal
    import time

    ds = scan_latent_folder(latent_folder)
    loader, plain = TorchLoader(ds, 5, seed=1, workers=1), TorchLoader(ds, 5, seed=1)
    first = loader.next()
    worker = loader._iter._workers[0]
    os.kill(worker.pid, getattr(signal, sig))
    time.sleep(0.5)
    assert worker.is_alive()
    _assert_same([first, *_draw(loader, 4)], _draw(plain, 5))
    loader.close()


def test_a_reader_error_ends_the_run_instead_of_hanging_it(tmp_path):
    """Torch-loader readers ignore SIGTERM (a preemption notice is the training process's to handle); left to
    the interpreter's exit after an error they were sent SIGTERM and waited for forever. The run now stops its
    readers itself and exits with the error."""
    import subprocess
    import sys

    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(4):
        Image.new("RGB", (32, 32), (40 * i, 90, 200)).save(folder / f"{i}.jpg")
    whole = (folder / "2.jpg").read_bytes()
    (folder / "2.jpg").write_bytes(whole[:len(whole) // 2])  # truncated: fails when decoded, not when listed
    preset = Path(__file__).resolve().parents[1] / "configs" / "mnist" / "teacher.yaml"
    done = subprocess.run([sys.executable, "-m", "fastonestep", "train", str(preset), "data.kind=folder",
                           f"data.path={folder}", "data.loader=torch", "data.workers=1", "data.resolution=32",
                           "train.batch_size=2", "train.steps=5", "network.channels=8", "--out", str(tmp_path / "run"),
                           "--no-progress"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    # one line naming the file, not the reader process's traceback
    assert done.stderr.strip().startswith("fastonestep: error: cannot read image") and "2.jpg" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_the_memory_loader_cuts_the_same_pixels_as_the_streaming_loaders(tmp_path):
    """data.loader=auto keeps a small folder in memory: it must hold exactly what the torch (and DALI) loaders
    read. Odd, non-square sizes that need resizing (the crop's odd margin after the resize), and a folder whose
    first file is grayscale but another is colour (both read it as RGB)."""
    from fastonestep.data.images import load_image_folder

    rng = np.random.default_rng(5)
    sizes = [(23, 16), (16, 21), (50, 37), (16, 16)]
    _write_png(str(tmp_path / "0.png"), rng.integers(0, 256, (19, 26), dtype=np.uint8))  # grayscale, first
    for i, (h, w) in enumerate(sizes, start=1):
        _write_png(str(tmp_path / f"{i}.png"), rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    in_memory, _, _ = load_image_folder(str(tmp_path), 16)
    ds = scan_image_folder(str(tmp_path), 16)
    assert ds.shape == tuple(in_memory.shape[1:]) == (3, 16, 16)
    (streamed, _), = _draw(TorchLoader(ds, 5, seed=0), 1)
    order = EpochOrder(5, 5, seed=0)
    _, idx, _ = order.batch(0)
    assert torch.equal(streamed, in_memory[torch.as_tensor(idx)])


@pytest.mark.parametrize("loader", ["torch", "dali", "auto"])
def test_a_missing_data_path_is_named_whatever_the_loader(loader):
    cfg = load_config(None, ["method=edm", "data.kind=folder", "data.path=/no/such/folder", f"data.loader={loader}"])
    with pytest.raises(DataError, match="'/no/such/folder' does not exist"):
        open_dataset(cfg)


@needs_dali
def test_a_file_dali_cannot_decode_is_named(tmp_path):
    for i in range(4):
        _write_png(str(tmp_path / f"{i}.png"), np.full((16, 16, 3), 40 * i, dtype=np.uint8))
    whole = (tmp_path / "2.png").read_bytes()
    (tmp_path / "2.png").write_bytes(whole[:len(whole) // 2])
    loader = DaliLoader(scan_image_folder(str(tmp_path), 16), 4, seed=0)
    with pytest.raises(DataError, match="cannot read image .*2.png"):
        loader.next()
