"""Evaluation: Frechet distance, toy metrics, and MNIST FD with the locally trained classifier."""
import importlib
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fastonestep.data import DataError, load_mnist, make_toy
from fastonestep.eval import (class_coverage, energy_distance, feature_stats, frechet_distance,
                              get_mnist_classifier, load_stats, log_likelihood, mmd_rbf, mnist_fd,
                              mnist_features, mode_stats, save_stats, toy_metrics)

# The submodule shares its name with the function exported by fastonestep.eval, so fetch it explicitly.
mnist_features_module = importlib.import_module("fastonestep.eval.mnist_features")


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------------------ frechet

def test_frechet_distance_matches_closed_form_for_diagonal_covariances():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    s1, s2 = rng.uniform(0.1, 3, size=6), rng.uniform(0.1, 3, size=6)
    expected = ((mu1 - mu2) ** 2).sum() + (s1 + s2 - 2 * np.sqrt(s1 * s2)).sum()
    assert frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expected, rel=1e-10)
    # Commuting covariances (same eigenbasis): FD is invariant under a shared rotation.
    q, _ = np.linalg.qr(rng.normal(size=(6, 6)))
    rotated = frechet_distance(q @ mu1, q @ np.diag(s1) @ q.T, q @ mu2, q @ np.diag(s2) @ q.T)
    assert rotated == pytest.approx(expected, rel=1e-8)


def test_frechet_distance_general_case_agrees_with_scipy():
    linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(5, 5)), rng.normal(size=(5, 5))
    s1, s2 = a @ a.T, b @ b.T
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    reference = ((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * linalg.sqrtm(s1 @ s2).real)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(reference, rel=1e-8)


def test_frechet_distance_of_a_set_with_itself_is_zero_even_when_singular():
    feats = np.random.default_rng(2).normal(size=(50, 80))  # N < F: singular covariance
    mu, sigma = feature_stats(feats)
    assert frechet_distance(mu, sigma, mu, sigma) < 1e-8 * np.trace(sigma)
    with pytest.raises(ValueError, match="shape mismatch"):
        frechet_distance(mu, sigma, mu[:3], sigma)


def test_feature_stats_and_stats_file_round_trip(tmp_path):
    feats = torch.randn(100, 4, generator=_gen())
    mu, sigma = feature_stats(feats)
    assert mu.dtype == np.float64 and sigma.shape == (4, 4)
    assert np.allclose(sigma, np.cov(feats.double().numpy(), rowvar=False))
    path = tmp_path / "sub" / "ref.npz"
    save_stats(str(path), mu, sigma)
    assert os.listdir(path.parent) == ["ref.npz"]  # no temporary file left behind
    mu2, sigma2 = load_stats(str(path))
    assert np.array_equal(mu, mu2) and np.array_equal(sigma, sigma2)


def test_load_stats_errors(tmp_path):
    with pytest.raises(DataError, match="'.*none.npz' does not exist"):
        load_stats(str(tmp_path / "none.npz"))
    np.savez(tmp_path / "partial.npz", mu=np.zeros(3), other=np.zeros(3))
    with pytest.raises(DataError, match=r"no array 'sigma' \(found: mu, other\)"):
        load_stats(str(tmp_path / "partial.npz"))


# --------------------------------------------------------------------------------------- toy metrics

def test_energy_distance_and_mmd_separate_shifted_samples():
    grid = make_toy("grid25")
    x, y = grid.sample(1000, _gen(0)), grid.sample(1000, _gen(1))
    shifted = y + torch.tensor([0.15, 0.0])
    same_ed, shifted_ed = energy_distance(x, y), energy_distance(x, shifted)
    same_mmd, shifted_mmd = mmd_rbf(x, y), mmd_rbf(x, shifted)
    assert abs(same_ed) < 5e-3 and shifted_ed > 10 * max(abs(same_ed), 1e-3)
    assert abs(same_mmd) < 1e-3 and shifted_mmd > 10 * max(abs(same_mmd), 1e-4)


def test_mode_stats_counts_only_the_modes_sampled():
    grid = make_toy("grid25")
    x, modes = grid.sample(5000, _gen(), return_components=True)
    full = mode_stats(x, grid)
    assert full["modes_covered"] == 25 and full["num_modes"] == 25
    assert abs(full["hq_fraction"] - (1 - math.exp(-4.5))) < 0.01  # 3-std disc in 2-D
    assert full["mode_kl"] < 0.02
    keep = torch.isin(modes, torch.arange(0, 25, 25 // 10)[:10])  # 10 of the 25 modes
    partial = mode_stats(x[keep], grid)
    assert partial["modes_covered"] == 10
    assert partial["mode_kl"] == pytest.approx(math.log(25 / 10), abs=0.05)
    assert mode_stats(x + 0.5, grid)["hq_fraction"] == 0.0  # everything between the modes


def test_log_likelihood_uses_the_exact_density():
    grid = make_toy("grid25")
    entropy = math.log(25) + math.log(2 * math.pi * math.e * 0.05**2)
    assert log_likelihood(grid.sample(5000, _gen()), grid) == pytest.approx(-entropy, abs=0.05)
    with pytest.raises(NotImplementedError):
        log_likelihood(torch.zeros(4, 2), make_toy("moons"))


def test_toy_metrics_reports_what_applies():
    grid, rings, moons = make_toy("grid25"), make_toy("rings"), make_toy("moons")
    g = toy_metrics(grid.sample(600, _gen(1)), grid, num_ref=500, generator=_gen(2))
    assert {"energy_distance", "mmd_rbf", "modes_covered", "hq_fraction", "log_likelihood",
            "ref_log_likelihood", "nonfinite_fraction"} <= set(g)
    assert g["modes_covered"] == 25 and abs(g["log_likelihood"] - g["ref_log_likelihood"]) < 0.2
    r = toy_metrics(rings.sample(500, _gen(1)), rings, num_ref=500, generator=_gen(2))
    assert "log_likelihood" in r and "modes_covered" not in r
    samples = moons.sample(500, _gen(1))
    samples[0] = float("nan")
    m = toy_metrics(samples, moons, num_ref=500, generator=_gen(2))
    assert "log_likelihood" not in m and m["nonfinite_fraction"] == pytest.approx(1 / 500)
    assert math.isfinite(m["energy_distance"])


# ---------------------------------------------------------------------------------------- MNIST FD

@pytest.fixture(scope="session")
def mnist_setup(cache_dir):
    """Train the classifier once per test session, in the session cache every MNIST test shares."""
    cache = cache_dir
    model = get_mnist_classifier(str(cache))
    images, labels = load_mnist()
    return model, str(cache), images, labels


def test_classifier_is_accurate_and_cached(mnist_setup):
    model, cache, _, _ = mnist_setup
    assert not model.training
    assert model.heldout_accuracy > 0.9
    # the classifier's file alone (atomic: no temporary left); other tests build into folders of the same cache
    files = [f for f in os.listdir(cache) if os.path.isfile(os.path.join(cache, f))]
    assert files == [f"{mnist_features_module.CLASSIFIER_VERSION}.safetensors"]
    again = get_mnist_classifier(cache)  # loads, does not retrain
    assert again.heldout_accuracy == pytest.approx(model.heldout_accuracy, abs=1e-4)
    for a, b in zip(model.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)


def test_corrupt_cache_file_is_ignored(tmp_path):
    path = tmp_path / "weights.safetensors"
    path.write_bytes(b"truncated")
    assert mnist_features_module._load(str(path)) is None


def test_mnist_fd_ranks_real_above_noise_and_blur(mnist_setup):
    model, _, images, _ = mnist_setup
    order = torch.randperm(len(images), generator=_gen())
    half_a, half_b = images[order[:2500]], images[order[2500:]]
    feats = mnist_features(model, half_a[:10])
    assert feats.shape == (10, 128) and feats.dtype == np.float64
    real = mnist_fd(half_a, half_b, model=model)
    noise = mnist_fd(half_a, torch.rand(2500, 1, 32, 32, generator=_gen(1)) * 2 - 1, model=model)
    blurred = mnist_fd(half_a, F.avg_pool2d(half_b, 5, stride=1, padding=2, count_include_pad=False), model=model)
    assert real < noise / 100 and real < blurred / 20
    assert mnist_fd(half_a, model=model) < blurred / 20  # default reference: the 5k MNIST set
    with pytest.raises(ValueError, match=r"\(N, 1, 32, 32\)"):
        mnist_features(model, torch.zeros(2, 1, 28, 28))


def test_class_coverage(mnist_setup):
    model, _, images, labels = mnist_setup
    real = class_coverage(model, images)
    assert real["num_classes_covered"] == 10
    assert sum(real["class_histogram"]) == 5000
    assert real["kl_to_uniform"] < 0.01 and real["mean_confidence"] > 0.8
    ones = class_coverage(model, images[labels == 1][:200])
    assert ones["num_classes_covered"] <= 2 and ones["class_histogram"][1] >= 190  # a few misread ones
    assert ones["kl_to_uniform"] > 1.5


def test_mnist_sample_metrics_add_prdc_in_classifier_features_and_keep_mnist_fd(mnist_setup):
    from fastonestep.data import make_dataset
    from fastonestep.engine.evaluate import sample_metrics

    model, _, _, _ = mnist_setup
    dataset = make_dataset("mnist", size=1000, seed=0)
    samples = load_mnist()[0][torch.randperm(5000, generator=_gen(3))[:300]]
    m = sample_metrics(samples, dataset)
    assert m["feature_space"] == "mnist"
    assert m["mnist_fd"] == pytest.approx(mnist_fd(samples, dataset.data, model=model), rel=1e-9)  # as before
    assert m["num_classes_covered"] == 10
    # Real digits against real digits: high fidelity and coverage. Uniform noise lands in one small region of
    # the classifier's feature space (seen: precision 0.1, coverage 0.003, diversity 3.4 vs 22 for digits).
    assert m["precision"] > 0.8 and m["coverage"] > 0.8 and m["diversity"] == pytest.approx(m["ref_diversity"], rel=0.1)
    noise = sample_metrics(torch.rand(300, 1, 32, 32, generator=_gen(4)) * 2 - 1, dataset)
    assert noise["recall"] < 0.05 and noise["coverage"] < 0.05 and noise["mnist_fd"] > 10 * m["mnist_fd"]
    assert noise["diversity"] < 0.3 * noise["ref_diversity"]
