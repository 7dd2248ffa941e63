"""Full training-iteration benchmark: DiffRatio vs DMD2 at EDM2 sizes, per backend, on synthetic latents.

One *iteration* is one `method.step` exactly as the training loop calls it (inside the backend's autocast):
for DiffRatio the `diffratio.ratio_steps` ratio-network updates plus the generator update, for DMD2 the
`dmd.fake_steps` (5) fake-score/GAN-head updates plus the generator update, EMA included. Data loading is
not part of it: the "real" batch is a synthetic tensor of latents (and labels) already on the device.

Setup of a case (method, size, backend, batch per GPU, precision, kernels, activation checkpointing):
- the method's settings come from the ImageNet-512 presets (`configs/imagenet512/diffratio_dijs_{s,m}.yaml`,
  `dmd2_{s,m}.yaml`; size `xs` = the S preset at EDM2-XS, size `tiny` = the S preset with a 16-channel
  two-level EDM2 UNet on 4x8x8 latents and 10 classes: a CPU smoke size);
- the teacher is a *randomly initialised* EDM2 denoiser of that size (output and embedding gains set to 1
  so every branch computes something non-trivial), exported once to a temporary `model.safetensors`
  (methods load their teacher from a file); its quality is irrelevant to the cost of an iteration;
- `train.batch_size` = batch per GPU x world size, no gradient accumulation; backends `single`, `ddp`,
  `zero1`/`zero2`/`zero3` (distributed.backend=deepspeed with that ZeRO stage). World size > 1 runs under
  torchrun (`--nproc N`); one process is world size 1 for every backend.

Measured after `--warmup` untimed iterations, over `--iters` timed ones (each bracketed by
torch.cuda.synchronize on GPU): median / p20 / p80 seconds per iteration, images/s (= global batch /
median: generator images per second, all GPUs), the real batches one iteration draws from `next_batch` and the
data images/s that makes (what a loader must deliver; DMD2 reads one batch per fake step, or more), seconds
per kimg (= 1000 x median / global batch), the CUDA peak allocated and reserved memory over the timed
iterations and the memory allocated between iterations
(the resident training state). One more, instrumented, iteration then times each phase (`ratio_step`,
`fake_step`, `generator_step`) and records the peak allocation inside it (absolute, and above what was
allocated when the phase began: that phase's activations and temporaries). Per-network state (weights +
gradients + optimizer state, per GPU) is *computed* from each network's parameter count with the dry-run
formula for the backend and ZeRO stage (fastonestep.engine.dryrun.state_bytes), not measured; EMA copies
and frozen networks (DMD's teacher) are listed too. With world size > 1 memory numbers are the maximum over
ranks.

Each case runs in its own process by default (fresh CUDA allocator, a DeepSpeed failure or OOM does not take
the sweep down); a case the method or backend refuses (e.g. a method not on the distributed API yet, or
deepspeed missing) becomes a `status=skipped` row with the reason. Rows are appended to a CSV (default
bench/results/step.csv) tagged with device, torch/triton/deepspeed versions, git commit and UTC date. Only
rows measured on CUDA at a real size are tagged `is_claim=true`; CPU rows are smoke runs of the harness.

    fastonestep bench step [--methods diffratio,dmd] [--sizes s,m] [--backends single,zero1,zero2,zero3]
                           [--batch-per-gpu s=32,m=16] [--nproc N] [--warmup 5] [--iters 10] [--quick]
                           [--activation-checkpointing off|on|off,on]
                           [--out CSV] [--plot PNG] [--no-run]
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import gc
import hashlib
import importlib.metadata
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch

from fastonestep.benchmark.kernels import _device_info, _quantile, append_rows, git_commit

METHODS = {"diffratio": "diffratio_dijs", "dmd": "dmd2"}  # method -> preset stem in configs/imagenet512
SIZES = ("tiny", "xs", "s", "m")
BACKENDS = {"single": ("single", 0), "ddp": ("ddp", 0), "zero1": ("deepspeed", 1), "zero2": ("deepspeed", 2),
            "zero3": ("deepspeed", 3)}
PHASES = ("ratio_step", "fake_step", "generator_step")  # the method functions timed in the instrumented iteration
PRECISIONS = ("auto", "bf16", "fp32")
KERNELS = ("fused", "eager")
DEFAULT_BATCH = {"tiny": 4, "xs": 32, "s": 32, "m": 16}
TINY = ["network.size=", "network.channels=16", "network.channel_mult=[1, 2]", "network.num_blocks=1",
        "network.attn_resolutions=[4]", "network.dropout=0.0", "data.shape=[4, 8, 8]", "data.num_classes=10"]
PRESETS = Path(__file__).resolve().parents[2] / "configs" / "imagenet512"
GIB = 2**30
MIN_CASE_SECONDS = 30.0  # with --max-seconds: a case that cannot get this much of the budget is skipped
CPU_NOTE = "CPU smoke run, not a performance claim"

COLUMNS = (
    "method", "size", "backend", "zero_stage", "world_size", "batch_per_gpu", "global_batch", "latent_shape",
    "precision", "kernels", "activation_checkpointing", "warmup", "iters",
    "median_s", "p20_s", "p80_s", "images_per_s", "sec_per_kimg", "data_batches_per_iter", "data_images_per_s",
    "peak_alloc_gib", "peak_reserved_gib", "resident_gib", "phase_s", "phase_peak_gib", "phase_act_gib",
    "params", "state_gib", "state_total_gib", "nonfinite_steps",
    "device", "device_type", "torch", "triton", "deepspeed", "commit", "date", "is_claim", "status", "note",
)


class BenchError(ValueError):
    """A bad option of `fastonestep bench step`; the message names it."""


@dataclass
class Case:
    method: str
    size: str
    backend: str
    batch_per_gpu: int
    world_size: int = 1
    precision: str = "auto"
    kernels: str = "fused"
    warmup: int = 5
    iters: int = 10
    device: str = "auto"
    teacher: str = ""  # the synthetic teacher's model file (make_teacher)
    activation_checkpointing: bool = False  # train.activation_checkpointing

    @property
    def label(self) -> str:
        ckpt = "+ckpt" if self.activation_checkpointing else ""
        return f"{self.method}/{self.size}/{self.backend}x{self.world_size}{ckpt}/b{self.batch_per_gpu}"


# ------------------------------------------------------------------------------------------- configuration
def _versions() -> dict:
    def version(name):
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return "none"

    triton = version("triton")
    if triton == "none":
        triton = version("pytorch-triton")
    return {"torch": torch.__version__, "triton": triton, "deepspeed": version("deepspeed")}


def case_config(case: Case, teacher: str = ""):
    """The method's preset for the case's size, with the benchmark's overrides (no data on disk is read)."""
    from fastonestep.config import load_config

    stem = METHODS[case.method]
    preset = PRESETS / f"{stem}_{'m' if case.size == 'm' else 's'}.yaml"
    if not preset.is_file():
        raise BenchError(f"preset '{preset}' not found (the benchmark reads the repository's configs/)")
    kind, stage = BACKENDS[case.backend]
    overrides = [f"teacher={teacher or 'synthetic'}", f"train.batch_size={case.batch_per_gpu * case.world_size}",
                 "train.batch_per_gpu=0", f"distributed.backend={kind}", f"distributed.precision={case.precision}",
                 f"train.kernels={case.kernels}", f"train.device={case.device}",
                 f"train.activation_checkpointing={str(case.activation_checkpointing).lower()}",
                 "eval.features=auto"]  # a benchmark never evaluates: the presets' FID settings are not needed
    if stage:
        overrides.append(f"distributed.zero_stage={stage}")
    if case.size == "xs":
        overrides.append("network.size=xs")
    elif case.size == "tiny":
        overrides += TINY
    return load_config(str(preset), overrides)


def teacher_info(cfg) -> dict:
    from fastonestep.engine.export import network_spec

    return {"method": "edm", "role": "denoiser", "network": network_spec(cfg.network),
            "data_shape": list(cfg.data.shape), "num_classes": cfg.data.num_classes,
            "sigma_data": cfg.diffusion.sigma_data}


def make_teacher(case: Case, directory: str) -> str:
    """A random EDM2 teacher of the case's size, written once per architecture into `directory`."""
    from fastonestep.engine.export import export_model
    from fastonestep.networks.build import build_denoiser

    info = teacher_info(case_config(case))
    key = json.dumps([info["network"], info["data_shape"], info["num_classes"]], sort_keys=True)
    path = os.path.join(directory, f"teacher-{case.size}-{hashlib.sha1(key.encode()).hexdigest()[:10]}.safetensors")
    if os.path.isfile(path):
        return path
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = build_denoiser("edm2", tuple(info["data_shape"]), info["num_classes"], info["sigma_data"],
                             **info["network"]["arch"])
    with torch.no_grad():  # EDM2 starts with zero output / embedding gains: make every branch active
        for name, p in net.named_parameters():
            if name.endswith("out_gain") or name.endswith("emb_gain"):
                p.fill_(1.0)
    export_model(path, net, info)
    return path


# --------------------------------------------------------------------------------------------- measuring
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _num_params(module) -> int:
    # ZeRO-3 leaves an empty tensor in p and the full size in p.ds_numel
    return sum(int(getattr(p, "ds_numel", p.numel())) for p in module.parameters())


def network_inventory(method) -> list[tuple[str, str, int]]:
    """(name, role, parameters) of every network the method holds: "trainable" (one per backend Trainable,
    or per torch optimiser of a method not on the Trainable API), "ema" (the EMA copy, fp32) and "frozen"
    (e.g. DMD's teacher)."""
    from torch import nn

    nets, seen = [], set()
    trainables = getattr(getattr(method, "backend", None), "trainables", {}) or {}
    for name, t in trainables.items():
        nets.append((name, "trainable", _num_params(t.network)))
        seen |= {id(p) for p in t.network.parameters()}
    modules = {k: v for k, v in vars(method).items() if isinstance(v, nn.Module)}
    if not trainables:  # optimiser attributes: name each by the module attribute holding the same parameters
        for opt in (v for v in vars(method).values() if isinstance(v, torch.optim.Optimizer)):
            ids = {id(p) for g in opt.param_groups for p in g["params"]}
            name = next((k for k, m in modules.items() if {id(p) for p in m.parameters()} == ids), "network")
            nets.append((name, "trainable", sum(p.numel() for g in opt.param_groups for p in g["params"])))
            seen |= ids
    ema = getattr(method, "ema", None)
    if ema is not None:  # its own copy: no other attribute holds its parameters
        nets.append(("ema", "ema", ema.numel()))
    for name, m in modules.items():
        ids = {id(p) for p in m.parameters()}
        if ids and not ids & seen:
            nets.append((name, "frozen", _num_params(m)))
            seen |= ids
    return nets


def state_bytes_per_gpu(role: str, params: int, precision: str, world_size: int, stage: int) -> float:
    """Weights + gradients + optimizer state on one GPU (the dry-run formula); EMA / frozen: fp32 weights (the EMA
    sharded over the GPUs under ZeRO)."""
    from fastonestep.engine.dryrun import EMA_BYTES, FROZEN_BYTES, state_bytes

    if role == "ema":
        return EMA_BYTES * params / (world_size if stage >= 1 else 1)
    if role == "frozen":
        return FROZEN_BYTES * params
    plan = argparse.Namespace(parameters=params, role="trainable", ema=False, ema_whole=False, posthoc=0)
    return state_bytes(plan, precision, world_size, stage)["total"]


@contextlib.contextmanager
def phase_probe(method, device: torch.device):
    """Times each phase function of `method` (instance attributes shadow the class methods for a while) and,
    on CUDA, records its peak allocation. Nested phase calls count in the outermost one."""
    record, depth, names = {}, [0], []

    def wrap(name, fn):
        def probed(*args, **kwargs):
            if depth[0]:
                return fn(*args, **kwargs)
            depth[0] += 1
            try:
                _sync(device)
                base = 0
                if device.type == "cuda":
                    base = torch.cuda.memory_allocated(device)
                    torch.cuda.reset_peak_memory_stats(device)
                t0 = time.perf_counter()
                out = fn(*args, **kwargs)
                _sync(device)
                rec = record.setdefault(name, {"calls": 0, "seconds": 0.0, "peak": 0, "act": 0})
                rec["calls"] += 1
                rec["seconds"] += time.perf_counter() - t0
                if device.type == "cuda":
                    peak = torch.cuda.max_memory_allocated(device)
                    rec["peak"], rec["act"] = max(rec["peak"], peak), max(rec["act"], peak - base)
                return out
            finally:
                depth[0] -= 1
        return probed

    for name in PHASES:
        fn = getattr(method, name, None)
        if callable(fn) and name not in vars(method):
            setattr(method, name, wrap(name, fn))
            names.append(name)
    try:
        yield record
    finally:
        for name in names:
            delattr(method, name)


def _fmt(value, digits=4) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.{digits}g}" if math.isfinite(value) else str(value)
    return str(value)


def _pairs(items, digits=4) -> str:
    return ";".join(f"{k}={_fmt(v, digits)}" for k, v in items)


def _is_finite(value) -> bool:
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return True


def base_row(case: Case) -> dict:
    kind, stage = BACKENDS[case.backend]
    shape = "4x8x8" if case.size == "tiny" else "4x64x64"
    return {"method": case.method, "size": case.size, "backend": case.backend, "zero_stage": stage,
            "world_size": case.world_size, "batch_per_gpu": case.batch_per_gpu,
            "global_batch": case.batch_per_gpu * case.world_size, "latent_shape": shape,
            "precision": _precision(case), "kernels": case.kernels,
            "activation_checkpointing": str(case.activation_checkpointing).lower(), "warmup": case.warmup,
            "iters": case.iters}


def _on_gpu(case: Case) -> bool:
    return case.device == "cuda" or (case.device == "auto" and torch.cuda.is_available())


def _precision(case: Case) -> str:
    """distributed.precision as the backend resolves it (auto: bf16 on CUDA, fp32 on CPU)."""
    if case.precision != "auto":
        return case.precision
    return "bf16" if _on_gpu(case) else "fp32"


def _skip_shm_comm_build() -> None:
    """CPU runs are smoke tests: DeepSpeed's CPU backend would JIT-build a shared-memory all-reduce op first
    (30 s to minutes); marked unavailable, gloo does the same collectives."""
    try:
        import deepspeed.ops
    except ImportError:
        return  # make_backend reports the missing package as the case's skip reason
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def tags(device_name: str, device_type: str, date: str) -> dict:
    return {"device": device_name, "device_type": device_type, **_versions(), "commit": git_commit(), "date": date}


def run_case(case: Case, date: str = "", log=print) -> dict | None:
    """Measures one case in this process (every rank of a torchrun launch calls it). Returns rank 0's row
    (None on other ranks); a case the method or backend refuses returns a `skipped` row."""
    from fastonestep.config import ConfigError
    from fastonestep.data.datasets import TensorDataset
    from fastonestep.engine.distributed import make_backend
    from fastonestep.engine.loop import seed_everything
    from fastonestep.methods import make_method

    date = date or _now()
    row = base_row(case)
    cfg = case_config(case, case.teacher)
    if BACKENDS[case.backend][0] == "deepspeed" and not _on_gpu(case):
        _skip_shm_comm_build()
    try:
        backend = make_backend(cfg)
    except ConfigError as e:
        name, dtype = _device_info(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
        return {**row, **tags(name, dtype, date), "is_claim": "false", "status": "skipped", "note": str(e)}
    device, main = backend.device, backend.is_main
    name, dtype = _device_info(device)
    row.update(tags(name, dtype, date))
    row["precision"] = backend.precision
    method = None
    try:
        seed_everything(cfg.seed)
        shape, classes = tuple(cfg.data.shape), cfg.data.num_classes
        # The dataset object only tells the method the sample shape and the classes; batches come from below.
        dataset = TensorDataset(torch.zeros((1, *shape)), torch.zeros(1, dtype=torch.long), classes, "synthetic")
        try:
            method = make_method(cfg, dataset, device, backend)
        except ConfigError as e:
            return {**row, "is_claim": "false", "status": "skipped", "note": str(e)} if main else None
        gen = torch.Generator(device=device).manual_seed(1 + backend.rank)
        x_real = cfg.diffusion.sigma_data * torch.randn((case.batch_per_gpu, *shape), generator=gen, device=device)
        labels = torch.randint(0, max(classes, 1), (case.batch_per_gpu,), generator=gen, device=device)

        data_batches = [0]  # real batches the method draws (DMD2: one per fake step, or more): the loader's load

        def next_batch():
            data_batches[0] += 1
            return x_real, labels

        global_batch = cfg.train.batch_size

        def iteration(i):
            with backend.autocast():
                return method.step(next_batch, i, i * global_batch)

        for i in range(case.warmup):
            iteration(i)
        _sync(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        times, bad = [], 0
        data_batches[0] = 0
        for i in range(case.warmup, case.warmup + case.iters):
            _sync(device)
            t0 = time.perf_counter()
            stats = iteration(i)
            _sync(device)
            times.append(time.perf_counter() - t0)
            bad += any(not _is_finite(v) for k, v in stats.items() if k.startswith("grad_norm/"))
        batches_per_iter = data_batches[0] / case.iters  # the timed iterations' only
        mem = [0.0, 0.0, 0.0]
        if device.type == "cuda":
            mem = [torch.cuda.max_memory_allocated(device), torch.cuda.max_memory_reserved(device),
                   torch.cuda.memory_allocated(device)]
        with phase_probe(method, device) as phases:
            iteration(case.warmup + case.iters)
        peaks = torch.tensor(mem + [float(phases.get(p, {}).get(k, 0)) for p in PHASES for k in ("peak", "act")],
                             dtype=torch.float64, device=device if device.type == "cuda" else "cpu")
        backend.all_reduce(peaks, op="max")
        peaks = peaks.tolist()
        if not main:
            return None
        times.sort()
        med = _quantile(times, 0.5)
        nets = network_inventory(method)
        from fastonestep.engine.dryrun import EMA_BYTES

        # the EMA as held (sharded under ZeRO unless a method keeps it whole), the networks by the formula
        states = [(n, EMA_BYTES * method.ema.local_numel() if role == "ema" else
                   state_bytes_per_gpu(role, p, backend.precision, backend.world_size, BACKENDS[case.backend][1]))
                  for n, role, p in nets]
        cuda = device.type == "cuda"
        act = dict(zip(PHASES, peaks[4::2]))
        peak = dict(zip(PHASES, peaks[3::2]))
        row.update({
            "median_s": _fmt(med), "p20_s": _fmt(_quantile(times, 0.2)), "p80_s": _fmt(_quantile(times, 0.8)),
            "images_per_s": _fmt(global_batch / med), "sec_per_kimg": _fmt(1000 * med / global_batch),
            "data_batches_per_iter": _fmt(batches_per_iter),
            "data_images_per_s": _fmt(batches_per_iter * global_batch / med),
            "peak_alloc_gib": _fmt(peaks[0] / GIB) if cuda else "",
            "peak_reserved_gib": _fmt(peaks[1] / GIB) if cuda else "",
            "resident_gib": _fmt(peaks[2] / GIB) if cuda else "",
            "phase_s": _pairs((f"{p}(x{r['calls']})", r["seconds"]) for p, r in phases.items()),
            "phase_peak_gib": _pairs((p, peak[p] / GIB) for p in phases) if cuda else "",
            "phase_act_gib": _pairs((p, act[p] / GIB) for p in phases) if cuda else "",
            "params": _pairs((n, f"{p / 1e6:.2f}M") for n, _, p in nets),
            "state_gib": _pairs((n, b / GIB) for n, b in states),
            "state_total_gib": _fmt(sum(b for _, b in states) / GIB),
            "nonfinite_steps": bad,
            "is_claim": "true" if cuda and case.size != "tiny" else "false",
            "status": "ok",
            "note": "" if cuda else CPU_NOTE,
        })
        if cuda and case.size == "tiny":
            row["note"] = "tiny smoke size, not a performance claim"
        return row
    except torch.cuda.OutOfMemoryError as e:
        return {**row, "is_claim": "false", "status": "oom", "note": _one_line(str(e))} if main else None
    finally:
        method = None  # drop the networks (and DeepSpeed engines) before the next in-process case
        backend.trainables.clear()
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


# --------------------------------------------------------------------------------------------- the sweep
def _child_command(case_path: str, nproc: int) -> list[str]:
    me = ["-m", "fastonestep.benchmark.step", "--_child", case_path]
    if nproc > 1:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *me]
    return [sys.executable, *me]


def run_isolated(case: Case, date: str, timeout: float, workdir: str) -> dict:
    """Runs a case in a child process (torchrun for world size > 1); a crash, timeout or missing result
    becomes an error row with the tail of the child's output."""
    stem = os.path.join(workdir, case.label.replace("/", "_"))
    with open(stem + ".case.json", "w", encoding="utf-8") as f:
        json.dump({"case": dataclasses.asdict(case), "date": date, "result": stem + ".row.json"}, f)
    with open(stem + ".log", "w", encoding="utf-8") as logf:
        # own session: on a timeout the whole process group (torchrun and its workers) is killed
        proc = subprocess.Popen(_child_command(stem + ".case.json", case.world_size), stdout=logf,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = proc.wait(timeout=timeout)
            status = None if code == 0 else "error"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            code, status = None, "timeout"
        except BaseException:  # Ctrl-C / a caller's timeout: the child is in its own session, take it down too
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise
    if os.path.isfile(stem + ".row.json"):
        with open(stem + ".row.json", encoding="utf-8") as f:
            return json.load(f)
    with open(stem + ".log", encoding="utf-8", errors="replace") as f:
        tail = [line.strip() for line in f.read().splitlines() if line.strip()][-3:]
    why = f"timed out after {timeout:.0f}s" if status == "timeout" else f"exit code {code}"
    return {**base_row(case), "status": status or "error", "is_claim": "false",
            "note": _one_line(f"{why}: {' | '.join(tail)} (log {stem}.log)")}


def _child_main(case_path: str) -> int:
    with open(case_path, encoding="utf-8") as f:
        spec = json.load(f)
    case = Case(**spec["case"])
    try:
        row = run_case(case, spec["date"], log=lambda *_: None)
    except Exception as e:  # noqa: BLE001 - reported as the case's row, the sweep goes on
        traceback.print_exc()
        row = {**base_row(case), "status": "error", "is_claim": "false",
               "note": _one_line(f"{type(e).__name__}: {e}")}
    if row is not None and int(os.environ.get("RANK", 0)) == 0:
        tmp = spec["result"] + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(row, f)
        os.replace(tmp, spec["result"])
    return 0


def _fill_tags(row: dict, known: dict, date: str) -> dict:
    """Rows a child could not write (crash, timeout) get the tags of this run's other rows."""
    if not row.get("device"):
        on_gpu = torch.cuda.is_available()
        row.update({**tags(known.get("device", "cuda (name not read)" if on_gpu else "cpu"),
                           known.get("device_type", "cuda" if on_gpu else "cpu"), date)})
    row.setdefault("date", date)
    return row


def run(cases: list[Case], out_csv: str | None = "bench/results/step.csv", isolate: bool = True,
        case_timeout: float = 300.0, max_seconds: float = 0.0, teacher_dir: str | None = None, log=print) -> list[dict]:
    """Runs every case (in a child process each unless isolate=False), appending each row to out_csv as it
    finishes. max_seconds > 0: a time budget for the whole sweep. No case runs past it (its timeout is what is
    left), and a case that cannot get MIN_CASE_SECONDS of it is recorded as skipped."""
    date, rows, known = _now(), [], {}
    t_start = time.perf_counter()
    with contextlib.ExitStack() as stack:
        if teacher_dir is None:
            teacher_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="fastonestep-step-bench-"))

        def left() -> float:  # seconds of the budget left (inf without one)
            return max_seconds - (time.perf_counter() - t_start) if max_seconds else float("inf")

        skipped = lambda case: {**base_row(case), "status": "skipped", "is_claim": "false",  # noqa: E731
                                "note": f"time budget --max-seconds {max_seconds:.0f} spent before this case"}
        for case in cases:
            if left() < MIN_CASE_SECONDS:
                row = skipped(case)
            else:
                if not case.teacher:
                    t0 = time.perf_counter()
                    case.teacher = make_teacher(case, teacher_dir)
                    log(f"[{case.label}] teacher {os.path.basename(case.teacher)} ({time.perf_counter() - t0:.1f}s)")
                # a case never runs past the budget: the caller's own time limit would cut the whole sweep
                timeout = min(case_timeout, left())
                if timeout < MIN_CASE_SECONDS:
                    row = skipped(case)
                else:
                    row = run_isolated(case, date, timeout, teacher_dir) if isolate else _run_here(case, date, log)
            row = _fill_tags(row, known, date)
            known.setdefault("device", row["device"])
            known.setdefault("device_type", row["device_type"])
            rows.append(row)
            log(_row_line(row))
            if out_csv:
                append_rows(out_csv, [row], COLUMNS)
    if out_csv:
        log(f"appended {len(rows)} rows to {out_csv}")
    return rows


def _run_here(case: Case, date: str, log) -> dict:
    """run_case in this process; an unexpected failure becomes the case's error row (the sweep goes on)."""
    try:
        return run_case(case, date, log)
    except Exception as e:  # noqa: BLE001
        log(traceback.format_exc())
        return {**base_row(case), "status": "error", "is_claim": "false", "note": _one_line(f"{type(e).__name__}: {e}")}


def _row_line(r: dict) -> str:
    head = f"[{r['method']}/{r['size']}/{r['backend']}x{r['world_size']}/b{r['batch_per_gpu']}]"
    if r.get("status") != "ok":
        return f"{head} {r.get('status')}: {r.get('note', '')}"
    mem = f", peak {r['peak_alloc_gib']} GiB" if r.get("peak_alloc_gib") else ""
    return (f"{head} {r['median_s']} s/it (p20 {r['p20_s']}, p80 {r['p80_s']}), {r['images_per_s']} img/s, "
            f"{r['sec_per_kimg']} s/kimg{mem}; phases {r['phase_s']}")


# ---------------------------------------------------------------------------------------------- reports
def read_rows(csv_path) -> list[dict]:
    import csv

    with open(csv_path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _key(r: dict) -> tuple:
    return (r["method"], r["size"], r["backend"], r["world_size"], r["batch_per_gpu"], r["precision"], r["kernels"],
            r.get("activation_checkpointing") or "false")  # rows of CSVs written before the column: off


def latest_rows(rows: list[dict]) -> list[dict]:
    """The last commit's rows, GPU rows when it has any, the newest row of each case."""
    if not rows:
        return []
    commit = rows[-1].get("commit")
    rows = [r for r in rows if r.get("commit") == commit]
    gpu = [r for r in rows if r.get("device_type") == "cuda"]
    newest = {}
    for r in gpu or rows:
        newest[_key(r)] = r
    return list(newest.values())


def _f(value):
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def markdown_table(rows: list[dict]) -> str:
    if not rows:
        return "(no rows)"
    r0 = rows[0]
    claim = "GPU measurement" if any(r.get("is_claim") == "true" for r in rows) else "not a performance claim"
    lines = [f"Full training iteration ({claim}): {r0.get('device', '')}; torch {r0.get('torch', '')}, triton "
             f"{r0.get('triton', '')}, deepspeed {r0.get('deepspeed', '')}; commit {r0.get('commit', '')}, "
             f"{r0.get('date', '')}", "",
             "| method | size | backend | GPUs | batch/GPU | s/iter median (p20-p80) | images/s | s/kimg | "
             "peak GiB | state GiB per GPU (computed) | status |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ok = r.get("status") == "ok"
        timing = f"{r['median_s']} ({r['p20_s']}-{r['p80_s']})" if ok else ""
        status = "ok" if ok else f"{r.get('status')}: {_one_line(r.get('note', ''), 80)}"
        name = "DMD2" if r["method"] == "dmd" else "DiffRatio" if r["method"] == "diffratio" else r["method"]
        rate, kimg = (r.get("images_per_s", ""), r.get("sec_per_kimg", "")) if ok else ("", "")
        lines.append(f"| {name} | {r['size']} | {_backend_label(r)} | {r['world_size']} | {r['batch_per_gpu']} | "
                     f"{timing} | {rate} | {kimg} | {r.get('peak_alloc_gib', '') or '-'} | "
                     f"{r.get('state_gib', '').replace(';', ', ')} | {status} |")
    comparison = comparison_table(rows)
    return "\n".join(lines) + ("\n\n" + comparison if comparison else "")


def _backend_label(r: dict) -> str:
    """The backend, marked when the case recomputed its blocks (train.activation_checkpointing)."""
    return r["backend"] + (" +ckpt" if r.get("activation_checkpointing") == "true" else "")


def comparison_table(rows: list[dict]) -> str:
    """DiffRatio / DMD2 at the same size, backend, world size and batch, against the issue's targets
    (images/s ratio >= 1.5, peak-memory ratio <= 0.60)."""
    by = {}
    for r in rows:
        if r.get("status") == "ok":
            by.setdefault(_key({**r, "method": ""}), {})[r["method"]] = r
    lines = []
    for (_, size, _, world, batch, _, _, _), pair in by.items():
        if "diffratio" not in pair or "dmd" not in pair:
            continue
        a, b = pair["diffratio"], pair["dmd"]
        speed = _f(a["images_per_s"]) / _f(b["images_per_s"])
        pa, pb = _f(a.get("peak_alloc_gib")), _f(b.get("peak_alloc_gib"))
        mem = pa / pb if pa is not None and pb else None
        claim = a.get("is_claim") == "true" and b.get("is_claim") == "true"
        verdict = ("not a claim" if not claim else
                   "meets both" if speed >= 1.5 and mem is not None and mem <= 0.60 else "misses")
        lines.append(f"| {size} | {_backend_label(a)} | {world} | {batch} | {speed:.2f}x | "
                     f"{'' if mem is None else f'{100 * mem:.0f}%'} | {verdict} |")
    if not lines:
        return ""
    return "\n".join(["DiffRatio vs DMD2 (targets: images/s >= 1.5x, peak memory <= 60%)", "",
                      "| size | backend | GPUs | batch/GPU | images/s DiffRatio / DMD2 | peak memory DiffRatio / DMD2 "
                      "| targets |", "|---|---|---|---|---|---|---|", *lines])


def plot(rows: list[dict], png_path: str) -> str:
    """Two panels: images/s and peak memory per case, DiffRatio and DMD2 side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r.get("status") == "ok"]
    cases = list(dict.fromkeys((r["size"], _backend_label(r), r["world_size"], r["batch_per_gpu"]) for r in ok))
    fig, axes = plt.subplots(1, 2, figsize=(max(8.0, 1.2 * len(cases) + 4), 4.2))
    for ax, column, label in ((axes[0], "images_per_s", "images/s"), (axes[1], "peak_alloc_gib", "peak GiB")):
        for j, (method, color) in enumerate((("diffratio", "#d62728"), ("dmd", "#1f77b4"))):
            xs, hs = [], []
            for i, c in enumerate(cases):
                r = next((r for r in ok if r["method"] == method and
                          (r["size"], _backend_label(r), r["world_size"], r["batch_per_gpu"]) == c), None)
                v = _f(r.get(column)) if r else None
                if v is not None:
                    xs.append(i - 0.2 + 0.4 * j)
                    hs.append(v)
            if xs:
                ax.bar(xs, hs, 0.4, label="DiffRatio" if method == "diffratio" else "DMD2", color=color)
        ax.set_xticks(range(len(cases)))
        ax.set_xticklabels([f"{s} {b}x{w}\nb{n}" for s, b, w, n in cases], fontsize=8)
        ax.set_xlim(-0.6, max(len(cases), 1) - 0.4)
        ax.set_ylabel(label)
        if ax.patches:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "not measured (CPU)" if column == "peak_alloc_gib" else "no rows", ha="center",
                    va="center", transform=ax.transAxes)
    r0 = rows[0] if rows else {}
    claim = "GPU measurement" if any(r.get("is_claim") == "true" for r in rows) else "not a performance claim"
    fig.suptitle(f"full training iteration ({claim})\n{r0.get('device', '')} | torch {r0.get('torch', '')} | "
                 f"commit {r0.get('commit', '')} | {r0.get('date', '')}", fontsize=9)
    fig.tight_layout()
    Path(png_path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path, dpi=120)
    plt.close(fig)
    return str(png_path)


# -------------------------------------------------------------------------------------------------- CLI
class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line through the CLI's error handler, not usage + message
        raise BenchError(message)


def _choices(text: str, allowed, option: str) -> list[str]:
    items = [v.strip() for v in text.split(",") if v.strip()]
    bad = [v for v in items if v not in allowed]
    if bad or not items:
        raise BenchError(f"{option}: unknown {', '.join(bad) or '(empty)'}; choose from {', '.join(allowed)}")
    return items


def _batches(text: str, sizes) -> dict:
    """'32' (every size) or 's=32,m=16' (sizes not named: their default)."""
    out = {s: DEFAULT_BATCH[s] for s in sizes}
    try:
        if "=" not in text:
            value = int(text)
            out = {s: value for s in sizes}
        else:
            for item in text.split(","):
                size, value = item.split("=")
                if size.strip() not in SIZES:
                    raise BenchError(f"--batch-per-gpu: unknown size {size.strip()!r}; choose from {', '.join(SIZES)}")
                out[size.strip()] = int(value)
    except ValueError as e:
        if isinstance(e, BenchError):
            raise
        raise BenchError(f"--batch-per-gpu: expected N or SIZE=N,... (e.g. s=32,m=16); got {text!r}") from None
    if any(v <= 0 for v in out.values()):
        raise BenchError(f"--batch-per-gpu: batches must be positive; got {text!r}")
    return out


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="fastonestep bench step",
                description="seconds per full training iteration, images/s and memory of DiffRatio vs DMD2 on "
                            "synthetic latents; appends CSV rows. Only GPU rows at a real size are claims.")
    p.add_argument("--methods", default="diffratio,dmd", help="comma list of diffratio,dmd (default %(default)s)")
    p.add_argument("--sizes", default="s,m", help="comma list of tiny,xs,s,m (default %(default)s; CPU: tiny only)")
    p.add_argument("--backends", default="single,zero1,zero2,zero3",
                   help=f"comma list of {','.join(BACKENDS)} (default %(default)s)")
    p.add_argument("--batch-per-gpu", default="", help="N, or SIZE=N,... (default: s=32,m=16,xs=32,tiny=4)")
    p.add_argument("--nproc", type=int, default=1,
                   help="processes (GPUs) for ddp/zero* via torchrun; single always runs on one (default 1)")
    p.add_argument("--warmup", type=int, default=5, help="untimed iterations first (default %(default)s)")
    p.add_argument("--iters", type=int, default=10, help="timed iterations (default %(default)s)")
    p.add_argument("--precision", default="auto", help="auto (bf16 on GPU) | bf16 | fp32")
    p.add_argument("--kernels", default="fused", help="fused | eager (train.kernels)")
    p.add_argument("--device", default="auto", help="auto | cuda | cpu")
    p.add_argument("--activation-checkpointing", default="off",
                   help="off | on | off,on: train.activation_checkpointing of the cases (default %(default)s)")
    p.add_argument("--quick", action="store_true",
                   help="CPU smoke test: tiny size, single backend, 1 warm-up + 2 timed iterations, in-process")
    p.add_argument("--in-process", action="store_true", help="run cases in this process (default: one child each)")
    p.add_argument("--case-timeout", type=float, default=300.0, help="seconds per child case (default %(default)s)")
    p.add_argument("--max-seconds", type=float, default=0.0,
                   help="skip cases not started within this many seconds of the sweep (0 = no limit)")
    p.add_argument("--out", default="bench/results/step.csv", help="CSV to append to (default %(default)s)")
    p.add_argument("--plot", help="also draw images/s and peak memory to this PNG")
    p.add_argument("--no-run", action="store_true", help="measure nothing; print the table of the CSV's latest rows")
    p.add_argument("--_child", help=argparse.SUPPRESS)
    return p


def parse_cases(args) -> list[Case]:
    methods = _choices(args.methods, METHODS, "--methods")
    sizes = _choices("tiny" if args.quick else args.sizes, SIZES, "--sizes")
    backends = _choices("single" if args.quick else args.backends, BACKENDS, "--backends")
    _choices(args.precision, PRECISIONS, "--precision")
    _choices(args.kernels, KERNELS, "--kernels")
    _choices(args.device, ("auto", "cuda", "cpu"), "--device")
    checkpointing = [v == "on" for v in _choices(args.activation_checkpointing, ("off", "on"),
                                                 "--activation-checkpointing")]
    if args.nproc < 1 or args.warmup < 0 or args.iters < 1:
        raise BenchError("--nproc and --iters must be >= 1, --warmup >= 0")
    batch = _batches(args.batch_per_gpu, sizes) if args.batch_per_gpu else {s: DEFAULT_BATCH[s] for s in sizes}
    on_gpu = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if not on_gpu and set(sizes) - {"tiny"}:
        raise BenchError(f"--sizes {','.join(sizes)}: without a GPU only the smoke size 'tiny' runs (--quick)")
    warmup, iters = (1, 2) if args.quick else (args.warmup, args.iters)
    cases = []
    for backend in backends:
        world = 1 if backend == "single" else args.nproc
        for size in sizes:
            for ckpt in checkpointing:
                for method in methods:
                    cases.append(Case(method, size, backend, batch[size], world, args.precision, args.kernels,
                                      warmup, iters, args.device, activation_checkpointing=ckpt))
    if any(c.world_size > 1 for c in cases) and args.in_process:
        raise BenchError("--nproc > 1 launches torchrun per case; it cannot be combined with --in-process")
    return cases


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "step":  # accept `... bench step ...` with or without the subcommand name
        argv = argv[1:]
    args = build_parser().parse_args(argv)
    if args._child:
        return _child_main(args._child)
    if not args.no_run:
        cases = parse_cases(args)
        run(cases, args.out, isolate=not (args.in_process or args.quick), case_timeout=args.case_timeout,
            max_seconds=args.max_seconds)
    if not os.path.exists(args.out):
        raise FileNotFoundError(f"no benchmark CSV at '{args.out}'")
    rows = latest_rows(read_rows(args.out))
    print()
    print(markdown_table(rows))
    if args.plot:
        print(f"wrote {plot(rows, args.plot)}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (ValueError, FileNotFoundError) as err:
        print(f"fastonestep bench step: error: {err}", file=sys.stderr)
        sys.exit(2)
