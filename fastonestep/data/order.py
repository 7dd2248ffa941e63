"""The data order every loader shares: which samples (and which flips) form batch k on rank r.

Batch k of a rank is a pure function of (seed, k, rank, world_size): epoch e = k // batches_per_epoch draws a
permutation of all N samples from a generator seeded by (seed, e), cut into global batches of
world_size * batch_size positions (the last partial one dropped); rank r takes the r-th contiguous slice of
batch_size positions of global batch k (train.batch_size is the global batch, batch_size = train.batch_size /
world_size is what one rank reads). So ranks are disjoint, and N processes together read exactly the batches
one process reads: the distributed backends follow the single-process trajectory. Optional horizontal flips
come from a second per-epoch generator, one flag per permutation position. Because nothing depends on what was read before, a
resumed loader skips to batch k without touching the skipped files, and the in-memory, torch and DALI loaders
all produce the same batches. With world_size 1 the order is the one EpochLoader always had.
"""
from __future__ import annotations

import numpy as np
import torch

_EPOCH_MIX = 1_000_003  # seed * _EPOCH_MIX + epoch seeds an epoch's permutation (EpochLoader's historic rule)
_FLIP_STREAM = 0x5DEECE66D  # added to the permutation seed for the flip generator: a separate stream


class EpochOrder:
    """Sharded, seeded per-epoch order. `batch(k)` -> (epoch, indices int64 (B,), flips bool (B,) or None)."""

    def __init__(self, num_samples: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 flip: bool = False):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in 0..world_size-1 (world_size={world_size})")
        if batch_size < 1:
            raise ValueError(f"train.batch_size must be positive, got {batch_size}")
        self.global_batch = batch_size * world_size
        if num_samples < self.global_batch:
            raise ValueError(f"dataset has {num_samples} samples, fewer than train.batch_size={self.global_batch}")
        self.num_samples, self.batch_size, self.seed = num_samples, batch_size, seed
        self.rank, self.world_size, self.flip = rank, world_size, flip
        self.batches_per_epoch = num_samples // self.global_batch
        self._cached_epoch, self._perm, self._flips = -1, None, None

    def _epoch_tables(self, epoch: int):
        if epoch != self._cached_epoch:
            base = self.seed * _EPOCH_MIX + epoch
            self._perm = torch.randperm(self.num_samples, generator=torch.Generator().manual_seed(base)).numpy()
            if self.flip:
                g = torch.Generator().manual_seed(base + _FLIP_STREAM)
                self._flips = (torch.rand(self.num_samples, generator=g) < 0.5).numpy()
            self._cached_epoch = epoch
        return self._perm, self._flips

    def batch(self, k: int):
        if k < 0:
            raise ValueError(f"batch number must be >= 0, got {k}")
        epoch, j = divmod(k, self.batches_per_epoch)
        perm, flips = self._epoch_tables(epoch)
        start = j * self.global_batch + self.rank * self.batch_size
        positions = slice(start, start + self.batch_size)
        return epoch, perm[positions].astype(np.int64), (None if flips is None else flips[positions].copy())

    # -- data position <-> batch number -----------------------------------------------------------------------
    def position_of(self, k: int) -> dict:
        """The resumable data position after k batches were consumed: global (the same on every rank, and
        independent of the number of ranks, so a run may resume on another number of processes)."""
        epoch, j = divmod(k, self.batches_per_epoch)
        return {"epoch": epoch, "position": j * self.global_batch, "seed": self.seed,
                "batch_size": self.global_batch}

    def batches_done(self, state: dict) -> int:
        """Inverse of position_of; checks that the saved position belongs to this order."""
        for key, mine in (("seed", self.seed), ("batch_size", self.global_batch)):
            if key in state and int(state[key]) != mine:
                raise ValueError(f"saved data position has {key}={state[key]}, this run has {mine}: the data order "
                                 "cannot resume exactly (keep seed and train.batch_size)")
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or position < 0 or position % self.global_batch:
            raise ValueError(f"saved data position epoch={epoch} position={position} is not a batch boundary "
                             f"of batch size {self.global_batch}")
        # A position at the end of an epoch (possible in older checkpoints) is the start of the next one.
        return epoch * self.batches_per_epoch + min(position // self.global_batch, self.batches_per_epoch)
