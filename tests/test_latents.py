"""Latent pipeline: `dataset encode` stores the VAE's own posterior moments, decoding inverts the latent scaling,
latents are sampled per channel as documented, and a latent dataset trains a tiny UNet end to end and samples
back to images with `fastonestep sample --vae`."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import save_tiny_vae
from fastonestep.cli import main
from fastonestep.config import load_config
from fastonestep.data.latents import (EDM2_BIAS, EDM2_SCALE, LatentSampling, decode_latents, load_vae,
                                      sample_latents)
from fastonestep.data.loaders import make_loader, open_dataset

diffusers = pytest.importorskip("diffusers", reason="latent datasets need the optional 'latent' extra (diffusers)")

RES = 8  # images 8x8 -> latents 4 x 4x4 (one downsampling)
SCALE, BIAS = [0.5, 1.0, 2.0, 0.25], [0.1, -0.2, 0.0, 0.3]


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    return save_tiny_vae(str(tmp_path_factory.mktemp("vae")))


@pytest.fixture(scope="module")
def encoded(tmp_path_factory, vae_dir):
    """4 PNGs (2 classes) encoded through the CLI. Returns (image paths in file order, out dir)."""
    images = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    paths = []
    for i in range(4):
        path = images / ("a" if i < 2 else "b") / f"{i}.png"
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (RES, RES, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    out = str(tmp_path_factory.mktemp("latents"))
    assert main(["dataset", "encode", str(images), "--vae", vae_dir, "--out", out, "--resolution", str(RES),
                 "--batch", "3"]) == 0  # 3 + a partial batch of 1
    return paths, out


def test_encode_stores_the_vae_posterior_moments(encoded, vae_dir):
    paths, out = encoded
    meta = json.load(open(os.path.join(out, "dataset.json")))
    assert meta["latent_channels"] == 4 and meta["resolution"] == RES and meta["class_names"] == ["a", "b"]
    assert [lab for _, lab in meta["labels"]] == [0, 0, 1, 1]
    vae = load_vae(vae_dir)
    for path, (name, _) in zip(paths, meta["labels"]):
        x = torch.from_numpy(np.asarray(Image.open(path), dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
        with torch.no_grad():
            dist = vae.encode(x).latent_dist
        stored = torch.from_numpy(np.load(os.path.join(out, name)))
        assert stored.shape == (8, RES // 2, RES // 2) and stored.dtype == torch.float32
        torch.testing.assert_close(stored[:4], dist.mean[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(stored[4:], dist.std[0], rtol=1e-5, atol=1e-5)


def test_decode_inverts_the_latent_scaling(encoded, vae_dir):
    _, out = encoded
    vae = load_vae(vae_dir)
    mean = torch.stack([torch.from_numpy(np.load(os.path.join(out, n)))[:4]
                        for n, _ in json.load(open(os.path.join(out, "dataset.json")))["labels"]])
    scaled = mean * torch.tensor(SCALE).view(1, 4, 1, 1) + torch.tensor(BIAS).view(1, 4, 1, 1)
    with torch.no_grad():
        direct = vae.decode(mean).sample.clamp(-1, 1)
    torch.testing.assert_close(decode_latents(vae, scaled, SCALE, BIAS, batch_size=3), direct, rtol=1e-4, atol=1e-5)


def test_sample_latents_per_channel_and_resumable():
    mean = torch.randn(4000, 4, 2, 2)
    std = torch.rand(1, 4, 1, 1) + 0.5
    moments = torch.cat([mean, std.expand_as(mean)], dim=1)
    x = sample_latents(moments, SCALE, BIAS, seed=11, impl="torch")
    resid = (x - (mean * torch.tensor(SCALE).view(1, 4, 1, 1) + torch.tensor(BIAS).view(1, 4, 1, 1)))
    resid = resid / (std * torch.tensor(SCALE).view(1, 4, 1, 1))  # must be z ~ N(0, 1) in every channel
    per_channel = resid.transpose(0, 1).reshape(4, -1)
    assert per_channel.mean(1).abs().max() < 0.05 and (per_channel.std(1) - 1).abs().max() < 0.05
    assert torch.equal(x, sample_latents(moments, SCALE, BIAS, seed=11, impl="torch"))
    assert not torch.equal(x, sample_latents(moments, SCALE, BIAS, seed=12, impl="torch"))

    class Fixed:  # a loader of moments
        def next(self):
            return moments[:8], None

        def state_dict(self):
            return {}

        def load_state_dict(self, state):
            pass

    a = LatentSampling(Fixed(), SCALE, BIAS, seed=3)
    draws = [a.next()[0] for _ in range(3)]
    b = LatentSampling(Fixed(), SCALE, BIAS, seed=3)
    b.load_state_dict({"latent_draws": 2})
    assert torch.equal(b.next()[0], draws[2]) and not torch.equal(draws[1], draws[2])


def test_edm2_default_scaling():
    cfg = load_config(None, [])
    assert cfg.data.latent_scale == pytest.approx(EDM2_SCALE) and cfg.data.latent_bias == pytest.approx(EDM2_BIAS)
    assert EDM2_SCALE[0] == pytest.approx(0.5 / 4.17) and EDM2_BIAS[3] == pytest.approx(2.15 * 0.5 / 3.28)


def test_latent_dataset_trains_and_samples_back_to_images(encoded, vae_dir, tmp_path, capsys):
    _, out = encoded
    from fastonestep.engine.export import read_info
    from fastonestep.engine.loop import train

    overrides = ["method=edm", "data.kind=latent", f"data.path={out}", "data.class_conditional=true",
                 "network.kind=unet", "network.channels=8", "network.channel_mult=[1, 2]", "train.steps=2",
                 "train.batch_size=2", "train.log_every=1", "train.checkpoint_every=1", "eval.num_samples=4",
                 "eval.batch_size=4", "eval.grid=2", "diffusion.sample_steps=2", "eval.teacher_fd=false",
                 f"data.latent_scale={SCALE}", f"data.latent_bias={BIAS}"]
    cfg = load_config(None, overrides)
    loader = make_loader(cfg, open_dataset(cfg), "cpu")
    x, y = loader.next()
    assert x.shape == (2, 4, 4, 4) and y.shape == (2,)
    run = str(tmp_path / "run")
    train(cfg, run, progress=False, log=lambda *_: None)
    info = read_info(os.path.join(run, "model.safetensors"))
    assert info["data_kind"] == "latent" and info["data_shape"] == [4, 4, 4]
    assert info["latent_scale"] == SCALE and info["latent_bias"] == BIAS

    png, npz = str(tmp_path / "s.png"), str(tmp_path / "s.npz")
    assert main(["sample", run, "--num", "4", "--steps", "2", "--out", png, "--npz", npz, "--vae", vae_dir]) == 0
    images = np.load(npz)["samples"]
    assert images.shape == (4, 3, RES, RES) and images.min() >= -1 and images.max() <= 1
    assert Image.open(png).mode == "RGB"
    capsys.readouterr()
    assert main(["sample", run, "--num", "4", "--steps", "2", "--out", png]) == 2  # latents need --vae
    assert "--vae" in capsys.readouterr().err


def test_fused_latent_sampling_matches_its_own_noise():
    """impl="triton" (the interpreter on CPU, set up by conftest) computes the same map with the kernel's z."""
    from fastonestep.losses import impl_available

    if not impl_available("triton")[0]:
        pytest.skip("Triton kernels unavailable")
    from fastonestep.kernels.triton_noise import regenerate_noise

    moments = torch.randn(2, 8, 4, 4)
    x = sample_latents(moments, SCALE, BIAS, seed=5, impl="triton")
    z = regenerate_noise((2, 4, 4, 4), 5, stream="latent")
    ref = (moments[:, :4] + moments[:, 4:] * z) * torch.tensor(SCALE).view(1, 4, 1, 1) + torch.tensor(BIAS).view(1, 4, 1, 1)
    torch.testing.assert_close(x, ref, rtol=1e-6, atol=1e-6)


def test_an_encode_resumes_only_with_the_same_inputs(encoded, vae_dir, tmp_path, capsys):
    """Latent files are matched to images by position: a resumed encode with another VAE, or with an image added
    to the folder, would mix encodes or shift latents against their labels. Both are refused, before and after
    the encode finished (a killed encode has its progress record, not yet dataset.json)."""
    import shutil

    paths, out = encoded
    images = os.path.dirname(os.path.dirname(paths[0]))
    partial = str(tmp_path / "partial")
    shutil.copytree(out, partial)
    os.remove(os.path.join(partial, "dataset.json"))  # killed after its files, before dataset.json
    os.remove(os.path.join(partial, json.load(open(os.path.join(out, "dataset.json")))["labels"][3][0]))
    progress = {**json.load(open(os.path.join(out, "dataset.json")))}
    progress.pop("labels"), progress.pop("latent_channels")
    with open(os.path.join(partial, "encode-progress.json"), "w") as f:
        json.dump(progress, f)
    other_vae = str(tmp_path / "other-vae")
    shutil.copytree(vae_dir, other_vae)
    args = ["dataset", "encode", images, "--out", partial, "--resolution", str(RES)]
    assert main(args + ["--vae", other_vae]) == 2
    assert "different encode (vae differ" in capsys.readouterr().err
    added, added_out = tmp_path / "added", str(tmp_path / "added-latents")
    shutil.copytree(images, added)
    again = ["dataset", "encode", str(added), "--vae", vae_dir, "--out", added_out, "--resolution", str(RES)]
    assert main(again) == 0
    Image.fromarray(np.zeros((RES, RES, 3), dtype=np.uint8)).save(added / "a" / "1b.png")  # sorts before b/2.png
    assert main(again) == 2  # a finished encode too
    assert "(num_images, files_sha256 differ; 4 images then, 5 now)" in capsys.readouterr().err
    assert main(args + ["--vae", vae_dir]) == 0  # the same inputs: resumes, encodes the missing file
    resumed = json.load(open(os.path.join(partial, "dataset.json")))
    assert resumed["labels"] == json.load(open(os.path.join(out, "dataset.json")))["labels"]
    assert not os.path.exists(os.path.join(partial, "encode-progress.json"))
    name = resumed["labels"][3][0]
    np.testing.assert_array_equal(np.load(os.path.join(partial, name)), np.load(os.path.join(out, name)))
