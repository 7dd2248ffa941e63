"""Isotropic Gaussian mixtures with exact noised densities, scores and denoisers.

Under x_t = alpha x0 + sigma eps, a mixture sum_k w_k N(mu_k, s_k^2 I) stays a mixture
sum_k w_k N(alpha mu_k, (alpha^2 s_k^2 + sigma^2) I), so log p_t, grad log p_t and E[x0 | x_t] are exact
at every noise level. This is the ground truth for toy metrics and the score-difference experiment.
"""
from __future__ import annotations

import math

import torch


class GaussianMixture:
    def __init__(self, means, stds, weights=None):
        self.means = torch.as_tensor(means, dtype=torch.float64)  # (K, D)
        k, self.dim = self.means.shape
        stds = torch.as_tensor(stds, dtype=torch.float64)
        self.stds = stds.expand(k).clone() if stds.ndim == 0 else stds.reshape(k)
        w = torch.ones(k, dtype=torch.float64) if weights is None else torch.as_tensor(weights, dtype=torch.float64)
        if (w < 0).any() or w.sum() <= 0:
            raise ValueError("mixture weights must be non-negative with a positive sum")
        self.weights = w / w.sum()

    @property
    def num_components(self) -> int:
        return self.means.shape[0]

    def sample(self, n: int, generator: torch.Generator | None = None, return_components: bool = False):
        comp = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        eps = torch.randn(n, self.dim, dtype=torch.float64, generator=generator)
        x = self.means[comp] + self.stds[comp, None] * eps
        x = x.float()
        return (x, comp) if return_components else x

    def _noised(self, alpha, sigma):
        var = (alpha**2) * self.stds**2 + sigma**2  # (K,)
        return alpha * self.means, var

    def _log_resp(self, x, alpha, sigma):
        """Per-component log(w_k N(x; alpha mu_k, var_k I)), shape (N, K)."""
        mu, var = self._noised(alpha, sigma)
        d2 = ((x[:, None, :] - mu[None]) ** 2).sum(-1)
        return self.weights.log()[None] - 0.5 * d2 / var[None] - 0.5 * self.dim * torch.log(2 * math.pi * var)[None]

    def log_prob(self, x: torch.Tensor, sigma: float = 0.0, alpha: float = 1.0) -> torch.Tensor:
        x64 = x.double()
        return torch.logsumexp(self._log_resp(x64, alpha, sigma), dim=1).to(x.dtype)

    def score(self, x: torch.Tensor, sigma: float = 0.0, alpha: float = 1.0) -> torch.Tensor:
        """grad_x log p_t(x), exact."""
        x64 = x.double()
        lr = self._log_resp(x64, alpha, sigma)
        resp = torch.softmax(lr, dim=1)  # (N, K)
        mu, var = self._noised(alpha, sigma)
        comp_scores = (mu[None] - x64[:, None, :]) / var[None, :, None]
        return (resp[..., None] * comp_scores).sum(1).to(x.dtype)

    def denoise(self, x: torch.Tensor, sigma: float, alpha: float = 1.0) -> torch.Tensor:
        """E[x0 | x_t], from Tweedie's formula."""
        s = self.score(x.double(), sigma, alpha)
        return ((x.double() + sigma**2 * s) / alpha).to(x.dtype)
