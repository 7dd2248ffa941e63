"""What every method shares: the backend it trains through, per-run RNG, global-batch randomness and
accumulation chunks, and the interface the engine drives (step, state_dict, samplers for evaluation)."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from fastonestep.config import Config
from fastonestep.diffusion.schedules import sample_lognormal_sigma
# Every method trains through backend Trainables (engine/distributed.py owns the optimiser recipe).
from fastonestep.engine.distributed import Backend
from fastonestep.engine.ema import EMA
from fastonestep.engine.posthoc_ema import PowerEMAs
from fastonestep.networks.edm2 import normalized_layers, restore_normalized_layers


def sample_sigma(n: int, p_mean: float, p_std: float, lo: float, hi: float, rng: torch.Generator, device):
    """ln(sigma) ~ N(p_mean, p_std^2), clipped to [lo, hi]."""
    return sample_lognormal_sigma(n, p_mean, p_std, generator=rng, device=device).clamp(lo, hi)


class Method:
    """A training method: owns its networks, optimisers, EMA and RNG; `step` is one generator update."""

    name = "base"

    # Methods on the Trainable API (backend.trainable, the *_global helpers, micro_chunks) set this True;
    # the others run on the single backend only (make_method refuses ddp / deepspeed / batch_per_gpu).
    supports_distributed = False

    def __init__(self, cfg: Config, dataset, device: torch.device, backend: Backend | None = None):
        self.cfg, self.dataset, self.device = cfg, dataset, device
        self.backend = backend if backend is not None else Backend(cfg, device)
        self.rank, self.world_size = self.backend.rank, self.backend.world_size
        self.global_batch, self.local_batch = self.backend.global_batch, self.backend.local_batch
        self.rng = torch.Generator(device=device).manual_seed(cfg.seed)
        self.conditional = bool(cfg.data.class_conditional)
        if self.conditional and not dataset.num_classes:
            raise ValueError("config key 'data.class_conditional' is true but the dataset has no labels")
        self.num_classes = dataset.num_classes if self.conditional else 0
        # train.kernels: "fused" lets fastonestep.losses pick the fastest implementation for the device;
        # "eager" pins the PyTorch reference (the ground truth the fused kernels are tested against).
        self.impl = "auto" if cfg.train.kernels == "fused" else "torch"
        self.posthoc = PowerEMAs()  # the post-hoc power EMAs (train.ema_stds), made by make_emas

    # -- EMAs -----------------------------------------------------------------------------------------------
    def make_emas(self, net: nn.Module) -> EMA:
        """The run's EMA of `net` (train.ema_halflife_kimg), returned, and its post-hoc power EMAs
        (train.ema_stds) in self.posthoc. Before the Trainable of `net` is made: ZeRO-3 shards `net` there."""
        t = self.cfg.train
        self.posthoc = PowerEMAs(net, t.ema_stds)
        return EMA(net, t.ema_halflife_kimg, t.ema_rampup)

    def shard_emas(self, trainable, part: str = "", main: bool = True) -> None:
        """Under ZeRO, each rank keeps only its slice of the EMAs (`main` False: self.ema stays whole, as an EMA
        that is run every step must)."""
        if main:
            self.ema.shard_like(trainable, part)
        self.posthoc.shard_like(trainable, part)

    def update_emas(self, trainable, nimg: int, batch_size: int, part: str = "") -> None:
        """Every EMA after an optimiser step of `trainable`; `nimg`: images seen after it."""
        self.ema.update_from(trainable, nimg, batch_size, part=part)
        self.posthoc.update_from(trainable, nimg, batch_size, part=part)

    # -- engine interface ---------------------------------------------------------------------------------
    def step(self, next_batch: Callable, step: int, nimg: int) -> dict:
        raise NotImplementedError

    def state_dict(self) -> dict:
        """Every trained network's Trainable state (weights, optimiser) under its name, the EMAs and the RNG, and
        which EDM2 layers of the trained networks hold an already rescaled weight ("normalized_layers": a network
        run again after its update, e.g. frozen in another network's step, has rescaled it; networks/edm2.py)."""
        posthoc = {"posthoc_ema": self.posthoc.state_dict()} if self.posthoc else {}
        trainables = self.backend.trainables
        return {**{name: t.state_dict() for name, t in trainables.items()},
                "normalized_layers": {name: normalized_layers(t.network) for name, t in trainables.items()},
                "ema": self.ema.state_dict(), **posthoc, **self.rng_state()}

    def load_state_dict(self, state: dict) -> None:
        missing = [k for k in [*self.backend.trainables, "ema"] if k not in state]
        if missing:
            raise ValueError(f"the checkpoint has no state for {', '.join(missing)} (it holds: {', '.join(state)}); "
                             f"it was written by another method or an older fastonestep than this {self.name!r} run")
        # Absent in checkpoints of earlier versions: every EDM2 layer then rescales at its next training forward.
        normalized = state.get("normalized_layers", {})
        for name, t in self.backend.trainables.items():
            t.load_state_dict(state[name])  # moves the version counters (DeepSpeed: marks every layer stale)
            restore_normalized_layers(t.network, normalized.get(name, []))
        self.ema.load_state_dict(state["ema"])
        if self.posthoc:
            self.posthoc.load_state_dict(state.get("posthoc_ema", {}))
        self.load_rng_state(state)

    def export_network(self) -> nn.Module:
        """The network a user samples from (EMA weights)."""
        return self.ema.net

    def export_extra(self) -> dict:
        """Networks exported next to model.safetensors at the end of a run: {file stem: (module, info)}, info
        being the self-describing metadata export_model stores (e.g. DiffRatio's ratio network)."""
        return {}

    def samplers(self) -> dict[str, Callable]:
        """Named samplers for evaluation: fn(noise, labels) -> samples. The first is the run's model."""
        raise NotImplementedError

    def known_metrics(self) -> dict:
        """Metrics of samplers measured elsewhere with the same settings (evaluate skips those samplers)."""
        return {}

    # -- shared helpers -----------------------------------------------------------------------------------
    def random_labels(self, n: int):
        if not self.num_classes:
            return None
        return torch.randint(0, self.num_classes, (n,), generator=self.rng, device=self.device)

    def noise_like(self, x: torch.Tensor) -> torch.Tensor:
        return torch.randn(x.shape, generator=self.rng, device=x.device, dtype=x.dtype)

    # -- global-batch randomness and accumulation ----------------------------------------------------------
    # Every rank draws the randomness of the WHOLE global batch from the same seeded generator (the same calls,
    # in the same order, as one process would make) and keeps its contiguous slice, so N processes follow the
    # single-process trajectory. The cost is drawing global-batch noise on every rank (cheap next to a step).
    def local(self, t: torch.Tensor, dim: int = 0) -> torch.Tensor:
        """This rank's contiguous slice of a global-batch tensor along `dim`."""
        if self.world_size == 1:
            return t
        if t.shape[dim] != self.global_batch:
            raise ValueError(f"local(): dimension {dim} has size {t.shape[dim]}, not the global batch "
                             f"{self.global_batch}")
        return t.narrow(dim, self.rank * self.local_batch, self.local_batch)

    def randn_global(self, *shape, groups: int = 0) -> torch.Tensor:
        """N(0, I) of shape (global_batch, *shape), or (groups, global_batch, *shape) drawn as one
        (groups * global_batch, *shape) draw; returns this rank's slice of the batch dimension."""
        n = self.global_batch
        if groups:
            full = torch.randn((groups * n, *shape), generator=self.rng, device=self.device).view(groups, n, *shape)
            return self.local(full, dim=1)
        return self.local(torch.randn((n, *shape), generator=self.rng, device=self.device))

    def sample_sigma_global(self, p_mean: float, p_std: float, lo: float, hi: float) -> torch.Tensor:
        """Clipped log-normal noise levels of the global batch; this rank's slice."""
        return self.local(sample_sigma(self.global_batch, p_mean, p_std, lo, hi, self.rng, self.device))

    def random_labels_global(self):
        labels = self.random_labels(self.global_batch)
        return None if labels is None else self.local(labels)

    def micro_chunks(self) -> list[tuple[slice, float | None]]:
        """(slice of the local batch, loss weight) per accumulation round. The weight makes the gradients of
        all chunks of all ranks sum to the global-batch mean (the ranks' gradients are averaged); it is None
        for a single chunk, where no scaling is needed."""
        micro = self.backend.micro_batch
        rounds = self.local_batch // micro
        if rounds == 1:
            return [(slice(0, self.local_batch), None)]
        return [(slice(i * micro, (i + 1) * micro), micro / self.local_batch) for i in range(rounds)]

    @staticmethod
    def weighted(value: torch.Tensor, weight: float | None) -> torch.Tensor:
        return value if weight is None else value * weight

    def rng_state(self) -> dict:
        return {"rng": self.rng.get_state()}

    def load_rng_state(self, state: dict) -> None:
        self.rng.set_state(state["rng"])
