"""Exponential moving average of a network's weights with the EDM half-life schedule.

beta = 0.5 ** (batch / halflife), where the half-life (in samples) ramps up as a fraction of the samples
seen so far, so early averages do not remember the random initialisation for long.

Under DeepSpeed ZeRO the EMA is sharded like the optimizer's fp32 master weights (`shard_like`): each rank
averages only its own slice of each parameter (engine/zero_master.py), in fp32, with no communication, and holds
1/N of the EMA instead of a full fp32 copy. The same numbers as a whole EMA: every element is averaged from the
same master value. `gathered()` (collective) assembles the whole network on rank 0 for evaluation, checkpoints
and the export; checkpoints hold the whole EMA, so the EMA never ties a resume to a number of processes (ZeRO's
optimizer state does: engine/distributed.py check_same_world_size).
"""
from __future__ import annotations

import contextlib
import copy

import torch
from torch import nn


class EMA:
    def __init__(self, net: nn.Module, halflife_kimg: float, rampup: float = 0.05):
        self.halflife_kimg, self.rampup = halflife_kimg, rampup
        self._net = copy.deepcopy(net).eval().requires_grad_(False)
        # sharded (shard_like): per parameter, this rank's fp32 slice of it flattened, and where that slice starts
        self._shards: list[torch.Tensor] | None = None
        self._starts: list[int] = []
        self._shapes: list[torch.Size] = []
        self._backend = None
        self._whole = True  # the parameters of self._net hold the EMA (always, unless sharded)

    @property
    def net(self) -> nn.Module:
        """The EMA network. Sharded, it is whole only on rank 0 inside `gathered()`."""
        if not self._whole:
            raise RuntimeError("the EMA is sharded over the ranks (DeepSpeed ZeRO): read it inside "
                               "`with ema.gathered():`, which every rank enters (rank 0 then holds it whole)")
        return self._net

    @property
    def sharded(self) -> bool:
        return self._shards is not None

    def numel(self) -> int:
        """Parameter elements of the EMA network."""
        if self.sharded:
            return sum(shape.numel() for shape in self._shapes)
        return sum(p.numel() for p in self._net.parameters())

    def local_numel(self) -> int:
        """Parameter elements this rank holds (all of them unless sharded)."""
        if self.sharded:
            return sum(s.numel() for s in self._shards)
        return self.numel()

    def beta(self, nimg: int, batch_size: int) -> float:
        if self.halflife_kimg <= 0:
            return 0.0
        halflife = self.halflife_kimg * 1000
        if self.rampup:
            halflife = min(halflife, nimg * self.rampup)
        return 0.5 ** (batch_size / max(halflife, 1e-8))

    # -- sharding -------------------------------------------------------------------------------------------
    def shard_like(self, trainable, part: str = "") -> None:
        """Keep only this rank's slice of each parameter: the slice of the fp32 master weights the trainable's
        optimizer holds here (Trainable.master_slices). A no-op where the trainable holds whole parameters
        (single, DDP). `part` as in `update`."""
        slices = trainable.master_slices(part)
        if slices is None:
            return
        params = list(self._net.parameters())
        prefix = part + "." if part else ""
        shapes = [tuple(getattr(p, "ds_shape", p.shape)) for n, p in trainable.network.named_parameters()
                  if n.startswith(prefix)]
        if shapes != [tuple(p.shape) for p in params]:  # the slices are matched to the EMA's parameters by order
            raise ValueError(f"the EMA's parameters (shapes {[tuple(p.shape) for p in params][:3]}...) are not "
                             f"those of trainable '{trainable.name}' under '{part}' ({shapes[:3]}...)")
        self._shapes = [p.shape for p in params]
        self._starts = [start for _, start in slices]
        self._shards = [p.detach().reshape(-1)[start:start + s.numel()].float().clone()
                        for p, (s, start) in zip(params, slices)]
        for p in params:  # the whole copies go: this is the memory sharding saves
            p.data = torch.empty(0, dtype=p.dtype, device=p.device)
        self._backend = trainable.backend
        self._whole = False

    @contextlib.contextmanager
    def gathered(self, everywhere: bool = False):
        """Collective, every rank enters: inside, the EMA network is whole on rank 0 (`everywhere`: on every
        rank). A sharded EMA is summed from the ranks' disjoint slices (exact: the others add zeros); a whole
        EMA is simply there."""
        if not self.sharded:
            yield self._net
            return
        backend, params = self._backend, list(self._net.parameters())
        holds = everywhere or backend.is_main
        try:
            for p, shard, start, shape in zip(params, self._shards, self._starts, self._shapes):
                full = torch.zeros(shape.numel(), dtype=shard.dtype, device=shard.device)
                full[start:start + shard.numel()] = shard
                if everywhere:
                    backend.all_reduce(full)
                else:
                    backend.reduce_to_main(full)
                if holds:
                    p.data = full.view(shape).to(p.dtype)
            self._whole = holds
            yield self._net if holds else None
        finally:
            for p in params:
                p.data = torch.empty(0, dtype=p.dtype, device=p.device)
            self._whole = False

    # -- updates ----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def update(self, net: nn.Module, nimg: int, batch_size: int, params=None, part: str = "") -> None:
        """`params`: the full parameters of `net` in parameters() order when `net` holds only a shard of them
        (ZeRO-3 gathers them; see Trainable.full_parameters). Buffers are never sharded. `part`: the name of
        the submodule of `net` this EMA follows, when `net` also trains something else ("": all of `net`)."""
        if self.sharded:
            raise RuntimeError("a sharded EMA is updated from its trainable's master slices (update_from)")
        prefix = part + "." if part else ""
        names = [n for n, _ in net.named_parameters()]
        source = [p.detach() for n, p in zip(names, net.parameters() if params is None else params, strict=True)
                  if n.startswith(prefix)]
        self._lerp(list(self._net.parameters()), source, self.beta(nimg, batch_size))
        self._copy_buffers(net, prefix)

    @torch.no_grad()
    def update_from(self, trainable, nimg: int, batch_size: int, part: str = "") -> None:
        """EMA step from a backend Trainable (any backend, any ZeRO stage); `part` as in `update`."""
        if not self.sharded:
            with trainable.full_parameters() as params:
                self.update(trainable.network, nimg, batch_size, params=params, part=part)
            return
        slices = trainable.master_slices(part)
        self._lerp(self._shards, [s for s, _ in slices], self.beta(nimg, batch_size))
        self._copy_buffers(trainable.network, part + "." if part else "")

    @staticmethod
    def _lerp(averages: list[torch.Tensor], sources: list[torch.Tensor], beta: float) -> None:
        """averages += (1 - beta) * (sources - averages), all tensors at once (one fused kernel per dtype and
        device on a GPU, not one per parameter)."""
        if len(averages) != len(sources):
            raise ValueError(f"the EMA has {len(averages)} parameters, its source {len(sources)}")
        sources = [s.to(a.device, a.dtype) for a, s in zip(averages, sources)]  # offloaded masters live on the CPU
        if averages:
            torch._foreach_lerp_(averages, sources, 1.0 - beta)

    def _copy_buffers(self, net: nn.Module, prefix: str) -> None:
        buffers = [b for n, b in net.named_buffers() if n.startswith(prefix)]
        for b_ema, b in zip(self._net.buffers(), buffers):
            b_ema.copy_(b)

    # -- state --------------------------------------------------------------------------------------------
    def state_dict(self):
        """The whole EMA network's state (sharded: on rank 0 inside `gathered()`)."""
        return self.net.state_dict()

    def load_state_dict(self, state):
        """A whole EMA state (as checkpoints hold it); a sharded EMA keeps its own slices of it."""
        if not self.sharded:
            self._net.load_state_dict(state)
            return
        names = [n for n, _ in self._net.named_parameters()]
        missing = [n for n in names if n not in state]
        if missing:
            raise ValueError(f"the EMA state has no {', '.join(missing[:3])}")
        for name, shard, start, shape in zip(names, self._shards, self._starts, self._shapes):
            full = state[name]
            if full.shape != shape:
                raise ValueError(f"the EMA state's '{name}' has shape {tuple(full.shape)}, expected {tuple(shape)}")
            shard.copy_(full.reshape(-1)[start:start + shard.numel()])
        for name, b in self._net.named_buffers():
            if name in state:
                b.copy_(state[name])
