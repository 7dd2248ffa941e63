"""Evaluation of latent data: raw features against the latents as training draws them (not the stored
moments), the FID of latents decoded by eval.vae, and the settings refused before training."""
import json
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from conftest import save_tiny_vae, stand_in_inception_features, use_stand_in_inception
from fastonestep.data.datasets import LatentTensorDataset
from fastonestep.data.errors import DataError
from fastonestep.engine.evaluate import EVAL_SEED, sample_metrics
from fastonestep.eval.features import check_eval_settings
from fastonestep.eval.frechet import feature_stats, frechet_distance, save_stats

diffusers = pytest.importorskip("diffusers", reason="latent datasets need the optional 'latent' extra (diffusers)")

SCALE, BIAS = [0.5, 1.0, 2.0, 0.25], [0.1, -0.2, 0.0, 0.3]
DATA = SimpleNamespace(latent_scale=SCALE, latent_bias=BIAS)


def _eval_cfg(**kw):
    return SimpleNamespace(**{"features": "auto", "inception": "", "fid_ref": "", "vae": "", "prdc_k": 3,
                              "batch_size": 5, **kw})


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    return save_tiny_vae(str(tmp_path_factory.mktemp("vae")))


@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory):
    """A random-init FID InceptionV3 state dict (no real weights exist here), as in tests/test_inception.py."""
    from fastonestep.eval.inception import FIDInceptionV3

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("inception") / "pt_inception-random.pth"
    torch.save(FIDInceptionV3().state_dict(), path)
    return str(path)


def _moments(n=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    mean = torch.randn(n, 4, 4, 4, generator=g) * 3 + 1
    std = torch.rand(n, 4, 4, 4, generator=g) + 0.5
    return torch.cat([mean, std], 1)


def test_raw_features_compare_with_latents_as_training_draws_them():
    """The reference of latent data is mean + std * z (z from the eval seed), scaled and biased: C channels
    like the samples. The moments themselves (2C channels) gave a dimension mismatch after training."""
    dataset = LatentTensorDataset(_moments(), name="lat")
    samples = torch.randn(16, 4, 4, 4, generator=torch.Generator().manual_seed(5))
    metrics = sample_metrics(samples, dataset, _eval_cfg(features="raw"), DATA)

    mean, std = dataset.data.chunk(2, 1)
    z = torch.randn(mean.shape, generator=torch.Generator().manual_seed(EVAL_SEED))
    scale, bias = torch.tensor(SCALE).view(1, -1, 1, 1), torch.tensor(BIAS).view(1, -1, 1, 1)
    reference = ((mean + std * z) * scale + bias).flatten(1).double().numpy()
    want = frechet_distance(*feature_stats(samples.flatten(1).double().numpy()), *feature_stats(reference))
    assert metrics["feature_space"] == "raw" and metrics["raw_fd"] == pytest.approx(want, rel=1e-9)
    assert sample_metrics(samples, dataset, _eval_cfg(features="raw"), DATA) == metrics  # fixed z: reproducible


def test_latent_data_need_their_scale_and_bias():
    dataset = LatentTensorDataset(_moments(), name="lat")
    with pytest.raises(ValueError, match="data.latent_scale"):
        sample_metrics(torch.zeros(4, 4, 4, 4), dataset, _eval_cfg(features="raw"))


def test_fid_of_latents_decodes_them_with_eval_vae(vae_dir, monkeypatch, tmp_path):
    """Generated latents are decoded by eval.vae (scale and bias undone) and measured in the image features,
    against eval.fid_ref; the Inception network is a stand-in feature map (3 numbers per image)."""
    from fastonestep.data.latents import decode_latents, load_vae

    seen = use_stand_in_inception(monkeypatch)
    ref = str(tmp_path / "ref.npz")
    ref_mu, ref_sigma = np.array([0.0, 0.5, 0.1]), np.diag([0.1, 0.2, 0.3])
    save_stats(ref, ref_mu, ref_sigma)
    dataset = LatentTensorDataset(_moments(), name="lat")
    samples = torch.randn(12, 4, 4, 4, generator=torch.Generator().manual_seed(3))
    cfg = _eval_cfg(features="inception", inception="w.pth", fid_ref=ref, vae=vae_dir)
    metrics = sample_metrics(samples, dataset, cfg, DATA, device="cpu")

    images = decode_latents(load_vae(vae_dir), samples, SCALE, BIAS)
    want = frechet_distance(*feature_stats(stand_in_inception_features(images)), ref_mu, ref_sigma)
    assert metrics["feature_space"] == "inception" and metrics["fid"] == pytest.approx(want, rel=1e-9)
    assert {tuple(x.shape[1:]) for x in seen} == {(3, 8, 8)}  # images, never latents
    assert {"precision", "recall", "coverage"} <= set(metrics)  # against decoded reference latents


def test_settings_refused_before_training(vae_dir, inception_weights, tmp_path):
    latents = (4, 4, 4)
    junk = tmp_path / "not-weights.pth"
    junk.write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="eval.vae"):  # inception for latents, nothing to decode them
        check_eval_settings(_eval_cfg(features="inception", inception=inception_weights), latents)
    with pytest.raises(ValueError, match="eval.vae"):  # auto + eval.inception used to skip the shape check
        check_eval_settings(_eval_cfg(inception=inception_weights), latents)
    with pytest.raises(DataError, match="cannot read Inception weights"):  # used to fail after training
        check_eval_settings(_eval_cfg(inception=str(junk)), (3, 16, 16))
    with pytest.raises(ValueError, match="eval.fid_ref"):  # decoded latents are no FID reference
        check_eval_settings(_eval_cfg(inception=inception_weights, vae=vae_dir), latents)
    with pytest.raises(DataError, match="decodes 4-channel latents"):
        check_eval_settings(_eval_cfg(vae=vae_dir, features="raw"), (8, 4, 4))
    broken = tmp_path / "broken-vae"
    broken.mkdir()
    (broken / "config.json").write_text(open(os.path.join(vae_dir, "config.json")).read())
    with pytest.raises(DataError, match="cannot load an AutoencoderKL"):
        check_eval_settings(_eval_cfg(vae=str(broken)), latents)
    wrong_dim = str(tmp_path / "wrong.npz")
    save_stats(wrong_dim, np.zeros(3), np.eye(3))
    with pytest.raises(ValueError, match="dimension"):
        check_eval_settings(_eval_cfg(inception=inception_weights, vae=vae_dir, fid_ref=wrong_dim), latents)
    streamed = SimpleNamespace(data=None)
    with pytest.raises(ValueError, match="eval.fid_ref"):
        check_eval_settings(_eval_cfg(inception=inception_weights), (3, 16, 16), dataset=streamed)
    good_ref = str(tmp_path / "good.npz")
    save_stats(good_ref, np.zeros(2048), np.eye(2048))
    check_eval_settings(_eval_cfg(features="inception", inception=inception_weights, vae=vae_dir, fid_ref=good_ref),
                        latents)


def test_imagenet512_presets_name_the_keys_fid_needs():
    from fastonestep.config import load_config

    root = os.path.join(os.path.dirname(__file__), "..", "configs", "imagenet512")
    for name in sorted(os.listdir(root)):
        cfg = load_config(os.path.join(root, name), ["teacher=/nowhere"])
        assert cfg.eval.features == "inception", name
        with pytest.raises(ValueError) as err:
            check_eval_settings(cfg.eval, tuple(cfg.data.shape))
        assert all(key in str(err.value) for key in ("eval.vae", "eval.inception", "eval.fid_ref")), name


def test_latent_run_skips_unmeasurable_samples_then_gets_an_fid_from_eval_vae(vae_dir, inception_weights,
                                                                             tmp_path, capsys):
    """Without eval.vae / eval.inception nothing measures latents: the final evaluation draws only the sample
    grid, says why, and does not spend eval.num_samples. `fastonestep eval RUN --vae --inception --fid-ref`
    then decodes the run's samples and measures their FID (random Inception weights)."""
    from PIL import Image

    from fastonestep.cli import main
    from fastonestep.config import load_config
    from fastonestep.engine.loop import train

    images = tmp_path / "images"
    rng = np.random.default_rng(0)
    for i in range(4):
        (images / "a").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(images / "a" / f"{i}.png")
    latents = str(tmp_path / "latents")
    assert main(["dataset", "encode", str(images), "--vae", vae_dir, "--out", latents, "--resolution", "8"]) == 0
    cfg = load_config(None, ["method=edm", "data.kind=latent", f"data.path={latents}", "network.kind=unet",
                             "network.channels=8", "network.channel_mult=[1, 2]", "train.steps=1",
                             "train.batch_size=2", "train.checkpoint_every=1", "eval.num_samples=64",
                             "eval.batch_size=4", "eval.grid=2", "diffusion.sample_steps=2",
                             f"data.latent_scale={SCALE}", f"data.latent_bias={BIAS}"])
    run, logs = str(tmp_path / "run"), []
    metrics = train(cfg, run, progress=False, log=logs.append)
    first = next(iter(metrics.values()))  # the run's model
    assert first["num_samples"] == 4 and "eval.vae" in first["not_measured"]
    assert any("not eval.num_samples=64" in line for line in logs)

    ref = str(tmp_path / "ref.npz")
    assert main(["eval", str(images), "--ref", str(images), "--inception", inception_weights, "--save-stats", ref]) == 0
    capsys.readouterr()
    assert main(["eval", run, "--vae", vae_dir, "--inception", inception_weights, "--fid-ref", ref,
                 "--features", "inception", "--num", "4"]) == 0
    with open(os.path.join(run, "metrics.json"), encoding="utf-8") as f:
        first = next(iter(json.load(f).values()))
    assert np.isfinite(first["fid"]) and first["num_samples"] == 4
    assert Image.open(os.path.join(run, "samples.png")).mode == "RGB"  # decoded for the grid too
