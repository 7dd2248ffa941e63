"""TensorBoard event files (config key train.tensorboard) under RUN_DIR/tensorboard, written by rank 0.

What goes in: every scalar of a stats.jsonl line under the same name (losses, gradient norms, ratio accuracy,
non-finite counts, images_per_sec, sec_per_kimg, peak_memory_mb), each numeric metric of an eval.jsonl line as
eval/<name>, and a grid of that evaluation's first samples (image data) as eval/samples. The x axis is the
training step, as in the JSON files; the JSON files stay the record, TensorBoard is a view of them.

Resume: the writer opens with purge_step = the first step the resumed run logs, so TensorBoard drops whatever
a crashed attempt logged after its last checkpoint, as stats.jsonl and eval.jsonl are truncated.
"""
from __future__ import annotations

import contextlib
import os

import torch

from fastonestep.engine.images import image_grid

LOG_DIR = "tensorboard"
MISSING = ("TensorBoard logging is off: the tensorboard package is not installed "
           "(pip install tensorboard, or set train.tensorboard=false to silence this)")
_SKIPPED_KEYS = ("step", "kimg", "time")  # the axes of a stats line, not quantities


def _number(v) -> float | None:
    """v as a float when it is a real number; None for bools, strings, lists and dicts (not logged)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v)


class TensorBoardLog:
    def __init__(self, run_dir: str, first_step: int):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(os.path.join(run_dir, LOG_DIR), purge_step=first_step)

    def stats(self, row: dict) -> None:
        """One stats.jsonl line."""
        step, walltime = row["step"], row.get("time")
        for key, value in row.items():
            v = None if key in _SKIPPED_KEYS else _number(value)
            if v is not None:
                self.writer.add_scalar(key, v, step, walltime=walltime)

    def eval(self, row: dict, samples: torch.Tensor | None = None, grid: int = 8) -> None:
        """One eval.jsonl line and, for image data, a grid of the first grid x grid samples."""
        step = row["step"]
        for key, value in row["metrics"].items():
            v = _number(value)
            if v is not None:
                self.writer.add_scalar(f"eval/{key}", v, step)
        if samples is not None and samples.ndim == 4:
            n = min(grid * grid, samples.shape[0])
            self.writer.add_image("eval/samples", image_grid(samples[:n], nrow=min(grid, n)), step,
                                  dataformats="HWC")
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


@contextlib.contextmanager
def tensorboard_log(enabled: bool, run_dir: str, first_step: int, log=print):
    """The run's TensorBoard log for the duration of a `with` block, closed (flushed) at its end; None when it is
    off or the tensorboard package is missing (said once)."""
    board = None
    if enabled:
        try:
            board = TensorBoardLog(run_dir, first_step)
        except ImportError:
            log(MISSING)
    try:
        yield board
    finally:
        if board is not None:
            board.close()


__all__ = ["LOG_DIR", "TensorBoardLog", "tensorboard_log"]
