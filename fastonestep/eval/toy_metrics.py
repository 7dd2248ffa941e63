"""Metrics for 2-D generators against a toy distribution whose samples (and often density) are exact.

- energy_distance, mmd_rbf: two-sample distances to fresh reference samples (any toy).
- mode_stats: mode coverage and sample quality for Gaussian mixtures (e.g. grid25).
- log_likelihood: mean log p of the samples under the true density (grid25, rings; not moons).
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from ..data.mixture import GaussianMixture

DEFAULT_BANDWIDTHS = (0.05, 0.1, 0.2, 0.5, 1.0)  # from the toys' mode width (0.05) up to their spacing (1)
_CHUNK = 1024  # rows per block of the pairwise matrices, to keep memory at O(chunk * N)


def _pairwise_mean(a: torch.Tensor, b: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor],
                   exclude_diagonal: bool) -> float:
    """Mean of fn(|a_i - b_j|) over pairs, float64, blockwise. exclude_diagonal (a is b): mean over i != j."""
    total = 0.0
    for start in range(0, len(a), _CHUNK):
        total += fn(torch.cdist(a[start:start + _CHUNK], b)).sum().item()
    if not exclude_diagonal:
        return total / (len(a) * len(b))
    n = len(a)
    total -= n * fn(torch.zeros(1, dtype=torch.float64)).item()
    return total / (n * (n - 1))


def _two_sample(x: torch.Tensor, y: torch.Tensor, fn) -> float:
    """Unbiased estimate of E fn(X, X') + E fn(Y, Y') - 2 E fn(X, Y) (U-statistics within each set)."""
    x, y = x.detach().double().cpu(), y.detach().double().cpu()
    if len(x) < 2 or len(y) < 2:
        raise ValueError(f"need at least 2 samples per set, got {len(x)} and {len(y)}")
    return (_pairwise_mean(x, x, fn, True) + _pairwise_mean(y, y, fn, True)
            - 2.0 * _pairwise_mean(x, y, fn, False))


def energy_distance(x: torch.Tensor, y: torch.Tensor) -> float:
    """Energy distance 2 E|X - Y| - E|X - X'| - E|Y - Y'| (squared-distance form, zero iff the distributions
    are equal). Within-set terms are U-statistics (pairs i != j), so the estimate is unbiased and can be
    slightly negative when the two sets come from the same distribution."""
    return -_two_sample(x, y, lambda d: d)


def mmd_rbf(x: torch.Tensor, y: torch.Tensor, bandwidths=DEFAULT_BANDWIDTHS) -> float:
    """Unbiased squared MMD with the kernel k(a, b) = mean_h exp(-|a - b|^2 / (2 h^2)) over `bandwidths`.
    Averaging several widths keeps it sensitive both inside a mode and between modes. Can be slightly
    negative for samples of the same distribution."""
    widths = [float(h) for h in bandwidths]

    def kernel(d: torch.Tensor) -> torch.Tensor:
        d2 = d**2
        return sum(torch.exp(-d2 / (2 * h * h)) for h in widths) / len(widths)

    return _two_sample(x, y, kernel)


def mode_stats(samples: torch.Tensor, mixture: GaussianMixture, num_std: float = 3.0,
               min_count: float | None = None) -> dict:
    """Mode coverage of samples from a Gaussian mixture.

    A sample is high quality if it lies within num_std standard deviations (Euclidean) of its nearest mean;
    in 2-D that holds for 1 - exp(-num_std^2 / 2) = 98.9% of true samples at num_std = 3. A mode is covered if
    it gets at least min_count high-quality samples; the default is max(1, 10% of its expected count
    n * w_k). Returns modes_covered, num_modes, hq_fraction, and mode_kl = KL(histogram of high-quality
    samples over modes || mixture weights), which is 0 for perfectly balanced modes.
    """
    x = samples.detach().double().cpu()
    dist = torch.cdist(x, mixture.means)
    nearest_dist, nearest = dist.min(dim=1)
    high_quality = nearest_dist <= num_std * mixture.stds[nearest]
    counts = torch.bincount(nearest[high_quality], minlength=mixture.num_components).double()
    if min_count is None:
        threshold = (0.1 * len(x) * mixture.weights).clamp(min=1.0)
    else:
        threshold = torch.full_like(counts, float(min_count))
    hist = counts / counts.sum() if counts.sum() > 0 else None
    mode_kl = math.nan if hist is None else float(
        torch.where(hist > 0, hist * (hist / mixture.weights).log(), torch.zeros_like(hist)).sum())
    return {
        "modes_covered": int((counts >= threshold).sum()),
        "num_modes": mixture.num_components,
        "hq_fraction": float(high_quality.double().mean()) if len(x) else math.nan,
        "mode_kl": mode_kl,
    }


def log_likelihood(samples: torch.Tensor, dist) -> float:
    """Mean log p(samples) under the toy's exact density (raises NotImplementedError for sample-only toys)."""
    return float(dist.log_prob(samples.detach().double().cpu()).mean())


def toy_metrics(samples: torch.Tensor, dist, num_ref: int = 2000, generator: torch.Generator | None = None) -> dict:
    """Every metric that applies to `dist`.

    energy_distance and mmd_rbf compare the first num_ref samples with num_ref fresh reference samples
    (their cost is quadratic: about 2 s at 2000 on a laptop core, 10x that at 5000). mode_stats (Gaussian
    mixtures) and log_likelihood (toys with a density) use all samples; ref_log_likelihood is the same on
    the reference samples, i.e. what a perfect generator gets. Non-finite samples are dropped from every
    metric and reported as nonfinite_fraction.
    """
    x = samples.detach().double().cpu().reshape(len(samples), -1)
    finite = torch.isfinite(x).all(dim=1)
    result = {"nonfinite_fraction": float(1.0 - finite.double().mean())}
    x = x[finite]
    ref = dist.sample(num_ref, generator=generator).double()
    result["energy_distance"] = energy_distance(x[:num_ref], ref)
    result["mmd_rbf"] = mmd_rbf(x[:num_ref], ref)
    if isinstance(dist, GaussianMixture):
        result.update(mode_stats(x, dist))
    try:
        result["log_likelihood"] = log_likelihood(x, dist)
        result["ref_log_likelihood"] = log_likelihood(ref, dist)
    except NotImplementedError:
        pass  # sample-only toy (moons)
    return result
