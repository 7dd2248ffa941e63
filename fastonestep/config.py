"""Typed configuration: dataclass sections, YAML presets (with `base:` inheritance), dotted overrides.

Every error names the offending key: an unknown key, a value of the wrong type, a value outside its
allowed choices. Presets live in configs/; `fastonestep train PRESET key=value ...` resolves them and the
run directory keeps the resolved config.yaml, which is what a resume reads back.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import os
import typing
from dataclasses import dataclass, field

import yaml


class ConfigError(ValueError):
    """A bad configuration: the message names the key and the problem."""


@dataclass
class DataConfig:
    kind: str = "toy2d"  # toy2d | mnist | folder | latent
    name: str = "grid25"  # toy2d: grid25 | rings | moons
    path: str = ""  # folder: an image directory or a .npz file; latent: a `fastonestep dataset encode` output dir
    resolution: int = 32
    size: int = 0  # 0: all (toy2d: 100k samples)
    class_conditional: bool = False
    # Optional promises about the data, checked against the dataset when it loads; the dry run
    # (`train --dry-run`) sizes the networks from them without reading any data. [] / 0: not stated.
    shape: list = field(default_factory=list)  # one sample's shape, e.g. [4, 64, 64] for ImageNet-512 latents
    num_classes: int = 0
    # auto: in memory for toys, MNIST, .npz and small folders; else streaming (dali if installed, else torch)
    loader: str = "auto"  # auto | memory | torch | dali
    workers: int = 0  # streaming loaders: reader processes (torch) / threads (dali); 0 = in-process / 1 thread
    xflip: bool = False  # image folders: random horizontal flips (seeded per epoch); off: digits and text must not flip
    # latent: clean sample = (mean + std * z) * latent_scale_c + latent_bias_c. EDM2 SD-VAE defaults:
    # scale = 0.5 / raw_std, bias = -raw_mean * scale, raw_mean [5.81, 3.25, 0.12, -2.15], raw_std [4.17, 4.62, 3.71, 3.28]
    latent_scale: list = field(default_factory=lambda: [0.5 / s for s in (4.17, 4.62, 3.71, 3.28)])
    latent_bias: list = field(default_factory=lambda: [-m * 0.5 / s for m, s in zip((5.81, 3.25, 0.12, -2.15),
                                                                                     (4.17, 4.62, 3.71, 3.28))])


@dataclass
class NetworkConfig:
    kind: str = "mlp"  # mlp | unet | edm2 (magnitude-preserving EDM2 UNet, networks/edm2.py)
    size: str = ""  # edm2: xs | s | m | l | xl | xxl picks channels (128 ... 448); "" = use channels
    # mlp
    hidden: int = 256
    depth: int = 3
    emb_dim: int = 64
    # unet
    channels: int = 32
    channel_mult: list = field(default_factory=lambda: [1, 2, 2])
    num_blocks: int = 1
    attn_resolutions: list = field(default_factory=list)
    dropout: float = 0.0


@dataclass
class DiffusionConfig:
    schedule: str = "edm"  # edm only for training (vp, flow: library functions, see fastonestep.diffusion.schedules)
    sigma_data: float = 0.5
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    p_mean: float = -1.2  # training noise: ln(sigma) ~ N(p_mean, p_std^2)
    p_std: float = 1.2
    sample_steps: int = 18  # teacher sampler (Karras grid)
    solver: str = "heun"  # heun | euler
    rho: float = 7.0


@dataclass
class OptimConfig:
    lr: float = 1e-3
    beta1: float = 0.9
    beta2: float = 0.999
    weight_decay: float = 0.0
    warmup_steps: int = 0  # linear ramp of the lr over the first N steps
    # EDM2's inverse-square-root decay: lr / sqrt(max(step / decay_steps, 1)); 0 = constant after the warm-up
    decay_steps: int = 0
    grad_clip: float = 1.0  # 0 disables clipping


@dataclass
class TrainConfig:
    steps: int = 1000  # generator (or denoiser) updates
    batch_size: int = 256
    ema_halflife_kimg: float = 50.0  # EMA half-life in thousands of samples (EDM style); 0 disables EMA
    ema_rampup: float = 0.05
    # Post-hoc EMA (EDM2): relative widths of power-function EMAs to track besides the EMA above (e.g. [0.05, 0.1];
    # empty: none), each saved every ema_snapshot_kimg thousand images and at the end into RUN_DIR/posthoc_ema/;
    # `fastonestep ema RUN --std S` then builds the EMA of any width S from them (engine/posthoc_ema.py).
    ema_stds: list = field(default_factory=list)
    ema_snapshot_kimg: float = 0.0
    log_every: int = 50
    checkpoint_every: int = 500
    device: str = "auto"  # auto | cpu | cuda
    kernels: str = "eager"  # eager | fused (fused kernels: see fastonestep.losses)
    threads: int = 0  # torch CPU threads; 0 = torch's default
    # Per-process micro-batch; 0 = batch_size / world_size. Changes only gradient accumulation
    # (batch_size / (world_size * batch_per_gpu) rounds), never the effective batch or the lr.
    batch_per_gpu: int = 0
    eval_every_kimg: float = 0.0  # evaluate the run's model every N thousand images into eval.jsonl; 0 = off
    tensorboard: bool = True  # also write stats and evaluations as TensorBoard events in RUN_DIR/tensorboard
    # Recompute each residual block's activations in the backward pass instead of keeping them: much less
    # activation memory for about a third more compute; gradients unchanged (networks/checkpointing.py).
    activation_checkpointing: bool = False


@dataclass
class RatioNetConfig:
    kind: str = "auto"  # auto (encoder for images, mlp for 2-D) | encoder | mlp
    init: str = "teacher"  # teacher | scratch
    head_channels: int = 0  # 0: the encoder's bottleneck width
    hidden: int = 256  # mlp ratio net
    depth: int = 3


@dataclass
class EDMConfig:
    """EDM diffusion pretraining (method: edm)."""
    # EDM2's learned uncertainty weighting: a log-variance u(sigma) (this many MP Fourier features of c_noise, one
    # MP linear) trained with the denoiser on L / exp(u) + u per sample; 0 = off (EDM's fixed lambda). EDM2: 128.
    logvar_channels: int = 0


@dataclass
class DiffRatioConfig:
    divergence: str = "dijs"  # rkl | dijs | fkl | hellinger
    realisation: str = "grad"  # grad: 4.1(b) normalised score-difference; logit: 4.1(a) weighted logits
    ratio_steps: int = 1  # ratio-classifier updates per generator update
    sigma_g: float = 2.5  # generator input noise level: G(z) = D(sigma_g z; sigma_g)
    # Noise levels of the classifier (pi_c) and of the generator loss: ln(sigma) ~ N(mean, std^2), clipped.
    ratio_p_mean: float = -0.4
    ratio_p_std: float = 1.4
    gen_p_mean: float = -0.4
    gen_p_std: float = 1.4
    sigma_min: float = 0.02
    sigma_max: float = 20.0
    weighting: str = "one"  # one | sigma2 (per-sample time weight w(t) of the generator gradient)
    logit_clamp: float = 10.0
    normalize: bool = True  # grad realisation: per-sample mean-|g| normaliser (DMD style)
    ratio_net: RatioNetConfig = field(default_factory=RatioNetConfig)
    ratio_optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-4, beta1=0.0, beta2=0.99))


@dataclass
class DMDConfig:
    """DMD / DMD2 (design 4.2). DMD2 = fake_steps 5 and gan_weight > 0. DP-DMD reads the fake-score and band
    keys from here too (it ignores student_sigmas / backward_simulation and refuses gan_weight > 0)."""
    fake_steps: int = 1  # fake-score updates per generator update (DMD 1, DMD2 5)
    fake_p_mean: float = -1.2  # fake-score training noise: ln(sigma) ~ N(fake_p_mean, fake_p_std^2)
    fake_p_std: float = 1.2
    # Generator noise band: uniform over the indices of a Karras grid of num_grid_steps levels
    # (diffusion.sigma_min..sigma_max) whose position, 0 = sigma_min .. 1 = sigma_max, is in [t_min, t_max].
    t_min_frac: float = 0.02
    t_max_frac: float = 0.98
    num_grid_steps: int = 1000
    student_sigmas: list = field(default_factory=lambda: [2.5])  # decreasing student levels; one = one-step G
    backward_simulation: bool = True  # multi-level students: own earlier steps make the input (DMD2)
    gan_weight: float = 0.0  # DMD2 generator GAN loss weight (DMD2 paper: 3e-3); 0 = no GAN head
    gan_disc_weight: float = 1e-2  # discriminator loss weight inside the fake-score loss (DMD2: 1e-2)
    fake_optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-4, beta1=0.0, beta2=0.99))


@dataclass
class DPDMDConfig:
    """DP-DMD (design 4.3): step 1 by target prediction onto the teacher ODE, steps 2..K by DMD (dmd.*)."""
    student_sigmas: list = field(default_factory=lambda: [2.5, 0.5])  # K >= 2 decreasing levels
    target: str = "x0"  # x0 | eps | v: the form in which the first-step prediction is regressed
    teacher_steps: int = 4  # teacher ODE steps from student_sigmas[0] to student_sigmas[1]
    teacher_solver: str = "heun"  # heun | euler
    diversity_weight: float = 1.0  # weight of the first-step target-prediction loss


@dataclass
class BackwardConfig:
    """Imagine-Flash-style backward distillation (design 4.4; our reading, see methods/backward.py)."""
    student_sigmas: list = field(default_factory=lambda: [80.0, 2.0])  # 1-3 decreasing student levels
    parameterization: str = "x0"  # x0 (the preconditioned denoiser) | eps (eps_hat = (x - D) / sigma)
    noise_correction: float = 1.0  # eps only, first step: eps = z + c (eps_hat - z); 1 = off, 0 = known noise
    trajectory_net: str = "student"  # student | ema: the weights that simulate the earlier steps (no gradient)
    step_weights: list = field(default_factory=list)  # relative probability of training each step; [] = uniform
    shift: str = "identity"  # identity (s' = s) | power (ln s' = shift_a ln s + shift_b) | fixed (s' = shift_sigma)
    shift_a: float = 1.0
    shift_b: float = 0.0
    shift_sigma: float = 1.0
    teacher_steps: int = 1  # 1: one teacher call at s'; n > 1: an n-level teacher ODE from s' to 0
    teacher_solver: str = "heun"  # heun | euler (teacher_steps > 1)
    weighting: str = "none"  # none: mean (x0_s - target)^2 | edm: times lambda(s_k)


@dataclass
class DistributedConfig:
    """Backends (fastonestep.engine.distributed): launch with torchrun (or the deepspeed launcher)."""
    backend: str = "single"  # single | ddp | deepspeed
    zero_stage: int = 2  # deepspeed: ZeRO stage 1 | 2 | 3
    deepspeed_config: str = ""  # optional DeepSpeed JSON (e.g. configs/deepspeed/zero3.json); validated against us
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16


@dataclass
class EvalConfig:
    num_samples: int = 2000  # images / points generated for metrics.json
    batch_size: int = 500
    teacher_fd: bool = True  # also measure the teacher's multi-step sampler (distillation runs)
    grid: int = 8  # samples.png is grid x grid
    inception: str = ""  # a local FID Inception weights file (pt_inception-2015-12-05 format): adds "fid"
    fid_ref: str = ""  # FID reference statistics .npz (mu, sigma); empty: the training images
    # latent data: the local diffusers AutoencoderKL folder the data were encoded with; generated latents are
    # decoded by it for the image features (inception FID). Empty: latents get latent-space metrics only.
    vae: str = ""
    features: str = "auto"  # FD / PRDC / diversity features: auto | mnist | inception | raw (fastonestep.eval.features)
    prdc_k: int = 5  # k of the k-NN balls of precision / recall / density / coverage


@dataclass
class Config:
    method: str = "edm"  # edm (diffusion pretraining) | diffratio | dmd | dpdmd
    seed: int = 0
    teacher: str = ""  # distillation: the teacher's run directory (or its checkpoint file)
    # distillation: dropout of every network the run trains (generator, fake score, ratio encoder), in place of
    # the teacher's own (EDM2-M pre-trains with 0.1); 0 = off, as DMD2 trains its EDM students.
    student_dropout: float = 0.0
    data: DataConfig = field(default_factory=DataConfig)
    network: NetworkConfig = field(default_factory=NetworkConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    edm: EDMConfig = field(default_factory=EDMConfig)
    diffratio: DiffRatioConfig = field(default_factory=DiffRatioConfig)
    dmd: DMDConfig = field(default_factory=DMDConfig)
    dpdmd: DPDMDConfig = field(default_factory=DPDMDConfig)
    backward: BackwardConfig = field(default_factory=BackwardConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)


CHOICES = {
    "method": ("edm", "diffratio", "dmd", "dpdmd", "backward"),
    "data.kind": ("toy2d", "mnist", "folder", "latent"),
    "data.loader": ("auto", "memory", "torch", "dali"),
    "network.kind": ("mlp", "unet", "edm2"),
    "network.size": ("", "xs", "s", "m", "l", "xl", "xxl"),
    "diffusion.schedule": ("edm", "vp", "flow"),
    "diffusion.solver": ("heun", "euler"),
    "train.device": ("auto", "cpu", "cuda"),
    "train.kernels": ("eager", "fused"),
    "distributed.backend": ("single", "ddp", "deepspeed"),
    "distributed.zero_stage": (1, 2, 3),
    "distributed.precision": ("auto", "fp32", "bf16"),
    "diffratio.divergence": ("rkl", "dijs", "fkl", "hellinger"),
    "diffratio.realisation": ("grad", "logit"),
    "diffratio.weighting": ("one", "sigma2"),
    "diffratio.ratio_net.kind": ("auto", "encoder", "mlp"),
    "diffratio.ratio_net.init": ("teacher", "scratch"),
    "eval.features": ("auto", "mnist", "inception", "raw"),
    "dpdmd.target": ("x0", "eps", "v"),
    "dpdmd.teacher_solver": ("heun", "euler"),
    "backward.parameterization": ("x0", "eps"),
    "backward.trajectory_net": ("student", "ema"),
    "backward.shift": ("identity", "power", "fixed"),
    "backward.teacher_solver": ("heun", "euler"),
    "backward.weighting": ("none", "edm"),
}

POSITIVE = ("train.steps", "train.batch_size", "train.log_every", "train.checkpoint_every", "eval.num_samples",
            "eval.batch_size", "eval.prdc_k", "diffratio.ratio_steps", "diffratio.sigma_g", "diffusion.sigma_data",
            "diffusion.sample_steps", "data.resolution", "optim.lr", "diffratio.ratio_optim.lr",
            "dmd.fake_steps", "dmd.num_grid_steps", "dmd.fake_optim.lr", "dmd.fake_p_std", "dpdmd.teacher_steps",
            "backward.teacher_steps", "diffratio.logit_clamp")


# ----------------------------------------------------------------------------------------------------------
# dict <-> dataclass


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def _field_types(cls) -> dict:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce(value, typ, key: str):
    """Checks/converts one leaf value; ints are accepted where floats are expected."""
    if typ is bool:
        if isinstance(value, bool):
            return value
    elif typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif typ is str:
        if isinstance(value, str):
            return value
        if value is None:
            return ""
    elif typ is list:
        if isinstance(value, (list, tuple)):
            return list(value)
    raise ConfigError(f"config key '{key}' expects {typ.__name__}, got {value!r} ({type(value).__name__})")


def _unknown(key: str, valid) -> ConfigError:
    leaf = key.rsplit(".", 1)[-1]
    close = difflib.get_close_matches(leaf, list(valid), n=1)
    hint = f" (did you mean '{key.rsplit('.', 1)[0] + '.' if '.' in key else ''}{close[0]}'?)" if close else ""
    return ConfigError(f"unknown config key '{key}'{hint}")


def from_dict(d: dict, cls=Config, prefix: str = ""):
    if not isinstance(d, dict):
        raise ConfigError(f"config section '{prefix.rstrip('.') or '<root>'}' must be a mapping, got {d!r}")
    types = _field_types(cls)
    kwargs = {}
    for key, value in d.items():
        full = prefix + str(key)
        if key not in types:
            raise _unknown(full, types)
        typ = types[key]
        if dataclasses.is_dataclass(typ):
            kwargs[key] = from_dict(value or {}, typ, full + ".")
        else:
            kwargs[key] = _coerce(value, typ, full)
    return cls(**kwargs)


# ----------------------------------------------------------------------------------------------------------
# presets and overrides


def _merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for k, v in update.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_yaml(path: str, _loading: tuple = ()) -> dict:
    """Reads a preset; `base: other.yaml` (relative to this file) is loaded first and updated."""
    if os.path.realpath(path) in _loading:
        chain = " -> ".join([*_loading, os.path.realpath(path)])
        raise ConfigError(f"config file '{path}': its 'base:' chain loops ({chain})")
    if not os.path.isfile(path):
        raise ConfigError(f"config file '{path}' does not exist")
    with open(path, encoding="utf-8") as f:
        try:
            d = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file '{path}' is not valid YAML: {e}") from None
    if not isinstance(d, dict):
        raise ConfigError(f"config file '{path}' must hold a mapping at the top level")
    base = d.pop("base", None)
    if base:
        d = _merge(load_yaml(os.path.join(os.path.dirname(path), base), (*_loading, os.path.realpath(path))), d)
    return d


def parse_override(text: str) -> tuple[list[str], object]:
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like key=value (e.g. train.steps=100)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override '{text}' has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(d: dict, overrides) -> dict:
    d = _merge({}, d)
    for text in overrides:
        path, value = parse_override(text)
        node = d
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{text}': '{part}' is not a section")
        node[path[-1]] = value
    return d


def _check_levels(levels, key: str, min_len: int) -> None:
    """Student noise levels: at least min_len positive numbers, strictly decreasing."""
    if len(levels) < min_len or not all(isinstance(s, (int, float)) and not isinstance(s, bool) for s in levels):
        raise ConfigError(f"config key '{key}' must be a list of at least {min_len} noise level(s); got {levels!r}")
    if min(levels) <= 0:
        raise ConfigError(f"config key '{key}' must hold positive noise levels; got {levels!r}")
    if any(b >= a for a, b in zip(levels, levels[1:])):
        raise ConfigError(f"config key '{key}' must be strictly decreasing (first step at the highest noise); "
                          f"got {levels!r}")


def dmd_band(num_grid_steps: int, t_min_frac: float, t_max_frac: float) -> range:
    """Indices (0 = sigma_min .. num_grid_steps - 1 = sigma_max) of the Karras-grid levels in the DMD band."""
    last = num_grid_steps - 1
    return range(math.ceil(t_min_frac * last - 1e-9), math.floor(t_max_frac * last + 1e-9) + 1)


def _validate_dmd(cfg: Config) -> None:
    dmd = cfg.dmd
    if not 0.0 <= dmd.t_min_frac < dmd.t_max_frac <= 1.0:
        raise ConfigError(f"config keys 'dmd.t_min_frac' < 'dmd.t_max_frac' within [0, 1] required; got "
                          f"{dmd.t_min_frac}, {dmd.t_max_frac}")
    if dmd.num_grid_steps < 2 or not dmd_band(dmd.num_grid_steps, dmd.t_min_frac, dmd.t_max_frac):
        raise ConfigError(f"config key 'dmd.num_grid_steps' = {dmd.num_grid_steps} leaves no grid level in the band "
                          f"[{dmd.t_min_frac}, {dmd.t_max_frac}] (needs >= 2 levels)")
    for key in ("gan_weight", "gan_disc_weight"):
        if getattr(dmd, key) < 0:
            raise ConfigError(f"config key 'dmd.{key}' must be >= 0; got {getattr(dmd, key)!r}")
    _check_levels(dmd.student_sigmas, "dmd.student_sigmas", 1)
    if cfg.method == "dpdmd":
        _check_levels(cfg.dpdmd.student_sigmas, "dpdmd.student_sigmas", 2)
        if cfg.dpdmd.diversity_weight < 0:
            raise ConfigError(f"config key 'dpdmd.diversity_weight' must be >= 0; got {cfg.dpdmd.diversity_weight!r}")
        if dmd.gan_weight > 0:
            raise ConfigError("config key 'dmd.gan_weight' must be 0 for method 'dpdmd' (DP-DMD uses no discriminator)")


def _validate_backward(b: BackwardConfig) -> None:
    _check_levels(b.student_sigmas, "backward.student_sigmas", 1)
    if len(b.student_sigmas) > 3:
        raise ConfigError(f"config key 'backward.student_sigmas' holds 1 to 3 levels (a 1-3 step student); "
                          f"got {b.student_sigmas!r}")
    w = b.step_weights
    if w and (len(w) != len(b.student_sigmas) or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                          and v >= 0 for v in w) or not sum(w) > 0):
        raise ConfigError(f"config key 'backward.step_weights' must be empty (uniform) or {len(b.student_sigmas)} "
                          f"non-negative numbers with a positive sum, one per student level; got {w!r}")
    if b.shift == "power" and not (b.shift_a > 0 and math.isfinite(b.shift_a) and math.isfinite(b.shift_b)):
        raise ConfigError(f"config key 'backward.shift_a' must be positive (the shift gamma must increase with "
                          f"sigma) and 'backward.shift_b' finite; got {b.shift_a!r}, {b.shift_b!r}")
    if b.shift == "fixed" and not b.shift_sigma > 0:
        raise ConfigError(f"config key 'backward.shift_sigma' must be positive; got {b.shift_sigma!r}")
    if not 0.0 <= b.noise_correction <= 1.0:
        raise ConfigError(f"config key 'backward.noise_correction' must be in [0, 1] (1 = no correction); "
                          f"got {b.noise_correction!r}")
    if b.parameterization == "x0" and b.noise_correction != 1.0:
        raise ConfigError("config key 'backward.noise_correction' applies to eps-parameterised students only: "
                          "set backward.parameterization=eps, or leave noise_correction at 1.0")


def _validate_posthoc_ema(t: TrainConfig) -> None:
    from fastonestep.engine.posthoc_ema import MAX_STD

    stds = t.ema_stds
    if not all(isinstance(s, (int, float)) and not isinstance(s, bool) and 0 < s <= MAX_STD for s in stds):
        raise ConfigError(f"config key 'train.ema_stds' must be a list of relative widths in (0, {MAX_STD:.4f}] "
                          f"(EDM2: [0.05, 0.1]); got {stds!r}")
    if not all(abs(round(s, 4) - s) < 1e-12 for s in stds):  # checkpoints and file names hold 4 decimals
        raise ConfigError(f"config key 'train.ema_stds' gives widths to 4 decimals at most; got {stds!r}")
    if len(set(stds)) != len(stds):
        raise ConfigError(f"config key 'train.ema_stds' holds the same width twice; got {stds!r}")
    if stds and not t.ema_snapshot_kimg > 0:
        raise ConfigError(f"config key 'train.ema_snapshot_kimg' must be positive when train.ema_stds is set (how "
                          f"often the post-hoc EMA snapshots are saved); got {t.ema_snapshot_kimg!r}")
    if not t.ema_snapshot_kimg >= 0:
        raise ConfigError(f"config key 'train.ema_snapshot_kimg' must be >= 0; got {t.ema_snapshot_kimg!r}")


def validate(cfg: Config) -> Config:
    flat = flatten(to_dict(cfg))
    for key, allowed in CHOICES.items():
        if flat[key] not in allowed:
            raise ConfigError(f"config key '{key}' must be one of {', '.join(map(str, allowed))}; got {flat[key]!r}")
    for key in POSITIVE:
        if not flat[key] > 0:
            raise ConfigError(f"config key '{key}' must be positive; got {flat[key]!r}")
    b, per_gpu = cfg.train.batch_size, cfg.train.batch_per_gpu
    if per_gpu < 0 or (per_gpu and b % per_gpu):  # the world-size part is checked at launch
        raise ConfigError(f"config key 'train.batch_per_gpu' = {per_gpu} must be 0 or divide "
                          f"train.batch_size = {b}")
    if not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in cfg.data.shape):
        raise ConfigError(f"config key 'data.shape' must be a list of positive integers; got {cfg.data.shape!r}")
    if cfg.data.num_classes < 0:
        raise ConfigError(f"config key 'data.num_classes' must be >= 0; got {cfg.data.num_classes!r}")
    if cfg.method != "edm" and not cfg.teacher:
        raise ConfigError(f"method '{cfg.method}' distils a teacher: set config key 'teacher' to a teacher run directory")
    if cfg.data.kind == "folder" and not cfg.data.path:
        raise ConfigError("config key 'data.path' must name an image folder or .npz file when data.kind=folder")
    if cfg.data.kind == "latent" and not cfg.data.path:
        raise ConfigError("config key 'data.path' must name a latent dataset folder (`fastonestep dataset encode`) "
                          "when data.kind=latent")
    if cfg.data.workers < 0:
        raise ConfigError(f"config key 'data.workers' must be >= 0; got {cfg.data.workers}")
    for key, path in (("eval.inception", cfg.eval.inception), ("eval.fid_ref", cfg.eval.fid_ref)):
        if path and not os.path.isfile(path):  # checked now, not after hours of training
            raise ConfigError(f"config key '{key}': file '{path}' does not exist")
    if cfg.eval.vae and not os.path.isdir(cfg.eval.vae):
        raise ConfigError(f"config key 'eval.vae': '{cfg.eval.vae}' is not a folder (a diffusers AutoencoderKL "
                          "saved with save_pretrained)")
    if not 0.0 <= cfg.student_dropout < 1.0:
        raise ConfigError(f"config key 'student_dropout' must be in [0, 1); got {cfg.student_dropout!r}")
    if cfg.diffratio.sigma_min >= cfg.diffratio.sigma_max:
        raise ConfigError("config keys 'diffratio.sigma_min' < 'diffratio.sigma_max' required")
    if cfg.edm.logvar_channels < 0:
        raise ConfigError(f"config key 'edm.logvar_channels' must be >= 0 (0 = off); got {cfg.edm.logvar_channels}")
    if cfg.diffusion.schedule != "edm":
        raise ConfigError(
            f"config key 'diffusion.schedule' = {cfg.diffusion.schedule!r}: training runs in EDM (variance-exploding) "
            "coordinates only. A VP or flow sample x_t is the EDM sample x_t / alpha at sigma / alpha, so one trained "
            "denoiser serves every schedule through fastonestep.diffusion (make_schedule, denoise_with_schedule); "
            "set diffusion.schedule=edm")
    _validate_posthoc_ema(cfg.train)
    if not cfg.train.eval_every_kimg >= 0:
        raise ConfigError(f"config key 'train.eval_every_kimg' must be >= 0 (0 = off); got {cfg.train.eval_every_kimg!r}")
    _validate_dmd(cfg)
    _validate_backward(cfg.backward)
    for section in ("optim", "diffratio.ratio_optim", "dmd.fake_optim"):
        for key in ("warmup_steps", "decay_steps", "grad_clip", "weight_decay"):
            if not flat[f"{section}.{key}"] >= 0:
                raise ConfigError(f"config key '{section}.{key}' must be >= 0; got {flat[f'{section}.{key}']!r}")
    return cfg


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, prefix + k + "."))
        else:
            out[prefix + k] = v
    return out


def load_config(path: str | None = None, overrides=()) -> Config:
    d = load_yaml(path) if path else {}
    cfg = validate(from_dict(apply_overrides(d, overrides)))
    if cfg.teacher:  # as typed it means "from this directory": saved resolved, eval and resume work from anywhere
        cfg.teacher = os.path.abspath(os.path.expanduser(cfg.teacher))
    return cfg


def save_config(cfg: Config, path: str) -> None:
    from fastonestep.engine.checkpoint import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))
