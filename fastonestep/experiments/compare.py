"""`fastonestep experiment compare`: every seed method distilled from one teacher per setup, one table.

For each setup (the 25-Gaussian toy, MNIST) one EDM teacher is trained (or reused), then every method
trains a student from it with the same budget: the same number of generator updates, batch size, seed and
evaluation noises. Methods differ in what else they train per generator update (DMD2 takes 5 fake-score
steps, DiffRatio its ratio steps as in its preset); the table reports that cost as time per iteration and
peak memory instead of hiding it.

Each training runs as its own `fastonestep train` process, so its peak memory (CUDA peak allocation on a
GPU, the process's peak RSS on a CPU) is its own. With --quick the runs share this process (imports dominate
tiny runs); the peak is restarted before each (CUDA: reset_peak_memory_stats; Linux: /proc/self/clear_refs),
and left empty ('-') where it cannot be. A restarted CPU peak starts from the process's resident memory
(imports, caches, what earlier runs left), so --quick peaks compare within one table, not with isolated runs. Runs live under <out stem>_runs/<setup>/<method>; a re-run of the
command reuses finished runs and resumes interrupted ones.

Columns: quality (toy: energy distance, modes covered of 25, high-quality fraction; MNIST: MNIST FD and
digits covered), diversity (recall / coverage and the mean pairwise feature distance where the evaluation
reports them), sampling steps (network evaluations), auxiliary-network parameters (everything trained
besides the generator), fp32 training state (weights, gradients and Adam moments of the trained networks, the
frozen teacher, the EMA), seconds per generator iteration (median over log intervals), peak memory.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from fastonestep.diffusion.samplers import karras_sigmas

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@dataclass(frozen=True)
class Setup:
    name: str
    preset_dir: str  # configs/<preset_dir>/<method preset>.yaml
    teacher_preset: str
    one_step_sigma: float  # the one-step generator's input level (the DiffRatio presets' sigma_g)
    levels_hi: float  # K-step students start from (nearly) pure noise ...
    levels_lo: float  # ... and end their last step here
    quick_teacher: tuple = ()
    quick_student: tuple = ()
    quick_steps: int = 4
    teacher_steps_quick: int = 100


SETUPS = {
    "toy": Setup("toy", "toy2d", "edm.yaml", one_step_sigma=40.0, levels_hi=40.0, levels_lo=0.3,
                 quick_teacher=("data.size=2048", "network.hidden=32", "network.depth=2", "network.emb_dim=16",
                                "train.batch_size=128", "eval.num_samples=256", "eval.batch_size=256",
                                "diffusion.sample_steps=8", "train.log_every=10", "train.ema_halflife_kimg=2"),
                 quick_student=("eval.num_samples=256", "eval.batch_size=256", "train.batch_size=128",
                                "train.log_every=2", "eval.teacher_fd=false", "diffratio.ratio_net.hidden=32",
                                "diffratio.ratio_net.depth=2")),
    "mnist": Setup("mnist", "mnist", "teacher.yaml", one_step_sigma=2.5, levels_hi=80.0, levels_lo=0.5,
                   quick_teacher=("data.size=256", "network.channels=8", "network.channel_mult=[1,2]",
                                  "train.batch_size=16", "eval.num_samples=64", "eval.batch_size=64",
                                  "diffusion.sample_steps=4", "train.log_every=2", "optim.warmup_steps=0"),
                   quick_student=("eval.num_samples=64", "eval.batch_size=64", "train.batch_size=8",
                                  "train.log_every=1", "eval.teacher_fd=false"),
                   quick_steps=2, teacher_steps_quick=4),
}


@dataclass(frozen=True)
class Entry:
    label: str
    preset: str  # file stem in configs/<setup>/
    overrides: tuple = field(default_factory=tuple)
    nfe: int = 1


def student_levels(setup: Setup, k: int) -> list[float]:
    """K noise levels of a K-step student: the Karras spacing from levels_hi down to levels_lo."""
    if k == 1:
        return [setup.one_step_sigma]
    return [round(float(s), 4) for s in karras_sigmas(k, setup.levels_lo, setup.levels_hi)[:-1]]


def _levels(key: str, levels: list[float]) -> str:
    return f"{key}=[{','.join(repr(s) for s in levels)}]"


def entries(setup: Setup) -> list[Entry]:
    out = [Entry("DiffRatio-rKL", "diffratio", ("diffratio.divergence=rkl",)),
           Entry("DiffRatio-DiJS", "diffratio", ("diffratio.divergence=dijs",)),
           Entry("DMD", "dmd", (_levels("dmd.student_sigmas", student_levels(setup, 1)),)),
           Entry("DMD2 (GAN)", "dmd2", (_levels("dmd.student_sigmas", student_levels(setup, 1)),))]
    out += [Entry(f"DP-DMD K={k}", "dpdmd", (_levels("dpdmd.student_sigmas", student_levels(setup, k)),), nfe=k)
            for k in (2, 3, 4)]
    out += [Entry(f"Backward {k}-step", "backward", (_levels("backward.student_sigmas", student_levels(setup, k)),),
                  nfe=k) for k in (1, 2, 3)]
    return out


# ----------------------------------------------------------------------------------------------------------
# running


def restart_peak_rss() -> bool:
    """Restarts this process's peak RSS (Linux: VmHWM, which getrusage's ru_maxrss follows), after handing
    freed memory back, so that an in-process run on a CPU gets a peak of its own. False where not possible."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL(None).malloc_trim(0)  # glibc keeps freed heap resident otherwise
    except (AttributeError, OSError):
        pass
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
    except OSError:
        return False
    return True


def _restart_peak_memory() -> bool:
    """Before an in-process run: whether its peak memory will be its own (the allocator's, or the RSS's)."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        return True
    return restart_peak_rss()


def _train(preset: Path, overrides, run_dir: Path, log, isolate: bool) -> tuple[dict, bool]:
    """Trains one run (resuming or reusing it): (its metrics.json, whether its logged peak memory is its own).
    isolate: in its own `fastonestep train` process; else in this process (saves the ~9 s of imports per run
    that dominate tiny runs), with the peak restarted first where possible."""
    run_dir.mkdir(parents=True, exist_ok=True)
    if not isolate:
        from fastonestep.config import load_config
        from fastonestep.engine.loop import train

        own_peak = _restart_peak_memory()
        metrics = train(load_config(str(preset), overrides), str(run_dir), progress=False, log=lambda *_: None)
        return metrics, own_peak
    cmd = [sys.executable, "-m", "fastonestep", "train", str(preset), *overrides, "--out", str(run_dir),
           "--no-progress"]
    log_path = run_dir / "train.log"
    with open(log_path, "a", encoding="utf-8") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=os.environ.copy())
    if proc.returncode != 0:
        tail = "".join(log_path.read_text(encoding="utf-8").splitlines(keepends=True)[-15:])
        raise RuntimeError(f"training '{run_dir}' failed (exit {proc.returncode}); log {log_path}:\n{tail}")
    with open(run_dir / "metrics.json", encoding="utf-8") as f:
        return json.load(f), True


def _stats_rows(run_dir: Path) -> list[dict]:
    path = run_dir / "stats.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _sec_per_iter(rows: list[dict], batch: int) -> float | None:
    # The first interval includes warm-up (allocations, lazy init), so it is left out when others exist.
    times = [r["sec_per_kimg"] * batch / 1000 for r in rows[1:] or rows if r.get("sec_per_kimg")]
    return statistics.median(times) if times else None


def auxiliary_parameters(counts: dict) -> int:
    """Parameters trained besides the generator (ratio net, fake score, GAN head); the frozen teacher, the
    'replaced' bookkeeping entries and byte counts are not counted."""
    return sum(v for k, v in counts.items() if k not in ("generator", "denoiser")
               and not k.startswith(("teacher", "replaced")) and not k.endswith("_bytes"))


def training_state_mb(counts: dict) -> float:
    """fp32 training state while training: weights + gradients + two Adam moments (16 bytes per parameter) of
    every trained network, 4 bytes per parameter of a teacher kept frozen, and the generator's EMA copy.
    Exact for these single-process fp32 runs; activations are not included."""
    trained = counts.get("generator", 0) + auxiliary_parameters(counts)
    frozen = sum(v for k, v in counts.items() if k.startswith("teacher") and not k.endswith("_bytes"))
    return (16 * trained + 4 * frozen + 4 * counts.get("generator", 0)) / 2**20


QUALITY_KEYS = {"toy": ("energy_distance", "modes_covered", "hq_fraction"),
                "mnist": ("mnist_fd", "num_classes_covered")}
DIVERSITY_KEYS = ("recall", "coverage", "diversity")


def _row(setup: Setup, entry: Entry, metrics: dict, run_dir: Path, batch: int, own_peak: bool) -> dict:
    model = next(iter(v for v in metrics.values() if isinstance(v, dict) and "num_samples" in v))
    rows = _stats_rows(run_dir)
    # Each log line holds the peak of its own interval (GPU) or since the run began (CPU): the run's is the
    # largest. It belongs to the run only when the peak was restarted for it (own_peak).
    peaks = [r["peak_memory_mb"] for r in rows if r.get("peak_memory_mb") is not None]
    peak = max(peaks) if peaks and own_peak else None
    row = {"setup": setup.name, "method": entry.label, "nfe": entry.nfe, "steps": metrics.get("steps"),
           "aux_parameters": auxiliary_parameters(metrics.get("parameters", {})),
           "state_mb": training_state_mb(metrics.get("parameters", {})),
           "sec_per_iter": _sec_per_iter(rows, batch), "peak_memory_mb": peak, "run": str(run_dir)}
    for key in QUALITY_KEYS[setup.name] + DIVERSITY_KEYS:
        if key in model:
            row[key] = model[key]
    return row


def _student_batch(run_dir: Path) -> int:
    import yaml

    with open(run_dir / "config.yaml", encoding="utf-8") as f:
        return int(yaml.safe_load(f)["train"]["batch_size"])


def run(out: str, steps: int | None = None, seed: int = 0, quick: bool = False, setups=("toy", "mnist"),
        methods=None, teachers: dict | None = None, isolate: bool | None = None, log=print) -> dict:
    """Trains and evaluates every method on each setup; writes `out` (JSON), a markdown table and a figure.
    isolate (default: not quick) runs each training in its own process (see _train)."""
    import torch

    isolate = (not quick) if isolate is None else isolate
    unknown = [s for s in setups if s not in SETUPS]
    if unknown:
        raise ValueError(f"unknown setup(s) {unknown}; available: {', '.join(SETUPS)}")
    out_path = Path(out)
    root = out_path.with_name(out_path.stem + "_runs")
    teachers = dict(teachers or {})
    rows, t0 = [], time.perf_counter()
    for name in setups:
        setup = SETUPS[name]
        chosen = [e for e in entries(setup) if methods is None or e.label in methods or e.preset in methods]
        if methods is not None and not chosen:
            raise ValueError(f"no method matches {methods}; available: {', '.join(e.label for e in entries(setup))}")
        teacher_dir = Path(teachers.get(name) or root / name / "teacher")
        if name not in teachers:
            over = [f"seed={seed}"] + (list(setup.quick_teacher) + [f"train.steps={setup.teacher_steps_quick}"]
                                       if quick else [])
            log(f"== {name}: teacher")
            _train(CONFIGS / setup.preset_dir / setup.teacher_preset, over, teacher_dir, log, isolate)
        for entry in chosen:
            run_dir = root / name / entry.label.replace(" ", "_").replace("(", "").replace(")", "").replace("=", "")
            over = [f"teacher={teacher_dir}", f"seed={seed}", *entry.overrides]
            if quick:
                over += list(setup.quick_teacher) + list(setup.quick_student) + [f"train.steps={setup.quick_steps}"]
            if steps is not None:
                over.append(f"train.steps={steps}")
            log(f"== {name}: {entry.label}")
            metrics, own_peak = _train(CONFIGS / setup.preset_dir / f"{entry.preset}.yaml", over, run_dir, log,
                                       isolate)
            rows.append(_row(setup, entry, metrics, run_dir, _student_batch(run_dir), own_peak))
    result = {"rows": rows, "settings": {"steps": steps, "seed": seed, "quick": quick, "setups": list(setups),
                                         "methods": methods, "teachers": {k: str(v) for k, v in teachers.items()},
                                         "isolate": isolate, "device": "cuda" if torch.cuda.is_available() else "cpu"},
              "seconds": time.perf_counter() - t0}
    from fastonestep.engine.checkpoint import atomic_write_json, atomic_write_text

    atomic_write_json(str(out_path), result)
    atomic_write_text(str(out_path.with_suffix(".md")), markdown_table(rows))
    figure(rows, str(out_path.with_suffix(".png")))
    return result


# ----------------------------------------------------------------------------------------------------------
# reporting


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1e4 else f"{v:.3e}"
    return str(v)


def markdown_table(rows: list[dict]) -> str:
    lines = []
    for setup in dict.fromkeys(r["setup"] for r in rows):
        sub = [r for r in rows if r["setup"] == setup]
        cols = ["method", "nfe", *QUALITY_KEYS[setup], *[k for k in DIVERSITY_KEYS if any(k in r for r in sub)],
                "aux_parameters", "state_mb", "sec_per_iter", "peak_memory_mb"]
        lines += [f"### {setup}", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        lines += ["| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |" for r in sub]
        lines.append("")
    return "\n".join(lines)


def figure(rows: list[dict], path: str) -> None:
    """One panel per run: its samples.png (image grid or toy scatter), titled with method and quality."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    setups = list(dict.fromkeys(r["setup"] for r in rows))
    ncol = max(len([r for r in rows if r["setup"] == s]) for s in setups)
    fig, axes = plt.subplots(len(setups), ncol, figsize=(2.2 * ncol, 2.7 * len(setups)), squeeze=False)
    for i, setup in enumerate(setups):
        sub = [r for r in rows if r["setup"] == setup]
        for j in range(ncol):
            ax = axes[i][j]
            ax.axis("off")
            if j >= len(sub):
                continue
            png = Path(sub[j]["run"]) / "samples.png"
            if png.exists():
                image = Image.open(png)
                ax.imshow(image, cmap="gray" if image.mode in ("L", "LA") else None)
            key = QUALITY_KEYS[setup][0]
            ax.set_title(f"{sub[j]['method']}\n{key}={_fmt(sub[j].get(key))}", fontsize=7)
    fig.tight_layout(pad=1.5)
    fig.savefig(path, dpi=120)
    plt.close(fig)
