"""Fused Triton losses: denoising_loss, dmd_loss, ratio_generator_loss, ratio_classifier_loss.

Each loss is a Triton kernel (or a short chain of them) plus a torch.autograd.Function, with the same
signature and semantics as its eager reference in kernels/reference.py. As in Liger-Kernel, the forward
writes the gradient w.r.t. the trained input in the same pass that computes the loss; the backward only
rescales it by grad_output (and returns it untouched when grad_output is 1 on CPU; on CUDA that check would
cost a host sync, dearer than the rescale, see triton_common.is_one). All arithmetic is fp32 whatever the
input dtype; gradients come back in the input's dtype. The forward writes the gradient in the input dtype, fp32
for fp16 inputs (fused_backward.saved_grad_dtype); the backward scales it in fp32 and rounds once.

Autograd: only the main inputs get gradients (F, x_t, x0; x; logits_gen, logits_real); the other tensors are
constants, detached before the Function, so a loss whose only inputs that require grad are constants does not
require grad (a Function applied directly to such inputs returns None gradients). Differentiable once: with
create_graph=True the gradients carry a node that raises when differentiated (fused_backward.first_order_only).
The Functions are in setup_context style, so torch.func.grad and torch.func.vjp run them: the forward returns the
loss and the gradient it wrote (non-differentiable, dropped by the wrappers), and takes `write_grad` from the
wrapper (fused_backward.needs_grad) since it has no ctx to ask. torch.func.vmap raises (refuse_vmap).
A loss over no elements is 0 (reference.mean_or_zero).

Passes (see triton_common for the tiling):
- denoising_loss: one pass (EDM combine, squared error, gradient); rows longer than one chunk add a tiny
  per-row reduction of the fp32 partials.
- dmd_loss / ratio_generator_loss: a whole row per program (small samples) is one pass. Long rows take
  three: (1) per-chunk partial sums of |p_real| (resp. |logit_grad|) for the per-sample normaliser,
  (2) gradient written, per-chunk partial sums of g^2 and non-finite flags, (3) rows with a non-finite
  element get their gradient zeroed (stores only for those rows) and the per-row g^2 sums are reduced.
  Without normalisation pass 1 is skipped.
- ratio_classifier_loss: a single program looping over the batch (logits are one value per sample).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import triton_common as tc
from .fused_backward import first_order_only, needs_grad, prepare_context, refuse_vmap, saved_grad_dtype
from .reference import DIVERGENCES

_DIV_CODE = {name: i for i, name in enumerate(DIVERGENCES)}  # rkl 0, dijs 1, fkl 2, hellinger 3


def _flat_rows(t: torch.Tensor, B: int, name: str) -> torch.Tensor:
    return tc.rows_view(t, B, name)


def _check_same_numel(ref: torch.Tensor, name_ref: str, **others):
    for name, t in others.items():
        if t.shape != ref.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {name_ref}'s {tuple(ref.shape)}")


def _constant(v):
    """A tensor detached (no gradient flows into it), anything else as it is."""
    return v.detach() if isinstance(v, torch.Tensor) else v


def _grad_buffer(like: torch.Tensor) -> torch.Tensor:
    """Where the forward writes the gradient for the backward: like's dtype, fp32 for fp16 (saved_grad_dtype)."""
    return torch.empty(like.shape, dtype=saved_grad_dtype(like.dtype), device=like.device)


# ----------------------------------------------------------------------------------------------------------
# denoising_loss
# ----------------------------------------------------------------------------------------------------------


@triton.jit
def _edm_coefficients(s, sigma_data):
    sd2 = sigma_data * sigma_data
    denom = s * s + sd2
    c_skip = sd2 / denom
    c_out = s * sigma_data / tl.sqrt(denom)
    lam = denom / ((s * sigma_data) * (s * sigma_data))
    return c_skip, c_out, lam


@triton.jit
def _denoising_kernel(f_ptr, xt_ptr, x0_ptr, sigma_ptr, grad_ptr, part_ptr, loss_ptr, B, N, C, sigma_data,
                      WRITE_GRAD: tl.constexpr, SINGLE: tl.constexpr, R: tl.constexpr, BLOCK: tl.constexpr):
    rows, rmask, mask, offs = tc.tile_offsets(B, N, R, BLOCK)
    s = tl.load(sigma_ptr + rows, mask=rmask, other=1.0)
    c_skip, c_out, lam = _edm_coefficients(s, sigma_data)
    f = tl.load(f_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    xt = tl.load(xt_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    x0 = tl.load(x0_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    err = c_skip[:, None] * xt + c_out[:, None] * f - x0
    sq = tl.sum(tl.where(mask, err * err, 0.0), axis=1)
    if SINGLE:
        tl.store(loss_ptr + rows, lam * sq / N, mask=rmask)
    else:
        tl.store(part_ptr + rows * C + tl.program_id(1), sq, mask=rmask)
    if WRITE_GRAD:
        k = 2.0 * lam * c_out / N  # d loss_i / d F = lambda_i * 2 * c_out_i * (D - x0) / N
        tl.store(grad_ptr + offs, (k[:, None] * err).to(grad_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _denoising_reduce_kernel(part_ptr, sigma_ptr, loss_ptr, B, N, C, sigma_data, R: tl.constexpr,
                             PBLOCK: tl.constexpr):
    rows = tl.program_id(0) * R + tl.arange(0, R)
    rmask = rows < B
    s = tl.load(sigma_ptr + rows, mask=rmask, other=1.0)
    _, _, lam = _edm_coefficients(s, sigma_data)
    total = tc.row_total(part_ptr, rows, rmask, C, R, PBLOCK)
    tl.store(loss_ptr + rows, lam * total / N, mask=rmask)


def denoising_forward(F, x_t, x0, sigma, sigma_data, write_grad=True):
    """(per-sample loss (B,) fp32, d loss_i / d F in saved_grad_dtype(F.dtype) or None)."""
    B = F.shape[0]
    F = _flat_rows(F, B, "F")
    _check_same_numel(F, "F", x_t=x_t, x0=x0)
    x_t, x0 = _flat_rows(x_t, B, "x_t"), _flat_rows(x0, B, "x0")
    s = tc.per_sample_vector(sigma, B, F.device, "sigma")
    N = F.numel() // max(B, 1)
    grad = _grad_buffer(F) if write_grad else None
    if B == 0 or N == 0:  # nothing to reduce; torch's mean over no elements is NaN
        return torch.full((B,), float("nan"), dtype=torch.float32, device=F.device), grad
    loss = torch.empty(B, dtype=torch.float32, device=F.device)
    lay = tc.layout(B, N)
    part = loss if lay.single else torch.empty(B, lay.C, dtype=torch.float32, device=F.device)
    with tc.device_guard(F):
        _denoising_kernel[lay.grid](F, x_t, x0, s, F if grad is None else grad, part, loss, B, N, lay.C,
                                    float(sigma_data), WRITE_GRAD=write_grad, SINGLE=lay.single, R=lay.R,
                                    BLOCK=lay.BLOCK, num_warps=tc.num_warps(lay))
        if not lay.single:
            _denoising_reduce_kernel[(B,)](part, s, loss, B, N, lay.C, float(sigma_data), R=1,
                                           PBLOCK=lay.PBLOCK)
    return loss, grad


class DenoisingLoss(torch.autograd.Function):
    """(per-sample loss, gradient w.r.t. F or None when write_grad is False). Gradients w.r.t. x_t and x0, when
    asked for, follow from the one w.r.t. F: d/dx_t = (c_skip / c_out) d/dF and d/dx0 = -(1 / c_out) d/dF, per
    sample. setup_context style (the gradient is an output, marked non-differentiable), so torch.func.grad and
    torch.func.vjp can run it."""

    @staticmethod
    def forward(F, x_t, x0, sigma, sigma_data, write_grad):
        return denoising_forward(F, x_t, x0, sigma, sigma_data, write_grad=write_grad)

    @staticmethod
    def setup_context(ctx, inputs, output):
        prepare_context(ctx, inputs)
        F, x_t, x0, sigma, sigma_data, _ = inputs
        grad = output[1]
        ctx.sigma_data = float(sigma_data)
        ctx.shapes = (F.shape, F.dtype, x_t.dtype, x0.dtype)
        if grad is not None:
            ctx.mark_non_differentiable(grad)
            ctx.save_for_backward(grad, tc.per_sample_vector(sigma, F.shape[0], F.device, "sigma"))

    @staticmethod
    def backward(ctx, grad_output, _grad_of_grad):
        # only constants (sigma) required grad, or the loss got no gradient: nothing to return
        if grad_output is None or not ctx.saved_tensors:
            return None, None, None, None, None, None
        grad, s = ctx.saved_tensors
        shape, f_dtype, xt_dtype, x0_dtype = ctx.shapes
        go = grad_output.reshape(-1)
        g_f = tc.scale_grad(grad, go, f_dtype).view(shape) if ctx.needs_input_grad[0] else None
        g_xt = g_x0 = None
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            # from the fp32 gradient w.r.t. F, each rounded once to its input's dtype
            g32 = tc.scale_grad(grad, go, torch.float32).view(shape)
            per_row = (-1,) + (1,) * (len(shape) - 1)  # (not reshape(B, -1): B may be 0)
            sd = ctx.sigma_data
            c_out = s * sd / (s * s + sd * sd).sqrt()
            if ctx.needs_input_grad[1]:
                c_skip = sd * sd / (s * s + sd * sd)
                g_xt = (g32 * (c_skip / c_out).view(per_row)).to(xt_dtype)
            if ctx.needs_input_grad[2]:
                g_x0 = (g32 * (-1.0 / c_out).view(per_row)).to(x0_dtype)
        return first_order_only((g_f, g_xt, g_x0, None, None, None), "denoising_loss (impl='triton')", ctx)

    vmap = refuse_vmap("denoising_loss (impl='triton')")


def denoising_loss(F, x_t, x0, sigma, sigma_data):
    """Per-sample EDM loss lambda(sigma_i) * mean_elements (c_skip x_t + c_out F - x0)^2, shape (B,), fp32."""
    loss, _ = DenoisingLoss.apply(F, x_t, x0, _constant(sigma), sigma_data, needs_grad(F, x_t, x0))
    return loss


# ----------------------------------------------------------------------------------------------------------
# Surrogate losses: dmd_loss and ratio_generator_loss
# ----------------------------------------------------------------------------------------------------------


@triton.jit
def _dmd_kernel(x_ptr, rh_ptr, fh_ptr, g_ptr, abs_ptr, sq_ptr, bad_ptr, rowsq_ptr, B, N, C, inv_numel, eps,
                WRITE_GRAD: tl.constexpr, SINGLE: tl.constexpr, R: tl.constexpr, BLOCK: tl.constexpr,
                PBLOCK: tl.constexpr):
    rows, rmask, mask, offs = tc.tile_offsets(B, N, R, BLOCK)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    rh = tl.load(rh_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    fh = tl.load(fh_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    p_real = x - rh
    diff = p_real - (x - fh)
    if SINGLE:
        total = tl.sum(tl.abs(p_real), axis=1)
    else:
        total = tc.row_total(abs_ptr, rows, rmask, C, R, PBLOCK)
    norm = total / N + eps
    g = diff / norm[:, None]
    tc.emit_surrogate_grad(g, g_ptr, rows, rmask, mask, offs, C, sq_ptr, bad_ptr, rowsq_ptr, inv_numel,
                           WRITE_GRAD, SINGLE)


@triton.jit
def _ratio_kernel(lg_ptr, logit_ptr, w_ptr, g_ptr, abs_ptr, sq_ptr, bad_ptr, rowsq_ptr, B, N, C, inv_numel, eps,
                  clamp, DIV: tl.constexpr, HAS_W: tl.constexpr, NORMALIZE: tl.constexpr,
                  WRITE_GRAD: tl.constexpr, SINGLE: tl.constexpr, R: tl.constexpr, BLOCK: tl.constexpr,
                  PBLOCK: tl.constexpr):
    rows, rmask, mask, offs = tc.tile_offsets(B, N, R, BLOCK)
    grad = tl.load(lg_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    l = tl.load(logit_ptr + rows, mask=rmask, other=0.0).to(tl.float32)
    l = tl.minimum(tl.maximum(l, -clamp, propagate_nan=tl.PropagateNan.ALL), clamp,
                   propagate_nan=tl.PropagateNan.ALL)
    # h(r) = f''(r) r^2 at r = exp(-l)
    if DIV == 0:  # reverse KL
        coef = tl.full([R], 1.0, tl.float32)
    elif DIV == 1:  # DiJS: r / (1 + r) = sigmoid(-l)
        coef = 1.0 / (1.0 + tl.exp(l))
    elif DIV == 2:  # forward KL: r
        coef = tl.exp(-l)
    else:  # squared Hellinger: sqrt(r) / 2
        coef = 0.5 * tl.exp(-0.5 * l)
    if HAS_W:
        coef = coef * tl.load(w_ptr + rows, mask=rmask, other=0.0)
    if NORMALIZE:
        if SINGLE:
            total = tl.sum(tl.abs(grad), axis=1)
        else:
            total = tc.row_total(abs_ptr, rows, rmask, C, R, PBLOCK)
        coef = coef / (total / N + eps)
    g = coef[:, None] * grad
    tc.emit_surrogate_grad(g, g_ptr, rows, rmask, mask, offs, C, sq_ptr, bad_ptr, rowsq_ptr, inv_numel,
                           WRITE_GRAD, SINGLE)


def _surrogate(launch, x, pass1_a, pass1_b, write_grad):
    """Runs a surrogate-loss kernel over the rows of `x`; pass 1 (normaliser partials of |a - b|, or |a| when b
    is None) runs first when rows span several chunks and a is given. Returns (loss, grad or None)."""
    B = x.shape[0]
    N = x.numel() // max(B, 1)
    dev = x.device
    grad = _grad_buffer(x) if write_grad else None
    if x.numel() == 0:  # a loss over no elements is 0 (reference.mean_or_zero says why)
        return torch.zeros((), dtype=torch.float32, device=dev), grad
    lay = tc.layout(B, N)
    rowsq = torch.empty(B, dtype=torch.float32, device=dev)
    if lay.single:
        abs_p = sq_p = bad_p = rowsq
    else:
        abs_p, sq_p, bad_p = (torch.empty(B, lay.C, dtype=torch.float32, device=dev) for _ in range(3))
    g_arg = x if grad is None else grad
    with tc.device_guard(x):
        if not lay.single and pass1_a is not None:
            tc.abs_partials_kernel[lay.grid](pass1_a, pass1_a if pass1_b is None else pass1_b, abs_p, B, N, lay.C,
                                             HAS_B=pass1_b is not None, R=lay.R, BLOCK=lay.BLOCK,
                                             num_warps=tc.num_warps(lay))
        launch(lay, g_arg, abs_p, sq_p, bad_p, rowsq, 1.0 / x.numel())
        if not lay.single:
            tc.finalize_kernel[lay.grid](g_arg, sq_p, bad_p, rowsq, B, N, lay.C, WRITE_GRAD=write_grad, R=lay.R,
                                         BLOCK=lay.BLOCK, PBLOCK=lay.PBLOCK, num_warps=tc.num_warps(lay))
    loss = rowsq.sum() * (0.5 / x.numel())
    return loss, grad


def dmd_forward(x, x_real_hat, x_fake_hat, eps=1e-8, write_grad=True):
    """(scalar 0.5 * mean(g^2), gradient g / numel(x) in saved_grad_dtype(x.dtype) or None); design.md 4.2."""
    B = x.shape[0]
    _check_same_numel(x, "x", x_real_hat=x_real_hat, x_fake_hat=x_fake_hat)
    x = _flat_rows(x, B, "x")
    rh, fh = _flat_rows(x_real_hat, B, "x_real_hat"), _flat_rows(x_fake_hat, B, "x_fake_hat")

    def launch(lay, g, abs_p, sq_p, bad_p, rowsq, inv_numel):
        _dmd_kernel[lay.grid](x, rh, fh, g, abs_p, sq_p, bad_p, rowsq, B, lay.N, lay.C, inv_numel, eps,
                              WRITE_GRAD=write_grad, SINGLE=lay.single, R=lay.R, BLOCK=lay.BLOCK, PBLOCK=lay.PBLOCK,
                              num_warps=tc.num_warps(lay))

    return _surrogate(launch, x, x, rh, write_grad)


def ratio_generator_forward(x, logit_grad, logits, weight=None, divergence="rkl", normalize=True, clamp=10.0,
                            eps=1e-8, write_grad=True):
    """(scalar surrogate, gradient g / numel(x) in saved_grad_dtype(x.dtype) or None); design.md 4.1(b)."""
    if divergence not in _DIV_CODE:
        raise ValueError(f"unknown divergence {divergence!r}; expected one of {DIVERGENCES}")
    B = x.shape[0]
    _check_same_numel(x, "x", logit_grad=logit_grad)
    x = _flat_rows(x, B, "x")
    lg = _flat_rows(logit_grad, B, "logit_grad")
    lo = tc.per_sample_vector(logits, B, x.device, "logits")
    w = None if weight is None else tc.per_sample_vector(weight, B, x.device, "weight")

    def launch(lay, g, abs_p, sq_p, bad_p, rowsq, inv_numel):
        _ratio_kernel[lay.grid](lg, lo, lo if w is None else w, g, abs_p, sq_p, bad_p, rowsq, B, lay.N, lay.C,
                                inv_numel, eps, float(clamp), DIV=_DIV_CODE[divergence], HAS_W=w is not None,
                                NORMALIZE=bool(normalize), WRITE_GRAD=write_grad, SINGLE=lay.single, R=lay.R,
                                BLOCK=lay.BLOCK, PBLOCK=lay.PBLOCK, num_warps=tc.num_warps(lay))

    return _surrogate(launch, x, lg if normalize else None, None, write_grad)


def _surrogate_setup(ctx, inputs, output, what):
    prepare_context(ctx, inputs)
    x, grad = inputs[0], output[1]
    ctx.n_other, ctx.x_dtype, ctx.what = len(inputs) - 1, x.dtype, what
    if grad is not None:
        ctx.mark_non_differentiable(grad)
        ctx.save_for_backward(grad)


class _SurrogateLoss(torch.autograd.Function):
    """(scalar loss, gradient w.r.t. x (argument 0) or None); the last argument says whether to write the
    gradient. Shared backward: the saved gradient rescaled by grad_output."""

    @staticmethod
    def backward(ctx, grad_output, _grad_of_grad):
        if grad_output is None or not ctx.saved_tensors:  # no gradient reached the loss, or only constants ask
            return (None,) * (1 + ctx.n_other)
        (grad,) = ctx.saved_tensors
        g = tc.scale_grad(grad, grad_output, ctx.x_dtype)
        return first_order_only((g,) + (None,) * ctx.n_other, ctx.what, ctx)


class DMDLoss(_SurrogateLoss):
    vmap = refuse_vmap("dmd_loss (impl='triton')")

    @staticmethod
    def forward(x, x_real_hat, x_fake_hat, write_grad):
        loss, grad = dmd_forward(x, x_real_hat, x_fake_hat, write_grad=write_grad)
        return loss, None if grad is None else grad.view(x.shape)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _surrogate_setup(ctx, inputs, output, "dmd_loss (impl='triton')")


class RatioGeneratorLoss(_SurrogateLoss):
    vmap = refuse_vmap("ratio_generator_loss (impl='triton')")

    @staticmethod
    def forward(x, logit_grad, logits, weight, divergence, normalize, clamp, write_grad):
        loss, grad = ratio_generator_forward(x, logit_grad, logits, weight, divergence, normalize, clamp,
                                             write_grad=write_grad)
        return loss, None if grad is None else grad.view(x.shape)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _surrogate_setup(ctx, inputs, output, "ratio_generator_loss (impl='triton')")


def dmd_loss(x, x_real_hat, x_fake_hat):
    """Scalar 0.5 * mean((x - sg(x - g))^2) with g = (p_real - p_fake) / (mean|p_real| + 1e-8) per sample in
    fp32; rows with a non-finite g get g = 0. Only x receives a gradient (g / numel(x))."""
    loss, _ = DMDLoss.apply(x, _constant(x_real_hat), _constant(x_fake_hat), needs_grad(x))
    return loss


def ratio_generator_loss(x, logit_grad, logits, weight=None, divergence="rkl", normalize=True, clamp=10.0):
    """Scalar surrogate whose gradient w.r.t. x is g / numel(x), g_i = w_i h(exp(-l_i)) logit_grad_i /
    (mean|logit_grad_i| + 1e-8) in fp32 (normaliser dropped when normalize=False); non-finite rows get 0."""
    loss, _ = RatioGeneratorLoss.apply(x, _constant(logit_grad), _constant(logits), _constant(weight), divergence,
                                       normalize, clamp, needs_grad(x))
    return loss


# ----------------------------------------------------------------------------------------------------------
# ratio_classifier_loss
# ----------------------------------------------------------------------------------------------------------


@triton.jit
def _softplus(z):
    """log(1 + exp(z)) without overflow; log1p by the (1 + u) - 1 correction so tiny terms keep precision."""
    u = tl.exp(-tl.abs(z))
    one_p = 1.0 + u
    log1p = tl.where(one_p == 1.0, u, tl.log(one_p) * (u / tl.where(one_p == 1.0, 1.0, one_p - 1.0)))
    return tl.maximum(z, 0.0) + log1p


@triton.jit
def _sigmoid(z):
    e = tl.exp(-tl.abs(z))
    return tl.where(z >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


@triton.jit
def _classifier_kernel(lg_ptr, lr_ptr, w_ptr, dg_ptr, dr_ptr, loss_ptr, B, inv_B, HAS_W: tl.constexpr,
                       WRITE_GRAD: tl.constexpr, BLOCK: tl.constexpr):
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, B, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < B
        lg = tl.load(lg_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        lr = tl.load(lr_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_W:
            w = tl.load(w_ptr + offs, mask=mask, other=0.0)
        else:
            w = tl.full([BLOCK], 1.0, tl.float32)
        acc += tl.where(mask, w * (_softplus(-lg) + _softplus(lr)), 0.0)
        if WRITE_GRAD:
            # d softplus(-l)/dl = -sigmoid(-l); d softplus(l)/dl = sigmoid(l)
            tl.store(dg_ptr + offs, (-(w * inv_B) * _sigmoid(-lg)).to(dg_ptr.dtype.element_ty), mask=mask)
            tl.store(dr_ptr + offs, ((w * inv_B) * _sigmoid(lr)).to(dr_ptr.dtype.element_ty), mask=mask)
    tl.store(loss_ptr, tl.sum(acc, axis=0) * inv_B)


def ratio_classifier_forward(logits_gen, logits_real, weight=None, write_grad=True):
    """(scalar mean_i w_i (softplus(-l_gen_i) + softplus(l_real_i)), d/dl_gen, d/dl_real or Nones)."""
    if logits_gen.shape != logits_real.shape:
        raise ValueError(f"logits_gen {tuple(logits_gen.shape)} and logits_real {tuple(logits_real.shape)} "
                         "must have the same shape")
    lg, lr = logits_gen.contiguous(), logits_real.contiguous()
    B = lg.numel()
    w = None if weight is None else tc.per_sample_vector(weight, B, lg.device, "weight")
    loss = torch.empty((), dtype=torch.float32, device=lg.device)
    dg = _grad_buffer(lg) if write_grad else None
    dr = _grad_buffer(lr) if write_grad else None
    if B == 0:
        return loss.zero_(), dg, dr  # a loss over no samples is 0 (reference.mean_or_zero says why)
    block = min(tc.pow2(B), 1024 if not tc.INTERPRETED else 1 << 16)
    with tc.device_guard(lg):
        _classifier_kernel[(1,)](lg, lr, lg if w is None else w, lg if dg is None else dg, lr if dr is None else dr,
                                 loss, B, 1.0 / B, HAS_W=w is not None, WRITE_GRAD=write_grad, BLOCK=block,
                                 num_warps=4)
    return loss, dg, dr


class RatioClassifierLoss(torch.autograd.Function):
    """(scalar loss, gradient w.r.t. logits_gen, w.r.t. logits_real; both None when write_grad is False)."""

    @staticmethod
    def forward(logits_gen, logits_real, weight, write_grad):
        return ratio_classifier_forward(logits_gen, logits_real, weight, write_grad=write_grad)

    @staticmethod
    def setup_context(ctx, inputs, output):
        prepare_context(ctx, inputs)
        ctx.dtypes = (inputs[0].dtype, inputs[1].dtype)
        _, dg, dr = output
        if dg is not None:
            ctx.mark_non_differentiable(dg, dr)
            ctx.save_for_backward(dg, dr)

    @staticmethod
    def backward(ctx, grad_output, _grad_gen_of_grad, _grad_real_of_grad):
        if grad_output is None or not ctx.saved_tensors:  # no gradient reached the loss, or only the weight asks
            return None, None, None, None
        dg, dr = ctx.saved_tensors
        if not tc.is_one(grad_output):
            # one value per sample: rescaling in torch (fp32) is as cheap as a kernel launch here
            dg, dr = dg.float() * grad_output.float(), dr.float() * grad_output.float()
        grads = (dg.to(ctx.dtypes[0]) if ctx.needs_input_grad[0] else None,
                 dr.to(ctx.dtypes[1]) if ctx.needs_input_grad[1] else None, None, None)
        return first_order_only(grads, "ratio_classifier_loss (impl='triton')", ctx)

    vmap = refuse_vmap("ratio_classifier_loss (impl='triton')")


def ratio_classifier_loss(logits_gen, logits_real, weight=None):
    """Logistic loss of the ratio classifier, generated = 1, real = 0:
    mean_i w_i (softplus(-l_gen_i) + softplus(l_real_i)), fp32 scalar; gradients for both logits."""
    loss, _, _ = RatioClassifierLoss.apply(logits_gen, logits_real, _constant(weight),
                                           needs_grad(logits_gen, logits_real))
    return loss


__all__ = ["denoising_loss", "dmd_loss", "ratio_generator_loss", "ratio_classifier_loss", "DenoisingLoss",
           "DMDLoss", "RatioGeneratorLoss", "RatioClassifierLoss", "INTERPRETED"]
INTERPRETED = tc.INTERPRETED
