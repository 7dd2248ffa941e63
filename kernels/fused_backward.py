"""What the backward of every fused loss shares: the csrc op's autograd formulas (kernels/ext.py) and the Triton
autograd Functions (kernels/triton_losses.py).

- The dtype the forward writes its gradient in (`saved_grad_dtype`), the same rule as csrc/op_checks.h.
- The backward scales that gradient by grad_output in fp32 and casts once (`scale_in_fp32`): grad_output rounded
  to fp16 first turns a loss scale of 65536 into inf.
- No second derivative (`first_order_only`): the backward returns a gradient written by the forward, a constant
  to autograd, so a gradient of it (create_graph=True, then backward through the result) would silently miss
  every term that depends on the inputs. Differentiating it raises instead.
- What every setup_context does first (`prepare_context`): no zero gradient materialised for an output that gets
  none (the gradient outputs), and under a torch.func transform the inputs kept for first_order_only.
"""
from __future__ import annotations

import torch
from torch._C import _functions as _autograd_functions  # DelayedError, what @once_differentiable uses


def saved_grad_dtype(dtype: torch.dtype) -> torch.dtype:
    """The input's dtype, except fp32 for fp16. Gradients of size 1/numel are fp16 subnormals for any realistic
    sample (below 6.1e-5, in fixed steps of 6e-8), and the backward multiplies them by grad_output (a loss scale
    of 2^16, say) only afterwards: rounded to fp16 first they keep about one significant digit. Saving fp32 costs
    2 more bytes per element of the loss input, held until the backward; the generator output is small next to
    the network's activations. bf16 has fp32's exponent range and keeps its own dtype (and memory)."""
    return torch.float32 if dtype == torch.float16 else dtype


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def scale_in_fp32(grad: torch.Tensor, grad_output: torch.Tensor, dtype: torch.dtype,
                  per_row: bool = False) -> torch.Tensor:
    """grad * grad_output in fp32 (fp64 for fp64), cast once to `dtype`; grad_output is a scalar, or one value
    per row when per_row."""
    acc = accumulation_dtype(grad.dtype)
    go = grad_output.to(acc)
    if per_row:
        go = go.reshape((-1,) + (1,) * (grad.ndim - 1))
    return (grad.to(acc) * go).to(dtype)


def transforms_active() -> bool:
    """Whether a torch.func transform is running (never in code torch.compile traces: it sees no transforms)."""
    return not torch.compiler.is_compiling() and torch._C._are_functorch_transforms_active()


def differentiating_transforms() -> int:
    """How many torch.func transforms that differentiate (grad, vjp, jvp and those built on them) are running. Inside
    one, a backward's result is that transform's answer; inside two, the outer one differentiates it again."""
    if not transforms_active():  # the usual case: no interpreter stack to import and walk
        return 0
    try:
        from torch._functorch.pyfunctorch import GradInterpreter, JvpInterpreter, retrieve_all_functorch_interpreters
    except ImportError:  # a torch without functorch's Python interpreters: no transform can be running
        return 0
    return sum(isinstance(i, (GradInterpreter, JvpInterpreter)) for i in retrieve_all_functorch_interpreters())


def prepare_context(ctx, inputs) -> None:
    """What every fused setup_context does first.

    - set_materialize_grads(False): the gradient the forward wrote is a second, non-differentiable output, and
      autograd would otherwise hand the backward a zero tensor of its size (an allocation and a memset as large as
      the trained input, every step). The backward then gets None for an output that received no gradient.
    - Under a torch.func transform, the inputs are kept (references, no copy): first_order_only ties its error node
      to them, the only tensors of the transform's level that a differentiation of the gradient reaches.
    """
    ctx.set_materialize_grads(False)
    ctx.inputs_under_transform = tuple(inputs) if transforms_active() else None


class _NoSecondDerivative(torch.autograd.Function):
    """The identity on a gradient, with the input it is the gradient of as a second argument: the node then lies on
    the path autograd walks back to that input, so differentiating the gradient w.r.t. it raises `message`
    (setup_context style, so it also works inside a torch.func transform, where requires_grad_ is refused)."""

    @staticmethod
    def forward(grad, of_input, message):
        return grad.view_as(grad)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.message = inputs[2]

    @staticmethod
    def backward(ctx, _grad_of_grad):
        raise RuntimeError(ctx.message)


def _second_derivative_message(what: str) -> str:
    return (f"fastonestep.losses.{what} has no second derivative: its backward returns the gradient the forward "
            "wrote, so a gradient of that gradient (create_graph=True, then backward through it) would miss every "
            "term that depends on the inputs. Use impl='torch' to differentiate twice.")


def first_order_only(grads: tuple, what: str, ctx=None) -> tuple:
    """`grads` as returned by a fused backward (one per input); when the backward runs with create_graph=True,
    each gradient tensor is routed through a node that raises if anything is differentiated through it. Without
    create_graph (grad mode off in the backward) and in code torch.compile traces (it refuses double backward
    itself), the gradients pass untouched. `ctx`: the backward's, given to prepare_context by its setup_context."""
    if not torch.is_grad_enabled() or torch.compiler.is_compiling():
        return grads
    at = [i for i, g in enumerate(grads) if isinstance(g, torch.Tensor)]
    if not at:
        return grads
    message = _second_derivative_message(what)
    levels = differentiating_transforms()
    if levels > 1:  # torch.func.grad of torch.func.grad: the outer level differentiates this gradient
        raise RuntimeError(message)
    if levels == 1:
        return _tied_to_inputs(grads, at, getattr(ctx, "inputs_under_transform", None), message)
    # The gradients become leaves that require grad, so that the error node is recorded after them (as
    # torch.autograd.function.once_differentiable does, which only does it when grad_output requires grad:
    # a create_graph=True backward from a loss gets a grad_output of ones that does not).
    wrapped = _autograd_functions.DelayedError(message.encode(), len(at))(
        *[grads[i].detach().requires_grad_(True) for i in at])
    wrapped = wrapped if isinstance(wrapped, tuple) else (wrapped,)
    out = list(grads)
    for i, g in zip(at, wrapped):
        out[i] = g
    return tuple(out)


def _tied_to_inputs(grads: tuple, at: list, inputs, message: str) -> tuple:
    """Inside one torch.func.grad / vjp. The backward runs there both as the transform's own (its gradient is the
    answer, nothing differentiates it) and as a create_graph=True torch.autograd.grad inside the transformed
    function (the transform then differentiates the gradient, which autograd sees as a constant: the answer would
    silently be 0). Each gradient goes through _NoSecondDerivative with its input, which is harmless in the first
    case and raises in the second. Without the inputs (a graph recorded outside the transform) nothing at this
    level can reach them, and the gradients pass untouched."""
    if inputs is None:
        return grads
    out = list(grads)
    for i in at:
        if isinstance(inputs[i], torch.Tensor):
            out[i] = _NoSecondDerivative.apply(grads[i], inputs[i], message)
    return tuple(out)


def needs_grad(*tensors) -> bool:
    """Whether a fused forward must write its gradient: grad mode is on and a trained input requires grad. Decided
    by the caller and passed to the autograd Function, whose forward (setup_context style, as torch.func needs)
    has no ctx to ask; under torch.func.grad / vjp the inputs are wrapped tensors that require grad."""
    return torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors)


def refuse_vmap(what: str):
    """The `vmap` staticmethod of a fused autograd Function: torch.func.grad and vjp work, vmap does not (the
    kernels already treat dimension 0 as the batch; a batching rule would have to fold the vmapped dimension
    into it and the per-sample reductions into the loss). Raises a clear error instead of a generic one."""

    def vmap(info, in_dims, *args):
        raise NotImplementedError(f"fastonestep.losses.{what} does not support torch.func.vmap (torch.func.grad and "
                                  "torch.func.vjp are supported): pass the batch as dimension 0 instead of mapping "
                                  "over it.")

    return staticmethod(vmap)
