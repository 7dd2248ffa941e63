"""EDM2's forced weight normalisation under DeepSpeed.

An EDM2 layer (networks/edm2.py, MPConv) rescales its stored weight in place to unit-RMS rows at the first
training forward after the weight changed (it watches the tensor's version counter), so every gradient is
taken and every Adam step starts at normalised weights, and the effective learning rate does not decay as the
weights grow. Under DeepSpeed neither half works by itself: the optimizer updates its own fp32 master weights
(ZeRO 1/2: a flat partition per rank; ZeRO-3: the module's weight is a shard gathered for each forward) and
copies them into the module without the version counter seeing it, so the layer would rescale only once per
process, and its rescale would never reach the master weights (nor, under ZeRO-3, the shard). The run would
quietly train like EDM2 *without* forced normalisation.

`attach` makes the layers of a DeepSpeed engine's module rescale as they do on one process: `mark_stale` after
every optimizer step that was taken (and after loading a checkpoint) makes the next training forward rescale
again, and each rescale's row divisors are applied to this rank's other copies of the weight: its slice of the
fp32 master weights and, under ZeRO-3, its shard. The layer computes the divisors from the whole weight it sees
in its forward (gathered under ZeRO-3, the same on every rank), so no communication is needed. What the EMA,
checkpoints and exports read is the same as on one process: the weights right after the step, rescaled later.
A checkpoint also records which layers already hold their rescaled weight (a network run frozen after its update):
after the load marks every layer stale, Method.load_state_dict marks those rescaled again (networks/edm2.py,
restore_normalized_layers), as on one process, so a resume does not rescale them a second time.
"""
from __future__ import annotations

import math
from functools import partial

import torch
from torch import nn

from fastonestep.engine.zero_master import local_master


def forced_norm_layers(network: nn.Module) -> list[nn.Module]:
    """The trained layers that keep their weight rows at unit RMS (modules with `force_normalize_`: EDM2's MPConv)."""
    return [m for m in network.modules() if hasattr(m, "force_normalize_") and m.weight.requires_grad]


def _rows(param: nn.Parameter) -> int:
    """Elements per output row of a weight, whatever DeepSpeed left in param.data."""
    shape = getattr(param, "ds_shape", param.shape)
    return math.prod(int(s) for s in shape[1:])


def _divide_rows(flat: torch.Tensor, start: int, per_row: int, divisors: torch.Tensor) -> None:
    """Divides each element of a slice of a flattened weight (its first element has index `start`) by its row's
    divisor, in fp32 and rounded once, as the layer rescales its own copy (a bf16 shard matches it bit for bit)."""
    row_of = torch.arange(start, start + flat.numel(), device=flat.device) // per_row
    flat.copy_((flat.float() / divisors.to(flat.device)[row_of]).to(flat.dtype))


@torch.no_grad()
def _rescale_other_copies(param: nn.Parameter, rank: int, divisors: torch.Tensor) -> None:
    """Divides this rank's other copies of `param` (its slice of the fp32 master weights; under ZeRO-3 also its
    shard) row by row. DeepSpeed may alias copies (fp32 ZeRO-3 uses the shard as the master; one rank's
    gathered weight is its shard, which the layer has just rescaled): each memory region is divided once."""
    per_row = _rows(param)
    seen = {(param.data.data_ptr(), param.data.numel())}

    def divide(flat, start):
        if flat.numel() and (flat.data_ptr(), flat.numel()) not in seen:
            seen.add((flat.data_ptr(), flat.numel()))
            _divide_rows(flat, start, per_row, divisors)

    if hasattr(param, "ds_id"):  # ZeRO-3 also keeps a shard: rank r holds [r * size, (r + 1) * size), padded
        shard = param.ds_tensor.reshape(-1)
        start = rank * shard.numel()
        valid = max(0, min(shard.numel(), param.ds_numel - start))
        divide(shard[:valid], start)
    # this rank's slice of the fp32 master weights (ZeRO 1/2: a fragment of the flat partition, or nothing), in
    # place: also after a frozen forward (the ratio network in DiffRatio's generator step may be the first after a
    # step), and without the reduce-stream wait of DeepSpeed's accessor
    divide(*local_master(param, rank))


def attach(layers: list[nn.Module], rank: int) -> None:
    """Hooks the layers of a DeepSpeed engine's module up to its other copies; they rescale at the next forward."""
    for layer in layers:
        layer.on_normalize = partial(_rescale_other_copies, layer.weight, rank)
    mark_stale(layers)


def mark_stale(layers: list[nn.Module]) -> None:
    """After an optimizer step (or a checkpoint load): the next training forward of each layer rescales again."""
    for layer in layers:
        layer.stale = True
