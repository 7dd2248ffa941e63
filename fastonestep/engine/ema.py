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
    def update(self, net: nn.Module, nimg: int, batch_size: int, params=None, part: str = "") -> None:
        """`params`: the full parameters of `net` in parameters() order when `net` holds only a shard of them
        (ZeRO-3 gathers them; see Trainable.full_parameters). Buffers are never sharded. `part`: the name of
        the submodule of `net` this EMA follows, when `net` also trains something else ("": all of `net`)."""
        beta = self.beta(nimg, batch_size)
        prefix = part + "." if part else ""
        names = [n for n, _ in net.named_parameters()]
        source = [p for n, p in zip(names, net.parameters() if params is None else params, strict=True)
                  if n.startswith(prefix)]
        buffers = [b for n, b in net.named_buffers() if n.startswith(prefix)]
        for p_ema, p in zip(self.net.parameters(), source, strict=True):
            p_ema.lerp_(p.detach().to(p_ema.dtype), 1.0 - beta)
        for b_ema, b in zip(self.net.buffers(), buffers):
            b_ema.copy_(b)

    def update_from(self, trainable, nimg: int, batch_size: int, part: str = "") -> None:
        """EMA step from a backend Trainable (any backend, any ZeRO stage); `part` as in `update`."""
        with trainable.full_parameters() as params:
            self.update(trainable.network, nimg, batch_size, params=params, part=part)

    def state_dict(self):
        return self.net.state_dict()

    def load_state_dict(self, state):
        self.net.load_state_dict(state)
