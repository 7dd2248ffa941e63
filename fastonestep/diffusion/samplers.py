"""Samplers: the teacher's probability-flow ODE on the Karras sigma grid (EDM, Karras et al. 2022, alg. 1
without churn) and the few-step student sampler.

A `denoiser` is anything called as denoiser(x, sigma, labels) -> E[x0 | x] in VE coordinates (an
EDMPrecond, or an exact mixture denoiser in tests); sigma is passed as a 0-d tensor.
Grad mode: `edm_sample` runs under torch.no_grad (it is for inference); `ode_solve` and
`student_sample` follow the caller's grad mode, so a method can take gradients through them or wrap
them in torch.no_grad itself (teacher targets, backward simulation).
"""
from __future__ import annotations

import torch

from fastonestep.tensors import device_tensor, python_floats

SOLVERS = ("euler", "heun")


def karras_sigmas(num_steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0,
                  device=None, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """EDM eq. 5: num_steps noise levels from sigma_max down to sigma_min, evenly spaced in sigma^(1/rho),
    followed by a final 0. Shape (num_steps + 1,), strictly decreasing."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if not 0 < sigma_min <= sigma_max:
        raise ValueError(f"need 0 < sigma_min <= sigma_max, got {sigma_min}, {sigma_max}")
    ramp = torch.linspace(0.0, 1.0, num_steps, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    sigmas = (hi + ramp * (lo - hi)) ** rho
    return torch.cat([sigmas, sigmas.new_zeros(1)]).to(device=device, dtype=dtype)


def _state_dtype(x: torch.Tensor) -> torch.dtype:
    """Integrate in at least fp32, whatever the noise dtype."""
    return torch.promote_types(x.dtype, torch.float32)


def ode_solve(denoiser, x: torch.Tensor, sigmas, solver: str = "heun", labels=None) -> torch.Tensor:
    """Integrates the probability-flow ODE dx/dsigma = (x - D(x, sigma)) / sigma from sigmas[0] to sigmas[-1].

    x is a sample at noise level sigmas[0] (already scaled, not unit noise). `sigmas` is any decreasing
    sequence of levels; the last may be 0. Heun adds its second-order correction on every step except one
    that ends at sigma = 0 (where the slope is undefined; that step is Euler, i.e. returns D).
    Returns the state at sigmas[-1], in x's dtype.
    """
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; expected one of {SOLVERS}")
    dtype = _state_dtype(x)
    # Python floats (rounded to the state's dtype) for the step arithmetic and branching, and device fills of them
    # for the denoiser: a grid given on the CPU costs no host synchronisation, a grid on the GPU one.
    levels = torch.as_tensor(sigmas, dtype=dtype).reshape(-1).tolist()
    sigma_at = [device_tensor(s, dtype, x.device) for s in levels]
    state = x.to(dtype)
    for i in range(len(levels) - 1):
        s_cur, s_next = levels[i], levels[i + 1]
        slope = (state - denoiser(state, sigma_at[i], labels).to(dtype)) / s_cur
        x_next = state + (s_next - s_cur) * slope
        if solver == "heun" and s_next > 0:
            slope_next = (x_next - denoiser(x_next, sigma_at[i + 1], labels).to(dtype)) / s_next
            x_next = state + (s_next - s_cur) * 0.5 * (slope + slope_next)
        state = x_next
    return state.to(x.dtype)


@torch.no_grad()
def edm_sample(denoiser, noise: torch.Tensor, num_steps: int = 18, sigma_min: float = 0.002,
               sigma_max: float = 80.0, rho: float = 7.0, solver: str = "heun", labels=None) -> torch.Tensor:
    """Deterministic EDM sampler: x = noise * sigma_max, then the ODE along karras_sigmas(num_steps, ...)
    to sigma = 0. Heun costs 2 * num_steps - 1 denoiser calls, Euler num_steps. Returns x0 in noise's dtype."""
    sigmas = karras_sigmas(num_steps, sigma_min, sigma_max, rho)  # on the CPU: ode_solve needs no copy back
    x = noise.to(_state_dtype(noise)) * sigma_max
    return ode_solve(denoiser, x, sigmas, solver=solver, labels=labels).to(noise.dtype)


def student_sample(generator_denoiser, z: torch.Tensor, sigmas, labels=None,
                   generator: torch.Generator | None = None, noises=None) -> torch.Tensor:
    """Few-step student sampling: x = sigmas[0] * z; at each level x0 = D(x, sigma_k), then (except after the
    last level) re-noise x = x0 + sigmas[k + 1] * fresh N(0, I) noise drawn with `generator`.

    With a single level this is the one-step generator G(z) = D(sigma_g * z; sigma_g). `sigmas` are the
    positive levels the student is evaluated at (a trailing 0, as karras_sigmas ends with, is dropped).
    `noises`: the re-noising tensors (one per level after the first) drawn in advance, used instead of drawing
    from `generator` (distributed training draws them for the global batch and passes this rank's slice).
    """
    levels = python_floats(sigmas)
    if levels and levels[-1] == 0:
        levels = levels[:-1]
    if not levels or min(levels) <= 0:
        raise ValueError(f"student_sample needs one or more positive noise levels, got {levels}")
    if noises is not None and len(noises) != len(levels) - 1:
        raise ValueError(f"student_sample: {len(levels)} levels re-noise {len(levels) - 1} times, "
                         f"got {len(noises)} noise tensors")
    x = z * levels[0]
    for k, sigma in enumerate(levels):
        x0 = generator_denoiser(x, device_tensor(sigma, _state_dtype(z), z.device), labels)
        if k + 1 < len(levels):
            noise = (noises[k] if noises is not None
                     else torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype))
            x = x0 + levels[k + 1] * noise
    return x0
