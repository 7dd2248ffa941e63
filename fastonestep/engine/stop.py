"""Stopping a run cleanly on SIGTERM or SIGINT (a cluster's preemption notice, Ctrl-C).

While the training steps run, the first SIGTERM or SIGINT only raises a flag; the loop finishes the step it is
in, writes a checkpoint of it and raises `TrainingStopped`, so re-running the same command continues exactly
there. The handlers are then back to what they were, so a second signal acts at once (Ctrl-C twice: an
immediate KeyboardInterrupt; SIGTERM twice: the default, termination).

Every rank of a distributed run must stop after the same step (the checkpoint is collective), but a signal may
reach only some of them, or reach them in different steps. So after each step the ranks agree on the flags
through a one-element all-reduce on the CPU (a gloo group: no wait for the GPU).

Handlers can only be installed from the main thread; `train` called from another thread runs without them.
"""
from __future__ import annotations

import contextlib
import signal
import threading

import torch
import torch.distributed as dist

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class TrainingStopped(Exception):
    """Raised by the training loop after a signal, once the interrupted step is checkpointed."""

    def __init__(self, signal_name: str, step: int, run_dir: str):
        self.signal_name, self.step, self.run_dir = signal_name, step, run_dir
        super().__init__(f"stopped by {signal_name} after step {step}; the checkpoint of that step is in "
                         f"'{run_dir}': re-run the same command to resume")

    @property
    def exit_code(self) -> int:
        """128 + the signal number, as a shell reports a process the signal ended."""
        return 128 + int(getattr(signal, self.signal_name, signal.SIGTERM))


class StopRequests:
    """The signal flag of this process and the ranks' agreement on it."""

    def __init__(self, world_size: int = 1):
        self.world_size = world_size
        self.received = None  # the name of the first signal received, e.g. "SIGTERM"
        self._previous = {}
        self._group = None

    def _handle(self, signum, frame) -> None:
        self.received = self.received or signal.Signals(signum).name
        self.restore()  # the next signal acts at once

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def agreed(self) -> str | None:
        """The signal to stop for, once every rank knows one arrived somewhere (collective when distributed):
        the received signal's name, or "SIGTERM" on a rank that only heard of it from another."""
        if self.world_size == 1:
            return self.received
        if self._group is None:  # CPU collectives whatever the training backend (nccl cannot reduce CPU tensors)
            self._group = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else dist.group.WORLD
        flag = torch.tensor([0 if self.received is None else int(getattr(signal, self.received))],
                            dtype=torch.int64)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group)
        if not flag.item():
            return None
        return self.received or signal.Signals(int(flag.item())).name


@contextlib.contextmanager
def stop_requests(world_size: int = 1):
    """StopRequests with its handlers installed for the duration of the block."""
    requests = StopRequests(world_size)
    requests.install()
    try:
        yield requests
    finally:
        requests.restore()
