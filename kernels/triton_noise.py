"""Fused noising in Triton: x_t = alpha_i * x0 + sigma_i * eps, with eps drawn inside the kernel.

With a `seed` and no `noise` tensor, eps at flat element index k is Philox-based `tl.randn(seed, k)`: a pure
function of (seed, k), independent of the grid, block size and batch split. It is never stored;
`regenerate_noise(shape, seed)` runs the same kernel in a mode that writes it, and gives bit-identical values
wherever a backward or a target needs it again.

Optional fused latent sampling (EDM2-style latents stored as VAE posterior mean/std) happens in the same pass,
before noising: x0 = (mean + std * z) * scale_c + bias_c with per-channel scale/bias (dimension 1). z is given
or drawn from a second stream of the same seed (counter offset 2**62: the two streams never overlap), which
`regenerate_noise(shape, seed, stream="latent")` reproduces. The sampled x0 can be written out in the same
pass (`return_x0=True`) for use as the denoising target, or regenerated later with `sample_latents`.

Gradients, as the eager reference's autograd gives them: d x_t / d x0 = alpha_i (times scale_c on the latent
path), d x_t / d noise = sigma_i, d / d alpha_i = sum_j x0_ij g_ij with x0 the clean sample (regenerated from the
seed on the latent path), d / d sigma_i = sum_j eps_ij g_ij (eps regenerated from the seed when it was drawn).
On the latent path, with g_c the gradient reaching the clean sample (alpha_i g, plus the returned sample's):
d / d mean = scale_c g_c, d / d std = scale_c z g_c, d / d z = scale_c std g_c (a given z), d / d scale_c and
d / d bias_c the sums over batch and positions of (mean + std z) g_c and g_c (over everything for a scalar), in
fp32 and each returned in its argument's shape and dtype; z and the sample are regenerated from the seed. The
forward saves a full-size input only when a requested gradient reads it. The main use is under no_grad; the
backward is plain torch plus one regenerating launch per stream or sample it needs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from fastonestep.tensors import device_tensor

from . import triton_common as tc
from .fused_backward import refuse_vmap
from .reference import check_batched

LATENT_STREAM_OFFSET = 1 << 62  # counter offset of the latent (z) stream relative to the eps stream
_MODE_NOISE, _MODE_EPS, _MODE_LATENT = 0, 1, 2
STREAMS = {"eps": _MODE_EPS, "latent": _MODE_LATENT}


@triton.jit(do_not_specialize=["seed"])
def _noise_kernel(x0_ptr, noise_ptr, alpha_ptr, sigma_ptr, std_ptr, z_ptr, scale_ptr, bias_ptr, xt_ptr, x0_out_ptr,
                  seed, B, N, INNER, NCH, MODE: tl.constexpr, HAS_NOISE: tl.constexpr, LATENT: tl.constexpr,
                  HAS_Z: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, WRITE_XT: tl.constexpr,
                  WRITE_X0: tl.constexpr, R: tl.constexpr, BLOCK: tl.constexpr):
    rows, rmask, mask, offs = tc.tile_offsets(B, N, R, BLOCK)
    if MODE == 1:  # regenerate eps
        tl.store(xt_ptr + offs, tl.randn(seed, offs).to(xt_ptr.dtype.element_ty), mask=mask)
    elif MODE == 2:  # regenerate the latent z
        tl.store(xt_ptr + offs, tl.randn(seed, offs + 4611686018427387904).to(xt_ptr.dtype.element_ty), mask=mask)
    else:
        x0 = tl.load(x0_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if LATENT:
            std = tl.load(std_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            if HAS_Z:
                z = tl.load(z_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            else:
                z = tl.randn(seed, offs + 4611686018427387904)
            x0 = x0 + std * z
        if HAS_SCALE or HAS_BIAS:
            cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
            ch = ((cols // INNER) % NCH)[None, :]
            cmask = (cols < N)[None, :]
            if HAS_SCALE:
                x0 = x0 * tl.load(scale_ptr + ch, mask=cmask, other=1.0)
            if HAS_BIAS:
                x0 = x0 + tl.load(bias_ptr + ch, mask=cmask, other=0.0)
        if WRITE_X0:
            tl.store(x0_out_ptr + offs, x0.to(x0_out_ptr.dtype.element_ty), mask=mask)
        if WRITE_XT:
            a = tl.load(alpha_ptr + rows, mask=rmask, other=0.0)
            s = tl.load(sigma_ptr + rows, mask=rmask, other=0.0)
            if HAS_NOISE:
                eps = tl.load(noise_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            else:
                eps = tl.randn(seed, offs)
            tl.store(xt_ptr + offs, (a[:, None] * x0 + s[:, None] * eps).to(xt_ptr.dtype.element_ty), mask=mask)


def _seed(seed) -> int:
    """Python int in [0, 2**63); None draws one from torch's default (CPU) generator, so torch.manual_seed
    makes unseeded calls reproducible without any device synchronisation."""
    if seed is None:
        return int(torch.randint(0, 2**62, (1,)).item())
    return int(seed) % (1 << 63)


def _channel_vector(v, x: torch.Tensor, name: str):
    """(vector fp32, INNER, NCH) for a per-channel (dimension 1) scale or bias; a scalar broadcasts."""
    if v is None:
        return None
    v = device_tensor(v, torch.float32, x.device).detach().reshape(-1).contiguous()
    if v.numel() == 1:
        return v
    if x.ndim < 2 or v.numel() != x.shape[1]:
        raise ValueError(f"{name} must be a scalar or hold one value per channel (dimension 1 of "
                         f"{tuple(x.shape)}), got {v.numel()} values")
    return v


def _launch(x0, *, out_xt=None, out_x0=None, noise=None, alpha=None, sigma=None, std=None, z=None, scale=None,
            bias=None, seed=0, mode=_MODE_NOISE):
    ref = x0 if x0 is not None else out_xt
    B = ref.shape[0] if ref.ndim else 1
    N = ref.numel() // max(B, 1)
    if ref.numel() == 0:
        return
    counts = {v.numel() for v in (scale, bias) if v is not None and v.numel() > 1}
    if len(counts) > 1:
        raise ValueError("latent scale and bias must have the same number of channels")
    nch = counts.pop() if counts else 1
    inner = N // nch
    if nch > 1:  # a scalar next to a per-channel vector: broadcast it
        scale = None if scale is None else scale.expand(nch).contiguous()
        bias = None if bias is None else bias.expand(nch).contiguous()
    lay = tc.layout(B, N)
    # in a backward under torch.func every tensor, fresh buffers too, is wrapped; the kernel needs raw storage
    tensors = [tc.plain(ref if t is None else t) for t in (x0, noise, alpha, sigma, std, z, scale, bias, out_xt,
                                                           out_x0)]
    with tc.device_guard(ref), tc.outside_transforms():
        _noise_kernel[lay.grid](
            *tensors, seed, B, N, inner, nch, MODE=mode, HAS_NOISE=noise is not None, LATENT=std is not None,
            HAS_Z=z is not None, HAS_SCALE=scale is not None, HAS_BIAS=bias is not None,
            WRITE_XT=out_xt is not None, WRITE_X0=out_x0 is not None, R=lay.R, BLOCK=lay.BLOCK,
            num_warps=tc.num_warps(lay))


def _same_shape(x0, name, t):
    if t is None:
        return None
    if t.shape != x0.shape:
        raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {tuple(x0.shape)}")
    return t.contiguous()


def _row_sums(t: torch.Tensor) -> torch.Tensor:
    """(B,) sums over all but dimension 0 (also for B = 0)."""
    return t.flatten(1).sum(1) if t.ndim > 1 else t


def _per_sample_grad(values: torch.Tensor, g_xt: torch.Tensor, like):
    """d loss / d (alpha or sigma) = sum_j values_ij * g_ij per sample, in fp32, shaped, typed and placed like the
    argument (`like`, from _grad_like); an argument that held one value for the whole batch gets the batch's sum."""
    shape, dtype, device = like
    per = _row_sums(values.float() * g_xt.float())
    return (per.sum() if math.prod(shape) == 1 else per).reshape(shape).to(device=device, dtype=dtype)


def _grad_like(v):
    """(shape, dtype, device) of a per-sample or per-channel argument that is a tensor, for its gradient; None for a
    number. The device too: a CPU alpha next to a CUDA x0 is moved for the kernel, and autograd refuses a (B,)
    gradient on another device than its input."""
    return (tuple(v.shape), v.dtype, v.device) if isinstance(v, torch.Tensor) else None


def _kernel_vectors(x0, alpha, sigma, scale, bias):
    """The fp32 vectors the kernel reads, built once per call (a number takes a fill, an expand and a copy): alpha and
    sigma per sample (B,), the latent scale and bias per channel (None when not given). Detached: the gradients go
    to the arguments themselves, which _AddNoise takes next to these."""
    B = x0.shape[0]
    return (tc.per_sample_vector(alpha, B, x0.device, "alpha"), tc.per_sample_vector(sigma, B, x0.device, "sigma"),
            _channel_vector(scale, x0, "latent_scale"), _channel_vector(bias, x0, "latent_bias"))


class _AddNoise(torch.autograd.Function):
    """x_t, or (x_t, clean sample) when return_x0. setup_context style, so torch.func.grad / vjp can run it. The
    backward regenerates what the forward did not store: eps from the seed (for sigma's gradient), z from the seed
    (for std's), and the clean sample of the latent path in fp32 (for alpha's; before scale and bias, for
    scale's), exactly as the forward computed them.

    alpha, sigma, scale and bias come twice: as given (inputs 2, 3, 7, 8: what autograd differentiates, and the
    shapes of their gradients) and as the vectors the kernel reads (inputs 10 to 13, from _kernel_vectors: built
    once by the caller, used by the forward and saved for the backward)."""

    @staticmethod
    def forward(x0, noise, alpha, sigma, seed, std, z, scale, bias, return_x0, a, s, scale_v, bias_v):
        x0c = x0.contiguous()
        noise_c = _same_shape(x0, "noise", noise)
        std_c, z_c = _same_shape(x0, "latent_std", std), _same_shape(x0, "latent_noise", z)
        x_t = torch.empty_like(x0c)
        x0_out = torch.empty_like(x0c) if return_x0 else None
        _launch(x0c, out_xt=x_t, out_x0=x0_out, noise=noise_c, alpha=a, sigma=s, std=std_c, z=z_c, scale=scale_v,
                bias=bias_v, seed=seed)
        if return_x0:
            return x_t, x0_out
        return x_t

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.set_materialize_grads(False)  # an unused output (x_t or the clean sample) gets None, not zeros
        x0, noise, alpha, sigma, seed, std, z, scale, bias, _, a, s, scale_v, bias_v = inputs
        ctx.seed = seed
        ctx.dtypes = tuple(None if t is None else t.dtype for t in (x0, noise, std, z))
        ctx.alpha_like, ctx.sigma_like = _grad_like(alpha), _grad_like(sigma)
        ctx.scale_like, ctx.bias_like = _grad_like(scale), _grad_like(bias)
        ctx.has_noise = noise is not None
        # full-size inputs are kept only for the gradients that read them: the sampled latent (alpha's, scale's),
        # z for std's (regenerated when drawn), std for z's
        needs = ctx.needs_input_grad
        for_sample = needs[2] or needs[7]
        for_sigma = needs[3] and noise is not None
        ctx.save_for_backward(
            a, s, scale_v, bias_v, x0 if for_sample else None, std if (for_sample or needs[6]) else None,
            z if (for_sample or needs[5]) else None, noise if for_sigma else None)

    @staticmethod
    def backward(ctx, g_xt, g_x0=None):
        if g_xt is None and g_x0 is None:  # no gradient reached either output
            return (None,) * 14
        a, s, scale_v, bias_v, x0, std, z, noise = ctx.saved_tensors
        needs = ctx.needs_input_grad
        shape = g_xt.shape if g_xt is not None else g_x0.shape
        view = (shape[0],) + (1,) * (len(shape) - 1)
        grad_noise = grad_alpha = grad_sigma = None
        latent = _LatentGrads()
        if needs[0] or any(needs[5:9]):
            latent = _latent_grads(ctx, _clean_sample_grad(g_xt, g_x0, a.view(view)), x0, std, z, scale_v)
        if needs[1] and g_xt is not None:
            grad_noise = (g_xt.float() * s.view(view)).to(ctx.dtypes[1])
        if needs[2] and g_xt is not None:
            clean = _clean_sample_fp32(x0, std, z, scale_v, bias_v, ctx.seed)
            grad_alpha = _per_sample_grad(clean, g_xt, ctx.alpha_like)
        if needs[3] and g_xt is not None:
            eps = noise if ctx.has_noise else regenerate_noise(shape, ctx.seed, device=g_xt.device)
            grad_sigma = _per_sample_grad(eps, g_xt, ctx.sigma_like)
        return (latent.mean, grad_noise, grad_alpha, grad_sigma, None, latent.std, latent.z, latent.scale,
                latent.bias, None, None, None, None, None)

    vmap = refuse_vmap("add_noise (impl='triton')")


@dataclass
class _LatentGrads:
    """Gradients of the inputs of the clean sample (x0 + std * z) * scale + bias; None where not asked for."""

    mean: torch.Tensor | None = None
    std: torch.Tensor | None = None
    z: torch.Tensor | None = None
    scale: torch.Tensor | None = None
    bias: torch.Tensor | None = None


def _clean_sample_grad(g_xt, g_x0, a_view) -> torch.Tensor:
    """fp32 gradient reaching the clean sample: alpha_i * g through x_t, plus g of the returned clean sample (one of
    the two may be None, not both)."""
    g = None if g_xt is None else g_xt.float() * a_view
    if g_x0 is not None:
        g = g_x0.float() if g is None else g + g_x0.float()
    return g


def _latent_grads(ctx, g_clean, x0, std, z, scale_v) -> _LatentGrads:
    """The latent path's gradients from the clean sample's, in fp32, each cast to its argument's dtype: through
    the per-channel scale to x0 (the mean), std (times z) and a given z (times std); scale's and bias's summed
    per channel (scale's against the regenerated sample before the affine map)."""
    needs, (x0_dtype, _, std_dtype, z_dtype) = ctx.needs_input_grad, ctx.dtypes
    out = _LatentGrads()
    g_pre = g_clean if scale_v is None else g_clean * _channel_view(scale_v, g_clean.ndim)
    if needs[0]:
        out.mean = g_pre.to(x0_dtype)
    if needs[5]:
        if z is None:  # drawn in the forward: regenerated bit-identical (and reused for scale's gradient)
            z = regenerate_noise(g_clean.shape, ctx.seed, stream="latent", device=g_clean.device)
        out.std = (g_pre * z.float()).to(std_dtype)
    if needs[6]:
        out.z = (g_pre * std.float()).to(z_dtype)
    if needs[7]:
        pre_affine = _clean_sample_fp32(x0, std, z, None, None, ctx.seed)
        out.scale = _channel_grad(g_clean * pre_affine, ctx.scale_like)
    if needs[8]:
        out.bias = _channel_grad(g_clean, ctx.bias_like)
    return out


def _channel_view(v: torch.Tensor, ndim: int) -> torch.Tensor:
    """A per-channel vector viewed to broadcast along dimension 1 of an ndim tensor; a scalar as it is."""
    return v.view((1, -1) + (1,) * (ndim - 2)) if v.numel() > 1 else v


def _channel_grad(terms: torch.Tensor, like) -> torch.Tensor:
    """d loss / d (latent scale or bias) from its per-element fp32 terms: summed over all but the channel dimension
    (over everything for a scalar), shaped, typed and placed like the argument (`like`, from _grad_like)."""
    shape, dtype, device = like
    total = terms.sum() if math.prod(shape) == 1 else terms.sum(dim=[d for d in range(terms.ndim) if d != 1])
    return total.reshape(shape).to(device=device, dtype=dtype)


def _clean_sample_fp32(x0, std, z, scale_v, bias_v, seed):
    """The clean sample the forward noised, in fp32 as the kernel held it: x0 itself, or the latent path's
    (x0 + std * z) * scale + bias with z regenerated from the seed when it was not given."""
    if std is None and scale_v is None and bias_v is None:
        return x0.float()
    x0c = x0.contiguous()
    out = torch.empty(x0c.shape, dtype=torch.float32, device=x0c.device)
    _launch(x0c, out_x0=out, std=_same_shape(x0, "latent_std", std), z=_same_shape(x0, "latent_noise", z),
            scale=scale_v, bias=bias_v, seed=seed)
    return out


def add_noise(x0, alpha, sigma, noise=None, seed=None, *, latent_std=None, latent_noise=None, latent_scale=None,
              latent_bias=None, return_x0=False):
    """x_t = alpha_i * x0 + sigma_i * eps, fp32 arithmetic, returned in x0's dtype.

    alpha, sigma: python floats, 0-d or (B,) tensors. eps: `noise` when given, else tl.randn(seed, flat index)
    (seed None: one drawn from torch's default generator). Latent path (latent_std given): x0 is the posterior
    mean and the clean sample is (x0 + latent_std * z) * latent_scale_c + latent_bias_c, z = latent_noise or the
    seed's latent stream; latent_scale / latent_bias alone apply just the per-channel affine map. With
    return_x0=True returns (x_t, clean sample), both written by the same pass."""
    check_batched(x0, "x0", "add_noise")
    if latent_noise is not None and latent_std is None:
        raise ValueError("latent_noise needs latent_std (the latent sampling path)")
    seed = _seed(seed) if (noise is None or (latent_std is not None and latent_noise is None)) else 0
    vectors = _kernel_vectors(x0, alpha, sigma, latent_scale, latent_bias)
    return _AddNoise.apply(x0, noise, alpha, sigma, seed, latent_std, latent_noise, latent_scale, latent_bias,
                           bool(return_x0), *vectors)


def sample_latents(mean, std=None, seed=None, z=None, scale=None, bias=None):
    """The clean sample of the latent path alone: (mean + std * z) * scale_c + bias_c in fp32, mean's dtype.
    With the same seed it equals the x0 that add_noise(..., latent_std=std, seed=seed) noised."""
    if z is not None and std is None:
        raise ValueError("z needs std")
    seed = _seed(seed) if (std is not None and z is None) else 0
    mean_c = mean.contiguous()
    out = torch.empty_like(mean_c)
    _launch(mean_c, out_x0=out, std=_same_shape(mean, "std", std), z=_same_shape(mean, "z", z),
            scale=_channel_vector(scale, mean, "scale"), bias=_channel_vector(bias, mean, "bias"), seed=seed)
    return out


def regenerate_noise(shape, seed, stream="eps", device=None, dtype=torch.float32):
    """The noise add_noise drew for `seed` on a tensor of this shape (stream "eps"), or the latent z
    (stream "latent"), bit-identical on a given device. Same kernel, a mode that stores the draw."""
    if stream not in STREAMS:
        raise ValueError(f"stream must be one of {sorted(STREAMS)}, got {stream!r}")
    shape = tuple(int(d) for d in (shape if isinstance(shape, (tuple, list, torch.Size)) else (shape,)))
    out = torch.empty(shape if shape else (1,), dtype=dtype, device=device)
    if out.ndim == 1:
        out = out.view(1, -1) if out.numel() else out
    if math.prod(shape) > 0:
        _launch(None, out_xt=out, seed=_seed(seed), mode=STREAMS[stream])
    return out.reshape(shape)


__all__ = ["add_noise", "regenerate_noise", "sample_latents", "LATENT_STREAM_OFFSET", "STREAMS"]
