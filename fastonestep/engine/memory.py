"""Training-state memory of a network, computed exactly from its parameters, and measured on CUDA.

A network trained with torch.optim.Adam holds: its parameters, one gradient per parameter (same dtype),
Adam's exp_avg and exp_avg_sq (same shape and dtype as the parameter) and a 0-d float32 `step` per parameter
tensor. A frozen network (a teacher) holds only its parameters. Activations are not counted: they depend on
the batch and are what the CUDA measurement adds.
"""
from __future__ import annotations

import torch
from torch import nn

_ADAM_STEP_BYTES = 4  # torch.optim.Adam keeps `step` as a 0-d float32 tensor per parameter (not fused/capturable)


def training_state_bytes(module: nn.Module, trainable: bool = True) -> dict:
    """{"params", "grads", "adam", "total"} in bytes. trainable=False: a frozen network (no grads, no Adam)."""
    params = [p for p in module.parameters()]
    param_bytes = sum(p.numel() * p.element_size() for p in params)
    grads = param_bytes if trainable else 0
    adam = (2 * param_bytes + _ADAM_STEP_BYTES * len(params)) if trainable else 0
    return {"params": param_bytes, "grads": grads, "adam": adam, "total": param_bytes + grads + adam}


def optimizer_state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes held in an optimiser's state tensors (what training_state_bytes' "adam" predicts for Adam)."""
    return sum(t.numel() * t.element_size() for state in opt.state.values() for t in state.values()
               if torch.is_tensor(t))


def measure_cuda_peak_bytes(fn, device) -> int:
    """Peak CUDA memory allocated while fn() runs, above what was allocated before it (bytes)."""
    device = torch.device(device)
    if device.type != "cuda":
        raise ValueError(f"measure_cuda_peak_bytes needs a CUDA device, got {device}")
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base
