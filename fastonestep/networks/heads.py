"""Small heads that sit on another network's features.

`GANHead` is DMD2's discriminator: a two-layer MLP from a denoiser's `features` (the pooled UNet bottleneck,
or an MLP's last hidden layer, see EDMPrecond.features) to one real/fake logit per sample.
`LogVarHead` is EDM2's learned loss weighting: one log-variance per noise level, from c_noise alone.
"""
from __future__ import annotations

import torch
from torch import nn

from fastonestep.networks.edm2 import MPConv, MPFourier


class GANHead(nn.Module):
    """features (B, in_dim) -> (B,) logits. The output layer starts at zero, so an untrained head says
    "undecided" (logit 0) and its generator loss pushes nothing until the discriminator has learned."""

    def __init__(self, in_dim: int, hidden: int = 0):
        super().__init__()
        hidden = hidden or in_dim
        self.inp = nn.Linear(in_dim, hidden)
        self.act = nn.SiLU()
        self.out = nn.Linear(hidden, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.out(self.act(self.inp(features.float())))[:, 0]


class LogVarHead(nn.Module):
    """c_noise (B,) -> (B,) log-variances u: EDM2's uncertainty-based loss weighting (Karras et al. 2024, sec. 4).

    Magnitude-preserving Fourier features of c_noise and one MP linear layer, as EDM2 builds it. Trained with
    the denoiser on the per-sample loss L / exp(u) + u, it learns u = log E[L | sigma], so every noise level
    contributes a loss of about 1: the fixed lambda(sigma) is corrected by what the network can achieve there.
    It is part of training only: the exported denoiser does not contain it."""

    def __init__(self, channels: int = 128):
        super().__init__()
        self.fourier = MPFourier(channels)
        self.linear = MPConv(channels, 1)

    def forward(self, c_noise: torch.Tensor) -> torch.Tensor:
        with torch.autocast(c_noise.device.type, enabled=False):  # fp32 under bf16 training, as EDM2 computes it
            return self.linear(self.fourier(c_noise.float())).float()[:, 0]
