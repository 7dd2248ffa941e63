"""The torch DataLoader fallback for streamed data (image folders decoded with PIL, numpy latent files).

One DataLoader item is one whole batch: `_BatchReader[k]` reads the files of batch k of this rank's
EpochOrder, so the order, sharding and flips are those of every other loader and a resume just starts the
batch counter at the saved position; skipped batches are never read. With `workers` > 0 the batches are
built in that many worker processes (in order: the DataLoader keeps the sampler's order).
"""
from __future__ import annotations

import itertools
import signal

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .errors import DataError
from .files import FileDataset, images_to_tensor, read_sample
from .order import EpochOrder


class _BatchReader(Dataset):
    """Item k: (k, x float32 NCHW, labels int64 or None) for batch k."""

    def __init__(self, dataset: FileDataset, order: EpochOrder):
        self.dataset, self.order = dataset, order

    def __getitem__(self, k: int):
        _, idx, flips = self.order.batch(int(k))
        samples = [read_sample(self.dataset, int(i)) for i in idx]
        if self.dataset.is_latent:
            x = torch.from_numpy(np.stack(samples))
        else:
            x = images_to_tensor(samples, flips)
        y = None if self.dataset.labels is None else self.dataset.labels[torch.from_numpy(idx)]
        return k, x, y


class _CountFrom(Sampler):
    """start, start + 1, ... forever: batch numbers."""

    def __init__(self, start: int):
        self.start = start

    def __iter__(self):
        return itertools.count(self.start)


def _ignore_stop_signals(_worker_id: int) -> None:
    """Readers leave SIGINT / SIGTERM to the training process, which finishes its step and checkpoints
    (engine/stop.py); a reader ended by a signal sent to the whole process group would fail that step."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _last_line(message: str) -> str:
    """The error itself out of a reader's re-raised message ("Caught ... Original Traceback ... X: what")."""
    last = message.strip().splitlines()[-1] if message.strip() else message
    prefix = f"{DataError.__module__}.{DataError.__name__}: "
    return last[len(prefix):] if last.startswith(prefix) else last


def _keep_none(item):
    return item  # items are whole batches already; the default collate would choke on labels=None


class TorchLoader:
    kind = "torch"

    def __init__(self, dataset: FileDataset, batch_size: int, seed: int, device="cpu", rank: int = 0,
                 world_size: int = 1, workers: int = 0, flip: bool = False):
        self.dataset, self.device, self.workers = dataset, torch.device(device), workers
        self.order = EpochOrder(len(dataset), batch_size, seed, rank, world_size,
                                flip=flip and not dataset.is_latent)
        self.consumed = 0
        self._iter = None

    def _start(self):
        loader = DataLoader(_BatchReader(self.dataset, self.order), batch_size=None,
                            sampler=_CountFrom(self.consumed), num_workers=self.workers, collate_fn=_keep_none,
                            pin_memory=self.device.type == "cuda",
                            prefetch_factor=2 if self.workers else None, persistent_workers=False,
                            worker_init_fn=_ignore_stop_signals if self.workers else None)
        self._iter = iter(loader)

    def next(self):
        if self._iter is None:
            self._start()
        try:
            k, x, y = next(self._iter)
        except DataError as err:  # from a reader process: its message carries the reader's whole traceback
            raise DataError(_last_line(str(err))) from None
        if k != self.consumed:  # cannot happen with an ordered DataLoader; guards resume bookkeeping
            raise RuntimeError(f"torch loader produced batch {k}, expected {self.consumed}")
        self.consumed += 1
        x = x.to(self.device, non_blocking=True)
        y = None if y is None else y.to(self.device, non_blocking=True)
        return x, y

    def state_dict(self) -> dict:
        return {"kind": self.kind, **self.order.position_of(self.consumed)}

    def load_state_dict(self, state: dict) -> None:
        self.consumed = self.order.batches_done(state)
        self.close()  # the next batch restarts the readers at the saved position

    def close(self) -> None:
        """Stops the reader processes now. Left to garbage collection at interpreter exit they would be sent
        SIGTERM, which they ignore (_ignore_stop_signals), and the exit would wait for them forever."""
        it, self._iter = self._iter, None
        shutdown = getattr(it, "_shutdown_workers", None)  # DataLoader's own orderly stop: a sentinel per reader
        if shutdown is not None:
            shutdown()
