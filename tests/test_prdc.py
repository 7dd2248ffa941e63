"""Precision / recall / density / coverage, diversity, and the pluggable feature spaces of evaluation."""
import math

import numpy as np
import pytest
import torch

from conftest import stand_in_inception_features, use_stand_in_inception
from fastonestep.data import make_dataset, make_toy
from fastonestep.engine.evaluate import sample_metrics
from fastonestep.eval import compare_features, diversity, feature_stats, frechet_distance, make_features, prdc
from fastonestep.eval.features import resolve_kind


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------------------------ PRDC

@pytest.mark.parametrize("k", [1, 3, 5])
def test_identical_sets(k):
    x = torch.randn(300, 4, generator=_gen())
    r = prdc(x, x.clone(), k=k)
    assert r["precision"] == r["recall"] == r["coverage"] == 1.0
    # Each real ball holds its centre and its k nearest neighbours (no ties in continuous data), so the
    # ball memberships of the generated copies sum to (k + 1) N: density = (k + 1) / k exactly.
    assert r["density"] == pytest.approx((k + 1) / k, abs=1e-12)


def test_disjoint_far_apart_sets_score_zero():
    x = torch.randn(200, 3, generator=_gen(0))
    y = torch.randn(150, 3, generator=_gen(1)) + 100.0
    r = prdc(x, y, k=5)
    assert r == {"precision": 0.0, "recall": 0.0, "density": 0.0, "coverage": 0.0, "prdc_k": 5}


def test_hand_computed_example():
    # Real {0, 1, 2, 3}: every 1-NN radius is 1. Generated {0.5, 10, 3.2}: 1-NN radii 2.7, 6.8, 2.7.
    real = np.array([[0.0], [1.0], [2.0], [3.0]])
    fake = np.array([[0.5], [10.0], [3.2]])
    r = prdc(real, fake, k=1)
    assert r["precision"] == pytest.approx(2 / 3)  # 0.5 (balls of 0 and 1) and 3.2 (ball of 3); 10 is in none
    assert r["recall"] == 1.0  # the ball of 0.5 (radius 2.7) holds 0..3 already
    assert r["density"] == pytest.approx((2 + 0 + 1) / 3)
    assert r["coverage"] == pytest.approx(3 / 4)  # 2's nearest generated point (3.2) is 1.2 > 1 away


def test_coverage_of_a_mixture_counts_the_modes_sampled():
    means = torch.tensor([[0.0, 0.0], [10, 0], [0, 10], [10, 10], [20, 20]])
    real = (means[:, None] + 0.3 * torch.randn(5, 100, 2, generator=_gen(0))).reshape(-1, 2)
    # Ten times more generated points, from 3 of the 5 modes: a real point of a sampled mode is covered
    # unless its 5 nearest neighbours in the pooled set are all real (probability ~ (1/11)^5).
    fake = (means[:3, None] + 0.3 * torch.randn(3, 1000, 2, generator=_gen(1))).reshape(-1, 2)
    r = prdc(real, fake, k=5)
    assert r["coverage"] == pytest.approx(3 / 5, abs=0.01)
    assert r["recall"] == pytest.approx(3 / 5, abs=0.01)
    assert r["precision"] > 0.98


def test_coverage_of_the_same_distribution_matches_its_expectation():
    # Naeem et al.: for real and fake from one distribution, E[coverage] = 1 - C(N-1, k) / C(N-1+M, k).
    n, m, k = 300, 300, 3
    expected = 1 - math.comb(n - 1, k) / math.comb(n - 1 + m, k)
    values = [prdc(torch.randn(n, 2, generator=_gen(s)), torch.randn(m, 2, generator=_gen(100 + s)), k)["coverage"]
              for s in range(8)]
    assert np.mean(values) == pytest.approx(expected, abs=0.015)


def test_prdc_errors():
    with pytest.raises(ValueError, match="k must be"):
        prdc(torch.randn(5, 2), torch.randn(5, 2), k=5)
    with pytest.raises(ValueError, match="dimension"):
        prdc(torch.randn(10, 2), torch.randn(10, 3), k=2)
    bad = torch.randn(10, 2)
    bad[3, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        prdc(torch.randn(10, 2), bad, k=2)


# ------------------------------------------------------------------------------------------ diversity

@pytest.mark.parametrize("n", [2, 5, 12])
def test_diversity_of_simplex_vertices(n):
    assert diversity(np.eye(n)) == pytest.approx(math.sqrt(2), rel=1e-12)  # every pair sqrt(2) apart


def test_diversity_of_a_regular_polygon():
    n = 7
    angle = 2 * math.pi * torch.arange(n, dtype=torch.float64) / n
    pts = torch.stack([angle.cos(), angle.sin()], dim=1)
    chord = sum(2 * math.sin(math.pi * j / n) for j in range(1, n)) / (n - 1)  # mean chord of a unit circle
    assert diversity(pts) == pytest.approx(chord, rel=1e-12)
    assert diversity(3 * pts) == pytest.approx(3 * chord, rel=1e-12)
    with pytest.raises(ValueError, match="at least 2"):
        diversity(pts[:1])


# --------------------------------------------------------------------------------------- features

def test_feature_kinds_resolve():
    assert resolve_kind("auto", (2,)) == "raw"
    assert resolve_kind("auto", (1, 32, 32)) == "mnist"
    assert resolve_kind("auto", (3, 64, 64)) is None
    assert resolve_kind("auto", (3, 64, 64), inception="w.pth") == "inception"
    with pytest.raises(ValueError, match="eval.features=mnist needs 1x32x32"):
        resolve_kind("mnist", (3, 32, 32))
    with pytest.raises(ValueError, match="eval.inception"):
        resolve_kind("inception", (3, 32, 32))
    with pytest.raises(ValueError, match="eval.features"):
        resolve_kind("clip", (2,))


def test_compare_features_fd_is_the_closed_form_and_stats_dims_are_checked():
    rng = np.random.default_rng(0)
    gen, ref = rng.normal(size=(400, 3)), rng.normal(size=(500, 3)) * 2 + 1
    out = compare_features(gen, "raw_fd", ref_feats=ref)
    assert out["raw_fd"] == pytest.approx(frechet_distance(*feature_stats(gen), *feature_stats(ref)), rel=1e-12)
    assert out["diversity"] == pytest.approx(diversity(gen)) and out["ref_diversity"] == pytest.approx(diversity(ref))
    assert {"precision", "recall", "density", "coverage"} <= out.keys()
    only_fd = compare_features(gen, "raw_fd", ref_stats=feature_stats(ref))
    assert only_fd["raw_fd"] == pytest.approx(out["raw_fd"]) and "precision" not in only_fd
    with pytest.raises(ValueError, match="dimension"):
        compare_features(gen, "raw_fd", ref_stats=feature_stats(ref[:, :2]))


def test_toy_sample_metrics_keep_old_keys_and_add_feature_metrics():
    dataset = make_dataset("toy2d", name="grid25", size=5000, seed=0)
    grid = make_toy("grid25")
    good = grid.sample(800, _gen(1))
    bad = good + 0.5  # every point halfway between modes
    m = sample_metrics(good, dataset)
    assert {"energy_distance", "mmd_rbf", "modes_covered", "hq_fraction", "log_likelihood"} <= m.keys()
    assert m["feature_space"] == "raw" and m["prdc_k"] == 5
    assert m["precision"] > 0.9 and m["coverage"] > 0.9 and m["raw_fd"] < 0.02
    assert m["diversity"] == pytest.approx(m["ref_diversity"], rel=0.05)
    assert m == sample_metrics(good, dataset)  # fixed seeds: the reference points are the same every time
    b = sample_metrics(bad, dataset)
    assert b["precision"] == 0.0 and b["coverage"] == 0.0 and b["density"] == 0.0
    # FD against all of the training points (as mnist_fd does), computed here independently
    assert b["raw_fd"] == pytest.approx(frechet_distance(*feature_stats(bad), *feature_stats(dataset.data)), rel=1e-9)
    assert b["raw_fd"] > 0.4 > 0.02 > m["raw_fd"]
    assert b["diversity"] == pytest.approx(m["diversity"], rel=1e-9)  # a shift keeps every distance


def test_raw_features_flatten_and_auto_finds_none_for_large_images():
    raw = make_features("raw", (3, 4, 4))
    feats = raw(torch.ones(5, 3, 4, 4))
    assert feats.shape == (5, 48) and feats.dtype == np.float64
    assert make_features("auto", (3, 64, 64)) is None


def test_large_sets_are_subsampled_at_random_not_by_their_first_rows(monkeypatch):
    """An image folder's rows come sorted by class subfolder: PRDC on its first rows would compare against a few
    classes only. Ten clusters, the reference sorted by cluster, the generated set from the same mixture."""
    from fastonestep.eval import features

    monkeypatch.setattr(features, "PRDC_MAX_POINTS", 300)
    rng = np.random.default_rng(0)
    centres = rng.normal(scale=20.0, size=(10, 8))
    ref = np.concatenate([c + rng.normal(size=(100, 8)) for c in centres])  # sorted by cluster
    gen = centres[rng.integers(0, 10, 1000)] + rng.normal(size=(1000, 8))
    out = features.compare_features(gen, "fd", ref_feats=ref)
    assert out["precision"] > 0.85 and out["coverage"] > 0.85, out  # first 300 rows: 3 clusters, precision ~0.3
    again = features.compare_features(gen, "fd", ref_feats=ref)
    assert again == out  # a fixed subset: the same numbers every time


def test_an_fid_beside_another_feature_space_uses_the_cached_gpu_path(monkeypatch, tmp_path):
    """eval.inception with eval.features=mnist: the FID comes from the Inception extractor make_features builds
    (its model cached, on the GPU when there is one), against reference features computed once per dataset, with
    non-finite samples dropped like every other metric's."""
    import importlib
    from types import SimpleNamespace

    seen = use_stand_in_inception(monkeypatch)  # a stand-in feature map: 3 numbers per image
    dataset = make_dataset("mnist", size=64)
    samples = torch.rand(40, 1, 32, 32) * 2 - 1
    samples[3] = float("nan")
    cfg = SimpleNamespace(features="raw", inception="w.pth", fid_ref="", prdc_k=3)
    mnist_module = importlib.import_module("fastonestep.eval.mnist_features")  # its classifier: not under test
    monkeypatch.setattr(mnist_module, "get_mnist_classifier", lambda: None)
    monkeypatch.setattr(mnist_module, "mnist_fd", lambda *a, **k: 0.0)
    monkeypatch.setattr(mnist_module, "class_coverage", lambda *a, **k: {})
    first = sample_metrics(samples, dataset, cfg)
    again = sample_metrics(samples, dataset, cfg)
    calls = [len(x) for x in seen]
    ref = stand_in_inception_features(dataset.data)
    want = frechet_distance(*feature_stats(stand_in_inception_features(samples)[np.arange(40) != 3]),
                            *feature_stats(ref))
    assert first["fid"] == again["fid"] == pytest.approx(want, rel=1e-12)
    assert calls.count(len(dataset.data)) == 1  # the reference computed once for both calls (cached)


def test_mnist_metrics_leave_out_non_finite_samples(monkeypatch):
    """The MNIST FD and class coverage see only the finite samples, as every other metric does (a NaN image
    was classified as some digit and made the FD NaN)."""
    import importlib

    mnist_module = importlib.import_module("fastonestep.eval.mnist_features")
    classifier = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(32 * 32, 10))
    passed = []
    monkeypatch.setattr(mnist_module, "get_mnist_classifier", lambda: classifier)
    monkeypatch.setattr(mnist_module, "mnist_fd", lambda samples, data, model: passed.append(len(samples)) or 1.0)
    dataset = make_dataset("mnist", size=64)
    samples = torch.rand(30, 1, 32, 32) * 2 - 1
    samples[[2, 7]] = float("nan")
    from types import SimpleNamespace

    metrics = sample_metrics(samples, dataset, SimpleNamespace(features="raw", inception="", fid_ref="", prdc_k=3))
    assert passed == [28] and sum(metrics["class_histogram"]) == 28
