"""EDM preconditioning (Karras et al. 2022, table 1). Coefficients are always computed in fp32."""
from __future__ import annotations

import torch
from torch import nn

from fastonestep.tensors import device_tensor


def edm_coefficients(sigma: torch.Tensor, sigma_data: float):
    """Returns (c_skip, c_out, c_in, c_noise) as fp32 tensors shaped like sigma."""
    s = sigma.float()
    sd2 = sigma_data**2
    denom = s**2 + sd2
    c_skip = sd2 / denom
    c_out = s * sigma_data / denom.sqrt()
    c_in = 1.0 / denom.sqrt()
    c_noise = s.log() / 4
    return c_skip, c_out, c_in, c_noise


def edm_loss_weight(sigma: torch.Tensor, sigma_data: float) -> torch.Tensor:
    """lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma * sigma_data)^2, which makes the effective
    target of F unit-variance at every noise level."""
    s = sigma.float()
    return (s**2 + sigma_data**2) / (s * sigma_data) ** 2


def _per_sample(c: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return c.reshape((-1,) + (1,) * (like.ndim - 1))


class EDMPrecond(nn.Module):
    """D(x, sigma) = c_skip * x + c_out * F(c_in * x, c_noise, labels).

    `net` is any raw network with signature net(x_in, c_noise, labels=None) -> tensor shaped like x_in.
    Networks know nothing about losses or schedules; this wrapper is the only place sigma_data enters.
    """

    def __init__(self, net: nn.Module, sigma_data: float = 0.5):
        super().__init__()
        self.net = net
        self.sigma_data = float(sigma_data)

    def raw(self, x: torch.Tensor, sigma: torch.Tensor, labels=None):
        """Returns (F, c_skip, c_out) so fused losses can combine them themselves."""
        sigma = _as_batch(sigma, x)
        c_skip, c_out, c_in, c_noise = edm_coefficients(sigma, self.sigma_data)
        x_in = (_per_sample(c_in, x) * x.float()).to(x.dtype)
        F = self.net(x_in, c_noise, labels)
        return F, c_skip, c_out

    def features(self, x: torch.Tensor, sigma: torch.Tensor, labels=None) -> torch.Tensor:
        """The raw network's `features` (B, feature_dim) on the preconditioned input (e.g. the pooled UNet
        bottleneck): what a discriminator head on this denoiser sees. Gradients flow to x."""
        sigma = _as_batch(sigma, x)
        _, _, c_in, c_noise = edm_coefficients(sigma, self.sigma_data)
        x_in = (_per_sample(c_in, x) * x.float()).to(x.dtype)
        return self.net.features(x_in, c_noise, labels)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, labels=None) -> torch.Tensor:
        F, c_skip, c_out = self.raw(x, sigma, labels)
        return (_per_sample(c_skip, x) * x.float() + _per_sample(c_out, x) * F.float()).to(x.dtype)


def _as_batch(sigma, x: torch.Tensor) -> torch.Tensor:
    """Accepts a python float, a 0-d tensor or a per-sample vector; returns a (B,) fp32 tensor."""
    sigma = device_tensor(sigma, torch.float32, x.device)
    if sigma.ndim == 0:
        sigma = sigma.expand(x.shape[0])
    return sigma.reshape(x.shape[0])


def denoise_with_schedule(denoiser: nn.Module, x_t: torch.Tensor, t: torch.Tensor, schedule, labels=None):
    """E[x0 | x_t] under any schedule, through a VE-preconditioned denoiser: D_ve(x_t / alpha, sigma / alpha)."""
    t = _as_batch(t, x_t)
    alpha = _per_sample(schedule.alpha(t), x_t)
    return denoiser(x_t / alpha, schedule.edm_sigma(t), labels)
