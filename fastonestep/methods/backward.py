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
"""
from __future__ import annotations

import copy
import math

import torch

from fastonestep import losses
from fastonestep.diffusion.backward_sampler import backward_sample, backward_states
from fastonestep.diffusion.precond import edm_loss_weight
from fastonestep.diffusion.samplers import edm_sample, karras_sigmas, ode_solve
from fastonestep.engine.ema import EMA
from fastonestep.engine.evaluate import EVAL_SEED
from fastonestep.engine.export import load_model
from fastonestep.methods.base import Method, make_optimizer, optimizer_step
from fastonestep.methods.diffratio import DiffRatio
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


def check_teacher(info: dict, path: str, dataset, num_classes: int) -> None:
    shape, classes = tuple(info["data_shape"]), info["num_classes"]
    if shape != tuple(dataset.shape):
        raise ValueError(f"teacher '{path}' was trained on data of shape {shape}, "
                         f"but the dataset has shape {tuple(dataset.shape)}")
    if classes != num_classes:
        raise ValueError(f"teacher '{path}' has num_classes={classes}, the run has "
                         f"{num_classes} (config key 'data.class_conditional')")


class BackwardDistillation(Method):
    name = "backward"

    def __init__(self, cfg, dataset, device):
        super().__init__(cfg, dataset, device)
        b = cfg.backward
        self.teacher, self.teacher_info = load_model(cfg.teacher, device)
        check_teacher(self.teacher_info, cfg.teacher, dataset, self.num_classes)
        self.teacher.requires_grad_(False)
        self.sigma_data = self.teacher_info["sigma_data"]
        self.levels = [float(s) for s in b.student_sigmas]
        weights = torch.tensor([float(w) for w in b.step_weights] or [1.0] * len(self.levels), dtype=torch.float64)
        self.step_probs = (weights / weights.sum()).to(device=device, dtype=torch.float32)
        # The deepest level that is ever trained: the trajectory never needs to run further.
        self.max_step = max(j for j, w in enumerate(weights.tolist()) if w > 0)
        d = cfg.diffusion
        self.shifted_levels = shifted_sigma(torch.tensor(self.levels, dtype=torch.float64), b,
                                            d.sigma_min, d.sigma_max).tolist()
        self.generator = copy.deepcopy(self.teacher).train().requires_grad_(True)
        self.opt = make_optimizer(self.generator.parameters(), cfg.optim)
        self.ema = EMA(self.generator, cfg.train.ema_halflife_kimg, cfg.train.ema_rampup)
        self.parameter_counts = {"generator": count_parameters(self.generator),
                                 "teacher_frozen": count_parameters(self.teacher)}

    # -- training -----------------------------------------------------------------------------------------
    def draw(self, n: int):
        """(labels, z, k): the random choices of one generator step, in this order from self.rng.
        k holds 0-based student step indices, one per sample."""
        labels = self.random_labels(n)
        z = torch.randn((n, *self.dataset.shape), generator=self.rng, device=self.device)
        k = torch.multinomial(self.step_probs, n, replacement=True, generator=self.rng)
        return labels, z, k

    @torch.no_grad()
    def trajectory_inputs(self, z: torch.Tensor, k: torch.Tensor, labels=None) -> torch.Tensor:
        """x_{s_k} for each sample: the student's own earlier steps from z, without gradient (backward
        distillation). Draws max_step re-noising tensors from self.rng."""
        b = self.cfg.backward
        net = self.generator if b.trajectory_net == "student" else self.ema.net
        states = backward_states(net, z, self.levels, self.max_step + 1, b.parameterization, b.noise_correction,
                                 labels, generator=self.rng)
        return torch.stack(states)[k, torch.arange(z.shape[0], device=z.device)]

    @torch.no_grad()
    def teacher_target(self, x_shift: torch.Tensor, k: torch.Tensor, labels=None) -> torch.Tensor:
        """The frozen teacher's clean estimate from x_shift (noised to s' = shifted_levels[k])."""
        b, d = self.cfg.backward, self.cfg.diffusion
        s_shift = torch.tensor(self.shifted_levels, dtype=torch.float32, device=k.device)[k]
        if b.teacher_steps == 1:
            return self.teacher(x_shift, s_shift, labels)
        target = torch.empty_like(x_shift)
        for j, s in enumerate(self.shifted_levels[: self.max_step + 1]):  # one ODE per level (<= 3)
            idx = (k == j).nonzero().squeeze(1)
            if idx.numel() == 0:
                continue
            grid = karras_sigmas(b.teacher_steps, min(d.sigma_min, s), s, d.rho, device=x_shift.device)
            target[idx] = ode_solve(self.teacher, x_shift[idx], grid, b.teacher_solver,
                                    None if labels is None else labels[idx])
        return target

    def reconstruction_loss(self, x_in: torch.Tensor, k: torch.Tensor, labels=None):
        """Shifted reconstruction loss of the student at step k from the (constant) inputs x_in.
        Returns (scalar loss, per-sample loss). Draws the re-noising noise from self.rng."""
        b = self.cfg.backward
        sigma = torch.tensor(self.levels, dtype=torch.float32, device=x_in.device)[k]
        F, c_skip, c_out = self.generator.raw(x_in, sigma, labels)
        shape = (-1,) + (1,) * (x_in.ndim - 1)
        with torch.no_grad():  # x0_s itself, only as the start of the (detached) target
            x0_s = (c_skip.reshape(shape) * x_in.float() + c_out.reshape(shape) * F.float()).to(x_in.dtype)
            s_shift = torch.tensor(self.shifted_levels, dtype=torch.float32, device=x_in.device)[k]
            x_shift = losses.add_noise(x0_s, 1.0, s_shift, noise=self.noise_like(x0_s), impl=self.impl)
        target = self.teacher_target(x_shift, k, labels)
        per = losses.denoising_loss(F, x_in, target, sigma, self.sigma_data, impl=self.impl)
        if b.weighting == "none":
            per = per / edm_loss_weight(sigma, self.sigma_data)
        return per.mean(), per

    def generator_loss(self, n: int):
        """One generator loss: draw, simulate the trajectory (no gradient), shifted reconstruction loss."""
        labels, z, k = self.draw(n)
        x_in = self.trajectory_inputs(z, k, labels)
        loss, per = self.reconstruction_loss(x_in, k, labels)
        stats = {"backward/step_mean": (k + 1).float().mean()}
        for j in range(self.max_step + 1):
            mask = (k == j).float()
            count = mask.sum()
            stats[f"backward/frac_step{j + 1}"] = count / n
            stats[f"backward/loss_step{j + 1}"] = torch.where(
                count > 0, (per.detach() * mask).sum() / count.clamp(min=1), torch.full_like(count, float("nan")))
        return loss, stats

    def step(self, next_batch, step, nimg):
        # Data-free: the teacher is the only source of knowledge (next_batch is not consumed).
        n = self.cfg.train.batch_size
        loss, stats = self.generator_loss(n)
        loss.backward()
        grad_norm = optimizer_step(self.opt, self.generator, self.cfg.optim, step)
        self.ema.update(self.generator, nimg + n, n)
        return {"gen/loss": loss.detach(), "grad_norm/generator": grad_norm, **stats}

    # -- persistence and evaluation -----------------------------------------------------------------------
    def state_dict(self):
        return {"generator": self.generator.state_dict(), "opt": self.opt.state_dict(), "ema": self.ema.state_dict(),
                **self.rng_state()}

    def load_state_dict(self, state):
        self.generator.load_state_dict(state["generator"])
        self.opt.load_state_dict(state["opt"])
        self.ema.load_state_dict(state["ema"])
        self.load_rng_state(state)

    def export_network(self):
        return self.ema.net

    def _sampler(self, net):
        """The run's sampler on `net`; re-noising draws come from a fixed seed, so metrics are reproducible and
        the student and its initialisation see the same noise."""
        b = self.cfg.backward
        renoise = torch.Generator(device=self.device).manual_seed(EVAL_SEED + 1)

        def sample(noise, labels):
            return backward_sample(net, noise, self.levels, b.parameterization, b.noise_correction, labels, renoise)

        return sample

    def samplers(self):
        d = self.cfg.diffusion
        out = {"student": self._sampler(self.ema.net), "init_student": self._sampler(self.teacher)}
        if self.cfg.eval.teacher_fd:
            def teacher_ode(noise, labels):
                return edm_sample(self.teacher, noise, num_steps=d.sample_steps, sigma_min=d.sigma_min,
                                  sigma_max=d.sigma_max, rho=d.rho, solver=d.solver, labels=labels)

            out[f"teacher_{d.solver}{d.sample_steps}"] = teacher_ode
        return out

    # The teacher's multi-step metrics, reused when its run measured them with the same settings (needs only
    # cfg.teacher / cfg.diffusion / cfg.eval, which every distillation config has).
    known_metrics = DiffRatio.known_metrics

    def export_info(self) -> dict:
        b = self.cfg.backward
        return {"role": "generator", "sigma_g": list(self.levels), "sampler": "backward",
                "parameterization": b.parameterization, "noise_correction": b.noise_correction}
