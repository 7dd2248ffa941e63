"""EDM diffusion pretraining (design.md 4.5): the teacher, and the initialisation of every generator.

One network trains: the preconditioned denoiser, on lambda(sigma)-weighted denoising loss with
ln sigma ~ N(P_mean, P_std^2). Evaluation samples with Heun/Euler on the Karras grid.
"""
from __future__ import annotations

from fastonestep import losses
from fastonestep.diffusion.samplers import edm_sample
from fastonestep.diffusion.schedules import sample_lognormal_sigma
from fastonestep.engine.ema import EMA
from fastonestep.methods.base import Method, make_optimizer, optimizer_step
from fastonestep.networks.build import build_denoiser, count_parameters
from fastonestep.engine.export import network_spec


class EDMPretrain(Method):
    name = "edm"

    def __init__(self, cfg, dataset, device):
        super().__init__(cfg, dataset, device)
        self.net = build_denoiser(cfg.network.kind, tuple(dataset.shape), self.num_classes,
                                  cfg.diffusion.sigma_data, **network_spec(cfg.network)["arch"]).to(device)
        self.opt = make_optimizer(self.net.parameters(), cfg.optim)
        self.ema = EMA(self.net, cfg.train.ema_halflife_kimg, cfg.train.ema_rampup)
        self.parameter_counts = {"denoiser": count_parameters(self.net)}

    def step(self, next_batch, step, nimg):
        d = self.cfg.diffusion
        x0, labels = next_batch()
        labels = labels if self.conditional else None
        sigma = sample_lognormal_sigma(x0.shape[0], d.p_mean, d.p_std, generator=self.rng, device=self.device)
        x_t = losses.add_noise(x0, 1.0, sigma, noise=self.noise_like(x0), impl=self.impl)
        F, _, _ = self.net.raw(x_t, sigma, labels)
        loss = losses.denoising_loss(F, x_t, x0, sigma, d.sigma_data, impl=self.impl).mean()
        loss.backward()
        grad_norm = optimizer_step(self.opt, self.net, self.cfg.optim, step)
        self.ema.update(self.net, nimg + x0.shape[0], x0.shape[0])
        return {"loss": loss.detach(), "grad_norm/denoiser": grad_norm}

    def state_dict(self):
        return {"net": self.net.state_dict(), "opt": self.opt.state_dict(), "ema": self.ema.state_dict(),
                **self.rng_state()}

    def load_state_dict(self, state):
        self.net.load_state_dict(state["net"])
        self.opt.load_state_dict(state["opt"])
        self.ema.load_state_dict(state["ema"])
        self.load_rng_state(state)

    def export_network(self):
        return self.ema.net

    def samplers(self):
        d = self.cfg.diffusion

        def teacher(noise, labels):
            return edm_sample(self.ema.net, noise, num_steps=d.sample_steps, sigma_min=d.sigma_min,
                              sigma_max=d.sigma_max, rho=d.rho, solver=d.solver, labels=labels)

        return {f"teacher_{d.solver}{d.sample_steps}": teacher}
