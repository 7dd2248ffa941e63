"""Exponential moving average of a network's weights with the EDM half-life schedule.

beta = 0.5 ** (batch / halflife), where the half-life (in samples) ramps up as a fraction of the samples
seen so far, so early averages do not remember the random initialisation for long.
"""
from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    def __init__(self, net: nn.Module, halflife_kimg: float, rampup: float = 0.05):
        self.halflife_kimg, self.rampup = halflife_kimg, rampup
        self.net = copy.deepcopy(net).eval().requires_grad_(False)

    def beta(self, nimg: int, batch_size: int) -> float:
        if self.halflife_kimg <= 0:
            return 0.0
        halflife = self.halflife_kimg * 1000
        if self.rampup:
            halflife = min(halflife, nimg * self.rampup)
        return 0.5 ** (batch_size / max(halflife, 1e-8))

    @torch.no_grad()
    def update(self, net: nn.Module, nimg: int, batch_size: int) -> None:
        beta = self.beta(nimg, batch_size)
        for p_ema, p in zip(self.net.parameters(), net.parameters()):
            p_ema.lerp_(p.detach().to(p_ema.dtype), 1.0 - beta)
        for b_ema, b in zip(self.net.buffers(), net.buffers()):
            b_ema.copy_(b)

    def state_dict(self):
        return self.net.state_dict()

    def load_state_dict(self, state):
        self.net.load_state_dict(state)
