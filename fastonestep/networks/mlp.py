"""MLP for 2-D toys: the raw network F(x_in, c_noise, labels) behind EDMPrecond, and a scalar head for
the ratio network. Noise level enters through a Fourier embedding of c_noise."""
from __future__ import annotations

import math

import torch
from torch import nn


class FourierEmbedding(nn.Module):
    """Random Fourier features of a scalar (the EDM c_noise), fixed at construction."""

    def __init__(self, dim: int, scale: float = 16.0):
        super().__init__()
        self.register_buffer("freqs", torch.randn(dim // 2) * scale)

    def forward(self, c: torch.Tensor) -> torch.Tensor:
        arg = 2 * math.pi * c.float()[:, None] * self.freqs[None]
        return torch.cat([arg.cos(), arg.sin()], dim=1)


class MLP(nn.Module):
    """x (B, dim) and c_noise (B,) -> (B, out_dim). out_dim = dim for a denoiser, 1 for a ratio logit."""

    def __init__(self, dim: int = 2, hidden: int = 256, depth: int = 3, emb_dim: int = 64, out_dim: int | None = None,
                 num_classes: int = 0, zero_init_output: bool = False):
        super().__init__()
        self.dim, self.out_dim = dim, dim if out_dim is None else out_dim
        self.emb = FourierEmbedding(emb_dim)
        self.emb_proj = nn.Sequential(nn.Linear(emb_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.label_emb = nn.Embedding(num_classes, hidden) if num_classes else None
        self.inp = nn.Linear(dim, hidden)
        self.blocks = nn.ModuleList(nn.Sequential(nn.SiLU(), nn.Linear(hidden, hidden)) for _ in range(depth))
        self.out = nn.Sequential(nn.SiLU(), nn.Linear(hidden, self.out_dim))
        if zero_init_output:
            nn.init.zeros_(self.out[1].weight)
            nn.init.zeros_(self.out[1].bias)

    @property
    def feature_dim(self) -> int:
        return self.inp.out_features

    def features(self, x: torch.Tensor, c_noise: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """The last hidden layer (B, hidden), before the output projection: what a GAN head on this net sees."""
        h_emb = self.emb_proj(self.emb(c_noise))
        if self.label_emb is not None and labels is not None:
            h_emb = h_emb + self.label_emb(labels)
        h = self.inp(x) + h_emb
        for block in self.blocks:
            h = h + block(h)
        return h

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        out = self.out(self.features(x, c_noise, labels))
        return out[:, 0] if self.out_dim == 1 else out
