"""Eager PyTorch references of every fused loss (design.md section 5).

These are the ground truth the fused kernels are tested against, and the `impl="torch"` path of
fastonestep.losses. All arithmetic is fp32 whatever the input dtype; results are cast back where the
contract returns a tensor shaped like the input.

Shapes, as in the fused kernels: dimension 0 is the batch (a 1-D tensor is B samples of one element each);
per-sample values (sigma, logits, weight, the classifier's logits) are numbers or tensors of B values in any
shape ((B,), (B, 1), ...), one value broadcasting to all samples. Constants get no gradient: sigma, sigma_data,
x_real_hat, x_fake_hat, logit_grad, logits and the weights.
"""
from __future__ import annotations

import math
import numbers

import numpy as np
import torch
import torch.nn.functional as F

from fastonestep.tensors import device_tensor

DIVERGENCES = ("rkl", "dijs", "fkl", "hellinger")
MASK64 = (1 << 64) - 1


def check_batched(t: torch.Tensor, name: str, fn: str) -> None:
    """ValueError for a 0-d tensor: every loss input has a batch dimension (dimension 0)."""
    if t.ndim == 0:
        raise ValueError(f"{fn}: {name} must have a batch dimension (shape (B, ...)), got a 0-d tensor")


def check_floating(t, name: str, fn: str) -> None:
    """TypeError unless `t` is a floating-point tensor: integer data would be cast by some implementations and
    refused by others."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{fn}: {name} must be a floating-point tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{fn}: {name} must be a floating-point tensor, got {t.dtype}")


def check_per_sample(v, B: int, name: str, fn: str) -> None:
    """ValueError unless `v` (a number or a tensor) holds one value, or one value per sample (B of them, in any
    shape: (B,), (B, 1), ...)."""
    if isinstance(v, numbers.Number):
        return
    shape = tuple(v.shape) if isinstance(v, torch.Tensor) else np.shape(v)  # (np: a sequence of numbers)
    n = math.prod(shape)
    if n != 1 and n != B:
        raise ValueError(f"{fn}: {name} must hold one value per sample (B={B}: shape ({B},) or ({B}, 1)) or a "
                         f"single value, got shape {shape}")


def per_sample_values(v, B: int, name: str, fn: str, device) -> torch.Tensor:
    """`v` checked by check_per_sample, as a constant (detached) fp32 (B,) tensor."""
    check_per_sample(v, B, name, fn)
    t = device_tensor(v, torch.float32, device).detach().reshape(-1)
    return t.expand(B) if t.numel() == 1 else t


def sample_logits(logits_gen: torch.Tensor, logits_real: torch.Tensor, fn: str = "ratio_classifier_loss"):
    """The classifier's logits flattened to (B,), B = their number of elements (which must agree)."""
    if logits_gen.numel() != logits_real.numel():
        raise ValueError(f"{fn}: logits_gen {tuple(logits_gen.shape)} and logits_real {tuple(logits_real.shape)} "
                         "must hold one logit per sample each, the same number of samples")
    return logits_gen.reshape(-1), logits_real.reshape(-1)


def latent_seed(seed: int) -> int:
    """The seed of the latent z stream for add_noise's `seed` (splitmix64 of it). torch's CPU generator keeps only
    the low 32 bits of a seed, so an offset in the high bits (seed + 2**32) drew z == eps; the mixed seed differs
    from `seed` in its low 32 bits, so z and eps are independent streams."""
    z = (int(seed) + 0x9E3779B97F4A7C15) & MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    z ^= z >> 31
    return z ^ 1 if (z ^ int(seed)) & 0xFFFFFFFF == 0 else z  # (a 2^-32 chance, ruled out)


def _as_rows(t: torch.Tensor) -> torch.Tensor:
    """(B, N) view of a batch; a 1-D tensor is B rows of one element (also for B = 0, unlike reshape(B, -1))."""
    return t.flatten(1) if t.ndim > 1 else t[:, None]


def per_sample(c: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Broadcasts a (B,) coefficient over the remaining dimensions of `like`."""
    c = device_tensor(c, torch.float32, like.device)
    if c.ndim == 0:
        c = c.expand(like.shape[0])
    return c.reshape((-1,) + (1,) * (like.ndim - 1))


def add_noise(x0, alpha, sigma, noise=None, seed=None):
    check_batched(x0, "x0", "add_noise")
    if noise is None:
        gen = torch.Generator(device=x0.device)
        gen.manual_seed(0 if seed is None else int(seed))
        noise = torch.randn(x0.shape, generator=gen, device=x0.device, dtype=torch.float32)
    x_t = per_sample(alpha, x0) * x0.float() + per_sample(sigma, x0) * noise.float()
    return x_t.to(x0.dtype)


def denoising_loss(F_out, x_t, x0, sigma, sigma_data):
    """Per-sample EDM loss lambda(sigma) * mean_elements (c_skip x_t + c_out F - x0)^2 (sigma a constant)."""
    check_batched(x_t, "x_t", "denoising_loss")
    s = per_sample_values(sigma, x_t.shape[0], "sigma", "denoising_loss", x_t.device)
    sd2 = sigma_data**2
    c_skip = sd2 / (s**2 + sd2)
    c_out = s * sigma_data / (s**2 + sd2).sqrt()
    weight = (s**2 + sd2) / (s * sigma_data) ** 2
    D = per_sample(c_skip, x_t) * x_t.float() + per_sample(c_out, x_t) * F_out.float()
    err = _as_rows((D - x0.float()).square()).mean(1)
    return weight * err


def _sample_normaliser(v: torch.Tensor, eps: float) -> torch.Tensor:
    return _as_rows(v.abs()).mean(1) + eps


def _finite_rows(*tensors) -> torch.Tensor:
    ok = torch.ones(tensors[0].shape[0], dtype=torch.bool, device=tensors[0].device)
    for t in tensors:
        ok &= torch.isfinite(_as_rows(t)).all(1)
    return ok


def mean_or_zero(t: torch.Tensor) -> torch.Tensor:
    """Mean of `t`, 0 for an empty tensor. The scalar losses of an empty batch (B = 0, or samples of no
    elements) are 0 with zero-size gradients in every implementation, not NaN and not an error: a rank whose
    shard of the batch is empty still joins the step, and a NaN from it would poison the DDP all-reduce of every
    rank (an error would stall them). The sum over no samples is 0, and its gradient is empty."""
    return t.sum() / max(t.numel(), 1)


def surrogate_loss(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """The contract of 0.5 * mean((x - sg(x - g))^2): value 0.5*mean(g^2), gradient w.r.t. x exactly g / numel(x).

    Written literally, autograd forms the gradient as x - sg(x - g), which in fp32 loses g's low bits (all of
    them once |g| < ulp(x)): clamped logits or small time weights then get a noisy, biased update. Here
    the value is computed from g and the gradient comes from a term linear in x, so neither cancels."""
    g = g.detach()
    # A NaN/Inf element of x sits in a row whose g is 0: without nan_to_num, 0 * NaN would make the value NaN
    # where the fused kernels (and 0.5*mean(g^2)) give a number; the gradient is g / numel either way.
    linear = mean_or_zero(x.float().nan_to_num(0.0, 0.0, 0.0) * g)
    return 0.5 * mean_or_zero(g.square()) + (linear - linear.detach())


def dmd_gradient(x, x_real_hat, x_fake_hat, eps: float = 1e-8) -> torch.Tensor:
    """DMD direction (p_real - p_fake) / mean|p_real| per sample in fp32; rows with NaN/Inf become 0."""
    check_batched(x, "x", "dmd_loss")
    x32 = x.float()
    p_real = x32 - x_real_hat.float()
    p_fake = x32 - x_fake_hat.float()
    g = (p_real - p_fake) / per_sample(_sample_normaliser(p_real, eps), x)
    ok = _finite_rows(g)
    return torch.where(per_sample(ok, x).bool(), g, torch.zeros_like(g))


def dmd_loss(x, x_real_hat, x_fake_hat):
    return surrogate_loss(x, dmd_gradient(x, x_real_hat, x_fake_hat).detach())


def divergence_weight(logits: torch.Tensor, divergence: str, clamp: float = 10.0) -> torch.Tensor:
    """h(r) = f''(r) r^2 at r = exp(-logit) (the estimated p/q), from the clamped logit, in fp32."""
    l = (logits.float() if isinstance(logits, torch.Tensor) else torch.tensor(float(logits))).clamp(-clamp, clamp)
    if divergence == "rkl":
        return torch.ones_like(l)
    if divergence == "dijs":
        return torch.sigmoid(-l)  # r / (1 + r)
    if divergence == "fkl":
        return torch.exp(-l)  # r
    if divergence == "hellinger":
        return 0.5 * torch.exp(-0.5 * l)  # sqrt(r) / 2
    raise ValueError(f"unknown divergence {divergence!r}; expected one of {DIVERGENCES}")


def ratio_generator_gradient(logit_grad, logits, weight=None, divergence="rkl", normalize=True,
                             clamp: float = 10.0, eps: float = 1e-8) -> torch.Tensor:
    """g_i = w_i h(r_i) grad_i / (mean|grad_i| + eps) in fp32 (4.1(b)); rows with NaN/Inf become 0."""
    check_batched(logit_grad, "logit_grad", "ratio_generator_loss")
    grad = logit_grad.detach().float()
    B = grad.shape[0]
    coef = divergence_weight(per_sample_values(logits, B, "logits", "ratio_generator_loss", grad.device), divergence,
                             clamp)
    if weight is not None:
        coef = coef * per_sample_values(weight, B, "weight", "ratio_generator_loss", grad.device)
    if normalize:
        coef = coef / _sample_normaliser(grad, eps)
    g = per_sample(coef, grad) * grad
    ok = _finite_rows(g)
    return torch.where(per_sample(ok, grad).bool(), g, torch.zeros_like(g))


def ratio_generator_loss(x, logit_grad, logits, weight=None, divergence="rkl", normalize=True, clamp=10.0):
    check_batched(x, "x", "ratio_generator_loss")
    g = ratio_generator_gradient(logit_grad, logits, weight, divergence, normalize, clamp)
    return surrogate_loss(x, g.detach())


def ratio_classifier_loss(logits_gen, logits_real, weight=None):
    """Logistic loss, generated = 1, real = 0: mean_i w_i (softplus(-l_gen_i) + softplus(l_real_i)); the logits
    hold one value per sample in any shape ((B,) or (B, 1)), the weight (a constant) is one value or B."""
    logits_gen, logits_real = sample_logits(logits_gen, logits_real)
    per = F.softplus(-logits_gen.float()) + F.softplus(logits_real.float())
    if weight is not None:
        per = per * per_sample_values(weight, per.numel(), "weight", "ratio_classifier_loss", per.device)
    return mean_or_zero(per)


def latent_sample(mean, std=None, z=None, scale=None, bias=None, seed=None):
    """Clean latent sample (mean + std * z) * scale_c + bias_c in fp32 (c = dimension 1), in mean's dtype.

    The optional step before add_noise on latent datasets stored as VAE posterior mean/std. Without std it is
    only the per-channel affine map. z: given, or drawn from a torch.Generator seeded with latent_seed(seed) (seed
    None: 0), a stream independent of add_noise's eps for the same seed. scale / bias: scalars or one value per
    channel."""
    x = mean.float()
    if std is not None:
        if z is None:
            gen = torch.Generator(device=mean.device)
            gen.manual_seed(latent_seed(0 if seed is None else seed))
            z = torch.randn(mean.shape, generator=gen, device=mean.device, dtype=torch.float32)
        x = x + std.float() * z.float()

    def channel(v):
        v = device_tensor(v, torch.float32, mean.device).reshape(-1)
        return v if v.numel() == 1 else v.reshape((1, -1) + (1,) * (mean.ndim - 2))

    if scale is not None:
        x = x * channel(scale)
    if bias is not None:
        x = x + channel(bias)
    return x.to(mean.dtype)
