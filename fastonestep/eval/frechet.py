"""Frechet distance between Gaussians fitted to feature sets (the FID formula, with any features).

FD = ||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^{1/2}).

tr((S1 S2)^{1/2}) is computed without a general (non-symmetric) matrix square root: S1 S2 is similar to the
symmetric PSD matrix S1^{1/2} S2 S1^{1/2}, so the trace is the sum of square roots of that matrix's
eigenvalues. Two symmetric eigendecompositions in float64, with round-off negatives clipped to 0, are
stable where scipy.linalg.sqrtm can return complex parts or fail on singular covariances, and need no scipy.
"""
from __future__ import annotations

import os
import tempfile
import zipfile

import numpy as np

from ..data.errors import DataError


def _as_float64(a) -> np.ndarray:
    if hasattr(a, "detach"):  # torch tensor
        a = a.detach().cpu().numpy()
    return np.asarray(a, dtype=np.float64)


def _psd_sqrt(sym: np.ndarray) -> np.ndarray:
    """Square root of a symmetric positive semi-definite matrix (negative round-off eigenvalues -> 0)."""
    eigvals, eigvecs = np.linalg.eigh(sym)
    return (eigvecs * np.sqrt(np.clip(eigvals, 0.0, None))) @ eigvecs.T


def _trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """tr((S1 S2)^{1/2}) via the eigenvalues of S1^{1/2} S2 S1^{1/2}."""
    root1 = _psd_sqrt(sigma1)
    middle = root1 @ sigma2 @ root1
    middle = 0.5 * (middle + middle.T)  # symmetric in exact arithmetic; remove round-off asymmetry
    return float(np.sqrt(np.clip(np.linalg.eigvalsh(middle), 0.0, None)).sum())


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2), in float64. Clamped at 0, since tiny
    negative values can only be round-off."""
    mu1, mu2 = _as_float64(mu1).reshape(-1), _as_float64(mu2).reshape(-1)
    sigma1, sigma2 = np.atleast_2d(_as_float64(sigma1)), np.atleast_2d(_as_float64(sigma2))
    d = mu1.shape[0]
    if mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(f"shape mismatch: mu1 {mu1.shape}, sigma1 {sigma1.shape}, mu2 {mu2.shape}, "
                         f"sigma2 {sigma2.shape}; expected (D,) and (D, D) for both")
    sigma1, sigma2 = 0.5 * (sigma1 + sigma1.T), 0.5 * (sigma2 + sigma2.T)
    mean_term = float(((mu1 - mu2) ** 2).sum())
    cov_term = float(np.trace(sigma1) + np.trace(sigma2)) - 2.0 * _trace_sqrt_product(sigma1, sigma2)
    return max(mean_term + cov_term, 0.0)


def feature_stats(features) -> tuple[np.ndarray, np.ndarray]:
    """Mean (F,) and covariance (F, F) (unbiased, N - 1) of features (N, F), in float64."""
    feats = _as_float64(features)
    if feats.ndim != 2 or feats.shape[0] < 2:
        raise ValueError(f"features must be (N, F) with N >= 2, got shape {feats.shape}")
    return feats.mean(axis=0), np.cov(feats, rowvar=False).reshape(feats.shape[1], feats.shape[1])


def save_stats(path: str, mu, sigma) -> None:
    """Write {'mu', 'sigma'} as a .npz file, atomically (temporary file, then rename)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:  # a file object, so numpy does not append ".npz" to the temp name
            np.savez(f, mu=_as_float64(mu), sigma=_as_float64(sigma))
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def load_stats(path: str) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) from a .npz file with keys 'mu' and 'sigma' (the format of save_stats and of FID tools)."""
    if not os.path.isfile(path):
        raise DataError(f"feature statistics file {path!r} does not exist")
    try:
        with np.load(path, allow_pickle=False) as stats:
            missing = [k for k in ("mu", "sigma") if k not in stats.files]
            if missing:
                raise DataError(f"{path!r} has no array {', '.join(repr(k) for k in missing)} "
                                f"(found: {', '.join(stats.files) or 'nothing'})")
            return stats["mu"].astype(np.float64), stats["sigma"].astype(np.float64)
    except DataError:
        raise
    except (OSError, ValueError, zipfile.BadZipFile) as err:
        raise DataError(f"cannot read {path!r} as a .npz file: {err}") from err
