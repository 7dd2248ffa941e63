"""Stopping a run cleanly on SIGTERM or SIGINT (a cluster's preemption notice, Ctrl-C).

While the training steps run, the first SIGTERM or SIGINT only raises a flag; the loop finishes the step it is
in, writes a checkpoint of it and raises `TrainingStopped`, so re-running the same command continues exactly
there. Signals often come in pairs: a scheduler signals every process of the job and torchrun forwards its own
copy, Ctrl-C reaches the workers from the terminal and again from the launcher. So further SIGTERMs are ignored
(a scheduler kills after its grace period anyway), and so is a SIGINT within REPEAT_WINDOW_S of the first
signal; a later SIGINT (Ctrl-C pressed again) raises KeyboardInterrupt at once, without a checkpoint.

Every rank of a distributed run must stop after the same step (the checkpoint is collective), but a signal may
reach only some of them, or reach them in different steps. So after each step the ranks agree on the flags
through a one-element all-reduce on the CPU: a gloo group, made when the steps start (so a machine where gloo
cannot connect fails then, not later), and no wait for the GPU. If the gloo group cannot be made, the flag
goes through the training backend instead, at the cost of one more host synchronisation per step.

Handlers can only be installed from the main thread; `train` called from another thread runs without them. A
signal the process was started to ignore (a background job's SIGINT) stays ignored.
"""
from __future__ import annotations

import contextlib
import signal
import threading
import time
import warnings

import torch
import torch.distributed as dist

SIGNALS = (signal.SIGTERM, signal.SIGINT)
REPEAT_WINDOW_S = 2.0  # a SIGINT this soon after the first signal is the same request, forwarded


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

    def __init__(self, world_size: int = 1, device: torch.device | None = None):
        self.world_size = world_size
        self.received = None  # the name of the first signal received, e.g. "SIGTERM"
        self._first_at = 0.0
        self._previous = {}
        self._group, self._device = None, torch.device("cpu")
        if world_size > 1:
            self._group = self._cpu_group(device)

    def _cpu_group(self, device):
        if dist.get_backend() == "gloo":
            return dist.group.WORLD
        try:
            return dist.new_group(backend="gloo")  # collective: every rank makes it as its steps start
        except (RuntimeError, ValueError) as e:
            warnings.warn(f"no gloo process group ({e}); ranks agree on a stop signal through the training "
                          "backend, one more host synchronisation per step", stacklevel=3)
            self._device = device if device is not None else torch.device("cpu")
            return None

    def _handle(self, signum, frame) -> None:
        if self.received is None:
            self.received, self._first_at = signal.Signals(signum).name, time.monotonic()
        elif signum == signal.SIGINT and time.monotonic() - self._first_at > REPEAT_WINDOW_S:
            self.restore()
            raise KeyboardInterrupt  # Ctrl-C again: stop now, without a checkpoint

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in SIGNALS:
            if signal.getsignal(sig) is not signal.SIG_IGN:  # a signal the process was told to ignore stays so
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
        flag = torch.tensor([0 if self.received is None else int(getattr(signal, self.received))],
                            dtype=torch.int64, device=self._device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group)
        if not flag.item():
            return None
        return self.received or signal.Signals(int(flag.item())).name


@contextlib.contextmanager
def stop_requests(world_size: int = 1, device: torch.device | None = None):
    """StopRequests with its handlers installed for the duration of the block (`device`: the training device, for
    the fallback without gloo)."""
    requests = StopRequests(world_size, device)
    requests.install()
    try:
        yield requests
    finally:
        requests.restore()
