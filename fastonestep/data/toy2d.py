"""2-D toy distributions: a grid of Gaussians, concentric rings and two moons.

Each toy has `dim`, `sample(n, generator=None, return_components=False)` (float32 (n, 2)) and, where the
density is known in closed form, `log_prob(x)` and `score(x)` (exact, computed in float64). These are the
ground truth that toy metrics compare a generator against.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from .errors import DataError
from .mixture import GaussianMixture


def gaussian_grid(num_per_side: int = 5, spacing: float = 1.0, std: float = 0.05) -> GaussianMixture:
    """num_per_side^2 equal-weight isotropic Gaussians on a square grid centred at the origin.
    The default is 25 modes at {-2, -1, 0, 1, 2}^2 with std 0.05."""
    offsets = (torch.arange(num_per_side, dtype=torch.float64) - (num_per_side - 1) / 2) * spacing
    gx, gy = torch.meshgrid(offsets, offsets, indexing="ij")
    means = torch.stack([gx.reshape(-1), gy.reshape(-1)], dim=1)
    return GaussianMixture(means, std)


def _require_clean(sigma: float, alpha: float, what: str) -> None:
    if sigma != 0.0 or alpha != 1.0:
        raise NotImplementedError(f"{what} is exact only for clean data (sigma=0, alpha=1); "
                                  "use a GaussianMixture toy for noised densities")


class Rings:
    """Concentric rings: pick ring k with weight w_k, radius r = |R_k + width * eps|, angle uniform.

    The density in the plane is exact (no truncation): with phi the N(0, width^2) density,
        p(x) = sum_k w_k [phi(|x| - R_k) + phi(|x| + R_k)] / (2 pi |x|).
    The second ("folded") term accounts for R_k + width * eps < 0, which lands on the opposite side;
    it is negligible when R_k >> width. p grows like 1 / |x| at the origin (integrably), where log_prob is
    +inf and the score undefined; samples land there with probability 0. Only the clean density (sigma = 0)
    is provided.
    """

    dim = 2

    def __init__(self, radii=(0.5, 1.0, 1.5), width: float = 0.05, weights=None):
        self.radii = torch.as_tensor(radii, dtype=torch.float64).reshape(-1)
        if (self.radii <= 0).any() or width <= 0:
            raise ValueError("ring radii and width must be positive")
        self.width = float(width)
        k = self.radii.numel()
        w = torch.ones(k, dtype=torch.float64) if weights is None else torch.as_tensor(weights, dtype=torch.float64)
        self.weights = w / w.sum()

    @property
    def num_components(self) -> int:
        return self.radii.numel()

    def sample(self, n: int, generator: torch.Generator | None = None, return_components: bool = False):
        comp = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        radius = self.radii[comp] + self.width * torch.randn(n, dtype=torch.float64, generator=generator)
        angle = 2 * math.pi * torch.rand(n, dtype=torch.float64, generator=generator)
        x = torch.stack([radius * angle.cos(), radius * angle.sin()], dim=1).float()
        return (x, comp) if return_components else x

    def _radial_terms(self, r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Centres m_j = +-R_k and log(w_k phi(r - m_j)) for the 2K folded-normal terms, shapes (2K,), (N, 2K)."""
        centres = torch.cat([self.radii, -self.radii])
        log_w = self.weights.log().repeat(2)
        var = self.width**2
        log_terms = log_w[None] - 0.5 * (r[:, None] - centres[None]) ** 2 / var - 0.5 * math.log(2 * math.pi * var)
        return centres, log_terms

    def log_prob(self, x: torch.Tensor, sigma: float = 0.0, alpha: float = 1.0) -> torch.Tensor:
        _require_clean(sigma, alpha, "Rings.log_prob")
        x64 = x.double()
        r = x64.norm(dim=1)
        _, log_terms = self._radial_terms(r)
        return (torch.logsumexp(log_terms, dim=1) - torch.log(2 * math.pi * r)).to(x.dtype)

    def score(self, x: torch.Tensor, sigma: float = 0.0, alpha: float = 1.0) -> torch.Tensor:
        """grad_x log p(x) = (d log p / dr) x / r, with d log p / dr = sum_j resp_j (m_j - r) / width^2 - 1 / r."""
        _require_clean(sigma, alpha, "Rings.score")
        x64 = x.double()
        r = x64.norm(dim=1)
        centres, log_terms = self._radial_terms(r)
        resp = torch.softmax(log_terms, dim=1)
        dlogp_dr = (resp * (centres[None] - r[:, None])).sum(1) / self.width**2 - 1.0 / r
        return (dlogp_dr[:, None] * x64 / r[:, None]).to(x.dtype)


class Moons:
    """Two interleaving half circles (unit radius) plus isotropic Gaussian noise, shifted so the data is
    centred near the origin. Sample-only: the noisy density has no closed form here."""

    dim = 2
    num_components = 2
    _centre = (0.5, 0.25)

    def __init__(self, noise: float = 0.05):
        self.noise = float(noise)

    def sample(self, n: int, generator: torch.Generator | None = None, return_components: bool = False):
        comp = torch.randint(0, 2, (n,), generator=generator)
        t = math.pi * torch.rand(n, dtype=torch.float64, generator=generator)
        upper = torch.stack([t.cos(), t.sin()], dim=1)
        lower = torch.stack([1.0 - t.cos(), 0.5 - t.sin()], dim=1)
        x = torch.where(comp[:, None] == 0, upper, lower) - torch.tensor(self._centre, dtype=torch.float64)
        x = x + self.noise * torch.randn(n, 2, dtype=torch.float64, generator=generator)
        x = x.float()
        return (x, comp) if return_components else x

    def log_prob(self, x: torch.Tensor, sigma: float = 0.0, alpha: float = 1.0) -> torch.Tensor:
        raise NotImplementedError("moons is a sample-only toy: its density has no closed form "
                                  "(use 'grid25' or 'rings' for exact log-likelihoods and scores)")

    def score(self, x: torch.Tensor, sigma: float = 0.0, alpha: float = 1.0) -> torch.Tensor:
        raise NotImplementedError("moons is a sample-only toy: its score has no closed form "
                                  "(use 'grid25' or 'rings' for exact scores)")


def rings(radii=(0.5, 1.0, 1.5), width: float = 0.05) -> Rings:
    return Rings(radii, width)


def moons(noise: float = 0.05) -> Moons:
    return Moons(noise)


TOYS: dict[str, Callable[..., object]] = {
    "grid25": gaussian_grid,
    "rings": rings,
    "moons": moons,
}


def make_toy(name: str, **kwargs):
    """The toy registered under `name`; keyword arguments go to its factory."""
    if name not in TOYS:
        raise DataError(f"unknown toy dataset {name!r}; valid names: {', '.join(sorted(TOYS))}")
    return TOYS[name](**kwargs)
