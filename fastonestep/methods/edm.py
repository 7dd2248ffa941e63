"""EDM diffusion pretraining (design.md 4.5): the teacher, and the initialisation of every generator.

One network trains: the preconditioned denoiser, on lambda(sigma)-weighted denoising loss with
ln sigma ~ N(P_mean, P_std^2); with edm.logvar_channels, also EDM2's learned log-variance u(sigma), the
per-sample loss becoming L / exp(u) + u. Evaluation samples with Heun/Euler on the Karras grid.
"""
from __future__ import annotations

from torch import nn

from fastonestep import losses
from fastonestep.diffusion.samplers import edm_sample
from fastonestep.diffusion.schedules import sample_lognormal_sigma
from fastonestep.methods.base import Method
from fastonestep.networks.build import build_denoiser, count_parameters
from fastonestep.engine.export import network_spec
from fastonestep.networks.heads import LogVarHead


class _RawDenoiser(nn.Module):
    """Training view of an EDMPrecond whose forward is `raw`: returns (F, u), F the raw network output (the loss
    is taken in F-space) and u the log-variance of each sample's noise level (None without a LogVarHead). One
    module, so one optimiser (and one DeepSpeed engine, whose forward must be a module call) trains both."""

    def __init__(self, precond: nn.Module, logvar: nn.Module | None = None):
        super().__init__()
        self.precond = precond
        self.logvar = logvar

    def forward(self, x, sigma, labels=None):
        F = self.precond.raw(x, sigma, labels)[0]
        return F, None if self.logvar is None else self.logvar(sigma.float().log() / 4)  # c_noise


class EDMPretrain(Method):
    name = "edm"
    supports_distributed = True

    def __init__(self, cfg, dataset, device, backend=None):
        super().__init__(cfg, dataset, device, backend)
        self.net = build_denoiser(cfg.network.kind, tuple(dataset.shape), self.num_classes,
                                  cfg.diffusion.sigma_data, **network_spec(cfg.network)["arch"]).to(device)
        self.parameter_counts = {"denoiser": count_parameters(self.net)}  # before ZeRO-3 shards it
        logvar = LogVarHead(cfg.edm.logvar_channels).to(device) if cfg.edm.logvar_channels else None
        if logvar is not None:
            self.parameter_counts["logvar"] = count_parameters(logvar)
        self.ema = self.make_emas(self.net)  # the denoiser only
        self.denoiser = self.backend.trainable("denoiser", _RawDenoiser(self.net, logvar), cfg.optim)
        self.shard_emas(self.denoiser, part="precond")  # ZeRO: each rank averages its slice only

    def step(self, next_batch, step, nimg):
        d = self.cfg.diffusion
        x0, labels = next_batch()  # this rank's slice of the global batch
        labels = labels if self.conditional else None
        sigma = self.local(sample_lognormal_sigma(self.global_batch, d.p_mean, d.p_std, generator=self.rng,
                                                  device=self.device))
        noise = self.randn_global(*x0.shape[1:])
        total, total_logvar = 0.0, 0.0
        for chunk, weight in self.micro_chunks():
            lab = None if labels is None else labels[chunk]
            x_t = losses.add_noise(x0[chunk], 1.0, sigma[chunk], noise=noise[chunk], impl=self.impl)
            F, logvar = self.denoiser.module(x_t, sigma[chunk], lab)
            per_sample = losses.denoising_loss(F, x_t, x0[chunk], sigma[chunk], d.sigma_data, impl=self.impl)
            if logvar is None:
                loss = self.weighted(per_sample.mean(), weight)
                total = total + loss.detach()
            else:  # EDM2: the log-variance reweights each noise level; "loss" stays the lambda-weighted one
                loss = self.weighted((per_sample / logvar.exp() + logvar).mean(), weight)
                total = total + self.weighted(per_sample.mean(), weight).detach()
                total_logvar = total_logvar + self.weighted(logvar.mean(), weight).detach()
            self.denoiser.backward(loss)
        grad_norm = self.denoiser.step(step)
        self.update_emas(self.denoiser, nimg + self.global_batch, self.global_batch, part="precond")
        stats = {"loss": total, "grad_norm/denoiser": grad_norm}
        if self.cfg.edm.logvar_channels:
            stats["edm/logvar"] = total_logvar
        return stats

    def samplers(self):
        d = self.cfg.diffusion

        def teacher(noise, labels):
            return edm_sample(self.ema.net, noise, num_steps=d.sample_steps, sigma_min=d.sigma_min,
                              sigma_max=d.sigma_max, rho=d.rho, solver=d.solver, labels=labels)

        return {f"teacher_{d.solver}{d.sample_steps}": teacher}
