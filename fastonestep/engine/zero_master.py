"""This rank's part of a parameter's fp32 master weights under DeepSpeed ZeRO.

The optimizer of a ZeRO engine keeps fp32 master weights partitioned over the ranks: ZeRO 1/2 one flat partition
per rank, of which a parameter owns a fragment (or nothing), and ZeRO-3 a shard of every parameter (rank r holds
the elements [r * size, (r + 1) * size) of the flattened parameter, the last shard padded). What lives here is the
parameter right after each optimizer step, in full precision, whatever the module holds (bf16 copies, or under
ZeRO-3 nothing between forwards). The sharded EMA (engine/ema.py) follows these slices without communication.

ZeRO 1/2 here means either optimizer DeepSpeed links that way (`_hp_mapping`): DeepSpeedZeroOptimizer, or the
BF16_Optimizer it picks for bf16 ZeRO-1 with fp32 gradient accumulation (our default, engine/distributed.py).

The slices are views into the optimizer's flat fp32 buffers, which its steps update in place, so a caller may keep
them (until a checkpoint is loaded). Under ZeRO-3 they are taken from the optimizer's own bookkeeping
(`grad_position`, `fp32_partitioned_groups_flat`, DeepSpeed 0.19) rather than through `safe_get_local_fp32_param`,
which waits for the reduce stream on every call: one host wait per parameter per step on a GPU.
"""
from __future__ import annotations

import torch
from torch import nn


def _zero3_master(param: nn.Parameter, rank: int) -> tuple[torch.Tensor, int]:
    optimizer = param._z3_optimizer
    if optimizer.optimizer_swapper is not None:  # the buffer may be on NVMe between steps: no stable view
        raise RuntimeError("DeepSpeed ZeRO-3 with the optimizer state swapped to NVMe (offload_optimizer.device="
                           "nvme) is not supported: the sharded EMA reads the fp32 master weights in place")
    size = param.ds_tensor.numel()
    start = min(rank * size, param.ds_numel)
    valid = max(0, min(size, param.ds_numel - start))
    position = optimizer.grad_position.get(optimizer.get_param_id(param))
    if position is None:  # DeepSpeed keeps master weights only for parameters that require grad
        raise RuntimeError(f"no fp32 master weight for a parameter of shape {tuple(param.ds_shape)}: the "
                           "parameters of a trained network must require grad")
    group, offset, _ = position
    return optimizer.fp32_partitioned_groups_flat[group].narrow(0, offset, valid), start


def local_master(param: nn.Parameter, rank: int) -> tuple[torch.Tensor, int]:
    """(this rank's slice of the flattened fp32 master weight of `param`, the index of its first element); empty
    when this rank holds none of it. On the optimizer's device (the CPU when its state is offloaded)."""
    if hasattr(param, "ds_id"):
        return _zero3_master(param, rank)
    if not hasattr(param, "_hp_mapping"):  # ZeRO 1/2 link every parameter they train; None = none of it here
        raise RuntimeError(f"no fp32 master weight for a parameter of shape {tuple(param.shape)}: the parameters "
                           "of a trained network must require grad")
    mapping = param._hp_mapping
    if mapping is None:
        return torch.empty(0, dtype=torch.float32, device=param.device), 0
    return mapping.get_hp_fragment().reshape(-1), mapping.lp_fragment_address.start
