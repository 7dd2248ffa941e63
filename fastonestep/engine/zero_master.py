"""This rank's part of a parameter's fp32 master weights under DeepSpeed ZeRO.

The optimizer of a ZeRO engine keeps fp32 master weights partitioned over the ranks: ZeRO 1/2 one flat partition
per rank, of which a parameter owns a fragment (or nothing), and ZeRO-3 a shard of every parameter (rank r holds
the elements [r * size, (r + 1) * size) of the flattened parameter, the last shard padded). What lives here is the
parameter right after each optimizer step, in full precision, whatever the module holds (bf16 copies, or under
ZeRO-3 nothing between forwards). The sharded EMA (engine/ema.py) follows these slices without communication.
"""
from __future__ import annotations

import torch
from torch import nn


def local_master(param: nn.Parameter, rank: int) -> tuple[torch.Tensor, int]:
    """(this rank's slice of the flattened fp32 master weight of `param`, the index of its first element):
    a view, or a copy when the optimizer state is offloaded; empty when this rank holds none of it."""
    if hasattr(param, "ds_id"):  # ZeRO-3
        from deepspeed.utils import safe_get_local_fp32_param

        size = param.ds_tensor.numel()
        start = min(rank * size, param.ds_numel)
        valid = max(0, min(size, param.ds_numel - start))
        master = safe_get_local_fp32_param(param)
        if master is None:  # DeepSpeed answers only for parameters that require grad
            raise RuntimeError(f"no fp32 master weight for a parameter of shape {tuple(param.ds_shape)}: the "
                               "parameters of a trained network must require grad")
        return master.reshape(-1)[:valid], start
    mapping = getattr(param, "_hp_mapping", None)  # ZeRO 1/2: a fragment of the flat fp32 partition, or none
    if mapping is None:
        return torch.empty(0, dtype=torch.float32, device=param.device), 0
    return mapping.get_hp_fragment().reshape(-1), mapping.lp_fragment_address.start
