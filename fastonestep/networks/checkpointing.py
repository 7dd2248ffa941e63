"""Activation checkpointing of residual blocks (config key train.activation_checkpointing).

A checkpointed block keeps only its inputs for the backward pass; what it would have saved (the
normalised activations, the attention, EDM2's normalised weight copies) is recomputed from them when its
gradient is needed. The cost is one more forward of each block per backward (about a third more compute
for a block-dominated network); the saving is most of the activation memory of a training forward.

Gradients are unchanged to the bit: torch's non-reentrant checkpoint replays the block under the same
autocast state and restores the RNG state, so dropout draws the same masks, and the global RNG stream after
the step is the one an uncheckpointed step leaves. A block is checkpointed only while autograd records (a
no-grad forward, such as a frozen teacher's, keeps nothing to begin with).

The checkpointed call is the module call itself, `block(x, emb)`, so the recomputation passes through the
block's forward hooks again: that is what lets DeepSpeed ZeRO-3 gather the block's parameters for the replay.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


class CheckpointableBlock(nn.Module):
    """Base of the residual blocks (UNet ResBlock, EDM2Block): whether this block is checkpointed."""

    activation_checkpointing = False


def run_block(block: CheckpointableBlock, *args):
    """block(*args), checkpointed when the block is marked and autograd is recording."""
    if block.activation_checkpointing and torch.is_grad_enabled():
        return checkpoint(block, *args, use_reentrant=False)
    return block(*args)


def checkpointable_blocks(net: nn.Module) -> list[CheckpointableBlock]:
    """The residual blocks of `net`; none for networks without (the 2-D MLP, the GAN head)."""
    return [m for m in net.modules() if isinstance(m, CheckpointableBlock)]


def set_activation_checkpointing(net: nn.Module, enabled: bool = True) -> int:
    """Marks (or unmarks) every residual block of `net` in place; returns how many blocks it has."""
    blocks = checkpointable_blocks(net)
    for block in blocks:
        block.activation_checkpointing = bool(enabled)
    return len(blocks)
