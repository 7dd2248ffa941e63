"""Deterministic, resumable batches from an in-memory dataset.

The order is fastonestep.data.order.EpochOrder: a permutation seeded by (seed, epoch), sharded per rank; the
loader's whole state is the data position (epoch, position, seed), so a resumed run draws exactly the batches
the uninterrupted run would have drawn. Every loader (memory, torch, DALI) has this interface:
`next() -> (x, labels or None)` on the loader's device, `state_dict()`, `load_state_dict(state)`.
"""
from __future__ import annotations

import torch

from fastonestep.data.order import EpochOrder


class EpochLoader:
    kind = "memory"

    def __init__(self, data: torch.Tensor, labels: torch.Tensor | None, batch_size: int, seed: int, device="cpu",
                 rank: int = 0, world_size: int = 1, flip: bool = False):
        self.data, self.labels = data, labels
        self.batch_size, self.seed, self.device = batch_size, seed, device
        self.order = EpochOrder(data.shape[0], batch_size, seed, rank, world_size, flip=flip)
        self.consumed = 0  # batches drawn so far: the data position

    @property
    def epoch(self) -> int:
        return self.consumed // self.order.batches_per_epoch

    def next(self):
        """Returns (x, labels or None) on the loader's device; drops the last partial batch of each epoch."""
        _, idx, flips = self.order.batch(self.consumed)
        self.consumed += 1
        idx = torch.from_numpy(idx)
        x = self.data[idx]
        if flips is not None and flips.any():
            mask = torch.from_numpy(flips)
            x[mask] = x[mask].flip(-1)  # x is a copy (advanced indexing), the dataset is untouched
        x = x.to(self.device, non_blocking=True)
        y = None if self.labels is None else self.labels[idx].to(self.device, non_blocking=True)
        return x, y

    def state_dict(self) -> dict:
        return {"kind": self.kind, **self.order.position_of(self.consumed)}

    def load_state_dict(self, state: dict) -> None:
        self.consumed = self.order.batches_done(state)
