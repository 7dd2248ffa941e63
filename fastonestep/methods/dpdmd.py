"""DP-DMD (design.md 4.3): a diversity-preserving K-step student (K >= 2 levels, dpdmd.student_sigmas
s_1 > s_2 > ... > s_K). The first step is trained only to follow the teacher's trajectory, so the student
keeps the teacher's noise -> sample assignment (diversity); the later steps are trained by DMD for quality.

First step (target prediction). From x = s_1 z the student predicts x0_1 = G(x, s_1). From the same x the
teacher's probability-flow ODE, dpdmd.teacher_steps Euler/Heun steps on a Karras grid from s_1 to s_2, lands
at x_{s2}^T. The target is the prediction whose deterministic (DDIM) step s_1 -> s_2,
x_{s2} = (s_2/s_1) x + (1 - s_2/s_1) x0, lands exactly there:
    x0* = (x_{s2}^T - (s_2/s_1) x) / (1 - s_2/s_1).
Prediction and target are converted to dpdmd.target ("x0", "eps" or "v", via fastonestep.diffusion.conversions)
in the variance-preserving coordinates of the same point: x_t = a x, alpha = a, sigma = a s_1 with
a = 1/sqrt(1 + s_1^2). x0 and eps are the same as in VE coordinates; v = (eps - s_1 x0) / sqrt(1 + s_1^2) is
Salimans & Ho's v, whose scale stays O(1) at large s_1 (the VE "v" eps - s_1 x0 would weight x0 errors by s_1^2).
The loss is dpdmd.diversity_weight * mean squared error in that form.

Steps 2..K (DMD). They start from the first step's output DETACHED and re-noised with fresh noise,
x_{s2} = sg(x0_1) + s_2 * noise: this is how the student is sampled (diffusion.samplers.student_sample, also
what `fastonestep sample` runs on the exported model), so training sees the inputs inference produces. The
DDIM landing above only defines the first step's target. Steps 2..K run with gradient, chained, and the DMD
loss (losses.dmd_loss, 4.2) on the final output trains them; the detach blocks any DMD gradient at step 1.
The network is shared by all levels, so its parameters receive both losses, at different levels.

The DMD machinery is DMD's (methods/dmd.py) and its hyper-parameters come from the `dmd` section: fake-score
steps, its noise distribution and optimiser (dmd.fake_*), the generator noise band (dmd.t_min_frac,
dmd.t_max_frac, dmd.num_grid_steps). dmd.student_sigmas and dmd.backward_simulation are not used (the levels
are dpdmd.student_sigmas) and dmd.gan_weight must be 0: DP-DMD has no discriminator and no perceptual network.
The fake score is trained on the student's final K-step samples, the distribution the DMD loss acts on.
"""
from __future__ import annotations

import math

import torch

from fastonestep.diffusion.conversions import from_x0
from fastonestep.diffusion.samplers import karras_sigmas, ode_solve, student_sample
from fastonestep.methods.distill import rows
from fastonestep.methods.dmd import DMD


def ddim_target(x_end: torch.Tensor, x: torch.Tensor, s1: float, s2: float) -> torch.Tensor:
    """The x0 whose deterministic step from (x, s1) to s2 lands on x_end: (x_end - (s2/s1) x) / (1 - s2/s1)."""
    r = s2 / s1
    return (x_end - r * x) / (1 - r)


class DPDMD(DMD):
    name = "dpdmd"

    def student_levels(self) -> list[float]:
        return [float(s) for s in self.cfg.dpdmd.student_sigmas]

    def first_step_target(self, x: torch.Tensor, labels=None) -> torch.Tensor:
        """x0* from the teacher's ODE s_1 -> s_2 started at x (no gradient)."""
        dp, s1, s2 = self.cfg.dpdmd, self.levels[0], self.levels[1]
        grid = karras_sigmas(dp.teacher_steps + 1, s2, s1, self.cfg.diffusion.rho)[:-1]
        with torch.no_grad():
            x_end = ode_solve(self.teacher, x, grid, solver=dp.teacher_solver, labels=labels)
        return ddim_target(x_end, x, s1, s2)

    def target_loss(self, x0_pred, x0_target, x):
        form, s1 = self.cfg.dpdmd.target, self.levels[0]
        a = 1.0 / math.sqrt(1.0 + s1 * s1)  # VP coordinates of the same point (see the module docstring)
        x_vp = a * x.float()
        pred = from_x0(x0_pred.float(), form, x_vp, a, a * s1)
        target = from_x0(x0_target.float(), form, x_vp, a, a * s1)
        return self.cfg.dpdmd.diversity_weight * (pred - target).square().mean()

    def fake_samples(self, next_batch):
        """The student's K-step samples (global-batch draws: labels, z, K - 1 re-noisings; this rank's slice)."""
        labels, z = self.random_labels_global(), self.noise_global()
        noises = [self.noise_global() for _ in self.levels[1:]]
        with torch.no_grad():
            return student_sample(self.generator, z, self.levels, labels=labels, noises=noises), labels

    def generator_inputs(self, next_batch):
        """Draws of one generator update in the single-process order: labels, z, the re-noising before each
        later step, then the DMD loss's draws (this rank's slices). The teacher's ODE target is per sample, so
        it is computed per accumulation chunk (generator_outputs)."""
        labels, z = self.random_labels_global(), self.noise_global()
        noises = [self.noise_global() for _ in self.levels[1:]]
        dmd = {k: self.local(v) for k, v in self.dmd_draws(self.global_batch).items()}
        return {"labels": labels, "z": z, "noises": noises, "dmd": dmd}

    def generator_outputs(self, draws, chunk):
        levels = self.levels
        labels = rows(draws["labels"], chunk)
        x = draws["z"][chunk] * levels[0]
        x0 = self.gen.module(x, levels[0], labels)
        loss_t = self.target_loss(x0, self.first_step_target(x, labels), x)
        x0 = x0.detach()  # steps 2..K: the DMD gradient stops here
        for sigma, noise in zip(levels[1:], draws["noises"]):
            x0 = self.gen.module(x0 + sigma * noise[chunk], sigma, labels)
        return x0, labels, loss_t, {"gen/target_loss": loss_t.detach()}
