"""The csrc fused losses (`impl="ext"`): C++ kernels on CPU, CUDA kernels on GPU (design.md section 5).

The ops live in csrc/ as the torch.library namespace `fastonestep`:

    denoising_loss_fwd(Tensor F, Tensor x_t, Tensor x0, Tensor sigma, float sigma_data) -> (Tensor, Tensor)
    dmd_loss_fwd(Tensor x, Tensor x_real_hat, Tensor x_fake_hat) -> (Tensor, Tensor)
    ratio_generator_loss_fwd(Tensor x, Tensor logit_grad, Tensor logits, Tensor? weight, int divergence,
                             bool normalize, float clamp) -> (Tensor, Tensor)
    ratio_classifier_loss_fwd(Tensor logits_gen, Tensor logits_real, Tensor? weight) -> (Tensor, Tensor, Tensor)

Each returns the loss and, written in the same pass, the gradient its backward needs (in the input dtype, fp32 for
fp16 inputs: kernels/fused_backward.py, saved_grad_dtype); the autograd formula registered here only multiplies
that gradient by grad_output, in fp32, and casts it once to the input dtype. The gradient is computed even when
no grad is required (that is the contract: one pass, no second kernel for the backward). The multiply is skipped
when grad_output is exactly 1 and the check is free (a plain CPU tensor, not under torch.compile); on CUDA it
always runs, because testing the value would cost a host synchronisation. No double backward: with
create_graph=True the gradients carry a node that raises when differentiated (fused_backward.first_order_only).
Under torch.func.grad / vjp the op is called through an autograd.Function with the same formula (_call), because
torch.library's registered formula does not support the transforms; vmap raises. A scalar loss over no elements is
0 (reference.mean_or_zero).

Loading: `load()` builds the library just in time with torch.utils.cpp_extension.load from csrc/ (next to this
package's source folder; the CUDA file only when a GPU, torch CUDA and nvcc are all present), cached under
$FASTONESTEP_CACHE (default ~/.cache/fastonestep) in ext-<torch version>-<hash of sources, flags, Python>, so a
second process reuses the build. Without csrc/ (a non-editable install) it imports `fastonestep._C`, the same
library built by setup.py (FASTONESTEP_EXT_PREBUILT=1 prefers it even when csrc/ is there). Building needs a C++
compiler and ninja; `available()` says why the ops are missing instead of raising.

The Python functions at the bottom have exactly the signatures of kernels/reference.py. Mixed input dtypes are
promoted first (as the reference's fp32 arithmetic would treat them). Constants, as in the reference's
`.detach()`: sigma and sigma_data; x_real_hat, x_fake_hat; logit_grad, logits and weight; the classifier weight.
They are detached before the op, so a loss whose only inputs that require grad are constants does not require grad.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import re
import shutil
import sys
import threading
from pathlib import Path

import torch

from fastonestep.kernels import reference as _ref
from fastonestep.kernels.fused_backward import (first_order_only, prepare_context, refuse_vmap, saved_grad_dtype,
                                                scale_in_fp32)
from fastonestep.kernels.reference import DIVERGENCES
from fastonestep.tensors import device_tensor

CSRC = Path(__file__).resolve().parent.parent / "csrc"
CPP_SOURCE = "fused_losses.cpp"
CUDA_SOURCE = "fused_losses_cuda.cu"
HEADERS = ("op_checks.h",)  # hashed with the sources: a header change must rebuild
PREBUILT = "fastonestep._C"
OPS = ("denoising_loss_fwd", "dmd_loss_fwd", "ratio_generator_loss_fwd", "ratio_classifier_loss_fwd")
CFLAGS = ["-O3"]
CUDA_CFLAGS = ["-O3", "-lineinfo"]

_lock = threading.Lock()
_status: tuple[bool, str] | None = None  # (ok, reason) of the one load attempt
_error: Exception | None = None
_loaded = False  # read by the wrappers (a plain global: torch.compile guards on it)
_cuda_kernels = False


def cache_root() -> Path:
    return Path(os.environ.get("FASTONESTEP_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "fastonestep"))


def nvcc_release(nvcc: str) -> str | None:
    """The CUDA release of an nvcc ("13.0"), read from `nvcc --version`; None when it cannot be run or read."""
    import subprocess

    try:
        text = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    found = re.search(r"release (\d+)\.(\d+)", text)
    return f"{found[1]}.{found[2]}" if found else None


def same_cuda_major(nvcc: str | None, torch_cuda: str | None) -> bool:
    """An op built by nvcc of one CUDA major version links that version's runtime, which a torch built for another
    does not load alongside its own (torch's setup.py builder checks this; its just-in-time builder does not)."""
    return bool(nvcc and torch_cuda) and nvcc.split(".")[0] == torch_cuda.split(".")[0]


def cuda_build_possible() -> tuple[bool, str]:
    """Whether the CUDA kernels can be built here: a GPU, a CUDA torch and nvcc of the same CUDA major version
    under CUDA_HOME."""
    if not torch.cuda.is_available() or torch.version.cuda is None:
        return False, "no CUDA device (or a CPU build of torch)"
    from torch.utils.cpp_extension import CUDA_HOME

    nvcc = os.path.join(CUDA_HOME, "bin", "nvcc") if CUDA_HOME else None
    if nvcc is None or not os.path.exists(nvcc):
        return False, "nvcc not found (set CUDA_HOME)"
    release = nvcc_release(nvcc)
    if not same_cuda_major(release, torch.version.cuda):
        return False, (f"{nvcc} is CUDA {release or '(version unreadable)'} but torch was built for CUDA "
                       f"{torch.version.cuda}; set CUDA_HOME to a toolkit of the same major version")
    return True, f"nvcc {release} in {CUDA_HOME}"


def compiler() -> str | None:
    """The C++ compiler torch's builder will call (CXX, default c++), or None when it is missing."""
    return shutil.which(os.environ.get("CXX", "c++"))


def ninja() -> str | None:
    """The ninja torch's builder needs: on PATH, or next to this Python (a pip-installed ninja in an
    unactivated virtual environment; load() then puts that folder on PATH)."""
    found = shutil.which("ninja")
    if found:
        return found
    beside = Path(sys.executable).parent / "ninja"
    return str(beside) if beside.exists() else None


def _ops_registered() -> bool:
    try:
        torch.ops.fastonestep.denoising_loss_fwd.default
        return True
    except (AttributeError, RuntimeError):
        return False


def _first_errors(message: str, limit: int = 12) -> str:
    """The compiler's and linker's error lines of a failed build (all lines when none look like errors), with
    a hint for the one failure that is about the machine rather than the sources: a CUDA runtime not found."""
    lines = [ln.rstrip() for ln in message.splitlines() if ln.strip()]
    errors = [ln for ln in lines if re.search(r"\berror\b|fatal|undefined|cannot find|no such file", ln,
                                              re.IGNORECASE)]
    picked = (errors or lines)[:limit]
    if re.search(r"cannot find -lcudart", message):
        picked.append("hint: the linker looked for libcudart under CUDA_HOME; set CUDA_HOME to the CUDA toolkit's "
                      "root (the folder whose lib64/ or lib/ holds libcudart.so)")
    return "\n  ".join(picked) if picked else message


def build_directory(sources: list[Path], with_cuda: bool) -> Path:
    digest = hashlib.sha256()
    for src in [*sources, *(CSRC / h for h in HEADERS)]:
        digest.update(src.name.encode())
        digest.update(src.read_bytes())
    # the GPUs' compute capabilities: without TORCH_CUDA_ARCH_LIST the build targets the GPUs it sees, and a cache
    # shared by machines with other GPUs must not hand one a library without kernels for its GPU
    gpus = [torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())] if with_cuda else []
    digest.update(repr((torch.__version__, torch.version.cuda, sys.version, with_cuda, CFLAGS, CUDA_CFLAGS,
                        os.environ.get("TORCH_CUDA_ARCH_LIST"), gpus)).encode())
    return cache_root() / f"ext-{torch.__version__}-{digest.hexdigest()[:16]}"


def _build_jit() -> str:
    from torch.utils import cpp_extension

    found = ninja()
    if found is None:
        raise RuntimeError("ninja is required to build the fastonestep extension (pip install ninja)")
    if shutil.which("ninja") is None:
        os.environ["PATH"] = os.path.dirname(found) + os.pathsep + os.environ.get("PATH", "")
    with_cuda, _ = cuda_build_possible()
    sources = [CSRC / CPP_SOURCE] + ([CSRC / CUDA_SOURCE] if with_cuda else [])
    build_dir = build_directory(sources, with_cuda)
    build_dir.mkdir(parents=True, exist_ok=True)
    name = "fastonestep_ext_cuda" if with_cuda else "fastonestep_ext"
    try:
        cpp_extension.load(name=name, sources=[str(s) for s in sources], extra_cflags=CFLAGS,
                           extra_cuda_cflags=CUDA_CFLAGS, build_directory=str(build_dir), verbose=False,
                           with_cuda=with_cuda, is_python_module=False)
    except Exception as exc:  # noqa: BLE001  (compiler, linker or ninja failures all surface here)
        raise RuntimeError(f"building the fastonestep C++{'/CUDA' if with_cuda else ''} extension in {build_dir} "
                           f"failed:\n  {_first_errors(str(exc))}") from exc
    return f"built from {CSRC} in {build_dir}" + (" with CUDA kernels" if with_cuda else " (CPU kernels only)")


@torch.compiler.disable
def load() -> str:
    """Builds (or reuses) and loads the extension once per process, registers the Python-side fake and
    autograd formulas, and returns where it came from. Raises RuntimeError (the same one on every later
    call) when it cannot be built or found."""
    global _status, _error, _loaded, _cuda_kernels
    with _lock:
        if _loaded:
            return _status[1]
        if _error is not None:
            raise _error
        try:
            prebuilt = importlib.util.find_spec(PREBUILT) is not None
            if _ops_registered():
                origin = "already registered in this process"
            elif prebuilt and os.environ.get("FASTONESTEP_EXT_PREBUILT") == "1":
                importlib.import_module(PREBUILT)
                origin = f"prebuilt {PREBUILT} (FASTONESTEP_EXT_PREBUILT=1)"
            elif (CSRC / CPP_SOURCE).exists():
                if compiler() is None:
                    raise RuntimeError(f"no C++ compiler ({os.environ.get('CXX', 'c++')}) to build the fastonestep "
                                       "extension")
                origin = _build_jit()
            elif prebuilt:
                importlib.import_module(PREBUILT)
                origin = f"prebuilt {PREBUILT}"
            else:
                raise RuntimeError(f"neither the sources {CSRC / CPP_SOURCE} nor a prebuilt {PREBUILT} are present")
            _register_python_side()
        except RuntimeError as exc:
            _error, _status = exc, (False, str(exc))
            raise
        except Exception as exc:  # noqa: BLE001
            _error = RuntimeError(f"fastonestep extension: {type(exc).__name__}: {exc}")
            _status = (False, str(_error))
            raise _error from exc
        _cuda_kernels = torch._C._dispatch_has_kernel_for_dispatch_key("fastonestep::denoising_loss_fwd", "CUDA")
        _status = (True, origin)
        _loaded = True
        return origin


def available() -> tuple[bool, str]:
    """(True, where it came from) once the extension is loaded, else (False, why); tries to load once."""
    if _status is None:
        try:
            load()
        except RuntimeError:
            pass
    return _status


def has_cuda_kernels() -> bool:
    return available()[0] and _cuda_kernels


# ----------------------------------------------------------------------------------------------------------
# Fake (meta) implementations and autograd formulas.

def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _is_one(t: torch.Tensor) -> bool:
    """grad_output == 1 everywhere, answered only when that is free: a plain CPU tensor in eager mode."""
    if torch.compiler.is_compiling() or type(t) is not torch.Tensor or t.device.type != "cpu" or t.requires_grad:
        return False
    wrapped = getattr(torch._C._functorch, "is_functorch_wrapped_tensor", None)
    if wrapped is not None and wrapped(t):  # vmap / grad transforms: no data-dependent branch
        return False
    return bool((t == 1).all())


def _scale(grad: torch.Tensor, grad_output: torch.Tensor, per_row: bool = False,
           dtype: torch.dtype | None = None) -> torch.Tensor:
    """The backward of every op: the forward's gradient times grad_output (scalar, or (B,) when per_row), in fp32,
    cast once to `dtype` (the input's; default the gradient's). grad_output rounded to fp16 first would turn a
    loss scale of 65536 into inf. (A loss that got no gradient, grad_output None, never gets here: its backward
    returns None for every input.)"""
    dtype = grad.dtype if dtype is None else dtype
    if _is_one(grad_output):
        return grad.to(dtype)  # the saved gradient itself when the dtypes agree
    return scale_in_fp32(grad, grad_output, dtype, per_row)


def _denoising_setup(ctx, inputs, output):
    prepare_context(ctx, inputs)
    F, _, _, sigma, sigma_data = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(output[1], sigma)
    ctx.sigma_data = sigma_data
    ctx.dtype = F.dtype  # F, x_t and x0 share it (promoted before the op)


def _denoising_backward(ctx, grad_loss, _grad_grad):
    grad_F, sigma = ctx.saved_tensors
    if grad_loss is None or not any(ctx.needs_input_grad[:3]):
        return None, None, None, None, None
    # gradients w.r.t. x_t and x0 follow from the fp32 one w.r.t. F, each rounded once to the input dtype
    gF = _scale(grad_F, grad_loss, per_row=True, dtype=_acc(grad_F.dtype))
    g_xt = g_x0 = None
    if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
        # dL/dx_t = grad_F c_skip / c_out and dL/dx0 = -grad_F / c_out: no second pass over the data in the forward.
        s = sigma.to(gF.dtype)
        sd = ctx.sigma_data
        c_out = s * sd / (s * s + sd * sd).sqrt()
        c_skip = sd * sd / (s * s + sd * sd)
        shape = (-1,) + (1,) * (gF.ndim - 1)
        if ctx.needs_input_grad[1]:
            g_xt = (gF * (c_skip / c_out).reshape(shape)).to(ctx.dtype)
        if ctx.needs_input_grad[2]:
            g_x0 = (gF * (-1.0 / c_out).reshape(shape)).to(ctx.dtype)
    g_F = gF.to(ctx.dtype) if ctx.needs_input_grad[0] else None
    return first_order_only((g_F, g_xt, g_x0, None, None), "denoising_loss (impl='ext')", ctx)


def _surrogate_setup(ctx, inputs, output):
    prepare_context(ctx, inputs)
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(output[1])
    ctx.x_dtype = inputs[0].dtype


def _surrogate_backward(ctx, grad_loss, n_inputs: int, what: str):
    """x's gradient (argument 0) and None for the n_inputs - 1 constants; all None when the loss got no gradient."""
    if grad_loss is None:
        return (None,) * n_inputs
    (grad,) = ctx.saved_tensors
    return first_order_only((_scale(grad, grad_loss, dtype=ctx.x_dtype),) + (None,) * (n_inputs - 1), what, ctx)


def _dmd_backward(ctx, grad_loss, _grad_grad):
    return _surrogate_backward(ctx, grad_loss, 3, "dmd_loss (impl='ext')")


def _ratio_generator_backward(ctx, grad_loss, _grad_grad):
    return _surrogate_backward(ctx, grad_loss, 7, "ratio_generator_loss (impl='ext')")


def _classifier_setup(ctx, inputs, output):
    prepare_context(ctx, inputs)
    ctx.mark_non_differentiable(output[1], output[2])
    ctx.save_for_backward(output[1], output[2])
    ctx.dtypes = (inputs[0].dtype, inputs[1].dtype)


def _classifier_backward(ctx, grad_loss, _g1, _g2):
    if grad_loss is None:
        return None, None, None
    grad_gen, grad_real = ctx.saved_tensors
    g_gen = _scale(grad_gen, grad_loss, dtype=ctx.dtypes[0]) if ctx.needs_input_grad[0] else None
    g_real = _scale(grad_real, grad_loss, dtype=ctx.dtypes[1]) if ctx.needs_input_grad[1] else None
    # the weight is a constant (no gradient)
    return first_order_only((g_gen, g_real, None), "ratio_classifier_loss (impl='ext')", ctx)


def _denoising_fake(F, x_t, x0, sigma, sigma_data):
    return (F.new_empty((F.shape[0],), dtype=_acc(F.dtype)),
            F.new_empty(F.shape, dtype=saved_grad_dtype(F.dtype)))


def _dmd_fake(x, x_real_hat, x_fake_hat):
    return x.new_empty((), dtype=_acc(x.dtype)), x.new_empty(x.shape, dtype=saved_grad_dtype(x.dtype))


def _ratio_generator_fake(x, logit_grad, logits, weight, divergence, normalize, clamp):
    return (logit_grad.new_empty((), dtype=_acc(logit_grad.dtype)),
            logit_grad.new_empty(x.shape, dtype=saved_grad_dtype(logit_grad.dtype)))


def _classifier_fake(logits_gen, logits_real, weight):
    return (logits_gen.new_empty((), dtype=_acc(logits_gen.dtype)),
            logits_gen.new_empty(logits_gen.shape, dtype=saved_grad_dtype(logits_gen.dtype)),
            logits_real.new_empty(logits_real.shape, dtype=saved_grad_dtype(logits_real.dtype)))


_PYTHON_SIDE = {
    "denoising_loss_fwd": (_denoising_fake, _denoising_setup, _denoising_backward),
    "dmd_loss_fwd": (_dmd_fake, _surrogate_setup, _dmd_backward),
    "ratio_generator_loss_fwd": (_ratio_generator_fake, _surrogate_setup, _ratio_generator_backward),
    "ratio_classifier_loss_fwd": (_classifier_fake, _classifier_setup, _classifier_backward),
}


def _register_python_side():
    for name, (fake, setup, backward) in _PYTHON_SIDE.items():
        qualname = f"fastonestep::{name}"
        try:
            torch.library.register_fake(qualname, fake)
            torch.library.register_autograd(qualname, backward, setup_context=setup)
        except RuntimeError as exc:  # registered already, e.g. by a second copy of this module
            if "already" not in str(exc):
                raise


# torch.func transforms (grad, vjp) refuse the autograd formula registered with torch.library: torch wraps it
# in an autograd.Function without setup_context. Under a transform the op is called through this Function
# instead, with the same setup and backward; everywhere else (eager autograd, torch.compile) the op is called
# directly, so compiled graphs keep the registered formula.
_FUNCTORCH_FUNCTIONS: dict = {}


def _functorch_function(name: str):
    if name not in _FUNCTORCH_FUNCTIONS:
        _, setup, backward = _PYTHON_SIDE[name]
        what = f"{name.removesuffix('_fwd')} (impl='ext')"
        _FUNCTORCH_FUNCTIONS[name] = type(f"{name}_function", (torch.autograd.Function,), {
            # through _call again: a nested transform (grad of grad) goes through this Function once per level
            "forward": staticmethod(lambda *args: _call(name, *args)),
            "setup_context": staticmethod(setup),
            "backward": staticmethod(backward),
            "vmap": refuse_vmap(what),
        })
    return _FUNCTORCH_FUNCTIONS[name]


def _functorch_active() -> bool:
    return not torch.compiler.is_compiling() and torch._C._are_functorch_transforms_active()


def _call(name: str, *args):
    """torch.ops.fastonestep.<name>(*args), through an autograd.Function while a torch.func transform runs."""
    if _functorch_active():
        return _functorch_function(name).apply(*args)
    return getattr(torch.ops.fastonestep, name)(*args)


# ----------------------------------------------------------------------------------------------------------
# Python API: exactly the signatures of kernels/reference.py.

def _ensure(*tensors):
    if not _loaded:
        load()
    if not _cuda_kernels:
        for t in tensors:
            if t.is_cuda:
                raise RuntimeError("the fastonestep extension was built without its CUDA kernels (no nvcc at build "
                                   "time?); use impl='triton' or 'torch' for CUDA tensors")


def _promote(*tensors):
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype, [t.to(dtype) for t in tensors]


def _per_sample(v, n: int, like: torch.Tensor) -> torch.Tensor:
    v = device_tensor(v, _acc(like.dtype), like.device).detach().reshape(-1)  # a constant
    return v.expand(n) if v.numel() == 1 else v


def _divergence_index(divergence) -> int:
    if isinstance(divergence, int):
        return divergence
    if divergence not in DIVERGENCES:
        raise ValueError(f"unknown divergence {divergence!r}; expected one of {DIVERGENCES}")
    return DIVERGENCES.index(divergence)


def add_noise(x0, alpha, sigma, noise=None, seed=None):
    """Delegates to the eager reference: noising is elementwise and differentiable as it is, so it needs no
    custom VJP in csrc/ (the fused, counter-RNG version is the Triton path's)."""
    return _ref.add_noise(x0, alpha, sigma, noise, seed)


def denoising_loss(F, x_t, x0, sigma, sigma_data):
    """Per-sample lambda(sigma_i) * mean (c_skip x_t + c_out F - x0)^2, (B,) fp32; gradients w.r.t. F, x_t, x0."""
    _ensure(F, x_t, x0)
    _, (F, x_t, x0) = _promote(F, x_t, x0)
    loss, _ = _call("denoising_loss_fwd", F, x_t, x0, _per_sample(sigma, F.shape[0], F), float(sigma_data))
    return loss


def dmd_loss(x, x_real_hat, x_fake_hat):
    """Scalar 0.5*mean(g^2) whose gradient w.r.t. x is g / numel(x) (x_real_hat, x_fake_hat are constants)."""
    _ensure(x, x_real_hat, x_fake_hat)
    _, (x, x_real_hat, x_fake_hat) = _promote(x, x_real_hat.detach(), x_fake_hat.detach())
    loss, _ = _call("dmd_loss_fwd", x, x_real_hat, x_fake_hat)
    return loss


def ratio_generator_loss(x, logit_grad, logits, weight=None, divergence="rkl", normalize=True, clamp=10.0):
    """Scalar 0.5*mean(g^2) whose gradient w.r.t. x is g / numel(x); logit_grad, logits and weight are constants."""
    _ensure(x, logit_grad)
    dtype = torch.promote_types(x.dtype, logit_grad.dtype)
    logit_grad = logit_grad.detach().to(dtype)
    n = logit_grad.shape[0]
    w = None if weight is None else _per_sample(weight, n, logit_grad)
    loss, _ = _call("ratio_generator_loss_fwd", x, logit_grad, _per_sample(logits, n, logit_grad), w,
                    _divergence_index(divergence), bool(normalize), float(clamp))
    return loss


def ratio_classifier_loss(logits_gen, logits_real, weight=None):
    """mean_i w_i (softplus(-l_gen_i) + softplus(l_real_i)); gradients w.r.t. both logits, the weight is a constant."""
    _ensure(logits_gen, logits_real)
    _, (logits_gen, logits_real) = _promote(logits_gen, logits_real)
    w = None if weight is None else _per_sample(weight, logits_gen.numel(), logits_gen)
    loss, _, _ = _call("ratio_classifier_loss_fwd", logits_gen, logits_real, w)
    return loss
