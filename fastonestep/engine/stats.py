"""Training statistics: running means between log lines, throughput and peak memory, stats.jsonl."""
from __future__ import annotations

import json
import os
import resource
import sys
import time

import torch


def peak_memory_mb(device: torch.device) -> float:
    """On a GPU: the allocator's peak since the last `restart_peak_memory`; on a CPU: the process's peak RSS
    (which cannot be restarted)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss_kb / (2**20 if sys.platform == "darwin" else 2**10)


def restart_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


SUMMED_OVER_RANKS = ("nonfinite_samples",)  # key suffixes of per-rank counts (summed, not averaged, over ranks)


class StatsLogger:
    """Accumulates per-step scalars and appends one JSON line per log interval to stats.jsonl.

    Values may be python numbers or 0-d tensors. Tensors are summed where they live, so a training step
    never waits for the device; the one synchronisation happens at `flush`. Non-finite values are left
    out of the means and counted under "nonfinite/<name>".

    With a distributed `backend` every rank calls `flush` (one all-reduce): a logged value is the mean over
    ranks and steps (counts such as "*nonfinite_samples" are summed over ranks), peak memory the maximum over
    ranks (on a GPU, of the interval since the last line; `exclude` leaves out work such as evaluation), and only
    rank 0 writes the file. Every rank must log the same keys (they run the same code).
    """

    def __init__(self, run_dir: str, device: torch.device, backend=None):
        self.path = os.path.join(run_dir, "stats.jsonl")
        self.device = device
        self.backend = backend
        self._reset()

    def _reset(self):
        self.sums, self.counts, self.adds = {}, {}, {}
        self.images, self.t0 = 0, time.perf_counter()

    def add(self, stats: dict, images: int) -> None:
        for k, v in stats.items():
            v = torch.as_tensor(v, dtype=torch.float64).detach().reshape(())
            ok = torch.isfinite(v)
            self.sums[k] = self.sums.get(k, 0) + torch.where(ok, v, torch.zeros_like(v))
            self.counts[k] = self.counts.get(k, 0) + ok.to(torch.int64)
            self.adds[k] = self.adds.get(k, 0) + 1
        self.images += images

    def flush(self, step: int, nimg: int) -> dict:
        dt = max(time.perf_counter() - self.t0, 1e-9)
        row = {"step": step, "kimg": nimg / 1000}
        keys = sorted(self.sums)
        sums, counts, adds = self._reduced(keys)
        world = self.backend.world_size if self.backend is not None else 1
        for k, total, count, added in zip(keys, sums, counts, adds):
            count, added = int(round(count)), int(round(added))
            row[k] = total / count * (world if k.endswith(SUMMED_OVER_RANKS) else 1) if count else None
            if count < added:
                row["nonfinite/" + k] = added - count
        row["images_per_sec"] = self.images / dt
        row["sec_per_kimg"] = dt / max(self.images / 1000, 1e-9)
        peak = peak_memory_mb(self.device)
        if world > 1:
            peak = float(self.backend.all_reduce(torch.tensor([peak], dtype=torch.float64, device=self.device),
                                                 "max"))
        row["peak_memory_mb"] = peak
        restart_peak_memory(self.device)  # each line: the peak of its own interval
        row["time"] = time.time()
        if self.backend is None or self.backend.is_main:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")
        self._reset()
        return row

    def exclude(self, seconds: float) -> None:
        """Work done between two steps (evaluation) is not training: neither its time nor its memory peak."""
        self.t0 += seconds
        restart_peak_memory(self.device)

    def pending_state(self) -> dict:
        """The running sums not logged yet, summed over ranks (collective when distributed), for a checkpoint: a
        run resumed from it logs the same next line as the uninterrupted run (throughput aside)."""
        keys = sorted(self.sums)
        sums, counts, adds = self._reduced(keys)
        return {"keys": keys, "sums": sums, "counts": counts, "adds": adds}

    def load_pending_state(self, state: dict | None, holds_totals: bool) -> None:
        """Restores `pending_state`. Its sums are over all ranks, so one rank (`holds_totals`) takes them; the
        others take the keys with zeros, so every rank reduces the same keys."""
        if not state:
            return
        for i, k in enumerate(state["keys"]):
            self.sums[k] = state["sums"][i] if holds_totals else 0.0
            self.counts[k] = int(round(state["counts"][i])) if holds_totals else 0
            self.adds[k] = int(round(state["adds"][i])) if holds_totals else 0

    def _reduced(self, keys):
        """(sums, finite counts, adds) per key as python floats, summed over ranks."""
        columns = [[self.sums[k] for k in keys], [self.counts[k] for k in keys], [self.adds[k] for k in keys]]
        if self.backend is None or self.backend.world_size == 1 or not keys:
            return [[float(v) for v in col] for col in columns]
        packed = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=self.device).reshape(())
                              for col in columns for v in col])
        packed = self.backend.all_reduce(packed).tolist()
        n = len(keys)
        return packed[:n], packed[n:2 * n], packed[2 * n:]


def _log_lines(path: str) -> tuple[str, list[str]]:
    """(text, lines) of JSON-lines log `path`: its lines that hold JSON, each ending in a newline. A torn last
    line (no newline: the process was killed while appending it) is left out; any other bad line is an error
    naming the file and line."""
    if not os.path.exists(path):
        return "", []
    with open(path, encoding="utf-8") as f:
        text = f.read()
    raw = text.splitlines(keepends=True)
    lines = []
    for number, line in enumerate(raw, 1):
        if not line.strip():
            continue
        try:
            json.loads(line)
        except ValueError as e:
            if number == len(raw) and not line.endswith("\n"):
                break
            raise ValueError(f"log file '{path}' line {number} is not valid JSON ({e}); delete that line to "
                             "go on") from None
        lines.append(line if line.endswith("\n") else line + "\n")
    return text, lines


def read_log_lines(path: str) -> list[str]:
    return _log_lines(path)[1]


def truncate_log(path: str, step: int) -> None:
    """Drops the lines of steps after `step` (and a torn last line) from JSON-lines log `path`, atomically."""
    text, lines = _log_lines(path)
    kept = "".join(ln for ln in lines if json.loads(ln).get("step", 0) <= step)
    if kept != text:
        from fastonestep.engine.checkpoint import atomic_write_text

        atomic_write_text(path, kept)


def truncate_stats(run_dir: str, step: int) -> None:
    """On resume, drops log lines written after the checkpoint, so stats.jsonl matches the resumed run."""
    truncate_log(os.path.join(run_dir, "stats.jsonl"), step)
