"""Kernel benchmark harness: eager vs torch.compile vs the fused Triton and csrc (`ext`) losses.

For every loss of `fastonestep.losses`, size and dtype it times four providers:

- `eager`:   the public function with `impl="torch"` (the eager reference);
- `compile`: `torch.compile` of the eager reference function of `fastonestep.kernels.reference`;
- `triton`:  the public function with `impl="triton"`;
- `ext`:     the public function with `impl="ext"` (the torch.library C++/CUDA op).

in three modes: `forward` (the loss with inputs requiring grad, as in training; `add_noise` under no_grad),
`backward` (only the gradient of a precomputed loss, `torch.autograd.grad(..., retain_graph=True)`) and
`full` (forward + backward). A provider that raises or warns when first called is recorded as skipped, with
the reason, and is not timed.

On CUDA times come from `triton.testing.do_bench` (median, p20, p80; it flushes L2 between calls) and the
peak memory from `torch.cuda.max_memory_allocated` around one call, minus what was allocated before it
(the inputs). On CPU a `time.perf_counter` loop gives the same quantiles and memory is left empty: CPU rows
are smoke runs of the harness, tagged `is_claim=false`, never performance claims.

Achieved bandwidth: every (loss, mode) has a fixed minimal byte count (`BYTES_MOVED`, the same for all
providers, so GB/s ratios are speedups); it is divided by the median time and compared with the device's
copy bandwidth measured in the same run (`dst.copy_(src)` on a large tensor, read + write counted).

Rows are appended to a CSV (default bench/results/kernels.csv), tagged with device, torch/triton versions,
git commit and UTC date. `plot()` and `markdown_table()` summarise the latest commit's rows.

    fastonestep bench kernels [--quick] [--losses a,b] [--providers eager,triton] [--max-seconds S] [--out CSV]
                              [--plot PNG]
    python -m fastonestep.benchmark.kernels --quick
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import datetime
import functools
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

LOSSES = ("add_noise", "add_noise_seeded", "denoising_loss", "dmd_loss", "ratio_generator_loss",
          "ratio_classifier_loss")
PROVIDERS = ("eager", "compile", "triton", "ext")
MODES = ("forward", "backward", "full")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
IMPL_OF = {"eager": "torch", "triton": "triton", "ext": "ext"}  # provider -> impl= of fastonestep.losses

# Realistic training batches of 64x64 latents (4 channels) and images (3 channels), and one large size.
GPU_SIZES = {
    "B32-4x64x64": (32, 4, 64, 64),
    "B256-4x64x64": (256, 4, 64, 64),
    "B128-3x64x64": (128, 3, 64, 64),
    "large-256x4x128x128": (256, 4, 128, 128),  # 16.8M elements: the bandwidth target is judged here
}
GPU_QUICK_SIZES = ("B32-4x64x64", "large-256x4x128x128")
LARGE_SIZES = ("large-256x4x128x128",)
CPU_SIZES = {"cpu-tiny-4x4x16x16": (4, 4, 16, 16), "cpu-small-8x3x32x32": (8, 3, 32, 32)}
CPU_QUICK_SIZES = ("cpu-tiny-4x4x16x16",)

SEED = 1234             # add_noise_seeded: noise from this seed, never stored
SIGMA_DATA = 0.5        # denoising_loss
DIVERGENCE = "dijs"     # ratio_generator_loss: the divergence of the headline DiffRatio results

COLUMNS = (
    "loss", "provider", "mode", "size", "shape", "dtype",
    "median_ms", "p20_ms", "p80_ms", "peak_mem_mb", "bytes", "gbps", "pct_copy_bw",
    "speedup_vs_eager", "speedup_vs_compile",
    "device", "device_type", "torch", "triton", "commit", "date", "is_claim", "status", "note",
)

# ---------------------------------------------------------------------------------------------------------
# Bytes moved: the minimal memory traffic of one call, (tensors read, tensors written), per loss and mode.
# The same count is used for every provider, so achieved GB/s is an "effective" bandwidth and the GB/s of
# two providers differ exactly by their speedup. Names are the case's tensors (see _make_tensors):
#   N-element tensors: x0 noise F x_t x x_real_hat x_fake_hat logit_grad (dtype of the run);
#   per-sample (B,) fp32: alpha sigma logits weight; the ratio classifier's logits_gen/logits_real are (B,)
#   in the dtype of the run.
#   "out"      the result: x_t for add_noise, the (B,) fp32 per-sample loss of denoising_loss, else a fp32 scalar;
#   "grad_out" the incoming gradient (ones shaped like out);
#   "grad:T"   the gradient w.r.t. T, written (T's size and dtype);
#   "saved:T"  a T-sized tensor the backward must read (the gradient a fused forward wrote, or what eager saved).
# forward  = the loss value only. ratio_generator_loss never reads x: its value is 0.5*mean(g^2) and its
#            gradient g/numel(x). A fused forward that also writes the gradient does more than this count,
#            so judge fused kernels at "full".
# backward = from the saved state to the input gradients (read saved + grad_out, write grads); a fused backward
#            that returns the saved gradient untouched when grad_out is 1 can exceed 100% of copy bandwidth.
# full     = one pass over the inputs writing the loss and the input gradients: for a fused loss, what its
#            forward kernel must move; the >= 85%-of-copy-bandwidth target applies to this mode.
# copy     = the reference: read src, write dst.
# With N elements of s bytes and batch B (per-sample fp32), this gives:
#   add_noise              fwd 3Ns+8B
#   add_noise_seeded       fwd 2Ns+8B
#   denoising_loss         fwd 3Ns+8B          bwd 2Ns+4B        full 4Ns+12B
#   dmd_loss               fwd 3Ns+4           bwd 2Ns+4         full 4Ns+8
#   ratio_generator_loss   fwd Ns+8B+4         bwd 2Ns+4         full 2Ns+8B+8
#   ratio_classifier_loss  fwd 2Bs+4B+4        bwd 4Bs+4         full 4Bs+4B+8
# ---------------------------------------------------------------------------------------------------------
BYTES_MOVED = {
    "add_noise": {
        "forward": (("x0", "noise", "alpha", "sigma"), ("out",)),
    },
    "add_noise_seeded": {
        "forward": (("x0", "alpha", "sigma"), ("out",)),
    },
    "denoising_loss": {
        "forward": (("F", "x_t", "x0", "sigma"), ("out",)),
        "backward": (("saved:F", "grad_out"), ("grad:F",)),
        "full": (("F", "x_t", "x0", "sigma", "grad_out"), ("out", "grad:F")),
    },
    "dmd_loss": {
        "forward": (("x", "x_real_hat", "x_fake_hat"), ("out",)),
        "backward": (("saved:x", "grad_out"), ("grad:x",)),
        "full": (("x", "x_real_hat", "x_fake_hat", "grad_out"), ("out", "grad:x")),
    },
    "ratio_generator_loss": {
        "forward": (("logit_grad", "logits", "weight"), ("out",)),
        "backward": (("saved:x", "grad_out"), ("grad:x",)),
        "full": (("logit_grad", "logits", "weight", "grad_out"), ("out", "grad:x")),
    },
    "ratio_classifier_loss": {
        "forward": (("logits_gen", "logits_real", "weight"), ("out",)),
        "backward": (("saved:logits_gen", "saved:logits_real", "grad_out"),
                     ("grad:logits_gen", "grad:logits_real")),
        "full": (("logits_gen", "logits_real", "weight", "grad_out"),
                 ("out", "grad:logits_gen", "grad:logits_real")),
    },
}


class ProviderUnavailable(RuntimeError):
    """A provider raised or warned on its first call; the message says why."""


# ------------------------------------------------------------------------------------------------ the losses
@dataclass(frozen=True)
class LossSpec:
    name: str
    args: tuple          # the case's tensors passed to the loss, in order
    grads: tuple         # inputs the loss is differentiated w.r.t.; empty: forward only, under no_grad
    api: Callable        # api(losses_module, impl, *tensors) -> out
    ref: Callable        # ref(reference_module) -> plain function of *tensors (what `compile` compiles)
    rng: bool = False    # an implementation may draw its own noise for the seed: a difference is noted, not flagged


SPECS = {s.name: s for s in (
    LossSpec("add_noise", ("x0", "alpha", "sigma", "noise"), (),
             lambda L, impl, x0, a, s, n: L.add_noise(x0, a, s, noise=n, impl=impl),
             lambda R: lambda x0, a, s, n: R.add_noise(x0, a, s, n, None)),
    LossSpec("add_noise_seeded", ("x0", "alpha", "sigma"), (),
             lambda L, impl, x0, a, s: L.add_noise(x0, a, s, seed=SEED, impl=impl),
             lambda R: lambda x0, a, s: R.add_noise(x0, a, s, None, SEED), rng=True),
    LossSpec("denoising_loss", ("F", "x_t", "x0", "sigma"), ("F",),
             lambda L, impl, F, xt, x0, s: L.denoising_loss(F, xt, x0, s, SIGMA_DATA, impl=impl),
             lambda R: lambda F, xt, x0, s: R.denoising_loss(F, xt, x0, s, SIGMA_DATA)),
    LossSpec("dmd_loss", ("x", "x_real_hat", "x_fake_hat"), ("x",),
             lambda L, impl, x, r, f: L.dmd_loss(x, r, f, impl=impl),
             lambda R: lambda x, r, f: R.dmd_loss(x, r, f)),
    LossSpec("ratio_generator_loss", ("x", "logit_grad", "logits", "weight"), ("x",),
             lambda L, impl, x, g, lo, w: L.ratio_generator_loss(x, g, lo, w, divergence=DIVERGENCE, normalize=True,
                                                                 clamp=10.0, impl=impl),
             lambda R: lambda x, g, lo, w: R.ratio_generator_loss(x, g, lo, w, DIVERGENCE, True, 10.0)),
    LossSpec("ratio_classifier_loss", ("logits_gen", "logits_real", "weight"), ("logits_gen", "logits_real"),
             lambda L, impl, lg, lr, w: L.ratio_classifier_loss(lg, lr, w, impl=impl),
             lambda R: lambda lg, lr, w: R.ratio_classifier_loss(lg, lr, w)),
)}
assert set(SPECS) == set(LOSSES) == set(BYTES_MOVED)


def modes_of(loss: str) -> tuple:
    return tuple(BYTES_MOVED[loss])


def _make_tensors(loss: str, shape, dtype, device, seed: int = 0) -> dict:
    """Inputs of one case, drawn from a seeded generator on the device; grad-requiring ones flagged."""
    spec = SPECS[loss]
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    B = shape[0]

    def big():
        return torch.randn(shape, generator=gen, device=device, dtype=torch.float32).to(dtype)

    def per_sample(lo, hi, dt=torch.float32):
        return (lo + (hi - lo) * torch.rand(B, generator=gen, device=device, dtype=torch.float32)).to(dt)

    if loss in ("add_noise", "add_noise_seeded"):
        t = {"x0": big(), "alpha": per_sample(0.5, 1.0), "sigma": per_sample(0.05, 2.0)}
        if loss == "add_noise":
            t["noise"] = big()
    elif loss == "denoising_loss":
        t = {"F": big(), "x_t": big(), "x0": big(), "sigma": per_sample(0.05, 5.0)}
    elif loss == "dmd_loss":
        x = big()
        t = {"x": x, "x_real_hat": (x.float() + 0.1 * big().float()).to(dtype),
             "x_fake_hat": (x.float() + 0.1 * big().float()).to(dtype)}
    elif loss == "ratio_generator_loss":
        t = {"x": big(), "logit_grad": big(), "logits": per_sample(-3.0, 3.0), "weight": per_sample(0.5, 1.5)}
    elif loss == "ratio_classifier_loss":
        t = {"logits_gen": per_sample(-3.0, 3.0, dtype), "logits_real": per_sample(-3.0, 3.0, dtype),
             "weight": per_sample(0.5, 1.5)}
    else:  # pragma: no cover - guarded by SPECS
        raise ValueError(loss)
    for name in spec.grads:
        t[name].requires_grad_(True)
    return t


def bytes_moved(loss: str, mode: str, tensors: dict, out: torch.Tensor) -> int:
    """The minimal bytes of one call of `loss` in `mode` (see BYTES_MOVED)."""
    reads, writes = BYTES_MOVED[loss][mode]
    total = 0
    for name in reads + writes:
        if name in ("out", "grad_out"):
            t = out
        else:
            t = tensors[name.split(":", 1)[-1]]
        total += t.numel() * t.element_size()
    return total


# --------------------------------------------------------------------------------------------- providers
def _impl_call(loss: str, impl: str) -> Callable:
    from fastonestep import losses as L

    return functools.partial(SPECS[loss].api, L, impl)


def _compiled_call(loss: str) -> Callable:
    from fastonestep.kernels import reference as R

    torch._dynamo.reset()  # fresh caches: never fall back to eager on a recompile limit across cases
    return torch.compile(SPECS[loss].ref(R), dynamic=False)


def make_call(loss: str, provider: str) -> Callable:
    """The loss as a function of the case's tensors (SPECS[loss].args, in order) for one provider."""
    if provider == "compile":
        return _compiled_call(loss)
    if provider not in IMPL_OF:
        raise ValueError(f"unknown provider {provider!r}; expected one of {', '.join(PROVIDERS)}")
    return _impl_call(loss, IMPL_OF[provider])


def _no_donated_buffers():
    """AOTAutograd config without donated buffers (they forbid retain_graph=True); a no-op where absent."""
    try:
        import torch._functorch.config as config
    except ImportError:  # pragma: no cover - present in every supported torch
        return contextlib.nullcontext()
    if hasattr(config, "donated_buffer"):
        return config.patch(donated_buffer=False)
    return contextlib.nullcontext()


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def run_once(loss: str, call: Callable, tensors: dict):
    """One call and, for a differentiable loss, the gradients (grad_out = ones): (out, grads)."""
    spec = SPECS[loss]
    args = [tensors[n] for n in spec.args]
    if not spec.grads:
        with torch.no_grad():
            return call(*args), ()
    out = call(*args)
    grads = torch.autograd.grad(out, [tensors[n] for n in spec.grads], torch.ones_like(out))
    return out.detach(), tuple(grads)


def availability(provider: str, device) -> str | None:
    """Why a fused provider cannot run on `device`, or None. Asked before the first call because
    fastonestep.losses falls back to eager with a warning only once per process: later calls would silently
    time eager under the fused name."""
    if provider not in ("triton", "ext"):
        return None
    device = torch.device(device)
    try:
        from fastonestep import losses as L

        check = getattr(L, "impl_available", None)
        if check is None:  # an API without the query: the probe's raise-or-warn rule decides
            return None
        ok, reason = check(IMPL_OF[provider], device)
        if not ok:
            return _one_line(reason or f"impl={IMPL_OF[provider]!r} is not available")
        if provider == "ext" and device.type == "cuda":
            from fastonestep.kernels import ext

            has_cuda = getattr(ext, "has_cuda_kernels", None)
            if has_cuda is not None and not has_cuda():
                return "the csrc extension was built without its CUDA kernels"
    except Exception as e:  # noqa: BLE001 - a failing check makes the provider unavailable, with its reason
        return _one_line(f"{type(e).__name__}: {e}")
    return None


def probe(loss: str, provider: str, call: Callable, tensors: dict, device):
    """First call of a provider: raises ProviderUnavailable if it raises, or (for the fused impls) warns."""
    strict = provider in ("triton", "ext")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            result = run_once(loss, call, tensors)
            _sync(device)
        except Exception as e:  # noqa: BLE001 - any failure makes the provider unavailable, with its reason
            raise ProviderUnavailable(_one_line(f"{type(e).__name__}: {e}")) from e
    if strict:
        real = [w for w in caught if not _benign_warning(w)]
        if real:
            w = real[0]
            raise ProviderUnavailable(_one_line(f"warned ({w.category.__name__}): {w.message}"))
    return result


def _benign_warning(w) -> bool:
    """Deprecation notices and warnings raised inside torch/triton themselves (e.g. cpp_extension's
    TORCH_CUDA_ARCH_LIST notice while the ext op builds) do not mean the fused path fell back."""
    if issubclass(w.category, (DeprecationWarning, PendingDeprecationWarning, FutureWarning)):
        return True
    filename = os.path.abspath(str(w.filename or ""))
    roots = [os.path.dirname(os.path.abspath(torch.__file__))]
    try:
        import triton

        roots.append(os.path.dirname(os.path.abspath(triton.__file__)))
    except Exception:  # noqa: BLE001
        pass
    return any(filename.startswith(root + os.sep) for root in roots)


def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def compare(result, reference, dtype) -> str | None:
    """None if a provider's (out, grads) match the eager reference loosely, else what differs."""
    rtol, atol = (1e-3, 1e-5) if dtype == torch.float32 else (3e-2, 1e-2)
    (out, grads), (ref_out, ref_grads) = result, reference
    pairs = [("value", out, ref_out)] + [(f"grad{i}", g, r) for i, (g, r) in enumerate(zip(grads, ref_grads))]
    if len(grads) != len(ref_grads):
        return f"{len(grads)} gradients, eager has {len(ref_grads)}"
    for what, a, b in pairs:
        if a is None or b is None or tuple(a.shape) != tuple(b.shape):
            return f"{what}: shape {None if a is None else tuple(a.shape)} vs eager {tuple(b.shape)}"
        a32, b32 = a.detach().float(), b.detach().float()
        if not torch.allclose(a32, b32, rtol=rtol, atol=atol):
            diff = (a32 - b32).abs().nan_to_num(float("inf")).max().item()
            return f"{what} differs from eager (max |diff| {diff:.3g})"
    return None


def mode_fn(loss: str, call: Callable, tensors: dict, mode: str, grad_out=None) -> Callable:
    """A zero-argument callable doing one `mode` step of `loss` with `call`."""
    spec = SPECS[loss]
    args = [tensors[n] for n in spec.args]
    if mode not in BYTES_MOVED[loss]:
        raise ValueError(f"{loss} has no {mode!r} mode (modes: {', '.join(modes_of(loss))})")
    if not spec.grads:
        def forward_nograd():
            with torch.no_grad():
                return call(*args)
        return forward_nograd
    if mode == "forward":
        return lambda: call(*args)
    gins = [tensors[n] for n in spec.grads]
    if mode == "full":
        if grad_out is None:
            grad_out = torch.ones_like(call(*args).detach())
        return lambda: torch.autograd.grad(call(*args), gins, grad_out)
    out = call(*args)  # backward: the forward runs once, outside the timed region
    if grad_out is None:
        grad_out = torch.ones_like(out.detach())
    return lambda: torch.autograd.grad(out, gins, grad_out, retain_graph=True)


def prepare(loss: str, provider: str, shape, dtype=torch.float32, device=None, mode: str = "full") -> Callable:
    """One ready-to-time callable (used by bench/test_bench_kernels.py). Raises ProviderUnavailable."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    reason = availability(provider, device)
    if reason:
        raise ProviderUnavailable(reason)
    tensors = _make_tensors(loss, tuple(shape), dtype, device)
    call = make_call(loss, provider)
    out, _ = probe(loss, provider, call, tensors, device)
    return mode_fn(loss, call, tensors, mode, torch.ones_like(out) if SPECS[loss].grads else None)


# ------------------------------------------------------------------------------------------------- timing
@dataclass
class Timing:
    warmup_ms: float = 25.0     # CUDA: do_bench warmup / rep budgets in ms
    rep_ms: float = 100.0
    cpu_warmup: int = 2         # CPU: warm-up calls, then up to cpu_reps timed calls within cpu_budget_s
    cpu_reps: int = 20
    cpu_budget_s: float = 2.0


def _quantile(sorted_values, q: float) -> float:
    if len(sorted_values) == 1:
        return sorted_values[0]
    pos = q * (len(sorted_values) - 1)
    lo = int(math.floor(pos))
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def time_fn(fn: Callable, device, timing: Timing) -> tuple:
    """(median, p20, p80) in ms."""
    if torch.device(device).type == "cuda":
        try:
            from triton.testing import do_bench
        except ImportError:  # pragma: no cover - triton ships with CUDA torch
            return _cuda_event_times(fn, timing)
        med, p20, p80 = do_bench(fn, warmup=timing.warmup_ms, rep=timing.rep_ms, quantiles=[0.5, 0.2, 0.8])
        return float(med), float(p20), float(p80)
    for _ in range(timing.cpu_warmup):
        fn()
    times = []
    start = time.perf_counter()
    while len(times) < timing.cpu_reps:
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
        if len(times) >= 3 and time.perf_counter() - start > timing.cpu_budget_s:
            break
    times.sort()
    return _quantile(times, 0.5), _quantile(times, 0.2), _quantile(times, 0.8)


def _cuda_event_times(fn, timing: Timing) -> tuple:  # pragma: no cover - GPU without triton only
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    times = []
    deadline = time.perf_counter() + timing.rep_ms / 1e3
    while len(times) < 10 or (time.perf_counter() < deadline and len(times) < 1000):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    times.sort()
    return _quantile(times, 0.5), _quantile(times, 0.2), _quantile(times, 0.8)


def peak_memory_mb(fn: Callable, device) -> float | None:
    """CUDA: peak allocated during one call minus what was allocated before it (inputs, saved graph); CPU: None."""
    if torch.device(device).type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    result = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    del result
    return (peak - base) / 2**20


def copy_bandwidth(device, numel: int, timing: Timing) -> tuple:
    """(GB/s, median ms, bytes) of dst.copy_(src) on `numel` fp32 elements, read + write counted."""
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    med, p20, p80 = time_fn(lambda: dst.copy_(src), device, timing)
    nbytes = 2 * src.numel() * src.element_size()
    return nbytes / (med * 1e6), (med, p20, p80), nbytes


# ------------------------------------------------------------------------------------------------ run tags
def _device_info(device) -> tuple:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device), "cuda"
    name = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    name = name or platform.processor() or platform.machine() or "cpu"
    return f"cpu: {name} ({torch.get_num_threads()} threads)", "cpu"


def _triton_version() -> str:
    try:
        import triton
    except Exception:  # noqa: BLE001 - any import failure means "no triton"
        return "none"
    return getattr(triton, "__version__", "unknown")


COMMIT_ENV = "FASTONESTEP_COMMIT"


def _git(where, *args) -> str | None:
    """git's stripped stdout in `where`, or None when git is missing or fails there."""
    try:
        out = subprocess.run(["git", *args], cwd=where, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _checkout_dirs() -> tuple:
    """Where to ask git: the checkout this package runs from, then the working directory."""
    return Path(__file__).resolve().parents[2], Path.cwd()


def git_commit() -> str:
    """The commit rows are tagged with. FASTONESTEP_COMMIT wins: a copy of the checkout without .git (what a
    device machine gets) cannot ask git. Otherwise the short HEAD, with "-dirty" when tracked files differ
    from it, so numbers of uncommitted code are never filed under the commit."""
    given = os.environ.get(COMMIT_ENV, "").strip()
    if given:
        return given
    for where in _checkout_dirs():
        head = _git(where, "rev-parse", "--short", "HEAD")
        if head:
            dirty = _git(where, "status", "--porcelain", "--untracked-files=no")
            return head + ("-dirty" if dirty else "")
    return "unknown"


# ------------------------------------------------------------------------------------------------------ CSV
def _fmt(value) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return "" if math.isnan(value) else repr(value)
    return str(value)


def append_rows(csv_path, rows, columns=None) -> None:
    """Appends rows to the CSV (header `columns`, default this benchmark's, created if missing) by writing the
    whole new file, then os.replace. Shared by every benchmark's results file."""
    path = Path(csv_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fields, old = list(columns or COLUMNS), []
    if path.exists() and path.stat().st_size > 0:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            old = list(reader)
            fields += [c for c in (reader.fieldnames or []) if c not in fields]
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=fields, restval="", extrasaction="ignore")
            writer.writeheader()
            writer.writerows(old)
            writer.writerows({k: _fmt(v) for k, v in row.items()} for row in rows)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def read_rows(csv_path) -> list:
    with open(csv_path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


# ------------------------------------------------------------------------------------------------------ run
def _parse_size(item: str, table: dict) -> tuple:
    if item in table:
        return item, table[item]
    if item in GPU_SIZES:
        return item, GPU_SIZES[item]
    if item in CPU_SIZES:
        return item, CPU_SIZES[item]
    try:
        shape = tuple(int(v) for v in item.lower().split("x"))
    except ValueError:
        shape = ()
    if len(shape) < 2 or min(shape) < 1:
        known = ", ".join(list(GPU_SIZES) + list(CPU_SIZES))
        raise ValueError(f"size {item!r} is neither a known label ({known}) nor a shape like 8x4x32x32")
    return item, shape


def _speedups(rows) -> None:
    """Fills speedup_vs_eager / speedup_vs_compile within each (loss, size, dtype, mode)."""
    timed = {}
    for r in rows:
        if r["median_ms"] is not None:
            timed.setdefault((r["loss"], r["size"], r["dtype"], r["mode"]), {})[r["provider"]] = r["median_ms"]
    for r in rows:
        if r["median_ms"] is None:
            continue
        group = timed[(r["loss"], r["size"], r["dtype"], r["mode"])]
        for base, key in (("eager", "speedup_vs_eager"), ("compile", "speedup_vs_compile")):
            if base in group and r["median_ms"] > 0:
                r[key] = group[base] / r["median_ms"]


def _row_line(r) -> str:
    if r["median_ms"] is None:
        return f"  {r['loss']:<22} {r['size']:<20} {r['dtype']:<4} {r['mode']:<8} {r['provider']:<7} " \
               f"{r['status']}: {r['note']}"
    mem = "" if r["peak_mem_mb"] is None else f" {r['peak_mem_mb']:8.1f} MB"
    sp = "" if r["speedup_vs_eager"] is None else f" x{r['speedup_vs_eager']:.2f} eager"
    spc = "" if r["speedup_vs_compile"] is None else f" x{r['speedup_vs_compile']:.2f} compile"
    flag = "" if r["status"] == "ok" else f"  [{r['status']}: {r['note']}]"
    return (f"  {r['loss']:<22} {r['size']:<20} {r['dtype']:<4} {r['mode']:<8} {r['provider']:<7} "
            f"{r['median_ms']:9.4f} ms [{r['p20_ms']:.4f}, {r['p80_ms']:.4f}] {r['gbps']:8.3g} GB/s "
            f"{r['pct_copy_bw']:6.3g}% copy{mem}{sp}{spc}{flag}")


_IMPORTED_AT = time.time()


def process_start_time() -> float:
    """When this process started (epoch seconds): --max-seconds counts from there, so that the start-up (imports,
    CUDA initialisation, the copy-bandwidth measurement) is inside the budget an outer time limit sees. Linux reads
    it from /proc; elsewhere, the import of this module."""
    try:
        with open("/proc/self/stat", encoding="ascii") as f:
            ticks_after_boot = float(f.read().rsplit(")", 1)[1].split()[19])  # field 22, after the command name
        with open("/proc/uptime", encoding="ascii") as f:
            uptime = float(f.read().split()[0])
        started = time.time() - uptime + ticks_after_boot / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return _IMPORTED_AT
    # a sandbox's /proc may not add up: trust it only for a start at most an hour before the import
    return min(started, _IMPORTED_AT) if _IMPORTED_AT - started < 3600 else _IMPORTED_AT


def run(quick: bool = False, losses=None, out_csv="bench/results/kernels.csv", providers=None, *, sizes=None,
        dtypes=None, modes=None, device=None, timing: Timing | None = None, max_seconds: float = 0.0,
        log=None) -> list:
    """Benchmarks every (loss, size, dtype, provider, mode); appends the rows to `out_csv` (None: no CSV)
    after each (loss, size, dtype) case and returns them. CPU runs use tiny sizes and fp32 unless told.
    max_seconds > 0: a case not started within that many seconds gets one `skipped` row instead, so a run
    under an outer time limit ends by itself, with its report (see case_order for what comes first)."""
    log = log or functools.partial(print, flush=True)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    on_gpu = device.type == "cuda"
    losses = list(losses or LOSSES)
    providers = list(providers or PROVIDERS)
    modes = list(modes or MODES)
    for name, given, known in (("loss", losses, LOSSES), ("provider", providers, PROVIDERS), ("mode", modes, MODES)):
        bad = [v for v in given if v not in known]
        if bad:
            raise ValueError(f"unknown {name} {', '.join(map(repr, bad))}; expected one of {', '.join(known)}")
    table = GPU_SIZES if on_gpu else CPU_SIZES
    if sizes is None:
        sizes = (GPU_QUICK_SIZES if quick else tuple(GPU_SIZES)) if on_gpu else \
                (CPU_QUICK_SIZES if quick else tuple(CPU_SIZES))
    size_list = [_parse_size(s, table) for s in sizes]
    dtype_names = list(dtypes or (("fp32", "bf16") if on_gpu else ("fp32",)))
    bad = [d for d in dtype_names if d not in DTYPES]
    if bad:
        raise ValueError(f"unknown dtype {', '.join(map(repr, bad))}; expected one of {', '.join(DTYPES)}")
    if timing is None:
        timing = Timing(warmup_ms=10, rep_ms=40, cpu_reps=5, cpu_budget_s=0.5) if quick else Timing()

    dev_name, dev_type = _device_info(device)
    tags = {"device": dev_name, "device_type": dev_type, "torch": torch.__version__, "triton": _triton_version(),
            "commit": git_commit(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "is_claim": on_gpu and os.environ.get("TRITON_INTERPRET") != "1"}
    log(f"fastonestep kernel benchmark: {dev_name} | torch {tags['torch']} | triton {tags['triton']} | "
        f"commit {tags['commit']} | {tags['date']}")
    if not on_gpu:
        log("  CPU run: a smoke run of the harness on tiny sizes, NOT a performance claim (is_claim=false)")
    elif not tags["is_claim"]:
        log("  TRITON_INTERPRET=1 is set: Triton runs interpreted, so these rows are not claims (is_claim=false)")

    forced = os.environ.pop("FASTONESTEP_IMPL", None)
    if forced:
        log(f"  FASTONESTEP_IMPL={forced} is ignored during the benchmark (each provider names its impl)")
    all_rows = []
    try:
        copy_numel = 2**26 if on_gpu else 2**22  # 256 MB on GPU (well past L2), 16 MB on CPU
        copy_gbps, (cmed, cp20, cp80), cbytes = copy_bandwidth(device, copy_numel, timing)
        copy_row = dict.fromkeys(COLUMNS)
        copy_row.update(loss="copy", provider="torch", mode="copy", size=f"copy-{copy_numel}", shape=str(copy_numel),
                        dtype="fp32", median_ms=cmed, p20_ms=cp20, p80_ms=cp80, bytes=cbytes, gbps=copy_gbps,
                        pct_copy_bw=100.0, status="ok", note="dst.copy_(src), read + write counted", **tags)
        log(f"  copy bandwidth: {copy_gbps:.1f} GB/s ({cmed:.4f} ms for {cbytes / 1e6:.0f} MB)")
        if out_csv:
            append_rows(out_csv, [copy_row])
        all_rows.append(copy_row)

        deadline = process_start_time() + max_seconds if max_seconds else math.inf
        for loss, (label, shape), dname in case_order(losses, size_list, dtype_names):
            if time.time() > deadline:
                rows = [_case_row(loss, label, shape, dname, tags, "skipped",
                                  f"time budget --max-seconds {max_seconds:g} spent before this case")]
            else:
                rows = _measure_case(loss, label, shape, dname, device, providers, modes, timing, tags, copy_gbps)
            _speedups(rows)
            for r in rows:
                log(_row_line(r))
            if out_csv:
                append_rows(out_csv, rows)
            all_rows.extend(rows)
    finally:
        if forced:
            os.environ["FASTONESTEP_IMPL"] = forced
    if out_csv:
        log(f"  appended {len(all_rows)} rows to {out_csv}")
    return all_rows


def case_order(losses, size_list, dtype_names) -> list:
    """(loss, (label, shape), dtype name) in run order: dtype, then size, then loss. A run cut short by its
    budget then still has every loss at the first dtype, at the realistic and the large size alike."""
    return [(loss, size, dname) for dname in dtype_names for size in size_list for loss in losses]


def _case_row(loss, label, shape, dname, tags, status, note) -> dict:
    """The one row of a case that was not measured (an error, or no time left)."""
    row = dict.fromkeys(COLUMNS)
    row.update(loss=loss, provider="all", mode="all", size=label, shape="x".join(map(str, shape)), dtype=dname,
               status=status, note=note, **tags)
    return row


def _measure_case(loss, label, shape, dname, device, providers, modes, timing, tags, copy_gbps) -> list:
    try:
        return _run_case(loss, label, shape, DTYPES[dname], device, providers,
                         [m for m in modes if m in BYTES_MOVED[loss]], timing, tags, copy_gbps)
    except Exception as e:  # noqa: BLE001 - e.g. out of memory: record it, go on with the next case
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return [_case_row(loss, label, shape, dname, tags, "error", _one_line(f"{type(e).__name__}: {e}"))]


def _run_case(loss, label, shape, dtype, device, providers, modes, timing, tags, copy_gbps) -> list:
    spec = SPECS[loss]
    tensors = _make_tensors(loss, shape, dtype, device)
    main_shape = tuple(tensors[spec.args[0]].shape)
    base = dict.fromkeys(COLUMNS)
    base.update(loss=loss, size=label, shape="x".join(map(str, main_shape)), dtype=DTYPE_NAMES[dtype], **tags)
    try:
        reference = run_once(loss, make_call(loss, "eager"), tensors)
    except Exception:  # noqa: BLE001 - eager's own rows will say why; nothing to compare against
        reference = None
    rows = []
    for provider in providers:
        note = ""
        try:
            reason = availability(provider, device)
            if reason:
                raise ProviderUnavailable(reason)
            call = make_call(loss, provider)
            result = probe(loss, provider, call, tensors, device)
        except Exception as e:  # noqa: BLE001 - unavailable providers are recorded, not fatal
            status = "skipped" if provider in ("triton", "ext") else "error"
            reason = str(e) if isinstance(e, ProviderUnavailable) else _one_line(f"{type(e).__name__}: {e}")
            rows.append({**base, "provider": provider, "mode": "all", "status": status, "note": reason})
            continue
        status = "ok"
        if provider != "eager" and reference is not None:
            diff = compare(result, reference, dtype)
            if diff and spec.rng:
                note = "noise differs from eager's (this implementation draws its own for the seed)"
            elif diff:
                status, note = "mismatch", diff
        if provider == "triton" and os.environ.get("TRITON_INTERPRET") == "1":
            note = "; ".join(filter(None, [note, "Triton interpreter (TRITON_INTERPRET=1)"]))
        grad_out = torch.ones_like(result[0]) if spec.grads else None
        # torch.compile: the backward mode is timed with retain_graph=True, which AOTAutograd refuses when it
        # donated the forward's buffers to the backward; that mode gets its own compile without donation, run
        # last so forward/full keep the default compile.
        order = sorted(modes, key=lambda m: provider == "compile" and m == "backward")
        mode_rows = {}
        for mode in order:
            row = {**base, "provider": provider, "mode": mode, "status": status, "note": note}
            fn = None
            own_compile = provider == "compile" and mode == "backward"
            try:
                with _no_donated_buffers() if own_compile else contextlib.nullcontext():
                    mode_call = make_call(loss, provider) if own_compile else call
                    fn = mode_fn(loss, mode_call, tensors, mode, grad_out)
                    fn()  # warm (and, for compile, compile) outside the timed region
                    _sync(device)
                    med, p20, p80 = time_fn(fn, device, timing)
                    peak = peak_memory_mb(fn, device)
            except Exception as e:  # noqa: BLE001 - one failing mode does not stop the others
                row.update(status="error", note=_one_line(f"{type(e).__name__}: {e}"))
                mode_rows[mode] = row
                continue
            finally:
                del fn
                if own_compile:
                    torch._dynamo.reset()
            if own_compile:
                row["note"] = "; ".join(filter(None, [note, "compiled without donated buffers (retain_graph)"]))
            nbytes = bytes_moved(loss, mode, tensors, result[0])
            gbps = nbytes / (med * 1e6)
            row.update(median_ms=med, p20_ms=p20, p80_ms=p80, peak_mem_mb=peak, bytes=nbytes, gbps=gbps,
                       pct_copy_bw=100.0 * gbps / copy_gbps)
            mode_rows[mode] = row
        rows.extend(mode_rows[m] for m in modes)
        del call, result
        if provider == "compile":
            torch._dynamo.reset()
    del tensors, reference
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


# ---------------------------------------------------------------------------------------------- reporting
def _num(value):
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def latest_rows(csv_path):
    """Rows of the latest commit and device in the CSV: GPU rows if there are any, else CPU rows. Within that
    selection the last row of each (loss, provider, mode, size, dtype) wins. Returns (rows, meta)."""
    rows = read_rows(csv_path)
    gpu = [r for r in rows if r.get("device_type") == "cuda" or r.get("is_claim") == "true"]
    pool = gpu or rows
    if not pool:
        return [], {}
    last = pool[-1]
    chosen = {}
    for r in pool:
        if r.get("commit") == last.get("commit") and r.get("device") == last.get("device"):
            chosen[(r["loss"], r["provider"], r["mode"], r["size"], r["dtype"])] = r
    meta = {k: last.get(k, "") for k in ("device", "device_type", "torch", "triton", "commit", "date", "is_claim")}
    meta["is_claim"] = last.get("is_claim") == "true"
    meta["on_gpu"] = bool(gpu)
    return list(chosen.values()), meta


def _headline_mode(loss: str) -> str:
    return "full" if "full" in BYTES_MOVED.get(loss, {}) else "forward"


def _cases(rows):
    """(loss, size, dtype) in run order with {provider: row} at the headline mode (full; add_noise: forward)."""
    cases = {}
    for r in rows:
        if r["loss"] == "copy" or r["mode"] != _headline_mode(r["loss"]):
            continue
        cases.setdefault((r["loss"], r["size"], r["dtype"]), {})[r["provider"]] = r
    return cases


def markdown_table(csv_path) -> str:
    """A README-ready summary of the latest commit/device: full-mode medians per provider, speedups of the
    fused providers over eager and torch.compile, peak memory and % of copy bandwidth."""
    rows, meta = latest_rows(csv_path)
    if not rows:
        return f"(no benchmark rows in {csv_path})"
    copy = [r for r in rows if r["loss"] == "copy"]
    copy_note = f" Copy bandwidth measured in the same run: {float(copy[-1]['gbps']):.3g} GB/s." if copy else ""
    lines = []
    if not meta["is_claim"]:
        lines.append("**GPU rows marked is_claim=false (TRITON_INTERPRET=1 was set): not a performance claim.**\n"
                     if meta["on_gpu"] else
                     "**CPU run, not a performance claim**: a smoke run of the harness on tiny sizes.\n")
    lines.append(f"Device: {meta['device']}; torch {meta['torch']}; triton {meta['triton']}; commit {meta['commit']}; "
                 f"{meta['date']}. Mode: forward + backward (`add_noise*`: forward only). Median ms; speedup = "
                 f"baseline median / fused median; peak memory in MB above the inputs.{copy_note}\n")
    lines.append("| loss | size | dtype | eager ms | compile ms | triton ms | ext ms | triton vs eager | "
                 "triton vs compile | ext vs eager | ext vs compile | peak MB eager / compile / triton / ext | "
                 "% copy BW triton / ext |")
    lines.append("|" + "---|" * 13)
    flagged = False

    def ms(r):
        nonlocal flagged
        v = _num(r.get("median_ms")) if r else None
        if v is None:
            return "-"
        if r.get("status") == "mismatch":
            flagged = True
            return f"{v:.4g} (!)"
        return f"{v:.4g}"

    def ratio(r, key):
        v = _num(r.get(key)) if r else None
        return "-" if v is None else f"{v:.2f}x"

    def field(r, key, spec):
        v = _num(r.get(key)) if r else None
        return "-" if v is None else format(v, spec)

    for (loss, size, dtype), by in _cases(rows).items():
        e, c, t, x = (by.get(p) for p in PROVIDERS)
        mem = " / ".join(field(r, "peak_mem_mb", ".1f") for r in (e, c, t, x))
        bw = " / ".join(field(r, "pct_copy_bw", ".0f") for r in (t, x))
        lines.append(f"| {loss} | {size} | {dtype} | {ms(e)} | {ms(c)} | {ms(t)} | {ms(x)} | "
                     f"{ratio(t, 'speedup_vs_eager')} | {ratio(t, 'speedup_vs_compile')} | "
                     f"{ratio(x, 'speedup_vs_eager')} | {ratio(x, 'speedup_vs_compile')} | {mem} | {bw} |")
    if flagged:
        lines.append("\n(!) values differ from the eager reference beyond tolerance (see the CSV's note column).")
    return "\n".join(lines) + "\n"


def plot(csv_path, png_path) -> str:
    """Grouped bars of the median time (p20-p80 whiskers) per loss and provider, one panel per size and
    dtype, at the headline mode, for the latest commit's GPU rows (else CPU rows, titled as no claim)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, meta = latest_rows(csv_path)
    cases = _cases(rows)
    panels = []
    for loss, size, dtype in cases:
        if (size, dtype) not in panels:
            panels.append((size, dtype))
    ncols = min(2, max(1, len(panels)))
    nrows = max(1, math.ceil(len(panels) / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(7.5 * ncols, 4.2 * nrows), squeeze=False)
    colors = {"eager": "#7f7f7f", "compile": "#1f77b4", "triton": "#d62728", "ext": "#2ca02c"}
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    for ax, (size, dtype) in zip(axes.flat, panels):
        losses = [l for l in LOSSES if (l, size, dtype) in cases]
        provs = [p for p in PROVIDERS if any(p in cases[(l, size, dtype)] for l in losses)]
        width = 0.8 / max(1, len(provs))
        for j, p in enumerate(provs):
            xs, hs, lo, hi = [], [], [], []
            for i, l in enumerate(losses):
                r = cases[(l, size, dtype)].get(p)
                med = _num(r.get("median_ms")) if r else None
                if med is None:
                    continue
                p20, p80 = _num(r.get("p20_ms")) or med, _num(r.get("p80_ms")) or med
                xs.append(i - 0.4 + width * (j + 0.5))
                hs.append(med)
                lo.append(max(0.0, med - p20))
                hi.append(max(0.0, p80 - med))
            if xs:
                ax.bar(xs, hs, width, yerr=[lo, hi], capsize=2, label=p, color=colors.get(p))
        ax.set_xticks(range(len(losses)))
        ax.set_xticklabels([l + (" (fwd)" if _headline_mode(l) == "forward" else "") for l in losses],
                           rotation=25, ha="right", fontsize=8)
        ax.set_yscale("log")
        ax.set_ylabel("median ms (log)")
        ax.set_title(f"{size} {dtype}", fontsize=10)
        ax.legend(fontsize=8)
    if not panels:
        axes.flat[0].text(0.5, 0.5, "no benchmark rows", ha="center", va="center")
    claim = ("GPU measurement" if meta.get("is_claim") else
             "GPU, not a performance claim" if meta.get("on_gpu") else "CPU, not a performance claim")
    fig.suptitle(f"fused losses, forward + backward ({claim})\n{meta.get('device', '')}\ntorch "
                 f"{meta.get('torch', '')} | triton {meta.get('triton', '')} | commit {meta.get('commit', '')} | "
                 f"{meta.get('date', '')}", fontsize=9)
    fig.tight_layout()
    Path(png_path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path, dpi=120)
    plt.close(fig)
    return str(png_path)


# ------------------------------------------------------------------------------------------------------ CLI
def _csv_list(text):
    return [v.strip() for v in text.split(",") if v.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fastonestep bench kernels",
        description="Times the fused losses (eager / torch.compile / triton / ext; forward, backward, full), "
                    "appends CSV rows, optionally plots. Only GPU rows are performance claims.")
    p.add_argument("--quick", action="store_true",
                   help="fewer sizes and shorter timing (GPU: B32 and the large size; CPU: one tiny size)")
    p.add_argument("--losses", type=_csv_list, help=f"comma list (default all): {','.join(LOSSES)}")
    p.add_argument("--providers", type=_csv_list, help=f"comma list (default all): {','.join(PROVIDERS)}")
    p.add_argument("--sizes", type=_csv_list,
                   help=f"comma list of labels ({','.join(list(GPU_SIZES) + list(CPU_SIZES))}) "
                        "or shapes like 8x4x32x32")
    p.add_argument("--dtypes", type=_csv_list, help="comma list of fp32,bf16,fp16 (default GPU fp32,bf16; CPU fp32)")
    p.add_argument("--modes", type=_csv_list, help=f"comma list (default all): {','.join(MODES)}")
    p.add_argument("--out", default="bench/results/kernels.csv", help="CSV to append to (default %(default)s)")
    p.add_argument("--plot", metavar="PNG", help="also draw the latest commit's rows to this PNG")
    p.add_argument("--max-seconds", type=float, default=0.0,
                   help="cases not started within this many seconds of the process's start get a skipped row "
                        "(default 0: no limit)")
    p.add_argument("--no-run", action="store_true", help="only report (table / plot) from the existing CSV")
    return p


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "kernels":  # accept `... bench kernels ...` with or without the subcommand name
        argv = argv[1:]
    args = build_parser().parse_args(argv)
    if not torch.cuda.is_available():
        # Lets the triton provider run (interpreted, slowly) on CPU; must be set before any @triton.jit runs.
        os.environ.setdefault("TRITON_INTERPRET", "1")
    if not args.no_run:
        run(quick=args.quick, losses=args.losses, out_csv=args.out, providers=args.providers, sizes=args.sizes,
            dtypes=args.dtypes, modes=args.modes, max_seconds=args.max_seconds)
    if not os.path.exists(args.out):
        raise FileNotFoundError(f"no benchmark CSV at '{args.out}'")
    print()
    print(markdown_table(args.out))
    if args.plot:
        print(f"wrote {plot(args.out, args.plot)}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (ValueError, FileNotFoundError) as err:
        print(f"fastonestep bench kernels: error: {err}", file=sys.stderr)
        sys.exit(2)
