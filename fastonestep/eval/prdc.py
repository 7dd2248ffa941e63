"""Precision, recall, density and coverage (Naeem et al. 2020, "Reliable Fidelity and Diversity Metrics for
Generative Models") and a diversity score, on feature arrays.

Every point gets a k-NN ball: its centre is the point, its radius the distance to its k-th nearest neighbour
in its own set (the point itself excluded). With real features X (N) and generated features Y (M):

- precision = fraction of Y inside at least one real ball (fidelity: samples look real);
- recall    = fraction of X inside at least one generated ball (the real data the generator can reach);
- density   = (1 / kM) sum_j #{real balls that contain Y_j} (fidelity that counts how crowded the real
  neighbourhood is; 1 in expectation for identical distributions, can exceed 1);
- coverage  = fraction of X whose own ball contains at least one Y (mode coverage that, unlike recall,
  uses only real balls and so is robust to generated outliers).

Distances are Euclidean, computed in float64 in row blocks so memory stays O(block * max(N, M)).
"""
from __future__ import annotations

import numpy as np
import torch

_BLOCK = 1024  # rows of a pairwise distance block


def _as_features(a, what: str) -> torch.Tensor:
    """(N, F) float64 CPU tensor from a tensor or array; non-finite rows are an error, not silently used."""
    t = a.detach().cpu().double() if torch.is_tensor(a) else torch.from_numpy(np.asarray(a, dtype=np.float64))
    if t.ndim != 2:
        raise ValueError(f"{what} features must be (N, F), got shape {tuple(t.shape)}")
    if not torch.isfinite(t).all():
        raise ValueError(f"{what} features contain NaN or Inf; drop non-finite samples first")
    return t


def kth_neighbour_radii(x: torch.Tensor, k: int) -> torch.Tensor:
    """Distance from each row of x to its k-th nearest other row (float64, (N,))."""
    if not 1 <= k < len(x):
        raise ValueError(f"k must be in [1, N - 1] = [1, {len(x) - 1}] for a set of {len(x)} points, got k={k}")
    radii = []
    for start in range(0, len(x), _BLOCK):
        d = torch.cdist(x[start:start + _BLOCK], x)
        # The k + 1 smallest include the point itself (distance 0), so the k-th neighbour is the last of them.
        radii.append(d.topk(k + 1, dim=1, largest=False).values[:, k])
    return torch.cat(radii)


def prdc(real_features, fake_features, k: int = 5) -> dict:
    """Precision, recall, density, coverage of fake_features (M, F) against real_features (N, F); see the
    module docstring. Returns the four as floats, and k as prdc_k."""
    x, y = _as_features(real_features, "real"), _as_features(fake_features, "generated")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"real features have dimension {x.shape[1]}, generated {y.shape[1]}")
    real_radii, fake_radii = kth_neighbour_radii(x, k), kth_neighbour_radii(y, k)

    # One pass over blocks of real rows. Every comparison with a real radius r_i uses distances computed in
    # X_i's own row, as r_i was: distances from a matrix product are not exactly symmetric, and a point on a
    # ball's boundary (its k-th neighbour, when the sets share points) must land inside it.
    balls_per_fake = torch.zeros(len(y), dtype=torch.int64)
    in_fake_ball, covered = [], []
    for start in range(0, len(x), _BLOCK):
        d = torch.cdist(x[start:start + _BLOCK], y)  # (b, M)
        radii = real_radii[start:start + _BLOCK, None]
        balls_per_fake += (d <= radii).sum(dim=0)
        covered.append(d.min(dim=1).values <= radii[:, 0])
        in_fake_ball.append((d <= fake_radii[None, :]).any(dim=1))
    return {
        "precision": float((balls_per_fake > 0).double().mean()),
        "recall": float(torch.cat(in_fake_ball).double().mean()),
        "density": float(balls_per_fake.double().sum() / (k * len(y))),
        "coverage": float(torch.cat(covered).double().mean()),
        "prdc_k": int(k),
    }


def diversity(features, max_points: int | None = None) -> float:
    """Mean Euclidean distance between distinct pairs of rows of features (N, F): how spread out a set is.
    Report it next to the same score of real data, which sets its scale. max_points: use only the first
    max_points rows (the cost is quadratic)."""
    x = _as_features(features, "diversity")
    if max_points is not None:
        x = x[:max_points]
    n = len(x)
    if n < 2:
        raise ValueError(f"diversity needs at least 2 points, got {n}")
    total = 0.0
    for start in range(0, n, _BLOCK):
        total += float(torch.cdist(x[start:start + _BLOCK], x).sum())  # the zero diagonal adds nothing
    return total / (n * (n - 1))
