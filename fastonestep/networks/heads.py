"""Small heads that sit on another network's features.

`GANHead` is DMD2's discriminator: a two-layer MLP from a denoiser's `features` (the pooled UNet bottleneck,
or an MLP's last hidden layer, see EDMPrecond.features) to one real/fake logit per sample.
"""
from __future__ import annotations

import torch
from torch import nn


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
