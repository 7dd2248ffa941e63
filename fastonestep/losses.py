"""Public functional API of the fused losses (design.md section 5).

Each function takes `impl="auto" | "triton" | "ext" | "torch"`; FASTONESTEP_IMPL in the environment forces
one. Today only the eager reference ("torch") exists: the fused Triton and csrc paths are tracked work, and
asking for them explicitly raises a clear error instead of silently running something else. "auto" picks
the fastest available implementation for the tensor's device, i.e. "torch" for now.

All functions accumulate in fp32 whatever the input dtype. Trainers call these; they never reimplement them.
"""
from __future__ import annotations

import os

from fastonestep.kernels import reference as _ref
from fastonestep.kernels.reference import DIVERGENCES, divergence_weight  # noqa: F401  (public helpers)

IMPLS = ("auto", "triton", "ext", "torch")
_AVAILABLE = ("torch",)


def resolve_impl(impl: str = "auto") -> str:
    forced = os.environ.get("FASTONESTEP_IMPL")
    choice = forced or impl
    if choice not in IMPLS:
        source = "FASTONESTEP_IMPL" if forced else "impl"
        raise ValueError(f"{source}={choice!r} is not one of {', '.join(IMPLS)}")
    if choice == "auto":
        return "torch"
    if choice not in _AVAILABLE:
        raise NotImplementedError(f"impl={choice!r}: the fused {choice} kernels are not built in this version; "
                                  "use impl='torch' or 'auto'")
    return choice


def add_noise(x0, alpha, sigma, noise=None, seed=None, impl="auto"):
    """x_t = alpha_i * x0 + sigma_i * eps with per-sample alpha, sigma. With `seed` and no `noise`, eps is
    drawn from a generator seeded by `seed` (reproducible without storing it)."""
    resolve_impl(impl)
    return _ref.add_noise(x0, alpha, sigma, noise, seed)


def denoising_loss(F, x_t, x0, sigma, sigma_data, impl="auto"):
    """Per-sample EDM loss: lambda(sigma_i) * mean_elements (c_skip x_t + c_out F - x0)^2."""
    resolve_impl(impl)
    return _ref.denoising_loss(F, x_t, x0, sigma, sigma_data)


def dmd_loss(x, x_real_hat, x_fake_hat, impl="auto"):
    """Scalar 0.5*mean((x - sg(x - g))^2), g = (p_real - p_fake) / mean|p_real| per sample (design 4.2)."""
    resolve_impl(impl)
    return _ref.dmd_loss(x, x_real_hat, x_fake_hat)


def ratio_generator_loss(x, logit_grad, logits, weight=None, divergence="rkl", normalize=True, clamp=10.0,
                         impl="auto"):
    """Scalar surrogate whose gradient w.r.t. the generator output x is g / numel(x), with
    g_i = weight_i * h(exp(-logit_i)) * logit_grad_i / (mean|logit_grad_i| + eps) (design 4.1(b))."""
    resolve_impl(impl)
    return _ref.ratio_generator_loss(x, logit_grad, logits, weight, divergence, normalize, clamp)


def ratio_classifier_loss(logits_gen, logits_real, weight=None, impl="auto"):
    """Logistic loss of the ratio classifier, generated = 1, real = 0."""
    resolve_impl(impl)
    return _ref.ratio_classifier_loss(logits_gen, logits_real, weight)
