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

Distributed (engine/distributed.py): the generator and the critic are one Trainable each; the teacher is a plain
frozen module on every rank. Every random draw of a step is made for the global batch in the single-process
order (methods/base.py) and each rank keeps its slice, so N processes follow one process's trajectory; the
no-grad work (backward simulation, fake-score samples) runs on the whole local slice, the losses per
accumulation chunk of train.batch_per_gpu, each scaled to its share of the batch.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fastonestep import losses
from fastonestep.config import dmd_band
from fastonestep.diffusion.samplers import karras_sigmas, student_sample
from fastonestep.methods.base import sample_sigma
from fastonestep.methods.distill import COUNTS, DistillMethod, accumulate, repeated_updates, rows
from fastonestep.networks.build import count_parameters
from fastonestep.networks.heads import GANHead

RENOISE_SEED = 4321  # evaluation of multi-level students: the re-noising draws are fixed too


class Critic(nn.ModuleDict):
    """DMD's trained critic: the fake score denoiser ("score") and, with DMD2's GAN, the head on its features
    ("gan_head"); one optimiser trains both. `forward` is what the critic's engine runs in the fake-score update
    (head="score": the raw output F, since the denoising loss is taken in F-space; head="gan": the
    discriminator logits). The frozen uses in the generator update call the plain modules."""

    def gan_logits(self, x_t, sigma, labels=None):
        return self["gan_head"](self["score"].features(x_t, sigma, labels))

    def forward(self, x_t, sigma, labels=None, head: str = "score"):
        if head == "score":
            return self["score"].raw(x_t, sigma, labels)[0]
        if head == "gan":
            return self.gan_logits(x_t, sigma, labels)
        raise ValueError(f"Critic head must be 'score' or 'gan', got {head!r}")


class DMD(DistillMethod):
    name = "dmd"
    supports_distributed = True

    def __init__(self, cfg, dataset, device, backend=None):
        super().__init__(cfg, dataset, device, backend)
        dmd, d = cfg.dmd, cfg.diffusion
        self.teacher = self.frozen_teacher(self.load_teacher())
        self.generator = self.student_from(self.teacher)
        # The fake score and the GAN head share one optimiser (DMD2), so they live in one module.
        self.critic = Critic({"score": self.student_from(self.teacher)})
        self.use_gan = dmd.gan_weight > 0
        if self.use_gan:
            self.critic["gan_head"] = GANHead(self.critic["score"].net.feature_dim).to(device)
        self.ema = self.make_emas(self.generator)
        ascending = karras_sigmas(dmd.num_grid_steps, d.sigma_min, d.sigma_max, d.rho, device=device,
                                  dtype=torch.float32)[:-1].flip(0)
        band = dmd_band(dmd.num_grid_steps, dmd.t_min_frac, dmd.t_max_frac)
        self.band_sigmas = ascending[band.start:band.stop]
        self.levels = self.student_levels()
        self.parameter_counts = {"generator": count_parameters(self.generator),
                                 "fake_score": count_parameters(self.critic["score"]),
                                 "teacher_frozen": count_parameters(self.teacher),
                                 "gan_head": count_parameters(self.critic["gan_head"]) if self.use_gan else 0}
        # One engine per trained network, created after everything that reads full parameters (ZeRO-3 shards
        # them here); self.generator / self.critic stay the plain networks (no-grad and frozen use).
        self.gen = self.backend.trainable("generator", self.generator, cfg.optim)
        self.critic_t = self.backend.trainable("critic", self.critic, dmd.fake_optim)
        self.shard_emas(self.gen)  # ZeRO: each rank averages its slice of the generator only

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
        x, labels = next_batch()  # this rank's slice of the global batch
        return x, (labels if self.conditional else None)

    def student_draws(self, next_batch) -> dict:
        """What one student output per sample needs, drawn for the global batch in the single-process order
        (labels, z, the level k shared by the batch, re-noising noise); this rank's slices. k > 0 without
        backward simulation reads a real batch instead (its labels replace the drawn ones)."""
        levels = self.levels
        draws = {"labels": self.random_labels_global(), "z": self.noise_global(), "noises": [], "x_real": None}
        k = 0 if len(levels) == 1 else int(torch.randint(len(levels), (1,), generator=self.rng,
                                                         device=self.device).item())
        draws["k"] = k
        if k > 0 and self.cfg.dmd.backward_simulation:
            # k - 1 re-noisings inside the simulation of levels[:k], then its x0 is re-noised to levels[k]
            draws["noises"] = [self.noise_global() for _ in range(k)]
        elif k > 0:
            draws["x_real"], draws["labels"] = self._real_batch(next_batch)
            draws["noises"] = [self.noise_global(draws["x_real"].dtype)]
        return draws

    def student_input(self, draws) -> torch.Tensor:
        """The student's input at level k for this rank's samples; a constant (made without gradient)."""
        levels, k = self.levels, draws["k"]
        if k == 0:
            return draws["z"] * levels[0]
        if draws["x_real"] is not None:
            return draws["x_real"] + levels[k] * draws["noises"][0]
        with torch.no_grad():  # DMD2 backward simulation: the student's own first k levels
            x0 = student_sample(self.generator, draws["z"], levels[:k], labels=draws["labels"],
                                noises=draws["noises"][:-1])
        return x0 + levels[k] * draws["noises"][-1]

    def fake_samples(self, next_batch):
        """(x, labels), this rank's slice, detached: samples of the distribution the DMD loss acts on (the fake
        score's training data). The plain generator samples: no engine, no gradient. DP-DMD overrides this."""
        draws = self.student_draws(next_batch)
        with torch.no_grad():
            x = self.generator(self.student_input(draws), self.levels[draws["k"]], draws["labels"])
        return x, draws["labels"]

    # -- fake score (and GAN discriminator) ---------------------------------------------------------------
    def gan_logits(self, x_t, sigma, labels):
        return self.critic.gan_logits(x_t, sigma, labels)

    def fake_step(self, next_batch, step):
        n = self.global_batch
        x_gen, labels = self.fake_samples(next_batch)
        sigma = self.local(self.fake_sigma(n))
        noise = self.noise_global(x_gen.dtype)
        if self.use_gan:  # DMD2: noised real data (label real) vs the same noised generator samples (fake)
            x_real, labels_real = self._real_batch(next_batch)
            sigma_real = self.local(self.fake_sigma(n))
            noise_real = self.noise_global(x_real.dtype)
        critic, stats = self.critic_t.module, {}
        for chunk, w in self.micro_chunks():
            lab = rows(labels, chunk)
            x_t = losses.add_noise(x_gen[chunk], 1.0, sigma[chunk], noise=noise[chunk], impl=self.impl)
            F_out = critic(x_t, sigma[chunk], lab)
            loss = losses.denoising_loss(F_out, x_t, x_gen[chunk], sigma[chunk], self.sigma_data, impl=self.impl).mean()
            total, chunk_stats = loss, {"fake/loss": loss.detach()}
            if self.use_gan:
                xr_t = losses.add_noise(x_real[chunk], 1.0, sigma_real[chunk], noise=noise_real[chunk], impl=self.impl)
                d_real = critic(xr_t, sigma_real[chunk], rows(labels_real, chunk), head="gan")
                d_gen = critic(x_t, sigma[chunk], lab, head="gan")
                loss_d = F.softplus(-d_real).mean() + F.softplus(d_gen).mean()
                total = total + self.cfg.dmd.gan_disc_weight * loss_d
                accuracy = 0.5 * ((d_real > 0).float().mean() + (d_gen < 0).float().mean())
                chunk_stats.update({"fake/gan_loss": loss_d.detach(), "fake/gan_accuracy": accuracy})
            self.critic_t.backward(self.weighted(total, w))
            accumulate(stats, chunk_stats, w)
        stats["grad_norm/fake"] = self.critic_t.step(step)
        return stats

    # -- generator ----------------------------------------------------------------------------------------
    def dmd_draws(self, n: int, dtype: torch.dtype = torch.float32) -> dict:
        """The randomness of the DMD loss of n samples, in order: band sigma, its noise, and with the GAN the
        discriminator-side sigma and noise."""
        draws = {"sigma": self.band_sigma(n),
                 "noise": torch.randn((n, *self.dataset.shape), generator=self.rng, device=self.device, dtype=dtype)}
        if self.use_gan:
            draws["sigma_gan"] = self.fake_sigma(n)
            draws["noise_gan"] = torch.randn((n, *self.dataset.shape), generator=self.rng, device=self.device,
                                             dtype=dtype)
        return draws

    def dmd_generator_loss(self, x, labels=None, draws=None):
        """DMD loss (plus DMD2's GAN term) of generator outputs x; the critic must be frozen. (loss, stats)
        draws: dmd_draws of x's samples (drawn here for x.shape[0] samples when not given)."""
        d = self.dmd_draws(x.shape[0], x.dtype) if draws is None else draws
        sigma = d["sigma"]
        with torch.no_grad():  # teacher and fake score only evaluate: no gradient reaches either
            x_t = losses.add_noise(x.detach(), 1.0, sigma, noise=d["noise"], impl=self.impl)
            real_hat = self.teacher(x_t, sigma, labels)
            fake_hat = self.critic["score"](x_t, sigma, labels)
            p_real = (x.detach() - real_hat).float().flatten(1)
            ratio = (fake_hat - real_hat).float().flatten(1).abs().mean(1) / (p_real.abs().mean(1) + 1e-8)
        loss = losses.dmd_loss(x, real_hat, fake_hat, impl=self.impl)
        finite = torch.isfinite(ratio)  # a masked mean, not ratio[finite]: boolean indexing waits for the GPU
        stats = {"gen/dmd_loss": loss.detach(),
                 "gen/dmd_grad_magnitude": torch.where(finite, ratio, 0.0).sum() / finite.sum(),
                 "gen/nonfinite_samples": (~finite).sum()}
        if self.use_gan:  # through the frozen fake encoder and head into x
            xc_t = losses.add_noise(x, 1.0, d["sigma_gan"], noise=d["noise_gan"], impl=self.impl)
            loss_gan = F.softplus(-self.gan_logits(xc_t, d["sigma_gan"], labels)).mean()
            loss = loss + self.cfg.dmd.gan_weight * loss_gan
            stats["gen/gan_loss"] = loss_gan.detach()
        return loss, stats

    def generator_inputs(self, next_batch) -> dict:
        """Everything one generator update draws (global batch, single-process order; this rank's slices) and
        the constant student inputs. DP-DMD overrides this with its own draws."""
        draws = self.student_draws(next_batch)
        draws["x_in"] = self.student_input(draws)
        draws["dmd"] = {k: self.local(v) for k, v in self.dmd_draws(self.global_batch).items()}
        return draws

    def generator_outputs(self, draws, chunk):
        """(x, labels, extra loss or None, extra stats) of a chunk's samples, with gradient; DP-DMD overrides."""
        labels = rows(draws["labels"], chunk)
        return self.gen.module(draws["x_in"][chunk], self.levels[draws["k"]], labels), labels, None, {}

    def chunk_loss(self, draws, chunk):
        """The generator objective of one accumulation chunk (critic frozen by the caller). (loss, stats)"""
        x, labels, extra, stats = self.generator_outputs(draws, chunk)
        loss, dmd_stats = self.dmd_generator_loss(x, labels, {k: v[chunk] for k, v in draws["dmd"].items()})
        stats.update(dmd_stats)
        if extra is not None:
            loss = loss + extra
        return loss, stats

    def generator_loss(self, next_batch=None):
        """The whole generator objective of one update on this rank's batch, as one chunk (critic frozen by
        the caller). (loss, stats)"""
        return self.chunk_loss(self.generator_inputs(next_batch), slice(None))

    def generator_step(self, next_batch, step, nimg):
        stats = {}
        # The GAN term backpropagates THROUGH the critic into G: its parameters are frozen meanwhile, so no
        # gradient lands on them and its engine neither accumulates nor reduces anything.
        with self.critic_t.frozen():
            draws = self.generator_inputs(next_batch)
            for chunk, w in self.micro_chunks():
                loss, chunk_stats = self.chunk_loss(draws, chunk)
                loss = self.weighted(loss, w)
                self.gen.backward(loss)
                accumulate(stats, {"gen/loss": loss.detach()}, None)
                accumulate(stats, chunk_stats, w, counts=COUNTS)
        return self.finish_generator_step(stats, step, nimg)

    def step(self, next_batch, step, nimg):
        stats = repeated_updates(self.cfg.dmd.fake_steps, lambda: self.fake_step(next_batch, step))
        stats.update(self.generator_step(next_batch, step, nimg))
        return stats

    # -- persistence and evaluation -----------------------------------------------------------------------
    def _student_sampler(self, net):
        levels, gen = self.levels, torch.Generator(device=self.device).manual_seed(RENOISE_SEED)

        def sample(noise, labels):
            return student_sample(net, noise, levels, labels=labels, generator=gen)
        return sample

    def samplers(self):
        name = "one_step" if len(self.levels) == 1 else f"{len(self.levels)}_step"
        return {name: self._student_sampler(self.ema.net), f"init_{name}": self._student_sampler(self.teacher),
                **self.teacher_samplers(self.teacher)}

    def export_info(self) -> dict:
        return {"role": "generator", "sigma_g": list(self.levels)}
