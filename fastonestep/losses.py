"""Public functional API of the fused losses (design.md section 5).

Each function takes `impl="auto" | "triton" | "ext" | "torch"`; FASTONESTEP_IMPL in the environment forces
one (it overrides the argument).

- "torch": the eager references in fastonestep.kernels.reference (the ground truth).
- "triton": the fused Triton kernels (fastonestep.kernels.triton_losses / triton_noise). Available when Triton
  imports and the tensors are on CUDA, or when TRITON_INTERPRET=1 was set before the kernels were imported
  (the interpreter runs them on any device; it exists for tests, it is slow).
- "ext": the csrc custom op (C++ on CPU, CUDA on GPU) from fastonestep.kernels.ext, available when it imports
  and its `available()` says so.
- "auto": on CUDA tensors the compiled Triton kernels, else ext, else torch. On CPU tensors always torch: the
  Triton interpreter is a test tool, not a fast path, and the C++ op is opt-in (impl="ext") because its first
  use compiles it (tens of seconds).

An implementation asked for explicitly (argument or FASTONESTEP_IMPL) that is not available falls back to
"torch" with a warning naming it and the reason, once per implementation and process. Unknown names raise
ValueError.

On CUDA, a fused implementation is checked once per process against the eager reference before its first use
(fastonestep.kernels.self_check: every function on small inputs, values and gradients, fp32 and bf16); if it
fails it counts as unavailable, with a warning saying what differed. A check that faulted the device (which
leaves CUDA unusable for the rest of the process, eager path included) raises instead, saying how to restart.
FASTONESTEP_SELF_CHECK=0 skips the check; code traced by torch.compile skips it too unless an eager call ran it first.

All functions accumulate in fp32 whatever the input dtype. Fused implementations return the same values up to
fp32 rounding, with one documented exception: the noise add_noise draws for a given `seed` depends on the
implementation (torch.Generator for torch/ext, in-kernel Philox for triton); a seed reproduces noise within
one implementation. Trainers call these; they never reimplement them.

Inputs, checked here the same way for every implementation: tensors of data are floating point (TypeError
otherwise) with a batch dimension 0 (a 1-D tensor is B samples of one element; 0-d is a ValueError). Per-sample
values (alpha, sigma, logits, weight, the classifier's logits) are a number or B values in any shape, (B,) or
(B, 1) alike (ValueError naming the argument otherwise). Constants get no gradient in any implementation:
denoising_loss's sigma and sigma_data, x_real_hat, x_fake_hat, logit_grad, logits and the weights; a loss whose
only inputs that require grad are constants does not require grad. add_noise differentiates w.r.t. x0, noise,
alpha and sigma in every implementation (d/dalpha_i = sum_j x0_ij g_ij with x0 the clean sample, the sampled one
on the latent path; d/dsigma_i = sum_j eps_ij g_ij; Triton regenerates eps and z from the seed in the backward).

An empty batch (B = 0, or samples of no elements) gives every scalar loss the value 0.0 with zero-size gradients,
in every implementation (reference.mean_or_zero says why); denoising_loss returns its (0,) per-sample losses.

The fused implementations (triton, ext) are differentiable once: with create_graph=True their gradients carry a
node that raises if differentiated again (impl="torch" for second derivatives). torch.func.grad and
torch.func.vjp work through them (a grad of a grad raises the same error); torch.func.vmap raises
NotImplementedError naming the loss. For fp16 inputs they keep the gradient written by the forward in fp32 until the
backward scales it (kernels/fused_backward.py, saved_grad_dtype: 2 more bytes per element, so that a loss
scale does not multiply fp16-rounded subnormals).
"""
from __future__ import annotations

import os
import warnings

import torch

from fastonestep.kernels import reference as _ref
from fastonestep.kernels.reference import DIVERGENCES, divergence_weight  # noqa: F401  (public helpers)

IMPLS = ("auto", "triton", "ext", "torch")

_WARNED: set = set()  # implementations whose fallback warning was already shown
_BACKENDS: dict = {}  # "triton" / "ext" -> (module or None, reason it is unavailable)
_CHECKED: dict = {}  # (impl, device type) -> "" when the first-use check passed, else what failed
SELF_CHECK_DEVICES = {"cuda"}  # where fused kernels are checked on first use (CI covers the CPU paths)


def _triton_backend():
    """(namespace with the Triton modules, "") or (None, why not). Import errors are cached."""
    if "triton" not in _BACKENDS:
        try:
            from fastonestep.kernels import triton_losses, triton_noise
        except Exception as exc:  # ImportError, or a Triton install that fails while importing
            _BACKENDS["triton"] = (None, f"the Triton kernels cannot be imported ({type(exc).__name__}: {exc})")
        else:
            _BACKENDS["triton"] = ((triton_losses, triton_noise), "")
    return _BACKENDS["triton"]


def _ext_backend():
    """(fastonestep.kernels.ext, "") or (None, why not). Imported lazily; the answer is cached per process."""
    if "ext" not in _BACKENDS:
        try:
            from fastonestep.kernels import ext
        except ImportError as exc:
            _BACKENDS["ext"] = (None, f"fastonestep.kernels.ext cannot be imported ({exc})")
        else:
            try:
                ok, reason = ext.available()
            except Exception as exc:  # a failed build reports itself here
                ok, reason = False, f"ext.available() raised {type(exc).__name__}: {exc}"
            _BACKENDS["ext"] = (ext, "") if ok else (None, f"the csrc extension is not available ({reason})")
    return _BACKENDS["ext"]


def _triton_interpreted() -> bool:
    mods, _ = _triton_backend()
    return mods is not None and mods[0].INTERPRETED


def _self_check(impl: str, device: torch.device) -> tuple[bool, str]:
    """(True, "") unless the first-use check of `impl` on this device type failed (then (False, why))."""
    if device.type not in SELF_CHECK_DEVICES or os.environ.get("FASTONESTEP_SELF_CHECK", "1") == "0":
        return True, ""
    key = (impl, device.type)
    if key not in _CHECKED and torch.compiler.is_compiling():
        return True, ""  # not traceable: the check runs at the first eager call
    if key not in _CHECKED:
        _CHECKED[key] = ""  # the check calls the implementation itself, through this dispatch
        from fastonestep.kernels import self_check

        try:
            failure = self_check.run(impl, device)
        except Exception as exc:  # a kernel that does not compile or launch fails its check
            failure = f"{type(exc).__name__}: {exc}"
        _CHECKED[key] = failure or ""
        if failure:
            _refuse_after_device_fault(impl, device, failure)
        if failure:
            warnings.warn(f"fastonestep.losses: impl={impl!r} failed its first-use check on {device.type} against "
                          f"the eager reference and will not be used: {failure}", RuntimeWarning, stacklevel=4)
    failure = _CHECKED[key]
    return (False, f"its first-use check on {device.type} failed ({failure})") if failure else (True, "")


def _device_fault(device: torch.device) -> Exception | None:
    """The error a device reports on its next synchronisation, if a kernel faulted on it (CUDA: an illegal
    address, a trap). After a fault the CUDA context refuses all further work, the eager path's too."""
    if device.type != "cuda":
        return None
    try:
        torch.cuda.synchronize(device)
    except Exception as fault:
        return fault
    return None


def _refuse_after_device_fault(impl: str, device: torch.device, failure: str) -> None:
    """A failed check normally costs a warning and the eager path; after a device fault there is no eager path
    left in this process, so say so instead of letting the next unrelated operation fail with the fault."""
    fault = _device_fault(device)
    if fault is not None:
        raise RuntimeError(
            f"fastonestep.losses: impl={impl!r} faulted on {device} during its first-use check ({failure}); the "
            f"device cannot run anything more in this process, so the eager fallback is not possible. Restart "
            f"with FASTONESTEP_IMPL=torch (or the trainer config 'kernels: eager'), and please report this error "
            f"with the GPU and the torch/triton versions.") from fault


def impl_available(impl: str, device=None) -> tuple[bool, str]:
    """Whether `impl` can run on tensors on `device` (default CPU), and if not, why."""
    device = torch.device("cpu" if device is None else device)
    if impl == "torch":
        return True, ""
    if impl == "triton":
        mods, reason = _triton_backend()
        if mods is None:
            return False, reason
        if device.type != "cuda" and not mods[0].INTERPRETED:
            return False, (f"tensors are on {device.type}; the Triton kernels run on CUDA (set TRITON_INTERPRET=1 "
                           "before importing fastonestep to run them through the interpreter, a test tool)")
        return _self_check(impl, device)
    if impl == "ext":
        mod, reason = _ext_backend()
        if mod is None:
            return False, reason
        if device.type == "cuda" and hasattr(mod, "has_cuda_kernels") and not mod.has_cuda_kernels():
            return False, "the csrc extension was built without its CUDA kernels"
        return _self_check(impl, device)
    raise ValueError(f"impl={impl!r} is not one of {', '.join(IMPLS)}")


def _warn_once(impl: str, reason: str) -> None:
    if impl in _WARNED:
        return
    _WARNED.add(impl)
    warnings.warn(f"fastonestep.losses: impl={impl!r} is not available: {reason}. Falling back to impl='torch' "
                  "(this warning is shown once per implementation).", RuntimeWarning, stacklevel=3)


def resolve_impl(impl: str = "auto", device=None) -> str:
    """The implementation that runs for `impl` (or FASTONESTEP_IMPL) on tensors on `device` (default CPU)."""
    forced = os.environ.get("FASTONESTEP_IMPL")
    choice = forced or impl
    if choice not in IMPLS:
        source = "FASTONESTEP_IMPL" if forced else "impl"
        raise ValueError(f"{source}={choice!r} is not one of {', '.join(IMPLS)}")
    device = torch.device("cpu" if device is None else device)
    if choice == "torch":
        return "torch"
    if choice == "auto":
        if device.type != "cuda":
            return "torch"
        if impl_available("triton", device)[0] and not _triton_interpreted():
            return "triton"
        if impl_available("ext", device)[0]:
            return "ext"
        return "torch"
    ok, reason = impl_available(choice, device)
    if not ok:
        _warn_once(choice, reason)
        return "torch"
    return choice


def _backend(impl: str, device):
    """(name, module) of the implementation to call; modules share the reference's function names."""
    name = resolve_impl(impl, device)
    if name == "triton":
        return name, _triton_backend()[0]
    if name == "ext":
        return name, _ext_backend()[0]
    return name, _ref


def _check_data(fn: str, **tensors) -> None:
    """Floating-point tensors with a batch dimension (TypeError / ValueError naming the argument)."""
    for name, t in tensors.items():
        if t is not None:
            _ref.check_floating(t, name, fn)
            _ref.check_batched(t, name, fn)


def _check_per_sample(fn: str, B: int, **values) -> None:
    for name, v in values.items():
        if v is not None:
            _ref.check_per_sample(v, B, name, fn)


def _fresh_seed() -> int:
    """From torch's default (CPU) generator: torch.manual_seed makes unseeded calls reproducible, no device sync."""
    return int(torch.randint(0, 2**62, (1,)).item())


def add_noise(x0, alpha, sigma, noise=None, seed=None, impl="auto", *, latent_std=None, latent_noise=None,
              latent_scale=None, latent_bias=None, return_x0=False):
    """x_t = alpha_i * x0 + sigma_i * eps with per-sample alpha, sigma. With `seed` and no `noise`, eps is
    drawn from a generator seeded by `seed` (reproducible without storing it; the triton path draws it inside
    the kernel and `fastonestep.kernels.triton_noise.regenerate_noise(shape, seed)` reproduces it). With
    neither, a seed is drawn from torch's default generator (fresh noise, reproducible under torch.manual_seed).

    Optional latent sampling before noising (design.md section 5): with `latent_std`, x0 is a posterior mean and
    the clean sample is (x0 + latent_std * z) * latent_scale_c + latent_bias_c (c = dimension 1), z =
    `latent_noise` or a second stream of the same seed, independent of eps (drawn from a fresh seed when there is
    none, also when `noise` is given); latent_scale / latent_bias alone apply only the per-channel affine map.
    `return_x0=True` returns (x_t, clean sample).

    Every implementation gives the eager reference's gradients to x0, noise, alpha, sigma and, on the latent path,
    latent_std, latent_scale, latent_bias and a given latent_noise, each in its argument's shape and dtype (a
    per-channel scale or bias summed over batch and positions); Triton regenerates drawn eps and z from the seed
    in the backward."""
    _check_data("add_noise", x0=x0, noise=noise, latent_std=latent_std, latent_noise=latent_noise)
    _check_per_sample("add_noise", x0.shape[0], alpha=alpha, sigma=sigma)
    if latent_noise is not None and latent_std is None:
        raise ValueError("latent_noise needs latent_std (the latent sampling path)")
    draws_z = latent_std is not None and latent_noise is None
    if seed is None and (noise is None or draws_z):  # a fresh seed for every stream drawn, eps or z
        seed = _fresh_seed()
    name, mod = _backend(impl, x0.device)
    latent = latent_std is not None or latent_scale is not None or latent_bias is not None
    if name == "triton":
        return mod[1].add_noise(x0, alpha, sigma, noise, seed, latent_std=latent_std, latent_noise=latent_noise,
                                latent_scale=latent_scale, latent_bias=latent_bias, return_x0=return_x0)
    clean = _ref.latent_sample(x0, latent_std, latent_noise, latent_scale, latent_bias, seed) if latent else x0
    x_t = mod.add_noise(clean, alpha, sigma, noise, seed)
    return (x_t, clean) if return_x0 else x_t


def denoising_loss(F, x_t, x0, sigma, sigma_data, impl="auto"):
    """Per-sample EDM loss: lambda(sigma_i) * mean_elements (c_skip x_t + c_out F - x0)^2."""
    _check_data("denoising_loss", F=F, x_t=x_t, x0=x0)
    _check_per_sample("denoising_loss", F.shape[0], sigma=sigma)
    name, mod = _backend(impl, F.device)
    if name == "triton":
        return mod[0].denoising_loss(F, x_t, x0, sigma, sigma_data)
    return mod.denoising_loss(F, x_t, x0, sigma, sigma_data)


def dmd_loss(x, x_real_hat, x_fake_hat, impl="auto"):
    """Scalar 0.5*mean((x - sg(x - g))^2), g = (p_real - p_fake) / mean|p_real| per sample (design 4.2)."""
    _check_data("dmd_loss", x=x, x_real_hat=x_real_hat, x_fake_hat=x_fake_hat)
    name, mod = _backend(impl, x.device)
    if name == "triton":
        return mod[0].dmd_loss(x, x_real_hat, x_fake_hat)
    return mod.dmd_loss(x, x_real_hat, x_fake_hat)


def ratio_generator_loss(x, logit_grad, logits, weight=None, divergence="rkl", normalize=True, clamp=10.0,
                         impl="auto"):
    """Scalar surrogate whose gradient w.r.t. the generator output x is g / numel(x), with
    g_i = weight_i * h(exp(-logit_i)) * logit_grad_i / (mean|logit_grad_i| + eps) (design 4.1(b)), with the logits
    clamped to [-clamp, clamp]."""
    if not clamp > 0:  # [-c, c] with c < 0 is empty: the implementations would disagree on what it means
        raise ValueError(f"ratio_generator_loss: clamp must be positive (logits are clamped to [-clamp, clamp]); "
                         f"got {clamp!r}")
    _check_data("ratio_generator_loss", x=x, logit_grad=logit_grad)
    _check_per_sample("ratio_generator_loss", x.shape[0], logits=logits, weight=weight)
    name, mod = _backend(impl, x.device)
    if name == "triton":
        return mod[0].ratio_generator_loss(x, logit_grad, logits, weight, divergence, normalize, clamp)
    return mod.ratio_generator_loss(x, logit_grad, logits, weight, divergence, normalize, clamp)


def ratio_classifier_loss(logits_gen, logits_real, weight=None, impl="auto"):
    """Logistic loss of the ratio classifier, generated = 1, real = 0. The logits hold one value per sample in any
    shape ((B,) or (B, 1)); they are flattened to (B,) and their gradients come back in their own shapes."""
    _ref.check_floating(logits_gen, "logits_gen", "ratio_classifier_loss")
    _ref.check_floating(logits_real, "logits_real", "ratio_classifier_loss")
    logits_gen, logits_real = _ref.sample_logits(logits_gen, logits_real)
    _check_per_sample("ratio_classifier_loss", logits_gen.numel(), weight=weight)
    name, mod = _backend(impl, logits_gen.device)
    if name == "triton":
        return mod[0].ratio_classifier_loss(logits_gen, logits_real, weight)
    return mod.ratio_classifier_loss(logits_gen, logits_real, weight)


# ----------------------------------------------------------------------------------------------------------
# Module wrappers: the functions above as torch.nn.Modules, for trainers that hold their losses as modules
# (Liger-Kernel style). The settings are fixed and checked at construction; forward takes the tensors only.
# They hold no parameters and no buffers, so they add nothing to a state_dict.


def _check_impl(impl: str, owner: str) -> str:
    if impl not in IMPLS:
        raise ValueError(f"{owner}: impl={impl!r} is not one of {', '.join(IMPLS)}")
    return impl


REDUCTIONS = ("mean", "sum", "none")


class DenoisingLoss(torch.nn.Module):
    """`denoising_loss` as a module: per-sample EDM losses reduced by `reduction` ("mean" over the batch, 0 for an
    empty one like every scalar loss here; "sum"; "none": the (B,) losses)."""

    def __init__(self, sigma_data: float = 0.5, reduction: str = "mean", impl: str = "auto"):
        super().__init__()
        if not sigma_data > 0:
            raise ValueError(f"DenoisingLoss: sigma_data must be positive, got {sigma_data!r}")
        if reduction not in REDUCTIONS:
            raise ValueError(f"DenoisingLoss: reduction={reduction!r} is not one of {', '.join(REDUCTIONS)}")
        self.sigma_data, self.reduction = float(sigma_data), reduction
        self.impl = _check_impl(impl, "DenoisingLoss")

    def forward(self, F, x_t, x0, sigma):
        per_sample = denoising_loss(F, x_t, x0, sigma, self.sigma_data, impl=self.impl)
        if self.reduction == "none":
            return per_sample
        if self.reduction == "sum":
            return per_sample.sum()
        return _ref.mean_or_zero(per_sample)

    def extra_repr(self) -> str:
        return f"sigma_data={self.sigma_data}, reduction={self.reduction!r}, impl={self.impl!r}"


class DMDLoss(torch.nn.Module):
    """`dmd_loss` as a module: forward(x, x_real_hat, x_fake_hat) -> scalar (design 4.2)."""

    def __init__(self, impl: str = "auto"):
        super().__init__()
        self.impl = _check_impl(impl, "DMDLoss")

    def forward(self, x, x_real_hat, x_fake_hat):
        return dmd_loss(x, x_real_hat, x_fake_hat, impl=self.impl)

    def extra_repr(self) -> str:
        return f"impl={self.impl!r}"


class RatioGeneratorLoss(torch.nn.Module):
    """`ratio_generator_loss` as a module: forward(x, logit_grad, logits, weight=None) -> scalar surrogate
    (design 4.1(b)) for the divergence, normaliser and clamp fixed here."""

    def __init__(self, divergence: str = "rkl", normalize: bool = True, clamp: float = 10.0, impl: str = "auto"):
        super().__init__()
        if divergence not in DIVERGENCES:
            raise ValueError(f"RatioGeneratorLoss: divergence={divergence!r} is not one of {', '.join(DIVERGENCES)}")
        if not clamp > 0:
            raise ValueError(f"RatioGeneratorLoss: clamp must be positive (logits are clamped to [-clamp, clamp]); "
                             f"got {clamp!r}")
        self.divergence, self.normalize, self.clamp = divergence, bool(normalize), float(clamp)
        self.impl = _check_impl(impl, "RatioGeneratorLoss")

    def forward(self, x, logit_grad, logits, weight=None):
        return ratio_generator_loss(x, logit_grad, logits, weight, self.divergence, self.normalize, self.clamp,
                                    impl=self.impl)

    def extra_repr(self) -> str:
        return (f"divergence={self.divergence!r}, normalize={self.normalize}, clamp={self.clamp}, "
                f"impl={self.impl!r}")


class RatioClassifierLoss(torch.nn.Module):
    """`ratio_classifier_loss` as a module: forward(logits_gen, logits_real, weight=None) -> scalar logistic loss
    (generated = 1, real = 0)."""

    def __init__(self, impl: str = "auto"):
        super().__init__()
        self.impl = _check_impl(impl, "RatioClassifierLoss")

    def forward(self, logits_gen, logits_real, weight=None):
        return ratio_classifier_loss(logits_gen, logits_real, weight, impl=self.impl)

    def extra_repr(self) -> str:
        return f"impl={self.impl!r}"
