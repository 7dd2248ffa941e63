"""The single-process training loop: config -> data -> method.step -> stats, checkpoints, export, eval.

Resume is "run the same command again": the loop finds the newest checkpoint in the run directory and
continues with the exact data order and RNG state, so the result equals an uninterrupted run. A finished
run re-run does nothing but report its metrics.
"""
from __future__ import annotations

import json
import os
import random
import time

import numpy as np
import torch
import yaml

from fastonestep.config import Config, ConfigError, save_config, to_dict, flatten
from fastonestep.data import make_dataset
from fastonestep.engine.checkpoint import (atomic_write_json, latest_checkpoint, load_checkpoint,
                                           save_checkpoint)
from fastonestep.engine.evaluate import evaluate
from fastonestep.engine.export import export_model, network_spec
from fastonestep.engine.loader import EpochLoader
from fastonestep.engine.stats import StatsLogger, truncate_stats
from fastonestep.methods import make_method

# Keys that may change between a run and its resume: how long and how verbosely, not what is trained.
RESUMABLE_CHANGES = ("train.steps", "train.log_every", "train.checkpoint_every", "train.device", "train.threads")


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("config key 'train.device' is 'cuda' but no CUDA device is available")
    return torch.device(name)


def _check_same_run(cfg: Config, run_dir: str) -> None:
    path = os.path.join(run_dir, "config.yaml")
    if not os.path.exists(path):
        return
    with open(path, encoding="utf-8") as f:
        saved = flatten(yaml.safe_load(f) or {})
    current = flatten(to_dict(cfg))
    differ = sorted(k for k in set(saved) | set(current)
                    if saved.get(k) != current.get(k) and k not in RESUMABLE_CHANGES and not k.startswith("eval."))
    if differ:
        raise ConfigError(f"run directory '{run_dir}' holds a run with a different config ({', '.join(differ)}); "
                          "use another --out, or the same settings to resume")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build(cfg: Config):
    """Dataset and method for a config (also used by `fastonestep eval`)."""
    device = pick_device(cfg.train.device)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    seed_everything(cfg.seed)
    d = cfg.data
    dataset = make_dataset(d.kind, name=d.name, path=d.path, resolution=d.resolution, size=d.size, seed=cfg.seed)
    return dataset, make_method(cfg, dataset, device)


def model_info(cfg: Config, method, dataset) -> dict:
    info = {"method": cfg.method, "network": network_spec(cfg.network), "data_shape": list(dataset.shape),
            "num_classes": method.num_classes, "sigma_data": cfg.diffusion.sigma_data, "role": "denoiser"}
    if hasattr(method, "teacher_info"):  # distilled generators keep their teacher's architecture
        info.update({k: method.teacher_info[k] for k in ("network", "sigma_data")})
    if hasattr(method, "export_info"):
        info.update(method.export_info())
    return info


def train(cfg: Config, run_dir: str, progress: bool = True, log=print) -> dict:
    os.makedirs(run_dir, exist_ok=True)
    _check_same_run(cfg, run_dir)
    metrics_path = os.path.join(run_dir, "metrics.json")
    dataset, method = build(cfg)
    save_config(cfg, os.path.join(run_dir, "config.yaml"))

    loader = EpochLoader(dataset.data, dataset.labels, cfg.train.batch_size, cfg.seed, method.device)
    start = 0
    ckpt_path = latest_checkpoint(run_dir)
    if ckpt_path:
        state = load_checkpoint(ckpt_path)
        method.load_state_dict(state["method"])
        loader.load_state_dict(state["loader"])
        torch.set_rng_state(state["torch_rng"])
        start = state["step"]
        truncate_stats(run_dir, start)
        log(f"resuming from {ckpt_path} (step {start})")
    if start >= cfg.train.steps and os.path.exists(metrics_path):
        log(f"run '{run_dir}' is complete ({start} steps); metrics in {metrics_path}")
        with open(metrics_path, encoding="utf-8") as f:
            return json.load(f)

    log(f"parameters: {method.parameter_counts}")
    stats = StatsLogger(run_dir, method.device)
    bar = _progress_bar(start, cfg.train.steps, progress)
    t_start = time.perf_counter()
    batch = cfg.train.batch_size
    for step in range(start, cfg.train.steps):
        row = method.step(loader.next, step, step * batch)
        stats.add(row, batch)
        done = step + 1
        if done % cfg.train.log_every == 0 or done == cfg.train.steps:
            line = stats.flush(done, done * batch)
            if bar is not None:
                bar.set_postfix({k: f"{v:.3g}" for k, v in line.items() if ("loss" in k or "accuracy" in k) and v is not None})
        if done % cfg.train.checkpoint_every == 0 or done == cfg.train.steps:
            save_checkpoint(run_dir, done, {"step": done, "method": method.state_dict(),
                                            "loader": loader.state_dict(), "torch_rng": torch.get_rng_state()})
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    train_seconds = time.perf_counter() - t_start

    export_model(os.path.join(run_dir, "model.safetensors"), method.export_network(),
                 model_info(cfg, method, dataset))
    metrics = evaluate(method, dataset, cfg, run_dir, progress=log)
    metrics["parameters"] = method.parameter_counts
    metrics["train_seconds_this_session"] = train_seconds
    metrics["steps"] = cfg.train.steps
    atomic_write_json(metrics_path, metrics)
    return metrics


def _progress_bar(start: int, total: int, enabled: bool):
    if not enabled or start >= total:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True)
