"""Evaluation during training (config key train.eval_every_kimg): every N thousand training images, the run's
model (the method's first sampler) generates eval.num_samples samples from the fixed evaluation noise
(EVAL_SEED) and one line {step, kimg, sampler, metrics} is added to run_dir/eval.jsonl.

The same noise and reference points at every evaluation make the lines a curve of one quantity. The global
RNG is forked around the evaluation, so training with evaluation on draws exactly the numbers it would draw
with it off; and a resumed run drops the lines written after its checkpoint, like stats.jsonl.
"""
from __future__ import annotations

import json
import math
import os
import time

import torch

from fastonestep.engine.checkpoint import atomic_write_text
from fastonestep.engine.evaluate import generate, sample_metrics
from fastonestep.engine.stats import read_log_lines, truncate_log

EVAL_LOG = "eval.jsonl"


def eval_due(done: int, batch_size: int, every_kimg: float) -> bool:
    """True when the images seen crossed a multiple of every_kimg * 1000 during step `done` (1-based)."""
    if every_kimg <= 0:
        return False
    every = every_kimg * 1000.0
    return math.floor(done * batch_size / every) > math.floor((done - 1) * batch_size / every)


def append_eval_line(run_dir: str, row: dict) -> None:
    """Adds one JSON line, rewriting the (small) file atomically: a crash leaves the old or the new file."""
    path = os.path.join(run_dir, EVAL_LOG)
    atomic_write_text(path, "".join(read_log_lines(path)) + json.dumps(row) + "\n")


def truncate_eval_log(run_dir: str, step: int) -> None:
    """On resume (or a fresh start), drops the lines of steps after `step`."""
    truncate_log(os.path.join(run_dir, EVAL_LOG), step)


def read_eval_log(run_dir: str) -> list[dict]:
    return [json.loads(ln) for ln in read_log_lines(os.path.join(run_dir, EVAL_LOG))]


def periodic_eval(method, dataset, cfg, run_dir: str, step: int, nimg: int) -> tuple[dict, torch.Tensor]:
    """Evaluates the method's first sampler now and appends the line to eval.jsonl; returns the line and the
    samples it was computed from."""
    name, sampler = next(iter(method.samplers().items()))
    t0 = time.perf_counter()
    devices = None if method.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        samples = generate(sampler, cfg.eval.num_samples, dataset.shape, method.num_classes, method.device,
                           cfg.eval.batch_size)
        metrics = sample_metrics(samples, dataset, cfg.eval, cfg.data, method.device)
    row = {"step": step, "kimg": nimg / 1000, "sampler": name, "metrics": metrics,
           "seconds": time.perf_counter() - t0}
    append_eval_line(run_dir, row)
    return row, samples
