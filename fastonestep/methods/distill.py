"""What every teacher-distillation method shares (DiffRatio, DMD/DMD2, DP-DMD, backward distillation).

The teacher (`cfg.teacher`, a run directory or model file) is loaded and checked against the dataset's sample
shape and the run's classes; its sigma_data is the run's. Methods keep it frozen (DMD, backward distillation)
or only initialise from it (DiffRatio); generators start as a trainable copy of it. Evaluation adds the
teacher's multi-step ODE sampler, whose metrics are reused when the teacher's own run measured them with the
same settings.
"""
from __future__ import annotations

import copy
import json
import os

import torch
from torch import nn

from fastonestep.diffusion.samplers import edm_sample
from fastonestep.config import ConfigError
from fastonestep.engine.export import file_sha256, load_model, model_path
from fastonestep.methods.base import Method
from fastonestep.networks.build import set_dropout


def missing_teacher_message(teacher: str, path: str) -> str:
    what = f"'{teacher}' has no model.safetensors (is the teacher run finished?)" if os.path.isdir(teacher) \
        else f"'{teacher}' does not exist"
    return (f"config key 'teacher': {what}; train a teacher first (method=edm: configs/toy2d/edm.yaml, "
            "configs/mnist/teacher.yaml or configs/imagenet512/edm2_*.yaml) and pass teacher=ITS_RUN_DIR")


def student_spec(teacher_spec: dict, dropout: float) -> dict:
    """The architecture record (network_spec) of a network copied from the teacher and trained with `dropout`."""
    arch = dict(teacher_spec["arch"])
    if "dropout" in arch:  # UNet and EDM2 kinds; the MLP has none
        arch["dropout"] = dropout
    return {**teacher_spec, "arch": arch}


class DistillMethod(Method):
    """A Method distilling the pretrained denoiser at config key 'teacher'."""

    # -- the teacher ----------------------------------------------------------------------------------------
    def load_teacher(self) -> nn.Module:
        """The teacher denoiser (eval mode); sets teacher_info and sigma_data, checks it fits the run."""
        path = model_path(self.cfg.teacher)
        if not os.path.exists(path):
            raise ConfigError(missing_teacher_message(self.cfg.teacher, path))
        teacher, self.teacher_info = load_model(path, self.device)
        self.check_teacher()
        # What the run is distilled from, by content: checked on resume (the path may move, the weights not)
        self.teacher_sha256 = file_sha256(path)
        self.sigma_data = self.teacher_info["sigma_data"]
        return teacher

    def check_teacher(self) -> None:
        role = self.teacher_info.get("role", "denoiser")
        if role != "denoiser":
            raise ConfigError(f"config key 'teacher': '{self.cfg.teacher}' is a {role} network of a "
                              f"'{self.teacher_info.get('method', '?')}' run, not a denoiser; the teacher is the "
                              "model of a teacher run (method=edm)")
        shape, classes = tuple(self.teacher_info["data_shape"]), self.teacher_info["num_classes"]
        if shape != tuple(self.dataset.shape):
            raise ValueError(f"teacher '{self.cfg.teacher}' was trained on data of shape {shape}, "
                             f"but the dataset has shape {tuple(self.dataset.shape)}")
        if classes != self.num_classes:
            raise ValueError(f"teacher '{self.cfg.teacher}' has num_classes={classes}, the run has "
                             f"{self.num_classes} (config key 'data.class_conditional')")

    def state_dict(self) -> dict:
        return {**super().state_dict(), "teacher_sha256": self.teacher_sha256}

    def load_state_dict(self, state: dict) -> None:
        saved = state.get("teacher_sha256")  # absent: a checkpoint from before it was recorded
        if saved is not None and saved != self.teacher_sha256:
            raise ValueError(f"the teacher '{self.cfg.teacher}' is not the one this run was trained from (its "
                             f"weights have sha256 {self.teacher_sha256[:12]}..., the run's teacher "
                             f"{saved[:12]}...); resume with that teacher, or start a new run with another --out")
        super().load_state_dict(state)

    @staticmethod
    def frozen_teacher(teacher: nn.Module) -> nn.Module:
        """The teacher as a constant: eval mode, no parameter ever gets a gradient (it has no optimiser)."""
        return teacher.eval().requires_grad_(False)

    def student_from(self, teacher: nn.Module) -> nn.Module:
        """A trainable copy of the teacher: every generator (and DMD's fake score) starts there. Its dropout is
        config key 'student_dropout', not the teacher's."""
        return set_dropout(copy.deepcopy(teacher), self.cfg.student_dropout).train().requires_grad_(True)

    # -- the generator's update ----------------------------------------------------------------------------
    def finish_generator_step(self, stats: dict, step: int, nimg: int) -> dict:
        """After the generator's gradients are accumulated: its optimiser step (grad norm into stats) and the
        EMA update for the global batch. Expects self.gen (its Trainable) and self.ema."""
        stats["grad_norm/generator"] = self.gen.step(step)
        self.update_emas(self.gen, nimg + self.global_batch, self.global_batch)
        return stats

    # -- global-batch draws of the data shape -----------------------------------------------------------------
    def noise_global(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """N(0, I) of shape (global_batch, *data shape) in `dtype` (what noise_like draws for a global-batch
        tensor of that dtype); this rank's slice."""
        full = torch.randn((self.global_batch, *self.dataset.shape), generator=self.rng, device=self.device,
                           dtype=dtype)
        return self.local(full)

    # -- evaluation -----------------------------------------------------------------------------------------
    def teacher_sampler_name(self) -> str:
        d = self.cfg.diffusion
        return f"teacher_{d.solver}{d.sample_steps}"

    def teacher_samplers(self, teacher: nn.Module) -> dict:
        """{name: the teacher's multi-step ODE sampler} when eval.teacher_fd is on, else {}."""
        if not self.cfg.eval.teacher_fd:
            return {}
        d = self.cfg.diffusion

        def teacher_ode(noise, labels):
            return edm_sample(teacher, noise, num_steps=d.sample_steps, sigma_min=d.sigma_min, sigma_max=d.sigma_max,
                              rho=d.rho, solver=d.solver, labels=labels)

        return {self.teacher_sampler_name(): teacher_ode}

    def known_metrics(self) -> dict:
        """The teacher's multi-step metrics, when its own run measured them with the same seeds and count."""
        name = self.teacher_sampler_name()
        path = os.path.join(self.cfg.teacher, "metrics.json")
        if not (self.cfg.eval.teacher_fd and os.path.isfile(path)):
            return {}
        with open(path, encoding="utf-8") as f:
            found = json.load(f).get(name)
        if not found or found.get("num_samples") != self.cfg.eval.num_samples:
            return {}
        return {name: {**found, "measured_in": self.cfg.teacher}}


def rows(t, chunk):
    """t[chunk], or None for an absent tensor (labels of an unconditional run)."""
    return None if t is None else t[chunk]


# Per-chunk counts among the stats: summed over accumulation chunks (the other stats are weighted means).
COUNTS = ("gen/nonfinite_samples",)


def repeated_updates(n: int, update) -> dict:
    """Runs update() n times (k ratio-classifier or fake-score updates per generator update) and returns each
    stat's mean over the n updates (a count in COUNTS: its sum), not just the last update's."""
    stats = {}
    for _ in range(n):
        accumulate(stats, update(), 1.0 / n if n > 1 else None, counts=COUNTS)
    return stats


def accumulate(total: dict, chunk: dict, weight: float | None, counts: tuple = ()) -> None:
    """Adds one accumulation chunk's stats into `total`: chunk means scaled by the chunk's share of the batch
    (`weight`, None for a single chunk), so they sum to the batch mean; keys in `counts` are summed as they are."""
    for k, v in chunk.items():
        if weight is not None and k not in counts:
            v = v * weight
        total[k] = v if k not in total else total[k] + v
