"""What every method shares: the optimiser recipe, one clipped optimiser step, per-run RNG, and the
interface the engine drives (step, state_dict, samplers for evaluation)."""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from fastonestep.config import Config, OptimConfig
from fastonestep.diffusion.schedules import sample_lognormal_sigma


def make_optimizer(params, cfg: OptimConfig) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay)


def optimizer_step(opt: torch.optim.Optimizer, net: nn.Module, cfg: OptimConfig, step: int) -> float:
    """Warm-up, clip, NaN guard, step. Returns the pre-clip gradient norm (inf/nan: the step was skipped).

    The finiteness check is the one host synchronisation of a step: skipping a bad update has to be decided
    before Adam's moments see it. Everything else a step reports stays on the device until a log line."""
    params = [p for p in net.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
    norm = float(norm)
    if math.isfinite(norm):
        scale = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0
        for group in opt.param_groups:
            group["lr"] = cfg.lr * scale
        opt.step()
    opt.zero_grad(set_to_none=True)
    return norm


def sample_sigma(n: int, p_mean: float, p_std: float, lo: float, hi: float, rng: torch.Generator, device):
    """ln(sigma) ~ N(p_mean, p_std^2), clipped to [lo, hi]."""
    return sample_lognormal_sigma(n, p_mean, p_std, generator=rng, device=device).clamp(lo, hi)


class Method:
    """A training method: owns its networks, optimisers, EMA and RNG; `step` is one generator update."""

    name = "base"

    def __init__(self, cfg: Config, dataset, device: torch.device):
        self.cfg, self.dataset, self.device = cfg, dataset, device
        self.rng = torch.Generator(device=device).manual_seed(cfg.seed)
        self.conditional = bool(cfg.data.class_conditional)
        if self.conditional and not dataset.num_classes:
            raise ValueError("config key 'data.class_conditional' is true but the dataset has no labels")
        self.num_classes = dataset.num_classes if self.conditional else 0
        # train.kernels: "fused" lets fastonestep.losses pick the fastest implementation for the device;
        # "eager" pins the PyTorch reference (the ground truth the fused kernels are tested against).
        self.impl = "auto" if cfg.train.kernels == "fused" else "torch"

    # -- engine interface ---------------------------------------------------------------------------------
    def step(self, next_batch: Callable, step: int, nimg: int) -> dict:
        raise NotImplementedError

    def state_dict(self) -> dict:
        raise NotImplementedError

    def load_state_dict(self, state: dict) -> None:
        raise NotImplementedError

    def export_network(self) -> nn.Module:
        """The network a user samples from (EMA weights)."""
        raise NotImplementedError

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

    def rng_state(self) -> dict:
        return {"rng": self.rng.get_state()}

    def load_rng_state(self, state: dict) -> None:
        self.rng.set_state(state["rng"])
