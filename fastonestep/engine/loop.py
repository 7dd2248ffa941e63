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
from fastonestep.data.loaders import make_loader, open_dataset
from fastonestep.engine.checkpoint import atomic_write_json, list_checkpoints, load_latest_checkpoint
from fastonestep.engine.distributed import make_backend
from fastonestep.engine.evaluate import evaluate
from fastonestep.engine.export import export_model, network_spec
from fastonestep.engine.periodic_eval import eval_due, periodic_eval, read_eval_log, truncate_eval_log
from fastonestep.engine.rundir import claimed_run_dir
from fastonestep.engine.stats import StatsLogger, truncate_stats
from fastonestep.engine.stop import TrainingStopped, stop_requests
from fastonestep.engine.tensorboard import tensorboard_log
from fastonestep.methods import make_method
from fastonestep.methods.distill import student_spec

# Keys that may change between a run and its resume: how long and how verbosely, not what is trained. The
# teacher's path may move: its weights are checked against the checkpoint's (DistillMethod.load_state_dict).
RESUMABLE_CHANGES = ("teacher", "train.steps", "train.log_every", "train.checkpoint_every", "train.device",
                     "train.threads", "train.eval_every_kimg", "train.batch_per_gpu", "train.tensorboard",
                     "train.activation_checkpointing", "train.ema_snapshot_kimg")


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("config key 'train.device' is 'cuda' but no CUDA device is available")
    return torch.device(name)


def _saved_config(run_dir: str) -> dict | None:
    """The flattened config.yaml of the run in `run_dir`; None when there is none."""
    path = os.path.join(run_dir, "config.yaml")
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        return flatten(yaml.safe_load(f) or {})


def _check_same_run(cfg: Config, run_dir: str) -> dict | None:
    """Refuses another config than the one in run_dir/config.yaml (resumable keys aside); returns that config,
    flattened (None when there is none)."""
    saved = _saved_config(run_dir)
    _check_same_config(cfg, run_dir, saved)
    return saved


def _check_same_config(cfg: Config, run_dir: str, saved: dict | None, source: str = "") -> None:
    """Refuses to continue the run of `saved` (a flattened config) with other settings than the resumable ones;
    `source` says where `saved` came from when it is not config.yaml."""
    if saved is None:  # a fresh run, or a checkpoint written before the config was recorded in it
        return
    current = flatten(to_dict(cfg))
    defaults = flatten(to_dict(Config()))  # a key added after the run was saved counts at its default value
    differ = sorted(k for k in set(saved) | set(current)
                    if saved.get(k, defaults.get(k)) != current.get(k) and k not in RESUMABLE_CHANGES
                    and not k.startswith("eval."))
    if differ:
        where = f" (recorded in {source})" if source else ""
        raise ConfigError(f"run directory '{run_dir}' holds a run with a different config ({', '.join(differ)})"
                          f"{where}; use another --out, or the same settings to resume")


def _check_steps_reach(cfg: Config, newest: tuple[int, str] | None) -> None:
    """train.steps may grow on resume, never fall below the run's newest checkpoint: a model exported there
    would be of a later step than its metrics say."""
    if newest is not None and cfg.train.steps < newest[0]:
        raise ConfigError(f"config key 'train.steps' is {cfg.train.steps} but the run has reached step {newest[0]} "
                          f"(checkpoint '{newest[1]}'); use train.steps={newest[0]} or more, or another --out")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def default_rng_state(device: torch.device) -> dict:
    """This rank's torch default generators, which draw what the methods' own generators do not (dropout masks):
    the CPU one, and on a GPU the device's (dropout on CUDA draws from it)."""
    state = {"torch_rng": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda_rng"] = torch.cuda.get_rng_state(device)
    return state


def load_default_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch_rng"])
    if device.type == "cuda" and "cuda_rng" in state:  # absent: written on another device type
        torch.cuda.set_rng_state(state["cuda_rng"], device)


def _mixed_seed(*words: int) -> int:
    """A 64-bit torch seed hashed from the words (numpy's SeedSequence): neighbouring (seed, rank) pairs give
    unrelated streams, unlike seed + rank, which would hand rank 1 of seed 0 the stream of rank 0 of seed 1."""
    return int(np.random.SeedSequence([w % 2**64 for w in words]).generate_state(1, np.uint64)[0])


def seed_rank_default_rng(seed: int, rank: int) -> None:
    """After the networks are built (their initial weights, hence the EMAs copied from them, must be alike on
    every rank): each rank > 0 gets its own default-generator stream (CPU and CUDA), seeded by (seed, rank), so
    the ranks' samples get independent dropout masks. Rank 0 keeps the stream seed_everything started: a
    single-process run draws exactly as before."""
    if rank > 0:
        torch.manual_seed(_mixed_seed(seed, rank))


def gathered_default_rng_states(backend, device: torch.device) -> list[dict] | None:
    """Collective: every rank's default_rng_state, indexed by rank, on rank 0 (None on the other ranks). Rank 0's
    entry holds the very tensors, not a copy: the checkpoint's top-level entries share their storage."""
    return backend.gather_object(default_rng_state(device))


def default_rng_checkpoint(states: list[dict]) -> dict:
    """The checkpoint's entries for the ranks' default generators: "rank_rng" indexed by rank, and rank 0's at
    the top level as checkpoints have always held it (read by older versions, and by a resume on another
    process count)."""
    return {**states[0], "rank_rng": states}


def restore_default_rng(state: dict, device: torch.device, rank: int, world_size: int, seed: int) -> bool:
    """Each rank resumes its own default-generator stream from the checkpoint `state`. Written on another number
    of processes (DDP resumes on any), rank 0 restores its own and the other ranks start fresh streams seeded
    by (seed, resumed step, rank): the run goes on with independent masks per rank, but is not the run an
    uninterrupted one would have been. Checkpoints of versions before "rank_rng" count as written by one
    process. Returns whether every rank could restore its own."""
    saved = state.get("rank_rng") or [{k: state[k] for k in ("torch_rng", "cuda_rng") if k in state}]
    same_layout = len(saved) == world_size
    if same_layout or rank == 0:
        load_default_rng_state(saved[rank], device)
    else:
        torch.manual_seed(_mixed_seed(seed, state["step"], rank))
    return same_layout


def build(cfg: Config, backend=None):
    """Dataset and method for a config (also used by `fastonestep eval`); backend None = single process."""
    device = backend.device if backend is not None else pick_device(cfg.train.device)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    seed_everything(cfg.seed)
    d = cfg.data
    dataset = open_dataset(cfg)  # in memory, or a file list for the streaming loaders (data.loader)
    _check_data_promises(d, dataset)
    return dataset, make_method(cfg, dataset, device, backend)


def _check_data_promises(d, dataset) -> None:
    """data.shape / data.num_classes (used by the dry run) must describe the data actually loaded."""
    if d.shape and tuple(d.shape) != tuple(dataset.shape):
        raise ConfigError(f"config key 'data.shape' is {list(d.shape)} but the dataset's samples have shape "
                          f"{list(dataset.shape)}")
    if d.num_classes and d.num_classes != dataset.num_classes:
        raise ConfigError(f"config key 'data.num_classes' is {d.num_classes} but the dataset has "
                          f"{dataset.num_classes} classes")


def model_info(cfg: Config, method, dataset) -> dict:
    info = {"method": cfg.method, "network": network_spec(cfg.network), "data_shape": list(dataset.shape),
            "num_classes": method.num_classes, "sigma_data": cfg.diffusion.sigma_data, "role": "denoiser"}
    if hasattr(method, "teacher_info"):  # distilled generators keep their teacher's architecture
        info.update(network=student_spec(method.teacher_info["network"], cfg.student_dropout),
                    sigma_data=method.teacher_info["sigma_data"])
    if hasattr(method, "export_info"):
        info.update(method.export_info())
    if cfg.data.kind == "latent":  # lets `fastonestep sample --vae` decode
        from fastonestep.data.latents import latent_model_info

        info.update(latent_model_info(cfg.data))
    return info


def train(cfg: Config, run_dir: str, progress: bool = True, log=print) -> dict:
    """Every rank of a torchrun / deepspeed launch calls this; rank 0 alone writes files (config, stats,
    checkpoints, exports, metrics) and evaluates, the others wait and return rank 0's metrics. Rank 0 holds the
    run directory's lock throughout: a second training on it is refused."""
    backend = make_backend(cfg)  # distributed.backend; process group from the launcher environment
    backend.run_dir = run_dir
    log = log if backend.is_main else (lambda *_: None)
    with claimed_run_dir(run_dir, backend, log):
        return _train(cfg, run_dir, backend, progress and backend.is_main, log)


def _continues_logged_interval(state: dict | None, cfg: Config) -> bool:
    """Whether the checkpoint ended a shorter run inside a log interval and this run goes on: the partial line
    that run logged at its last step is dropped, and its sums (in the checkpoint) go into the next line."""
    if not state or state["step"] >= cfg.train.steps:
        return False
    return (state.get("stats") or {}).get("logged_at") == state["step"]


def _train(cfg: Config, run_dir: str, backend, progress: bool, log) -> dict:
    main = backend.is_main
    metrics_path = os.path.join(run_dir, "metrics.json")
    saved_config = _check_same_run(cfg, run_dir)
    found = list_checkpoints(run_dir)
    newest = found[-1] if found else None
    _check_steps_reach(cfg, newest)
    finished = newest is not None and newest[0] == cfg.train.steps and os.path.exists(metrics_path)
    ckpt_path, state = None, None
    if not finished or saved_config is None:  # a finished run is not read, unless for its config
        ckpt_path, state = load_latest_checkpoint(run_dir, warn=log)
    if saved_config is None and state is not None:  # config.yaml deleted: the checkpoint's copy decides
        _check_same_config(cfg, run_dir, state.get("config"), f"checkpoint '{ckpt_path}'; config.yaml is missing")
    if finished:  # nothing to restore, and config.yaml stays that of the run
        backend.barrier()
        log(f"run '{run_dir}' is complete ({newest[0]} steps); metrics in {metrics_path}")
        with open(metrics_path, encoding="utf-8") as f:
            return json.load(f)
    dataset, method = build(cfg, backend)
    seed_rank_default_rng(cfg.seed, backend.rank)

    loader = make_loader(cfg, dataset, method.device, backend.rank, backend.world_size)
    try:
        start = state["step"] if state else 0
        if state:
            try:
                method.load_state_dict(state["method"])
            except ValueError as exc:
                raise ValueError(f"cannot resume from '{ckpt_path}': {exc}") from exc
            loader.load_state_dict(state["loader"])
            if not restore_default_rng(state, method.device, backend.rank, backend.world_size, cfg.seed):
                log(f"note: the checkpoint was written by another number of processes; ranks other than 0 draw "
                    f"fresh dropout streams seeded by (seed, step {start}, rank)")
            log(f"resuming from {ckpt_path} (step {start})")
        continues = _continues_logged_interval(state, cfg)
        if main:  # also on a fresh start: lines of an attempt that never checkpointed
            truncate_stats(run_dir, start - 1 if continues else start)
            truncate_eval_log(run_dir, start)
        backend.barrier()  # every rank has checked the saved config and restored its state
        if main:  # only now: a refused or failed start leaves the run's config.yaml as it was
            save_config(cfg, os.path.join(run_dir, "config.yaml"))

        log(f"parameters: {method.parameter_counts}")
        # TensorBoard lives as long as the steps: closed (flushed) after the last one, or when a step raises.
        # SIGTERM / SIGINT during the steps: the step finishes, is checkpointed, and TrainingStopped is raised.
        first_logged = start if continues else start + 1  # TensorBoard drops the events from here on
        with tensorboard_log(cfg.train.tensorboard and main, run_dir, first_logged, log) as board, \
                stop_requests(backend.world_size, method.device) as stop:
            if continues and board is not None:  # purged from `start` with the partial line: its evaluation returns
                for row in read_eval_log(run_dir):  # (scalars only; that step's sample grid is not kept)
                    if row["step"] == start:
                        board.eval(row)
            stats = StatsLogger(run_dir, method.device, backend)
            stats.load_pending_state(state.get("stats") if state else None, holds_totals=main)

            def save_checkpoint(done: int, pending: dict | None = None) -> None:
                if pending is None:
                    pending = stats.pending_state()  # collective: every rank, before the engines' shards
                rng_states = gathered_default_rng_states(backend, method.device)  # collective, likewise
                # collective: the checkpoint holds the whole EMAs (written by rank 0)
                with method.ema.gathered(), method.posthoc.gathered():
                    backend.save_checkpoint(run_dir, done, lambda: {
                        "step": done, "method": method.state_dict(), "loader": loader.state_dict(),
                        **default_rng_checkpoint(rng_states), "stats": pending,
                        "config": flatten(to_dict(cfg))})  # checked on resume should config.yaml be deleted
                stats.exclude(0.0)  # its time counts as training, its memory peak (the assembled EMA) does not

            bar = _progress_bar(start, cfg.train.steps, progress)
            t_start = time.perf_counter()
            batch = cfg.train.batch_size
            for step in range(start, cfg.train.steps):
                with backend.autocast():
                    row = method.step(loader.next, step, step * batch)
                stats.add(row, batch)
                done = step + 1
                # The last line of a run that ends inside a log interval is partial: its checkpoint keeps the
                # interval's sums, so a run continued with more train.steps logs that interval whole.
                carried = None
                if done % cfg.train.log_every == 0 or done == cfg.train.steps:
                    if done % cfg.train.log_every:
                        carried = {**stats.pending_state(), "logged_at": done}  # collective, like the flush
                    line = stats.flush(done, done * batch)
                    if board is not None:
                        board.stats(line)
                    if bar is not None:
                        bar.set_postfix({k: f"{v:.3g}" for k, v in line.items()
                                         if ("loss" in k or "accuracy" in k) and v is not None})
                if eval_due(done, batch, cfg.train.eval_every_kimg):  # before the checkpoint: a crash re-runs it
                    t_eval = time.perf_counter()
                    with method.ema.gathered():  # collective: the EMA whole on rank 0 (ZeRO shards it)
                        if main:  # evaluation reads the EMA only: no collective inside
                            row, samples = periodic_eval(method, dataset, cfg, run_dir, done, done * batch)
                            if board is not None:
                                board.eval(row, samples, cfg.eval.grid)
                    backend.barrier()
                    stats.exclude(time.perf_counter() - t_eval)  # evaluation (and its logging) is not training
                if method.posthoc and (eval_due(done, batch, cfg.train.ema_snapshot_kimg) or done == cfg.train.steps):
                    save_posthoc_snapshots(method, backend, run_dir, done * batch,
                                           lambda: model_info(cfg, method, dataset))
                    stats.exclude(0.0)  # like a checkpoint: its memory peak (the assembled EMAs) is not training's
                saved = done % cfg.train.checkpoint_every == 0 or done == cfg.train.steps
                if saved:
                    save_checkpoint(done, carried)
                if bar is not None:
                    bar.update(1)
                stop_signal = stop.agreed()
                if stop_signal:
                    if not saved:
                        save_checkpoint(done)
                    if bar is not None:
                        bar.close()
                    raise TrainingStopped(stop_signal, done, run_dir)
            if bar is not None:
                bar.close()
        train_seconds = time.perf_counter() - t_start

        metrics = None
        with method.ema.gathered():  # collective: the EMA whole on rank 0 for the export and the evaluation
            with backend.gathered():  # collective: trained networks whole, fp32, on every rank for the exports
                if main:
                    export_model(os.path.join(run_dir, "model.safetensors"), method.export_network(),
                                 model_info(cfg, method, dataset))
                    for name, (module, info) in method.export_extra().items():  # e.g. DiffRatio's ratio net (verifier)
                        export_model(os.path.join(run_dir, f"{name}.safetensors"), module, info)
            if main:
                log(f"final evaluation: {cfg.eval.num_samples} samples per sampler (eval.num_samples); "
                    f"metrics to {metrics_path}")  # (it can take long, and says nothing until a sampler is done)
                metrics = evaluate(method, dataset, cfg, run_dir, progress=log)
                metrics["parameters"] = method.parameter_counts
                metrics["train_seconds_this_session"] = train_seconds
                metrics["steps"] = cfg.train.steps
                atomic_write_json(metrics_path, metrics)
        return backend.broadcast_object(metrics)
    finally:  # readers stop now, on an error too (torch readers ignore the SIGTERM of an exit)
        close = getattr(loader, "close", None)
        if close is not None:
            close()


def save_posthoc_snapshots(method, backend, run_dir: str, nimg: int, info) -> None:
    """Collective: every rank enters; rank 0 writes each post-hoc power EMA at `nimg` images (`info()`: the model
    metadata). Before the step's checkpoint: a run that crashes between the two resumes from the checkpoint
    before and writes this snapshot again (over the file)."""
    method.posthoc.write_snapshots(run_dir, nimg, info, is_main=backend.is_main)
    backend.barrier()


def _progress_bar(start: int, total: int, enabled: bool):
    if not enabled or start >= total:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True)
