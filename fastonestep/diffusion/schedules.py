"""Noise schedules x_t = alpha(t) * x0 + sigma(t) * eps.

Every network in fastonestep is preconditioned in EDM (variance-exploding) coordinates, where alpha = 1
and the noise level is sigma. Any other schedule maps onto it exactly: x_t / alpha(t) is a VE sample at
sigma_edm = sigma(t) / alpha(t) (Karras et al. 2022, eq. 3), so one denoiser serves every schedule.
"""
from __future__ import annotations

import math

import torch


class Schedule:
    """Base class. `t` is the schedule's own time variable (for EDM it *is* sigma)."""

    name = "base"
    t_min: float
    t_max: float

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def edm_sigma(self, t: torch.Tensor) -> torch.Tensor:
        """Equivalent VE noise level sigma/alpha (the quantity the preconditioning sees)."""
        return self.sigma(t) / self.alpha(t)

    def t_from_edm_sigma(self, s: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def add_noise(self, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        shape = (-1,) + (1,) * (x0.ndim - 1)
        return self.alpha(t).reshape(shape) * x0 + self.sigma(t).reshape(shape) * eps


class EDMSchedule(Schedule):
    """Variance exploding: alpha = 1, sigma = t in [sigma_min, sigma_max]."""

    name = "edm"

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0):
        self.t_min, self.t_max = sigma_min, sigma_max

    def alpha(self, t):
        return torch.ones_like(t)

    def sigma(self, t):
        return t

    def t_from_edm_sigma(self, s):
        return s


class VPSchedule(Schedule):
    """Variance preserving with a linear beta(t) (DDPM continuous limit): alpha^2 + sigma^2 = 1."""

    name = "vp"

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0, t_min: float = 1e-3, t_max: float = 1.0):
        self.beta_min, self.beta_d = beta_min, beta_max - beta_min
        self.t_min, self.t_max = t_min, t_max

    def _log_alpha(self, t):
        return -0.5 * (0.5 * self.beta_d * t**2 + self.beta_min * t)

    def alpha(self, t):
        return torch.exp(self._log_alpha(t))

    def sigma(self, t):
        return torch.sqrt(-torch.expm1(2 * self._log_alpha(t)))

    def t_from_edm_sigma(self, s):
        # Solve 0.5*beta_d*t^2 + beta_min*t = log(1 + s^2) for t >= 0.
        c = torch.log1p(s**2)
        return (torch.sqrt(self.beta_min**2 + 2 * self.beta_d * c) - self.beta_min) / self.beta_d


class FlowSchedule(Schedule):
    """Rectified flow / linear interpolation: alpha = 1 - t, sigma = t."""

    name = "flow"

    def __init__(self, t_min: float = 1e-4, t_max: float = 1.0 - 1e-4):
        self.t_min, self.t_max = t_min, t_max

    def alpha(self, t):
        return 1.0 - t

    def sigma(self, t):
        return t

    def t_from_edm_sigma(self, s):
        return s / (1.0 + s)


SCHEDULES = {"edm": EDMSchedule, "ve": EDMSchedule, "vp": VPSchedule, "flow": FlowSchedule}


def make_schedule(name: str, **kwargs) -> Schedule:
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; expected one of {sorted(SCHEDULES)}")
    return SCHEDULES[name](**kwargs)


def sample_lognormal_sigma(n: int, p_mean: float, p_std: float, generator=None, device=None) -> torch.Tensor:
    """EDM training noise levels: ln(sigma) ~ N(p_mean, p_std^2)."""
    return torch.exp(p_mean + p_std * torch.randn(n, generator=generator, device=device))


def sample_loguniform_sigma(n: int, sigma_min: float, sigma_max: float, generator=None, device=None) -> torch.Tensor:
    u = torch.rand(n, generator=generator, device=device)
    return torch.exp(math.log(sigma_min) + u * (math.log(sigma_max) - math.log(sigma_min)))
