"""DiffRatio (design.md 4.1): a light time-conditional density-ratio classifier replaces the teacher and the
fake score network; the one-step generator follows the gradient of the estimated log density ratio.

Networks that train: the ratio network c(x_t, sigma) (logistic loss, generated = 1, real = 0; k steps per
generator step) and the generator G(z) = D(sigma_g z; sigma_g), initialised from the teacher denoiser.
At the classifier's optimum c = log q_t - log p_t, so grad_x c = s_q - s_p: the score difference that
VSD/DMD estimate with two full score networks. The teacher is used only to initialise G (and optionally
the ratio network's encoder); it is never evaluated during training.
"""
from __future__ import annotations

import math

import torch

from fastonestep import losses
from fastonestep.diffusion.samplers import student_sample
from fastonestep.engine.export import load_model
from fastonestep.engine.memory import training_state_bytes
from fastonestep.methods.base import sample_sigma
from fastonestep.methods.distill import COUNTS, DistillMethod, accumulate, repeated_updates, student_spec
from fastonestep.networks.build import build_ratio, count_parameters


def _keep_finite_rows(grad: torch.Tensor, finite_logit: torch.Tensor, dropped: torch.Tensor) -> torch.Tensor:
    """grad with zeros in the rows whose logit (finite_logit False) or gradient is not finite; rows dropped here
    for their gradient alone are added to `dropped` (the logit ones were counted in the forward)."""
    finite_grad = torch.isfinite(grad.reshape(grad.shape[0], -1)).all(1)
    dropped.add_((finite_logit & ~finite_grad).sum())
    keep = (finite_logit & finite_grad).reshape((-1,) + (1,) * (grad.ndim - 1))
    return torch.where(keep, grad, torch.zeros_like(grad))


class DiffRatio(DistillMethod):
    name = "diffratio"

    supports_distributed = True

    def __init__(self, cfg, dataset, device, backend=None):
        super().__init__(cfg, dataset, device, backend)
        dr = cfg.diffratio
        teacher = self.load_teacher()  # only initialises G (and the ratio encoder): not kept
        self.generator = self.student_from(teacher)
        self.ratio = self._build_ratio(teacher).to(device)
        self.ema = self.make_emas(self.generator)
        # Memory next to the networks the ratio net replaces (generator excluded, exact from parameter counts
        # and dtypes): the ratio net trains with Adam; DMD/VSD would hold a frozen teacher plus a fake score
        # network (a teacher copy) that trains with Adam.
        ratio_bytes = training_state_bytes(self.ratio)["total"]
        score_bytes = (training_state_bytes(teacher, trainable=False)["total"]
                       + training_state_bytes(teacher, trainable=True)["total"])
        self.parameter_counts = {"generator": count_parameters(self.generator),
                                 "ratio": count_parameters(self.ratio),
                                 "replaced_score_networks": 2 * count_parameters(teacher),
                                 "ratio_train_bytes": ratio_bytes,
                                 "replaced_score_networks_train_bytes": score_bytes}
        # One engine per trainable network, created after everything that reads full parameters (ZeRO-3
        # shards them here); self.generator / self.ratio stay the plain networks (frozen use, sampling).
        self.gen = self.backend.trainable("generator", self.generator, cfg.optim)
        self.ratio_t = self.backend.trainable("ratio", self.ratio, dr.ratio_optim)
        self.shard_emas(self.gen)  # ZeRO: each rank averages its slice of the generator only

    # -- construction -------------------------------------------------------------------------------------
    def _build_ratio(self, teacher):
        rn = self.cfg.diffratio.ratio_net
        spec = student_spec(self.teacher_info["network"], self.cfg.student_dropout)
        kind = rn.kind if rn.kind != "auto" else ("encoder" if spec["kind"] in ("unet", "edm2") else "mlp")
        if kind == "encoder":
            if spec["kind"] not in ("unet", "edm2"):
                raise ValueError("config key 'diffratio.ratio_net.kind=encoder' needs a UNet or EDM2 teacher")
            arch = dict(spec["arch"])
            if rn.head_channels:
                arch["head_channels"] = rn.head_channels
        else:
            arch = {"hidden": rn.hidden, "depth": rn.depth}
        # Only the encoder kinds have a teacher part to copy: an "mlp" ratio net always starts from scratch
        # (its zero output layer makes r = 1 at the start either way).
        init_from = teacher if (rn.init == "teacher" and kind == "encoder") else None
        # "encoder" means the teacher's own encoder half: for an EDM2 teacher that is the MP EDM2 encoder.
        build_kind = "edm2_encoder" if (kind == "encoder" and spec["kind"] == "edm2") else kind
        # What rebuilds this network without the teacher (ratio.safetensors): `arch` holds the teacher's full
        # architecture, so the keys init_from would fill in are the same defaults a rebuild gets.
        self.ratio_spec = {"kind": build_kind, "arch": arch}
        return build_ratio(build_kind, tuple(self.dataset.shape), self.num_classes, self.sigma_data,
                           init_from=init_from, **arch)

    # -- training -----------------------------------------------------------------------------------------
    def _sigma(self, n: int, which: str):
        dr = self.cfg.diffratio
        mean, std = (dr.ratio_p_mean, dr.ratio_p_std) if which == "ratio" else (dr.gen_p_mean, dr.gen_p_std)
        return sample_sigma(n, mean, std, dr.sigma_min, dr.sigma_max, self.rng, self.device)

    def _sigma_global(self, which: str):
        """_sigma of the whole global batch (same draw as one process makes); this rank's slice."""
        return self.local(self._sigma(self.global_batch, which))

    def ratio_step(self, x_real, labels_real, step):
        """x_real: this rank's slice of the global batch. Randomness is drawn for the global batch in the
        order of the single-process step (labels, z, sigma of each half, noise of both halves)."""
        labels_gen = self.random_labels_global()
        z = self.randn_global(*self.dataset.shape)
        with torch.no_grad():  # the generator only samples here: no engine, no gradients
            x_gen = student_sample(self.generator, z, [self.cfg.diffratio.sigma_g], labels=labels_gen)
        sigma_gen, sigma_real = self._sigma_global("ratio"), self._sigma_global("ratio")
        noise = self.randn_global(*self.dataset.shape, groups=2)  # [0]: generated half, [1]: real half
        stats = {}
        for chunk, w in self.micro_chunks():
            m = x_gen[chunk].shape[0]
            x = torch.cat([x_gen[chunk], x_real[chunk]])
            sigma = torch.cat([sigma_gen[chunk], sigma_real[chunk]])
            x_t = losses.add_noise(x, 1.0, sigma, noise=torch.cat([noise[0][chunk], noise[1][chunk]]),
                                   impl=self.impl)
            labels = None if labels_gen is None else torch.cat([labels_gen[chunk], labels_real[chunk]])
            logits = self.ratio_t.module(x_t, sigma, labels)
            l_gen, l_real = logits[:m], logits[m:]
            loss = self.weighted(losses.ratio_classifier_loss(l_gen, l_real, impl=self.impl), w)
            self.ratio_t.backward(loss)
            acc = 0.5 * ((l_gen > 0).float().mean() + (l_real < 0).float().mean())
            accumulate(stats, {"ratio/loss": loss.detach()}, None)  # already weighted
            accumulate(stats, {"ratio/accuracy": acc, "ratio/logit_gen": l_gen.mean().detach(),
                               "ratio/logit_real": l_real.mean().detach()}, w)
        stats["grad_norm/ratio"] = self.ratio_t.step(step)
        return stats

    def generator_loss(self, x: torch.Tensor, labels=None, sigma=None, noise=None):
        """The DiffRatio generator loss for generator outputs x (ratio network frozen). Returns (loss, stats).
        sigma / noise: pre-drawn (global-batch slices); drawn here, in that order, when not given.
        Rows whose logit or logit gradient is not finite are dropped from the update (zero gradient) and counted
        in gen/nonfinite_samples (in the logit realisation, rows whose gradient only turns non-finite in the
        backward are counted when the loss is backpropagated)."""
        dr = self.cfg.diffratio
        sigma = self._sigma(x.shape[0], "gen") if sigma is None else sigma
        weight = sigma.square() if dr.weighting == "sigma2" else None
        noise = self.noise_like(x) if noise is None else noise
        x_t = losses.add_noise(x, 1.0, sigma, noise=noise, impl=self.impl)
        if dr.realisation == "logit":
            return self._weighted_logit_loss(x_t, sigma, labels, weight)
        return self._score_difference_loss(x, x_t, sigma, labels, weight)

    def _weighted_logit_loss(self, x_t, sigma, labels, weight):
        """4.1(a): sum_i sg(w_i h_i) l_i, backpropagated through c into G."""
        dr = self.cfg.diffratio
        logits = self.ratio(x_t, sigma, labels)
        finite = torch.isfinite(logits)
        dropped = (~finite).sum()
        if x_t.requires_grad:
            # A row with a non-finite forward has a NaN backward through c even with a zero incoming gradient
            # (0 * NaN): zero such rows at x_t, before they reach G's parameters and void the whole update.
            x_t.register_hook(lambda grad: _keep_finite_rows(grad, finite, dropped))
        coef = losses.divergence_weight(logits.detach(), dr.divergence, dr.logit_clamp)
        if weight is not None:
            coef = coef * weight
        coef = torch.where(finite, coef, 0.0)  # where, not a product: 0 * NaN would still be NaN
        loss = (coef * torch.where(finite, logits, 0.0)).mean()
        return loss, {"gen/logit": logits.mean().detach(), "gen/nonfinite_samples": dropped}

    def _score_difference_loss(self, x, x_t, sigma, labels, weight):
        """4.1(b): grad_x l by autograd (VE: alpha = 1), normalised per sample, applied as a surrogate."""
        dr = self.cfg.diffratio
        x_t = x_t.detach().requires_grad_(True)
        with torch.enable_grad():
            logits = self.ratio(x_t, sigma, labels)
            (logit_grad,) = torch.autograd.grad(logits.sum(), x_t)
        finite_logit = torch.isfinite(logits.detach())
        bad = (~(finite_logit & torch.isfinite(logit_grad.flatten(1)).all(1))).sum()
        # The loss zeroes rows whose g is not finite; a row with a finite gradient but a non-finite logit would
        # stay (rkl's h = 1 never reads the logit): a zero weight drops it too, with no pass over logit_grad.
        keep = finite_logit.float()
        weight = keep if weight is None else weight * keep
        loss = losses.ratio_generator_loss(x, logit_grad, logits.detach(), weight, dr.divergence,
                                           normalize=dr.normalize, clamp=dr.logit_clamp, impl=self.impl)
        return loss, {"gen/logit": logits.mean().detach(), "gen/nonfinite_samples": bad,
                      "gen/grad_magnitude": logit_grad.abs().mean()}

    def generator_step(self, step, nimg):
        labels = self.random_labels_global()
        z = self.randn_global(*self.dataset.shape)
        sigma, noise = self._sigma_global("gen"), self.randn_global(*self.dataset.shape)
        stats = {}
        # The loss backpropagates THROUGH the ratio network into G: its parameters are frozen meanwhile, so no
        # gradient lands on them and its engine neither accumulates nor reduces anything.
        with self.ratio_t.frozen():
            for chunk, w in self.micro_chunks():
                lab = None if labels is None else labels[chunk]
                x = student_sample(self.gen.module, z[chunk], [self.cfg.diffratio.sigma_g], labels=lab)
                loss, chunk_stats = self.generator_loss(x, lab, sigma[chunk], noise[chunk])
                loss = self.weighted(loss, w)
                self.gen.backward(loss)
                accumulate(stats, {"gen/loss": loss.detach()}, None)  # already weighted
                accumulate(stats, chunk_stats, w, counts=COUNTS)
        return self.finish_generator_step(stats, step, nimg)

    def step(self, next_batch, step, nimg):
        def ratio_update():
            x_real, labels = next_batch()
            return self.ratio_step(x_real, labels if self.conditional else None, step)

        stats = repeated_updates(self.cfg.diffratio.ratio_steps, ratio_update)
        stats.update(self.generator_step(step, nimg))
        return stats

    # -- persistence and evaluation -----------------------------------------------------------------------
    def samplers(self):
        sigma_g = self.cfg.diffratio.sigma_g
        teacher, _ = load_model(self.cfg.teacher, self.device)

        def one_step(noise, labels):
            return student_sample(self.ema.net, noise, [sigma_g], labels=labels)

        def init(noise, labels):
            return student_sample(teacher, noise, [sigma_g], labels=labels)

        return {"one_step": one_step, "init_one_step": init, **self.teacher_samplers(teacher)}

    def export_info(self) -> dict:
        return {"role": "generator", "sigma_g": [self.cfg.diffratio.sigma_g]}

    def verifier_sigma(self) -> float:
        """Default noise level of verifier sampling: small, yet where the classifier saw many samples (one
        standard deviation below the mean of its ln sigma), clipped to [sigma_min, sigma_max]."""
        dr = self.cfg.diffratio
        return float(min(max(math.exp(dr.ratio_p_mean - dr.ratio_p_std), dr.sigma_min), dr.sigma_max))

    def export_extra(self) -> dict:
        """ratio.safetensors: the ratio network, loadable on its own for verifier sampling (design 4.1)."""
        info = {"method": self.name, "role": "ratio", "network": self.ratio_spec,
                "data_shape": list(self.dataset.shape), "num_classes": self.num_classes,
                "sigma_data": self.sigma_data, "verifier_sigma": self.verifier_sigma(),
                "divergence": self.cfg.diffratio.divergence}
        return {"ratio": (self.ratio, info)}
