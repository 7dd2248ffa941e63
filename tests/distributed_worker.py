"""Run by tests/test_distributed.py under torchrun (2 processes, gloo, CPU): several training jobs in one
launch, so the (slow) process start-up and DeepSpeed import are paid once.

argv[1]: a JSON file {"preset": path, "base": [overrides], "jobs": [{"run": dir, "overrides": [...],
"roundtrip": bool}]}; a job may name its own "preset" and "base" (other methods in the same launch).
A job with "roundtrip" also checks, after training, that a fresh method loading the newest checkpoint holds
exactly the trained state (full parameters, EMA, RNG, optimiser state of this rank's shard); the result goes
to <run>/roundtrip-rank<r>.json. A job with "signal_at": k has rank 0 (only) send itself SIGTERM during step
k; every rank must then stop after that same step with a checkpoint (TrainingStopped, recorded in
<run>/stopped-rank<r>.json), and the job is run again, resuming, to its end. Every other job records in
<run>/ema-rank<r>.json whether the EMA is sharded and how many of its elements this rank holds (and the same of
each post-hoc power EMA). A job with "dropout_masks" records, for every step it trains, which elements the first
dropout layer zeroed in its first forward of that step, in <run>/dropout-rank<r>.pt ({step: bool tensor}; the
steps of a resumed attempt overwrite those of the attempt before).
"""
import contextlib
import json
import os
import signal
import sys

import torch

from fastonestep.config import load_config
from fastonestep.engine.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint
from fastonestep.engine.distributed import make_backend
from fastonestep.engine.loop import build, train
from fastonestep.engine.stop import TrainingStopped

torch.set_num_threads(1)
QUIET = dict(progress=False, log=lambda *_: None)


def optimiser_tensors(t) -> list[torch.Tensor]:
    """The Adam moments this rank holds for a Trainable (its ZeRO shard under DeepSpeed)."""
    opt = t.engine.optimizer.optimizer if hasattr(t, "engine") else t.opt
    return [v.detach().clone() for s in opt.state.values() for k, v in sorted(s.items()) if torch.is_tensor(v)]


def snapshot(method) -> dict:
    with method.ema.gathered(everywhere=True):  # collective: ZeRO shards the EMA
        ema = {k: v.clone() for k, v in method.ema.state_dict().items()}
    out = {"ema": ema, "rng": method.rng.get_state()}
    if method.posthoc:
        with method.posthoc.gathered(everywhere=True):  # the post-hoc power EMAs, sharded alike
            out["posthoc_ema"] = [v.clone() for sd in method.posthoc.state_dict().values() for v in sd.values()]
    for name, t in method.backend.trainables.items():
        with t.full_parameters() as params:
            out[f"{name}/params"] = [p.detach().float().clone() for p in params]
        out[f"{name}/optimizer"] = optimiser_tensors(t)
    return out


def same(a, b) -> list[str]:
    """Keys whose values differ (bit-exact comparison)."""
    bad = []
    for k in a:
        x, y = a[k], b[k]
        if isinstance(x, dict):
            x, y = list(x.values()), list(y.values())
        if not isinstance(x, list):
            x, y = [x], [y]
        if len(x) != len(y) or not all(torch.equal(u, v) for u, v in zip(x, y)):
            bad.append(k)
    return bad


def roundtrip(cfg, run, trained_method) -> dict:
    before = snapshot(trained_method)
    backend = make_backend(cfg)
    backend.run_dir = run
    _, fresh = build(cfg, backend)
    fresh.load_state_dict(load_checkpoint(latest_checkpoint(run))["method"])
    return {"differs": same(before, snapshot(fresh)), "checked": sorted(before)}


@contextlib.contextmanager
def methods_seen(edit):
    """While open, every method train() builds goes through edit(method) first."""
    import fastonestep.engine.loop as loop

    original = loop.build

    def editing_build(c, b=None):
        dataset, method = original(c, b)
        edit(method)
        return dataset, method

    loop.build = editing_build
    try:
        yield
    finally:
        loop.build = original


def signal_rank0_during(step_number: int, rank: int):
    def edit(method):
        step = method.step

        def stepping(next_batch, index, nimg):
            if rank == 0 and index + 1 == step_number:
                os.kill(os.getpid(), signal.SIGTERM)
            return step(next_batch, index, nimg)

        method.step = stepping
    return edit


def record_dropout_masks(masks: dict):
    """An edit for methods_seen: masks[step number] = the zero pattern of the first nn.Dropout's output in its
    first forward of that training step."""
    def edit(method):
        step, current = method.step, {}

        def stepping(next_batch, index, nimg):
            current["step"] = index + 1
            return step(next_batch, index, nimg)

        def hook(module, inputs, output):
            if module.training and "step" in current and current["step"] not in masks:
                masks[current["step"]] = (output == 0).detach().cpu()

        method.step = stepping
        dropouts = (m for t in method.backend.trainables.values() for m in t.network.modules()
                    if isinstance(m, torch.nn.Dropout))
        next(dropouts).register_forward_hook(hook)
    return edit


def both(*edits):
    def edit(method):
        for e in edits:
            if e is not None:
                e(method)
    return edit


def skip_shm_op_build():
    """DeepSpeed's CPU comm backend JIT-builds a shared-memory all-reduce op (30 s to minutes on a loaded
    2-core machine) on first use; gloo does the same collectives, so the tests mark the op unavailable."""
    try:
        import deepspeed.ops
    except ImportError:
        return
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def main():
    with open(sys.argv[1], encoding="utf-8") as f:
        spec = json.load(f)
    skip_shm_op_build()
    rank = int(os.environ["RANK"])
    for job in spec["jobs"]:
        cfg = load_config(job.get("preset", spec["preset"]), job.get("base", spec["base"]) + job["overrides"])
        masks = {}
        recording = record_dropout_masks(masks) if job.get("dropout_masks") else None
        if job.get("signal_at"):
            result = {"stopped": False}
            try:
                with methods_seen(both(signal_rank0_during(job["signal_at"], rank), recording)):
                    train(cfg, job["run"], **QUIET)
            except TrainingStopped as e:
                result = {"stopped": True, "step": e.step, "signal": e.signal_name,
                          "checkpoints": [step for step, _ in list_checkpoints(job["run"])]}
            with open(os.path.join(job["run"], f"stopped-rank{rank}.json"), "w", encoding="utf-8") as f:
                json.dump(result, f)
            with methods_seen(both(recording)):
                train(cfg, job["run"], **QUIET)  # the same command again: resumes
        else:
            # train() keeps its method private: capture it as train() builds it
            captured = {}
            with methods_seen(both(lambda method: captured.update(method=method), recording)):
                train(cfg, job["run"], **QUIET)
            ema = captured["method"].ema
            with open(os.path.join(job["run"], f"ema-rank{rank}.json"), "w", encoding="utf-8") as f:
                json.dump({"sharded": ema.sharded, "local_numel": ema.local_numel(), "numel": ema.numel(),
                           "posthoc": [[e.sharded, e.local_numel()] for e in captured["method"].posthoc.emas]}, f)
            if job.get("roundtrip"):
                result = roundtrip(cfg, job["run"], captured["method"])
                with open(os.path.join(job["run"], f"roundtrip-rank{rank}.json"), "w", encoding="utf-8") as f:
                    json.dump(result, f)
        if recording is not None:
            torch.save(masks, os.path.join(job["run"], f"dropout-rank{rank}.pt"))


if __name__ == "__main__":
    main()
