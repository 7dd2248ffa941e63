"""The few-step student sampler of backward distillation (design.md 4.4), with Imagine-Flash-style noise
correction for eps-parameterised students.

The student is evaluated at decreasing levels s_1 > ... > s_K (VE coordinates, alpha = 1):
x = s_1 z; at each level x0_k = prediction; then (except after the last level) x = x0_k + s_{k+1} * fresh noise.

Parameterisations. The network is an EDM-preconditioned denoiser D(x; s), so its "x0" prediction is D and its
"eps" prediction is eps_hat = (x - D) / s (the exact conversion, fastonestep.diffusion.conversions).

Noise correction (eps only, first level only). At the first level the input is pure noise, x = s_1 z, and z is
known. The sampler uses eps_used = z + c * (eps_hat - z) (c = `noise_correction`: 0 = the known noise alone,
1 = the model's prediction, i.e. no correction) and x0 = x - s_1 * eps_used.

What this buys in these coordinates, honestly: since x = s_1 z exactly, s_1 (eps_hat - z) = -D, so the
corrected first step is x0 = c * D(s_1 z; s_1): the first clean prediction is scaled by c, and c = 0 gives
x0 = 0 exactly. The seed's motivation is a VP-type schedule with (near-)zero terminal SNR, where
x0 = (x - sigma eps) / alpha divides the eps error by alpha_T ~ 0 (the singularity); replacing eps by the
known noise removes that amplification. Under VE/EDM there is no such division (alpha = 1) and D is computed
directly, so eps_hat carries no singularity: noise correction is available for parity with the seed and for
experiments (c < 1 shrinks the first step towards 0, the data mean for centred data), and c = 1 is the
default. Levels after the first use eps_hat unchanged, which gives x0 = D up to rounding.
"""
from __future__ import annotations

import torch

from fastonestep.diffusion.conversions import from_x0, to_x0
from fastonestep.tensors import device_tensor, python_floats

PARAMETERIZATIONS = ("x0", "eps")


def _levels(sigmas) -> list[float]:
    levels = python_floats(sigmas, torch.float64)
    if levels and levels[-1] == 0:  # a karras_sigmas-style trailing 0 is not a student level
        levels = levels[:-1]
    if not levels or min(levels) <= 0 or any(b >= a for a, b in zip(levels, levels[1:])):
        raise ValueError(f"the backward sampler needs positive, strictly decreasing noise levels, got {levels}")
    return levels


def student_prediction(net, x: torch.Tensor, sigma: float, parameterization: str, labels=None,
                       known_noise: torch.Tensor | None = None, noise_correction: float = 1.0) -> torch.Tensor:
    """The clean prediction the sampler uses at one level. `known_noise` (the first level's z) switches on the
    noise correction for eps-parameterised students."""
    if parameterization not in PARAMETERIZATIONS:
        raise ValueError(f"unknown parameterization {parameterization!r}; expected one of {PARAMETERIZATIONS}")
    s = device_tensor(sigma, torch.float32, x.device)
    d = net(x, s, labels)
    if parameterization == "x0":
        return d
    eps_hat = from_x0(d, "eps", x, 1.0, sigma)
    if known_noise is not None:
        eps_hat = known_noise + noise_correction * (eps_hat - known_noise)
    return to_x0(eps_hat, "eps", x, 1.0, sigma)


def backward_states(net, z: torch.Tensor, sigmas, upto: int, parameterization: str = "x0",
                    noise_correction: float = 1.0, labels=None, generator: torch.Generator | None = None,
                    noises=None):
    """The student's own inputs at levels 1..upto (a list of `upto` tensors: x at s_1, x at s_2, ...), produced
    exactly as `backward_sample` produces them. Runs under the caller's grad mode (training wraps it in
    no_grad: earlier steps get no gradient). Consumes `upto - 1` noise draws from `generator`, or takes them
    from `noises` (drawn in advance, e.g. this rank's slice of a global batch's draws)."""
    levels = _levels(sigmas)
    if not 1 <= upto <= len(levels):
        raise ValueError(f"upto must be in 1..{len(levels)}, got {upto}")
    if noises is not None and len(noises) != upto - 1:
        raise ValueError(f"backward_states: {upto} states re-noise {upto - 1} times, got {len(noises)} noise tensors")
    x = z * levels[0]
    states = [x]
    for k in range(upto - 1):
        x0 = student_prediction(net, x, levels[k], parameterization, labels,
                                known_noise=z if k == 0 else None, noise_correction=noise_correction)
        noise = (noises[k] if noises is not None
                 else torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype))
        x = x0 + levels[k + 1] * noise
        states.append(x)
    return states


def backward_sample(net, z: torch.Tensor, sigmas, parameterization: str = "x0", noise_correction: float = 1.0,
                    labels=None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Samples a backward-distilled student: the states of `backward_states`, then the last level's prediction.
    With parameterization="x0" this is fastonestep.diffusion.samplers.student_sample (same noise draws)."""
    levels = _levels(sigmas)
    x = backward_states(net, z, levels, len(levels), parameterization, noise_correction, labels, generator)[-1]
    return student_prediction(net, x, levels[-1], parameterization, labels,
                              known_noise=z if len(levels) == 1 else None, noise_correction=noise_correction)
