"""Eager PyTorch references of every fused loss (design.md section 5).

These are the ground truth the fused kernels are tested against, and the `impl="torch"` path of
fastonestep.losses. All arithmetic is fp32 whatever the input dtype; results are cast back where the
contract returns a tensor shaped like the input.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fastonestep.tensors import device_tensor

DIVERGENCES = ("rkl", "dijs", "fkl", "hellinger")


def per_sample(c: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Broadcasts a (B,) coefficient over the remaining dimensions of `like`."""
    c = device_tensor(c, torch.float32, like.device)
    if c.ndim == 0:
        c = c.expand(like.shape[0])
    return c.reshape((-1,) + (1,) * (like.ndim - 1))


def add_noise(x0, alpha, sigma, noise=None, seed=None):
    if noise is None:
        gen = torch.Generator(device=x0.device)
        gen.manual_seed(0 if seed is None else int(seed))
        noise = torch.randn(x0.shape, generator=gen, device=x0.device, dtype=torch.float32)
    x_t = per_sample(alpha, x0) * x0.float() + per_sample(sigma, x0) * noise.float()
    return x_t.to(x0.dtype)


def denoising_loss(F_out, x_t, x0, sigma, sigma_data):
    """Per-sample EDM loss lambda(sigma) * mean_elements (c_skip x_t + c_out F - x0)^2."""
    s = device_tensor(sigma, torch.float32, x_t.device).reshape(-1).expand(x_t.shape[0])
    sd2 = sigma_data**2
    c_skip = sd2 / (s**2 + sd2)
    c_out = s * sigma_data / (s**2 + sd2).sqrt()
    weight = (s**2 + sd2) / (s * sigma_data) ** 2
    D = per_sample(c_skip, x_t) * x_t.float() + per_sample(c_out, x_t) * F_out.float()
    err = (D - x0.float()).square().flatten(1).mean(1)
    return weight * err


def _sample_normaliser(v: torch.Tensor, eps: float) -> torch.Tensor:
    return v.abs().flatten(1).mean(1) + eps


def _finite_rows(*tensors) -> torch.Tensor:
    ok = torch.ones(tensors[0].shape[0], dtype=torch.bool, device=tensors[0].device)
    for t in tensors:
        ok &= torch.isfinite(t.flatten(1) if t.ndim > 1 else t[:, None]).all(1)
    return ok


def surrogate_loss(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """The contract of 0.5 * mean((x - sg(x - g))^2): value 0.5*mean(g^2), gradient w.r.t. x exactly g / numel(x).

    Written literally, autograd forms the gradient as x - sg(x - g), which in fp32 loses g's low bits (all of
    them once |g| < ulp(x)): clamped logits or small time weights then get a noisy, biased update. Here
    the value is computed from g and the gradient comes from a term linear in x, so neither cancels."""
    g = g.detach()
    linear = (x.float() * g).sum() / x.numel()
    return 0.5 * g.square().mean() + (linear - linear.detach())


def dmd_gradient(x, x_real_hat, x_fake_hat, eps: float = 1e-8) -> torch.Tensor:
    """DMD direction (p_real - p_fake) / mean|p_real| per sample in fp32; rows with NaN/Inf become 0."""
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
    l = logits.float().clamp(-clamp, clamp)
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
    grad = logit_grad.float()
    coef = divergence_weight(logits, divergence, clamp)
    if weight is not None:
        coef = coef * device_tensor(weight, torch.float32, grad.device).reshape(-1)
    if normalize:
        coef = coef / _sample_normaliser(grad, eps)
    g = per_sample(coef, grad) * grad
    ok = _finite_rows(g)
    return torch.where(per_sample(ok, grad).bool(), g, torch.zeros_like(g))


def ratio_generator_loss(x, logit_grad, logits, weight=None, divergence="rkl", normalize=True, clamp=10.0):
    g = ratio_generator_gradient(logit_grad, logits, weight, divergence, normalize, clamp)
    return surrogate_loss(x, g.detach())


def ratio_classifier_loss(logits_gen, logits_real, weight=None):
    """Logistic loss, generated = 1, real = 0: mean_i w_i (softplus(-l_gen_i) + softplus(l_real_i))."""
    per = F.softplus(-logits_gen.float()) + F.softplus(logits_real.float())
    if weight is not None:
        per = per * device_tensor(weight, torch.float32, per.device).reshape(-1)
    return per.mean()


def latent_sample(mean, std=None, z=None, scale=None, bias=None, seed=None):
    """Clean latent sample (mean + std * z) * scale_c + bias_c in fp32 (c = dimension 1), in mean's dtype.

    The optional step before add_noise on latent datasets stored as VAE posterior mean/std. Without std it is
    only the per-channel affine map. z: given, or drawn from a torch.Generator seeded with seed + 2**32 (seed
    None: 0), a stream apart from add_noise's eps for the same seed. scale / bias: scalars or one value per
    channel."""
    x = mean.float()
    if std is not None:
        if z is None:
            gen = torch.Generator(device=mean.device)
            gen.manual_seed((0 if seed is None else int(seed)) + 2**32)
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
