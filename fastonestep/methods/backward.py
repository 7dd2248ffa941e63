"""Imagine-Flash-style backward distillation (design.md 4.4): a 1-3 step student trained on its own backward
trajectory with a shifted reconstruction loss against a frozen teacher; noise correction at inference.

These are our reading of the seed (arXiv 2405.05224, abstract only); each choice is a config key (`backward.*`):

- Student. G(x; s) is an EDM-preconditioned denoiser initialised as a copy of the teacher, evaluated at the
  levels s_1 > ... > s_K (`student_sigmas`, K = 1..3, VE coordinates). Sampling: x = s_1 z, x0_k = G(x; s_k),
  x = x0_k + s_{k+1} * fresh noise (diffusion/backward_sampler.py). `parameterization`: "x0" uses G directly;
  "eps" uses eps_hat = (x - G) / s, which differs from "x0" only where noise correction changes it.
- Backward distillation. Each training sample gets a step k (drawn per sample from `step_weights`, uniform by
  default). Its input x_{s_k} is made by the student itself from pure noise z, running steps 1..k-1 exactly as
  the sampler does (same re-noising, same noise correction) but under torch.no_grad, with the current weights
  or their EMA (`trajectory_net`). So training inputs have the inference distribution, and only step k gets a
  gradient; the trajectory is a constant as far as the loss is concerned.
- Shifted reconstruction loss. x0_s = G(x_{s_k}; s_k) (with gradient). The shifted level s' = gamma(s_k) is
  `shift`: identity (s' = s), power (ln s' = shift_a ln s + shift_b, shift_a > 0, so gamma increases: large s ->
  large s', the teacher re-does structure; small s -> small s', it only adds detail) or fixed (s' = shift_sigma);
  s' is clamped to the teacher's range [diffusion.sigma_min, diffusion.sigma_max]. sg(x0_s) is re-noised to s'
  (losses.add_noise) and the frozen teacher denoises it: one call D_T(.; s') for teacher_steps = 1 (the
  default), else a teacher_steps-level Euler/Heun probability-flow ODE from s' to 0 on the Karras grid. The
  target is that result, detached; loss = mean_i w_i mean_elements (x0_s - sg(target))^2 with w = 1
  (`weighting: none`, the design's formula) or w = lambda(s_k) (`weighting: edm`).
  It goes through losses.denoising_loss(F, x_{s_k}, target, s_k, sigma_data), which is lambda(s_k) times the
  same squared error (x0_s = c_skip x + c_out F) and writes its gradient w.r.t. F in one fused pass; for
  `none` its per-sample value is divided by lambda(s_k). Dividing keeps the fused kernel (and its gradient)
  for both weightings instead of a second, unfused code path; lambda is bounded away from 0, so it is exact
  up to fp32 rounding.
- Noise correction (inference only, eps students): at the first step eps = z + c (eps_hat - z), c =
  `noise_correction` (1 = off). In VE coordinates this is x0 = c * G(s_1 z; s_1): see backward_sampler.py for
  what it does and does not buy. The backward trajectory uses the same sampler, so the inputs of steps >= 2
  match inference with the correction; the loss always trains the student's own prediction G.

Distributed (engine/distributed.py): the student is one Trainable (its training forward is EDMPrecond.raw, so
the loss stays in F-space), the teacher a plain frozen module on every rank. Every draw of a step is made for
the global batch in the single-process order and each rank keeps its slice; the no-grad trajectory runs on the
whole local slice, the loss (teacher target included: it is per sample) per train.batch_per_gpu chunk.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from fastonestep import losses
from fastonestep.diffusion.backward_sampler import backward_sample, backward_states
from fastonestep.diffusion.precond import edm_loss_weight
from fastonestep.diffusion.samplers import karras_sigmas, ode_solve
from fastonestep.engine.evaluate import EVAL_SEED
from fastonestep.methods.distill import DistillMethod, accumulate, rows
from fastonestep.networks.build import count_parameters


def shifted_sigma(sigma: torch.Tensor, cfg, lo: float = 0.0, hi: float = math.inf) -> torch.Tensor:
    """gamma(sigma) for a BackwardConfig `cfg`, clamped to [lo, hi]; monotone non-decreasing in sigma."""
    if not torch.is_tensor(sigma):
        sigma = torch.as_tensor(sigma, dtype=torch.float64)
    if cfg.shift == "identity":
        out = sigma
    elif cfg.shift == "power":
        out = torch.exp(cfg.shift_a * torch.log(sigma) + cfg.shift_b)
    elif cfg.shift == "fixed":
        out = torch.full_like(sigma, cfg.shift_sigma)
    else:
        raise ValueError(f"config key 'backward.shift' must be identity, power or fixed; got {cfg.shift!r}")
    return out.clamp(lo, hi)


class _RawStudent(nn.Module):
    """Training view of the student whose forward is EDMPrecond.raw -> (F, c_skip, c_out): the loss is taken
    in F-space (fused denoising_loss), and the training forward must be a module call so a DeepSpeed engine can
    wrap it. Its parameters are the student's, in the same order (EMA.update_from relies on that)."""

    def __init__(self, precond: nn.Module):
        super().__init__()
        self.precond = precond

    def forward(self, x, sigma, labels=None):
        return self.precond.raw(x, sigma, labels)


class BackwardDistillation(DistillMethod):
    name = "backward"
    supports_distributed = True

    def __init__(self, cfg, dataset, device, backend=None):
        super().__init__(cfg, dataset, device, backend)
        b = cfg.backward
        self.teacher = self.frozen_teacher(self.load_teacher())
        self.levels = [float(s) for s in b.student_sigmas]
        weights = torch.tensor([float(w) for w in b.step_weights] or [1.0] * len(self.levels), dtype=torch.float64)
        self.step_probs = (weights / weights.sum()).to(device=device, dtype=torch.float32)
        # The deepest level that is ever trained: the trajectory never needs to run further.
        self.max_step = max(j for j, w in enumerate(weights.tolist()) if w > 0)
        d = cfg.diffusion
        self.shifted_levels = shifted_sigma(torch.tensor(self.levels, dtype=torch.float64), b,
                                            d.sigma_min, d.sigma_max).tolist()
        # The same levels as device tensors, made once: indexing them by a batch of steps k needs no host copy.
        self.level_table = torch.tensor(self.levels, dtype=torch.float32, device=device)
        self.shifted_table = torch.tensor(self.shifted_levels, dtype=torch.float32, device=device)
        self.generator = self.student_from(self.teacher)
        self.ema = self.make_emas(self.generator)
        self.parameter_counts = {"generator": count_parameters(self.generator),
                                 "teacher_frozen": count_parameters(self.teacher)}
        # The engine last (ZeRO-3 shards parameters here); self.generator stays the plain student.
        self.gen = self.backend.trainable("generator", _RawStudent(self.generator), cfg.optim)
        # ZeRO: each rank averages its slice of the generator only; an EMA that simulates trajectories stays whole
        self.shard_emas(self.gen, main=cfg.backward.trajectory_net == "student")

    # -- training -----------------------------------------------------------------------------------------
    def draw(self, n: int):
        """(labels, z, k): the random choices of one generator step, in this order from self.rng.
        k holds 0-based student step indices, one per sample."""
        labels = self.random_labels(n)
        z = torch.randn((n, *self.dataset.shape), generator=self.rng, device=self.device)
        k = torch.multinomial(self.step_probs, n, replacement=True, generator=self.rng)
        return labels, z, k

    @torch.no_grad()
    def trajectory_inputs(self, z: torch.Tensor, k: torch.Tensor, labels=None, noises=None) -> torch.Tensor:
        """x_{s_k} for each sample: the student's own earlier steps from z, without gradient (backward
        distillation). Re-noising: `noises` (max_step tensors drawn in advance), else max_step draws from
        self.rng."""
        b = self.cfg.backward
        net = self.generator if b.trajectory_net == "student" else self.ema.net
        states = backward_states(net, z, self.levels, self.max_step + 1, b.parameterization, b.noise_correction,
                                 labels, generator=self.rng, noises=noises)
        return torch.stack(states)[k, torch.arange(z.shape[0], device=z.device)]

    @torch.no_grad()
    def teacher_target(self, x_shift: torch.Tensor, k: torch.Tensor, labels=None) -> torch.Tensor:
        """The frozen teacher's clean estimate from x_shift (noised to s' = shifted_levels[k])."""
        b, d = self.cfg.backward, self.cfg.diffusion
        s_shift = self.shifted_table[k]
        if b.teacher_steps == 1:
            return self.teacher(x_shift, s_shift, labels)
        target = torch.empty_like(x_shift)
        for j, s in enumerate(self.shifted_levels[: self.max_step + 1]):  # one ODE per level (<= 3)
            idx = (k == j).nonzero().squeeze(1)
            if idx.numel() == 0:
                continue
            grid = karras_sigmas(b.teacher_steps, min(d.sigma_min, s), s, d.rho)
            target[idx] = ode_solve(self.teacher, x_shift[idx], grid, b.teacher_solver,
                                    None if labels is None else labels[idx])
        return target

    def reconstruction_loss(self, x_in: torch.Tensor, k: torch.Tensor, labels=None, noise=None):
        """Shifted reconstruction loss of the student at step k from the (constant) inputs x_in.
        Returns (scalar loss, per-sample loss). Re-noising: `noise` (drawn in advance), else drawn from
        self.rng."""
        b = self.cfg.backward
        sigma = self.level_table[k]
        F, c_skip, c_out = self.gen.module(x_in, sigma, labels)
        shape = (-1,) + (1,) * (x_in.ndim - 1)
        with torch.no_grad():  # x0_s itself, only as the start of the (detached) target
            x0_s = (c_skip.reshape(shape) * x_in.float() + c_out.reshape(shape) * F.float()).to(x_in.dtype)
            s_shift = self.shifted_table[k]
            noise = self.noise_like(x0_s) if noise is None else noise
            x_shift = losses.add_noise(x0_s, 1.0, s_shift, noise=noise, impl=self.impl)
        target = self.teacher_target(x_shift, k, labels)
        per = losses.denoising_loss(F, x_in, target, sigma, self.sigma_data, impl=self.impl)
        if b.weighting == "none":
            per = per / edm_loss_weight(sigma, self.sigma_data)
        return per.mean(), per

    def step_stats(self, k: torch.Tensor, per: torch.Tensor) -> dict:
        """Which steps were trained and their mean losses, over this rank's samples."""
        n = k.shape[0]
        per = per.detach()
        stats = {"backward/step_mean": (k + 1).float().mean()}
        for j in range(self.max_step + 1):
            mask = (k == j).float()
            count = mask.sum()
            stats[f"backward/frac_step{j + 1}"] = count / n
            stats[f"backward/loss_step{j + 1}"] = torch.where(
                count > 0, (per * mask).sum() / count.clamp(min=1), torch.full_like(count, float("nan")))
        return stats

    def generator_loss(self, n: int):
        """One generator loss on n samples: draw, simulate the trajectory (no gradient), shifted reconstruction
        loss (all draws from self.rng in that order; one process, no accumulation)."""
        labels, z, k = self.draw(n)
        x_in = self.trajectory_inputs(z, k, labels)
        loss, per = self.reconstruction_loss(x_in, k, labels)
        return loss, self.step_stats(k, per)

    def step(self, next_batch, step, nimg):
        # Data-free: the teacher is the only source of knowledge (next_batch is not consumed).
        n = self.global_batch
        labels, z, k = (None if t is None else self.local(t) for t in self.draw(n))
        noises = [self.noise_global() for _ in range(self.max_step)]  # the trajectory's re-noisings
        shift_noise = self.noise_global()  # the re-noising of x0_s to the shifted level
        x_in = self.trajectory_inputs(z, k, labels, noises)
        stats, per = {}, []
        for chunk, w in self.micro_chunks():
            loss, per_chunk = self.reconstruction_loss(x_in[chunk], k[chunk], rows(labels, chunk), shift_noise[chunk])
            loss = self.weighted(loss, w)
            self.gen.backward(loss)
            accumulate(stats, {"gen/loss": loss.detach()}, None)
            per.append(per_chunk.detach())
        return {**self.finish_generator_step(stats, step, nimg), **self.step_stats(k, torch.cat(per))}

    # -- persistence and evaluation -----------------------------------------------------------------------
    def _sampler(self, net):
        """The run's sampler on `net`; re-noising draws come from a fixed seed, so metrics are reproducible and
        the student and its initialisation see the same noise."""
        b = self.cfg.backward
        renoise = torch.Generator(device=self.device).manual_seed(EVAL_SEED + 1)

        def sample(noise, labels):
            return backward_sample(net, noise, self.levels, b.parameterization, b.noise_correction, labels, renoise)

        return sample

    def samplers(self):
        return {"student": self._sampler(self.ema.net), "init_student": self._sampler(self.teacher),
                **self.teacher_samplers(self.teacher)}

    def export_info(self) -> dict:
        b = self.cfg.backward
        return {"role": "generator", "sigma_g": list(self.levels), "sampler": "backward",
                "parameterization": b.parameterization, "noise_correction": b.noise_correction}
