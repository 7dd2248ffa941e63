"""Deterministic, resumable batches from an in-memory dataset.

The order is a permutation seeded by (seed, epoch); the loader's whole state is (epoch, position), so a
resumed run draws exactly the batches the uninterrupted run would have drawn.
"""
from __future__ import annotations

import torch


class EpochLoader:
    def __init__(self, data: torch.Tensor, labels: torch.Tensor | None, batch_size: int, seed: int, device="cpu"):
        if data.shape[0] < batch_size:
            raise ValueError(f"dataset has {data.shape[0]} samples, fewer than train.batch_size={batch_size}")
        self.data, self.labels = data, labels
        self.batch_size, self.seed, self.device = batch_size, seed, device
        self.epoch, self.position = 0, 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.data.shape[0], generator=g)

    def next(self):
        """Returns (x, labels or None) on the loader's device; drops the last partial batch of each epoch."""
        if self.position + self.batch_size > self.data.shape[0]:
            self.epoch, self.position = self.epoch + 1, 0
            self._order = self._permutation(self.epoch)
        idx = self._order[self.position:self.position + self.batch_size]
        self.position += self.batch_size
        x = self.data[idx].to(self.device, non_blocking=True)
        y = None if self.labels is None else self.labels[idx].to(self.device, non_blocking=True)
        return x, y

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._order = self._permutation(self.epoch)
