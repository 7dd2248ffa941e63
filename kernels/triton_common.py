"""Shared pieces of the Triton loss kernels: tiling policy, row reductions, the backward rescale.

Tiling. Every per-sample kernel sees its input as a (B, N) matrix (N = elements per sample) and runs on a
2-D grid (row tiles, column chunks). A program owns an [R, BLOCK] tile: R whole rows when a row fits in
one BLOCK (small samples such as 2-D toys: many rows per program instead of one tiny program per row), or
one BLOCK-wide chunk of a single row when rows are long (images and latents: many programs per row, so a
small batch still fills the GPU). TILE = R * BLOCK elements per program: 4096 compiled (8 warps, 16
elements per thread per operand), 16384 under the interpreter, where each program costs about a
millisecond whatever its size.

Determinism. Row reductions that span several chunks write fp32 partials to a (B, C) buffer and the
consumers re-read the whole row of partials in a fixed order: no atomics, bit-identical results run to run.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from fastonestep.tensors import device_tensor

from .fused_backward import scale_in_fp32

# Largest finite fp32: |v| <= FLT_MAX is False for NaN and +-Inf, the finiteness test used in kernels.
FLT_MAX = 3.4028234663852886e38
_MAX_GRID_Y = 65535


@triton.jit
def _probe_kernel(x_ptr):  # only used to learn whether the jit decorator produced an interpreted function
    tl.store(x_ptr, 0.0)


INTERPRETED = type(_probe_kernel).__name__ == "InterpretedFunction"
"""True when TRITON_INTERPRET=1 was set before these kernels were defined (CPU test mode)."""

# Elements per program. Tests lower it (monkeypatch) to exercise the multi-chunk and multi-row paths.
TILE = 16384 if INTERPRETED else 4096
NUM_WARPS = 8


def pow2(n: int) -> int:
    return 1 if n <= 1 else triton.next_power_of_2(int(n))


@dataclass(frozen=True)
class Layout:
    """How a (B, N) problem is cut into programs."""

    B: int
    N: int
    R: int  # rows per program (> 1 only when a whole row fits in one chunk)
    BLOCK: int  # columns per program
    C: int  # chunks per row
    PBLOCK: int  # width used to re-read a row of partials

    @property
    def grid(self):
        return (triton.cdiv(self.B, self.R), self.C)

    @property
    def single(self) -> bool:
        """One chunk per row: a program sees whole rows and can finish row reductions itself."""
        return self.C == 1


def layout(B: int, N: int) -> Layout:
    tile = int(TILE)
    block = min(pow2(N), tile)
    chunks = triton.cdiv(N, block)
    if chunks > _MAX_GRID_Y:  # grid dimension 1 is limited to 65535 on CUDA
        block = pow2(triton.cdiv(N, _MAX_GRID_Y))
        chunks = triton.cdiv(N, block)
    rows = max(1, min(tile // block, pow2(B))) if chunks == 1 else 1
    return Layout(B=B, N=N, R=rows, BLOCK=block, C=chunks, PBLOCK=min(pow2(chunks), 1024))


def num_warps(lay: Layout) -> int:
    """8 warps for a full 4096-element tile (16 elements per thread per operand), fewer for small tiles."""
    return max(1, min(NUM_WARPS, lay.R * lay.BLOCK // 512))


def device_guard(t: torch.Tensor):
    """Launch on the tensor's GPU, not on whatever device happens to be current."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def rows_view(t: torch.Tensor, B: int, name: str) -> torch.Tensor:
    """A contiguous tensor with B rows (any trailing shape); checks the batch dimension."""
    if t.ndim == 0 or t.shape[0] != B:
        raise ValueError(f"{name} must have batch size {B} in dimension 0, got shape {tuple(t.shape)}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    return t.contiguous()


def per_sample_vector(v, B: int, device, name: str) -> torch.Tensor:
    """A python float, a 0-d tensor, a (1,) or a (B,) tensor -> contiguous fp32 (B,)."""
    v = device_tensor(v, torch.float32, device).detach()
    if v.numel() == 1:
        return v.reshape(1).expand(B).contiguous()
    if v.numel() != B:
        raise ValueError(f"{name} must be a scalar or hold one value per sample ({B}), got shape {tuple(v.shape)}")
    return v.reshape(B).contiguous()


def transformed(t) -> bool:
    """Whether `t` is wrapped by a torch.func transform (grad, vjp): a Triton kernel cannot read its storage."""
    if torch.compiler.is_compiling() or not isinstance(t, torch.Tensor):  # (traced code sees no torch.func wrappers)
        return False
    return torch._C._functorch.is_functorch_wrapped_tensor(t)


def plain(t):
    """`t` without torch.func wrappers, for a kernel that reads or writes its raw storage (nothing is
    differentiated through a launch: the fused backwards are first order only)."""
    while transformed(t):
        t = torch._C._functorch.get_unwrapped(t)
    return t


def outside_transforms():
    """A context with torch.func's transforms suspended, for a kernel launched from a backward that runs under one:
    tensors made there (the interpreter's host copies too) are then plain, not wrapped for the transform."""
    if torch.compiler.is_compiling() or not torch._C._are_functorch_transforms_active():
        return contextlib.nullcontext()
    from torch._functorch.pyfunctorch import temporarily_clear_interpreter_stack

    return temporarily_clear_interpreter_stack()


def is_one(grad_output: torch.Tensor) -> bool:
    """True when grad_output is exactly 1 everywhere and answering is free: a CPU tensor outside torch.compile.

    On CUDA the answer would cost a device-to-host sync (the CPU stalls until the queued forward finishes and
    the GPU then idles while the rest of the backward is launched), which is dearer than the rescale it saves
    (one read and write of the gradient at ~3 TB/s); so on CUDA the rescale always runs, reading grad_output
    from device memory."""
    if grad_output.device.type != "cpu" or torch.compiler.is_compiling():
        return False
    return bool((grad_output == 1).all())


# ----------------------------------------------------------------------------------------------------------
# jit helpers
# ----------------------------------------------------------------------------------------------------------


@triton.jit
def tile_offsets(B, N, R: tl.constexpr, BLOCK: tl.constexpr):
    """Row indices, row mask, element mask and int64 element offsets of this program's [R, BLOCK] tile."""
    rows = tl.program_id(0) * R + tl.arange(0, R)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    rmask = rows < B
    mask = rmask[:, None] & (cols < N)[None, :]
    offs = rows.to(tl.int64)[:, None] * N + cols[None, :]
    return rows, rmask, mask, offs


@triton.jit
def row_total(part_ptr, rows, rmask, C, R: tl.constexpr, PBLOCK: tl.constexpr):
    """Sum of the C fp32 partials of each row in `rows`, always in the same order."""
    acc = tl.zeros([R, PBLOCK], dtype=tl.float32)
    for start in range(0, C, PBLOCK):
        idx = start + tl.arange(0, PBLOCK)
        m = rmask[:, None] & (idx < C)[None, :]
        acc += tl.load(part_ptr + rows[:, None] * C + idx[None, :], mask=m, other=0.0)
    return tl.sum(acc, axis=1)


@triton.jit
def abs_partials_kernel(a_ptr, b_ptr, part_ptr, B, N, C, HAS_B: tl.constexpr, R: tl.constexpr,
                        BLOCK: tl.constexpr):
    """Pass 1 of a normalised loss: part[row, chunk] = sum over the chunk of |a - b| (or |a|), in fp32."""
    rows, rmask, mask, offs = tile_offsets(B, N, R, BLOCK)
    v = tl.load(a_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_B:
        v = v - tl.load(b_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(part_ptr + rows * C + tl.program_id(1), tl.sum(tl.abs(v), axis=1), mask=rmask)


@triton.jit
def emit_surrogate_grad(g, g_ptr, rows, rmask, mask, offs, C, sq_ptr, bad_ptr, rowsq_ptr, inv_numel,
                        WRITE_GRAD: tl.constexpr, SINGLE: tl.constexpr):
    """Common tail of the surrogate losses 0.5 * mean(g^2): per-row sum of g^2, non-finite detection, and the
    gradient g / numel written in the output dtype. With whole rows in the tile (SINGLE) a row with any
    non-finite g gets a zero gradient and contributes nothing to the loss right here; otherwise per-chunk
    partials and flags go to (B, C) buffers and finalize_kernel does it."""
    bad = tl.max(tl.where(mask & ~(tl.abs(g) <= 3.4028234663852886e38), 1.0, 0.0), axis=1)
    sq = tl.sum(tl.where(mask, g * g, 0.0), axis=1)
    if SINGLE:
        ok = bad == 0.0
        g = tl.where(ok[:, None], g, 0.0)
        tl.store(rowsq_ptr + rows, tl.where(ok, sq, 0.0), mask=rmask)
    else:
        tl.store(sq_ptr + rows * C + tl.program_id(1), sq, mask=rmask)
        tl.store(bad_ptr + rows * C + tl.program_id(1), bad, mask=rmask)
    if WRITE_GRAD:
        tl.store(g_ptr + offs, (g * inv_numel).to(g_ptr.dtype.element_ty), mask=mask)


@triton.jit
def finalize_kernel(g_ptr, sq_ptr, bad_ptr, rowsq_ptr, B, N, C, WRITE_GRAD: tl.constexpr, R: tl.constexpr,
                    BLOCK: tl.constexpr, PBLOCK: tl.constexpr):
    """Pass 3 (multi-chunk rows only): zero the gradient of rows with a non-finite element (stores happen
    only for such rows, so a clean batch costs no traffic) and reduce the per-row sum of g^2."""
    rows, rmask, mask, offs = tile_offsets(B, N, R, BLOCK)
    bad = row_total(bad_ptr, rows, rmask, C, R, PBLOCK) > 0.0
    if WRITE_GRAD:
        zeros = tl.zeros([R, BLOCK], dtype=g_ptr.dtype.element_ty)
        tl.store(g_ptr + offs, zeros, mask=mask & bad[:, None])
    if tl.program_id(1) == 0:
        sq = row_total(sq_ptr, rows, rmask, C, R, PBLOCK)
        tl.store(rowsq_ptr + rows, tl.where(bad, 0.0, sq), mask=rmask)


@triton.jit
def scale_kernel(g_ptr, go_ptr, out_ptr, B, N, PER_ROW: tl.constexpr, R: tl.constexpr, BLOCK: tl.constexpr):
    """out = g * grad_output in fp32, stored in g's dtype; grad_output is a scalar or one value per row."""
    rows, rmask, mask, offs = tile_offsets(B, N, R, BLOCK)
    if PER_ROW:
        go = tl.load(go_ptr + rows, mask=rmask, other=0.0).to(tl.float32)[:, None]
    else:
        go = tl.load(go_ptr).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, (g * go).to(out_ptr.dtype.element_ty), mask=mask)


def scale_grad(grad: torch.Tensor, grad_output: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The whole backward of a fused loss: the gradient written by the forward, times grad_output in fp32, stored
    in `dtype` (the input's; default the gradient's own; the forward saves fp32 for fp16 inputs, see
    fused_backward.saved_grad_dtype).

    grad_output is a scalar (scalar losses) or (B,) (per-sample losses). When it is all ones (checked where
    that is free, see is_one) the saved gradient is returned untouched (cast when `dtype` differs). A new tensor
    is returned otherwise, so the saved gradient stays valid for a second backward (retain_graph=True)."""
    dtype = grad.dtype if dtype is None else dtype
    if is_one(grad_output):
        return grad.to(dtype)
    if transformed(grad) or transformed(grad_output):  # under torch.func the product stays on its level
        return scale_in_fp32(grad, grad_output, dtype, per_row=grad_output.numel() > 1)
    B = grad.shape[0]
    N = grad.numel() // max(B, 1)
    out = torch.empty(grad.shape, dtype=dtype, device=grad.device)
    if grad.numel() == 0:
        return out
    go = grad_output.detach().contiguous()
    per_row = go.numel() > 1
    if per_row and go.numel() != B:
        raise ValueError(f"grad_output has {go.numel()} values for a batch of {B}")
    lay = layout(B, N)
    with device_guard(grad):
        scale_kernel[lay.grid](grad, go, out, B, N, PER_ROW=per_row, R=lay.R, BLOCK=lay.BLOCK,
                               num_warps=num_warps(lay))
    return out
