"""DiffRatio (design.md 4.1): a light time-conditional density-ratio classifier replaces the teacher and the
fake score network; the one-step generator follows the gradient of the estimated log density ratio.

Networks that train: the ratio network c(x_t, sigma) (logistic loss, generated = 1, real = 0; k steps per
generator step) and the generator G(z) = D(sigma_g z; sigma_g), initialised from the teacher denoiser.
At the classifier's optimum c = log q_t - log p_t, so grad_x c = s_q - s_p: the score difference that
VSD/DMD estimate with two full score networks. The teacher is used only to initialise G (and optionally
the ratio network's encoder); it is never evaluated during training.
"""
from __future__ import annotations

import copy
import json
import os

import torch

from fastonestep import losses
from fastonestep.diffusion.samplers import edm_sample, student_sample
from fastonestep.engine.ema import EMA
from fastonestep.engine.export import load_model
from fastonestep.methods.base import Method, make_optimizer, optimizer_step, sample_sigma
from fastonestep.networks.build import build_ratio, count_parameters


class DiffRatio(Method):
    name = "diffratio"

    def __init__(self, cfg, dataset, device):
        super().__init__(cfg, dataset, device)
        dr = cfg.diffratio
        teacher, self.teacher_info = load_model(cfg.teacher, device)
        self._check_teacher(dataset)
        self.sigma_data = self.teacher_info["sigma_data"]
        self.generator = copy.deepcopy(teacher).train().requires_grad_(True)
        self.ratio = self._build_ratio(teacher).to(device)
        self.opt_g = make_optimizer(self.generator.parameters(), cfg.optim)
        self.opt_r = make_optimizer(self.ratio.parameters(), dr.ratio_optim)
        self.ema = EMA(self.generator, cfg.train.ema_halflife_kimg, cfg.train.ema_rampup)
        self.parameter_counts = {"generator": count_parameters(self.generator),
                                 "ratio": count_parameters(self.ratio),
                                 "replaced_score_networks": 2 * count_parameters(teacher)}

    # -- construction -------------------------------------------------------------------------------------
    def _check_teacher(self, dataset):
        shape, classes = tuple(self.teacher_info["data_shape"]), self.teacher_info["num_classes"]
        if shape != tuple(dataset.shape):
            raise ValueError(f"teacher '{self.cfg.teacher}' was trained on data of shape {shape}, "
                             f"but the dataset has shape {tuple(dataset.shape)}")
        if classes != self.num_classes:
            raise ValueError(f"teacher '{self.cfg.teacher}' has num_classes={classes}, the run has "
                             f"{self.num_classes} (config key 'data.class_conditional')")

    def _build_ratio(self, teacher):
        rn = self.cfg.diffratio.ratio_net
        spec = self.teacher_info["network"]
        kind = rn.kind if rn.kind != "auto" else ("encoder" if spec["kind"] == "unet" else "mlp")
        if kind == "encoder":
            if spec["kind"] != "unet":
                raise ValueError("config key 'diffratio.ratio_net.kind=encoder' needs a UNet teacher")
            arch = dict(spec["arch"])
            if rn.head_channels:
                arch["head_channels"] = rn.head_channels
        else:
            arch = {"hidden": rn.hidden, "depth": rn.depth}
        init_from = teacher if (rn.init == "teacher" and kind == "encoder") else None
        return build_ratio(kind, tuple(self.dataset.shape), self.num_classes, self.sigma_data,
                           init_from=init_from, **arch)

    # -- training -----------------------------------------------------------------------------------------
    def generate(self, net, n: int, labels=None):
        z = torch.randn((n, *self.dataset.shape), generator=self.rng, device=self.device)
        return student_sample(net, z, [self.cfg.diffratio.sigma_g], labels=labels)

    def _sigma(self, n: int, which: str):
        dr = self.cfg.diffratio
        mean, std = (dr.ratio_p_mean, dr.ratio_p_std) if which == "ratio" else (dr.gen_p_mean, dr.gen_p_std)
        return sample_sigma(n, mean, std, dr.sigma_min, dr.sigma_max, self.rng, self.device)

    def ratio_step(self, x_real, labels_real, step):
        n = x_real.shape[0]
        labels_gen = self.random_labels(n)
        with torch.no_grad():
            x_gen = self.generate(self.generator, n, labels_gen)
        x = torch.cat([x_gen, x_real])
        sigma = torch.cat([self._sigma(n, "ratio"), self._sigma(n, "ratio")])
        x_t = losses.add_noise(x, 1.0, sigma, noise=self.noise_like(x), impl=self.impl)
        labels = None if labels_gen is None else torch.cat([labels_gen, labels_real])
        logits = self.ratio(x_t, sigma, labels)
        l_gen, l_real = logits[:n], logits[n:]
        loss = losses.ratio_classifier_loss(l_gen, l_real, impl=self.impl)
        loss.backward()
        grad_norm = optimizer_step(self.opt_r, self.ratio, self.cfg.diffratio.ratio_optim, step)
        acc = 0.5 * ((l_gen > 0).float().mean() + (l_real < 0).float().mean())
        return {"ratio/loss": loss.detach(), "ratio/accuracy": acc, "ratio/logit_gen": l_gen.mean().detach(),
                "ratio/logit_real": l_real.mean().detach(), "grad_norm/ratio": grad_norm}

    def generator_loss(self, x: torch.Tensor, labels=None):
        """The DiffRatio generator loss for generator outputs x (ratio network frozen). Returns (loss, stats)."""
        dr = self.cfg.diffratio
        sigma = self._sigma(x.shape[0], "gen")
        weight = sigma.square() if dr.weighting == "sigma2" else None
        x_t = losses.add_noise(x, 1.0, sigma, noise=self.noise_like(x), impl=self.impl)
        if dr.realisation == "logit":
            # 4.1(a): sum_i sg(w_i h_i) l_i, backpropagated through c into G.
            logits = self.ratio(x_t, sigma, labels)
            coef = losses.divergence_weight(logits.detach(), dr.divergence, dr.logit_clamp)
            if weight is not None:
                coef = coef * weight
            loss = (coef * logits).mean()
            return loss, {"gen/logit": logits.mean().detach()}
        # 4.1(b): grad_x l by autograd (VE: alpha = 1), normalised per sample, applied as a surrogate.
        x_t = x_t.detach().requires_grad_(True)
        with torch.enable_grad():
            logits = self.ratio(x_t, sigma, labels)
            (logit_grad,) = torch.autograd.grad(logits.sum(), x_t)
        bad = (~torch.isfinite(logit_grad.flatten(1)).all(1)).sum()
        loss = losses.ratio_generator_loss(x, logit_grad, logits.detach(), weight, dr.divergence,
                                           normalize=dr.normalize, clamp=dr.logit_clamp, impl=self.impl)
        return loss, {"gen/logit": logits.mean().detach(), "gen/nonfinite_samples": bad,
                      "gen/grad_magnitude": logit_grad.abs().mean()}

    def generator_step(self, step, nimg):
        n = self.cfg.train.batch_size
        labels = self.random_labels(n)
        self.ratio.requires_grad_(False)  # frozen parameters; gradients still flow through its input
        try:
            x = self.generate(self.generator, n, labels)
            loss, stats = self.generator_loss(x, labels)
            loss.backward()
        finally:
            self.ratio.requires_grad_(True)
        grad_norm = optimizer_step(self.opt_g, self.generator, self.cfg.optim, step)
        self.ema.update(self.generator, nimg + n, n)
        return {"gen/loss": loss.detach(), "grad_norm/generator": grad_norm, **stats}

    def step(self, next_batch, step, nimg):
        stats = {}
        for _ in range(self.cfg.diffratio.ratio_steps):
            x_real, labels = next_batch()
            stats = self.ratio_step(x_real, labels if self.conditional else None, step)
        stats.update(self.generator_step(step, nimg))
        return stats

    # -- persistence and evaluation -----------------------------------------------------------------------
    def state_dict(self):
        return {"generator": self.generator.state_dict(), "ratio": self.ratio.state_dict(),
                "opt_g": self.opt_g.state_dict(), "opt_r": self.opt_r.state_dict(), "ema": self.ema.state_dict(),
                **self.rng_state()}

    def load_state_dict(self, state):
        self.generator.load_state_dict(state["generator"])
        self.ratio.load_state_dict(state["ratio"])
        self.opt_g.load_state_dict(state["opt_g"])
        self.opt_r.load_state_dict(state["opt_r"])
        self.ema.load_state_dict(state["ema"])
        self.load_rng_state(state)

    def export_network(self):
        return self.ema.net

    def samplers(self):
        sigma_g = self.cfg.diffratio.sigma_g
        d = self.cfg.diffusion
        teacher, _ = load_model(self.cfg.teacher, self.device)

        def one_step(noise, labels):
            return student_sample(self.ema.net, noise, [sigma_g], labels=labels)

        def init(noise, labels):
            return student_sample(teacher, noise, [sigma_g], labels=labels)

        def teacher_ode(noise, labels):
            return edm_sample(teacher, noise, num_steps=d.sample_steps, sigma_min=d.sigma_min, sigma_max=d.sigma_max,
                              rho=d.rho, solver=d.solver, labels=labels)

        out = {"one_step": one_step, "init_one_step": init}
        if self.cfg.eval.teacher_fd:
            out[f"teacher_{d.solver}{d.sample_steps}"] = teacher_ode
        return out

    def known_metrics(self):
        """The teacher's multi-step metrics, when its own run measured them with the same seeds and count."""
        d = self.cfg.diffusion
        name = f"teacher_{d.solver}{d.sample_steps}"
        path = os.path.join(self.cfg.teacher, "metrics.json")
        if not (self.cfg.eval.teacher_fd and os.path.isfile(path)):
            return {}
        with open(path, encoding="utf-8") as f:
            found = json.load(f).get(name)
        if not found or found.get("num_samples") != self.cfg.eval.num_samples:
            return {}
        return {name: {**found, "measured_in": self.cfg.teacher}}

    def export_info(self) -> dict:
        return {"role": "generator", "sigma_g": [self.cfg.diffratio.sigma_g]}
