"""DMD / DMD2 (design.md 4.2): distribution matching distillation with a trained fake score network.

Networks: the generator G (a copy of the teacher denoiser; G(z) = D(sigma_g z; sigma_g) for a one-level
student), the fake score denoiser D_fake (a copy of the teacher, trained), and the teacher D_real (frozen: no
gradients, no optimiser). DMD2 adds a small GAN head on D_fake's bottleneck features, trained with D_fake's
optimiser.

Phases of one `step` (one generator update):
1. `dmd.fake_steps` fake-score updates (DMD 1, DMD2 5): EDM denoising loss of D_fake on DETACHED generator
   samples, ln sigma ~ N(dmd.fake_p_mean, dmd.fake_p_std^2) clipped to [diffusion.sigma_min, sigma_max].
   With dmd.gan_weight > 0 the head also learns, in the same update, the non-saturating discriminator loss
   softplus(-d(real_t)) + softplus(d(gen_t)) weighted by dmd.gan_disc_weight (DMD2's 1e-2), at the same
   noise distribution: noised REAL data (label real) vs the same noised generator samples (label fake).
   Only this phase reads the dataset, and only when the GAN is on (DMD alone never reads real data).
2. Generator update: x = G(z); sigma uniform over the Karras-grid levels (dmd.num_grid_steps levels from
   diffusion.sigma_min to sigma_max, rho = diffusion.rho) whose position lies in [dmd.t_min_frac,
   dmd.t_max_frac]; x_t = x + sigma eps; D_real(x_t), D_fake(x_t) under no_grad; loss =
   losses.dmd_loss(x, D_real, D_fake): d loss / d x = (p_real - p_fake) / mean|p_real| / numel (4.2).
   DMD2's GAN term adds dmd.gan_weight * mean softplus(-d(x_t')) (default 0 = DMD; DMD2 paper 3e-3), x_t' noised
   at the fake-score noise distribution, gradients flowing through D_fake's encoder (parameters frozen).

Multi-step students (`dmd.student_sigmas` with K > 1 decreasing levels; sampling = student_sample: denoise,
re-noise with fresh noise to the next level): each update picks a level k uniformly. With
dmd.backward_simulation (DMD2) the input at level k is made by the student itself: its first k levels run
without gradient from noise, the resulting x0 is re-noised to sigma_k, then one step with gradient. Without
it, the input at k > 0 is noised real data (DMD2's ablation; this reads a batch). The fake score is trained on
outputs drawn the same way, so it models the distribution the DMD loss is applied to.

No classifier-free guidance (the toy and MNIST teachers have none).
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from fastonestep import losses
from fastonestep.config import dmd_band
from fastonestep.diffusion.samplers import edm_sample, karras_sigmas, student_sample
from fastonestep.engine.ema import EMA
from fastonestep.engine.export import load_model
from fastonestep.methods.base import Method, make_optimizer, optimizer_step, sample_sigma
from fastonestep.methods.diffratio import DiffRatio
from fastonestep.networks.build import count_parameters
from fastonestep.networks.heads import GANHead

RENOISE_SEED = 4321  # evaluation of multi-level students: the re-noising draws are fixed too


class DMD(Method):
    name = "dmd"

    # Teacher checks and reuse of the teacher's measured metrics are exactly DiffRatio's (they read only cfg,
    # teacher_info and num_classes).
    _check_teacher = DiffRatio._check_teacher
    known_metrics = DiffRatio.known_metrics

    def __init__(self, cfg, dataset, device):
        super().__init__(cfg, dataset, device)
        dmd, d = cfg.dmd, cfg.diffusion
        teacher, self.teacher_info = load_model(cfg.teacher, device)
        self._check_teacher(dataset)
        self.sigma_data = self.teacher_info["sigma_data"]
        self.teacher = teacher.eval().requires_grad_(False)
        self.generator = copy.deepcopy(teacher).train().requires_grad_(True)
        # The fake score and the GAN head share one optimiser (DMD2), so they live in one module.
        self.critic = nn.ModuleDict({"score": copy.deepcopy(teacher).train().requires_grad_(True)})
        self.use_gan = dmd.gan_weight > 0
        if self.use_gan:
            self.critic["gan_head"] = GANHead(self.critic["score"].net.feature_dim).to(device)
        self.opt_g = make_optimizer(self.generator.parameters(), cfg.optim)
        self.opt_f = make_optimizer(self.critic.parameters(), dmd.fake_optim)
        self.ema = EMA(self.generator, cfg.train.ema_halflife_kimg, cfg.train.ema_rampup)
        ascending = karras_sigmas(dmd.num_grid_steps, d.sigma_min, d.sigma_max, d.rho, device=device,
                                  dtype=torch.float32)[:-1].flip(0)
        band = dmd_band(dmd.num_grid_steps, dmd.t_min_frac, dmd.t_max_frac)
        self.band_sigmas = ascending[band.start:band.stop]
        self.levels = self.student_levels()
        self.parameter_counts = {"generator": count_parameters(self.generator),
                                 "fake_score": count_parameters(self.critic["score"]),
                                 "teacher_frozen": count_parameters(self.teacher),
                                 "gan_head": count_parameters(self.critic["gan_head"]) if self.use_gan else 0}

    def student_levels(self) -> list[float]:
        return [float(s) for s in self.cfg.dmd.student_sigmas]

    # -- noise levels -------------------------------------------------------------------------------------
    def band_sigma(self, n: int) -> torch.Tensor:
        idx = torch.randint(0, self.band_sigmas.numel(), (n,), generator=self.rng, device=self.device)
        return self.band_sigmas[idx]

    def fake_sigma(self, n: int) -> torch.Tensor:
        dmd, d = self.cfg.dmd, self.cfg.diffusion
        return sample_sigma(n, dmd.fake_p_mean, dmd.fake_p_std, d.sigma_min, d.sigma_max, self.rng, self.device)

    # -- the student --------------------------------------------------------------------------------------
    def _real_batch(self, next_batch):
        x, labels = next_batch()
        return x, (labels if self.conditional else None)

    def student_output(self, n: int, next_batch):
        """(x0, labels): the student's prediction at a random level k, the last step under the caller's grad
        mode (DMD2 backward simulation for k > 0, see the module docstring)."""
        levels = self.levels
        labels = self.random_labels(n)
        z = torch.randn((n, *self.dataset.shape), generator=self.rng, device=self.device)
        k = 0 if len(levels) == 1 else int(torch.randint(len(levels), (1,), generator=self.rng, device=self.device).item())
        if k == 0:
            x = z * levels[0]
        elif self.cfg.dmd.backward_simulation:
            with torch.no_grad():
                x0 = student_sample(self.generator, z, levels[:k], labels=labels, generator=self.rng)
            x = x0 + levels[k] * self.noise_like(x0)
        else:
            x_real, labels = self._real_batch(next_batch)
            x = x_real + levels[k] * self.noise_like(x_real)
        return self.generator(x, levels[k], labels), labels

    def fake_samples(self, n: int, next_batch):
        """Detached samples of the distribution the DMD loss acts on (the fake score's training data)."""
        with torch.no_grad():
            return self.student_output(n, next_batch)

    def generator_outputs(self, n: int, next_batch):
        """(x, labels, extra loss or None, extra stats) for the generator update; DP-DMD overrides this."""
        x, labels = self.student_output(n, next_batch)
        return x, labels, None, {}

    # -- fake score (and GAN discriminator) ---------------------------------------------------------------
    def gan_logits(self, x_t, sigma, labels):
        return self.critic["gan_head"](self.critic["score"].features(x_t, sigma, labels))

    def fake_step(self, next_batch, step):
        n = self.cfg.train.batch_size
        x_gen, labels = self.fake_samples(n, next_batch)
        sigma = self.fake_sigma(n)
        x_t = losses.add_noise(x_gen, 1.0, sigma, noise=self.noise_like(x_gen), impl=self.impl)
        F_out, _, _ = self.critic["score"].raw(x_t, sigma, labels)
        loss = losses.denoising_loss(F_out, x_t, x_gen, sigma, self.sigma_data, impl=self.impl).mean()
        stats = {"fake/loss": loss.detach()}
        total = loss
        if self.use_gan:
            x_real, labels_real = self._real_batch(next_batch)
            sigma_real = self.fake_sigma(n)
            xr_t = losses.add_noise(x_real, 1.0, sigma_real, noise=self.noise_like(x_real), impl=self.impl)
            d_real, d_gen = self.gan_logits(xr_t, sigma_real, labels_real), self.gan_logits(x_t, sigma, labels)
            loss_d = F.softplus(-d_real).mean() + F.softplus(d_gen).mean()
            total = total + self.cfg.dmd.gan_disc_weight * loss_d
            stats.update({"fake/gan_loss": loss_d.detach(),
                          "fake/gan_accuracy": 0.5 * ((d_real > 0).float().mean() + (d_gen < 0).float().mean())})
        total.backward()
        stats["grad_norm/fake"] = optimizer_step(self.opt_f, self.critic, self.cfg.dmd.fake_optim, step)
        return stats

    # -- generator ----------------------------------------------------------------------------------------
    def dmd_generator_loss(self, x, labels=None):
        """DMD loss (plus DMD2's GAN term) of generator outputs x; the critic must be frozen. (loss, stats)"""
        sigma = self.band_sigma(x.shape[0])
        with torch.no_grad():
            x_t = losses.add_noise(x.detach(), 1.0, sigma, noise=self.noise_like(x), impl=self.impl)
            real_hat = self.teacher(x_t, sigma, labels)
            fake_hat = self.critic["score"](x_t, sigma, labels)
            p_real = (x.detach() - real_hat).float().flatten(1)
            ratio = (fake_hat - real_hat).float().flatten(1).abs().mean(1) / (p_real.abs().mean(1) + 1e-8)
        loss = losses.dmd_loss(x, real_hat, fake_hat, impl=self.impl)
        stats = {"gen/dmd_loss": loss.detach(), "gen/dmd_grad_magnitude": ratio[torch.isfinite(ratio)].mean(),
                 "gen/nonfinite_samples": (~torch.isfinite(ratio)).sum()}
        if self.use_gan:
            sigma_c = self.fake_sigma(x.shape[0])
            xc_t = losses.add_noise(x, 1.0, sigma_c, noise=self.noise_like(x), impl=self.impl)
            loss_gan = F.softplus(-self.gan_logits(xc_t, sigma_c, labels)).mean()
            loss = loss + self.cfg.dmd.gan_weight * loss_gan
            stats["gen/gan_loss"] = loss_gan.detach()
        return loss, stats

    def generator_loss(self, next_batch=None):
        """The whole generator objective for one update (critic frozen by the caller). (loss, stats)"""
        x, labels, extra, stats = self.generator_outputs(self.cfg.train.batch_size, next_batch)
        loss, dmd_stats = self.dmd_generator_loss(x, labels)
        stats.update(dmd_stats)
        if extra is not None:
            loss = loss + extra
        return loss, stats

    def generator_step(self, next_batch, step, nimg):
        n = self.cfg.train.batch_size
        self.critic.requires_grad_(False)  # frozen parameters; gradients still flow through inputs (GAN term)
        try:
            loss, stats = self.generator_loss(next_batch)
            loss.backward()
        finally:
            self.critic.requires_grad_(True)
        grad_norm = optimizer_step(self.opt_g, self.generator, self.cfg.optim, step)
        self.ema.update(self.generator, nimg + n, n)
        return {"gen/loss": loss.detach(), "grad_norm/generator": grad_norm, **stats}

    def step(self, next_batch, step, nimg):
        stats = {}
        for _ in range(self.cfg.dmd.fake_steps):
            stats = self.fake_step(next_batch, step)
        stats.update(self.generator_step(next_batch, step, nimg))
        return stats

    # -- persistence and evaluation -----------------------------------------------------------------------
    def state_dict(self):
        return {"generator": self.generator.state_dict(), "critic": self.critic.state_dict(),
                "opt_g": self.opt_g.state_dict(), "opt_f": self.opt_f.state_dict(), "ema": self.ema.state_dict(),
                **self.rng_state()}

    def load_state_dict(self, state):
        self.generator.load_state_dict(state["generator"])
        self.critic.load_state_dict(state["critic"])
        self.opt_g.load_state_dict(state["opt_g"])
        self.opt_f.load_state_dict(state["opt_f"])
        self.ema.load_state_dict(state["ema"])
        self.load_rng_state(state)

    def export_network(self):
        return self.ema.net

    def _student_sampler(self, net):
        levels, gen = self.levels, torch.Generator(device=self.device).manual_seed(RENOISE_SEED)

        def sample(noise, labels):
            return student_sample(net, noise, levels, labels=labels, generator=gen)
        return sample

    def samplers(self):
        d = self.cfg.diffusion
        name = "one_step" if len(self.levels) == 1 else f"{len(self.levels)}_step"
        teacher = self.teacher

        def teacher_ode(noise, labels):
            return edm_sample(teacher, noise, num_steps=d.sample_steps, sigma_min=d.sigma_min, sigma_max=d.sigma_max,
                              rho=d.rho, solver=d.solver, labels=labels)

        out = {name: self._student_sampler(self.ema.net), f"init_{name}": self._student_sampler(teacher)}
        if self.cfg.eval.teacher_fd:
            out[f"teacher_{d.solver}{d.sample_steps}"] = teacher_ode
        return out

    def export_info(self) -> dict:
        return {"role": "generator", "sigma_g": list(self.levels)}
