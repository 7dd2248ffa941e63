"""Typed configuration: dataclass sections, YAML presets (with `base:` inheritance), dotted overrides.

Every error names the offending key: an unknown key, a value of the wrong type, a value outside its
allowed choices. Presets live in configs/; `fastonestep train PRESET key=value ...` resolves them and the
run directory keeps the resolved config.yaml, which is what a resume reads back.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import typing
from dataclasses import dataclass, field

import yaml


class ConfigError(ValueError):
    """A bad configuration: the message names the key and the problem."""


@dataclass
class DataConfig:
    kind: str = "toy2d"  # toy2d | mnist | folder
    name: str = "grid25"  # toy2d: grid25 | rings | moons
    path: str = ""  # folder: an image directory or a .npz file
    resolution: int = 32
    size: int = 0  # 0: all (toy2d: 100k samples)
    class_conditional: bool = False


@dataclass
class NetworkConfig:
    kind: str = "mlp"  # mlp | unet
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
    schedule: str = "edm"  # edm | vp | flow
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
    warmup_steps: int = 0
    grad_clip: float = 1.0  # 0 disables clipping


@dataclass
class TrainConfig:
    steps: int = 1000  # generator (or denoiser) updates
    batch_size: int = 256
    ema_halflife_kimg: float = 50.0  # EMA half-life in thousands of samples (EDM style); 0 disables EMA
    ema_rampup: float = 0.05
    log_every: int = 50
    checkpoint_every: int = 500
    device: str = "auto"  # auto | cpu | cuda
    kernels: str = "eager"  # eager | fused (fused kernels: see fastonestep.losses)
    threads: int = 0  # torch CPU threads; 0 = torch's default


@dataclass
class RatioNetConfig:
    kind: str = "auto"  # auto (encoder for images, mlp for 2-D) | encoder | mlp
    init: str = "teacher"  # teacher | scratch
    head_channels: int = 0  # 0: the encoder's bottleneck width
    hidden: int = 256  # mlp ratio net
    depth: int = 3


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
class EvalConfig:
    num_samples: int = 2000  # images / points generated for metrics.json
    batch_size: int = 500
    teacher_fd: bool = True  # also measure the teacher's multi-step sampler (distillation runs)
    grid: int = 8  # samples.png is grid x grid
    inception: str = ""  # a local FID Inception weights file (pt_inception-2015-12-05 format): adds "fid"
    fid_ref: str = ""  # FID reference statistics .npz (mu, sigma); empty: the training images


@dataclass
class Config:
    method: str = "edm"  # edm (diffusion pretraining) | diffratio
    seed: int = 0
    teacher: str = ""  # distillation: the teacher's run directory (or its checkpoint file)
    data: DataConfig = field(default_factory=DataConfig)
    network: NetworkConfig = field(default_factory=NetworkConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    diffratio: DiffRatioConfig = field(default_factory=DiffRatioConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


CHOICES = {
    "method": ("edm", "diffratio"),
    "data.kind": ("toy2d", "mnist", "folder"),
    "network.kind": ("mlp", "unet"),
    "diffusion.schedule": ("edm", "vp", "flow"),
    "diffusion.solver": ("heun", "euler"),
    "train.device": ("auto", "cpu", "cuda"),
    "train.kernels": ("eager", "fused"),
    "diffratio.divergence": ("rkl", "dijs", "fkl", "hellinger"),
    "diffratio.realisation": ("grad", "logit"),
    "diffratio.weighting": ("one", "sigma2"),
    "diffratio.ratio_net.kind": ("auto", "encoder", "mlp"),
    "diffratio.ratio_net.init": ("teacher", "scratch"),
}

POSITIVE = ("train.steps", "train.batch_size", "train.log_every", "train.checkpoint_every", "eval.num_samples",
            "eval.batch_size", "diffratio.ratio_steps", "diffratio.sigma_g", "diffusion.sigma_data",
            "diffusion.sample_steps", "data.resolution", "optim.lr", "diffratio.ratio_optim.lr")


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


def load_yaml(path: str) -> dict:
    """Reads a preset; `base: other.yaml` (relative to this file) is loaded first and updated."""
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
        d = _merge(load_yaml(os.path.join(os.path.dirname(path), base)), d)
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


def validate(cfg: Config) -> Config:
    flat = flatten(to_dict(cfg))
    for key, allowed in CHOICES.items():
        if flat[key] not in allowed:
            raise ConfigError(f"config key '{key}' must be one of {', '.join(allowed)}; got {flat[key]!r}")
    for key in POSITIVE:
        if not flat[key] > 0:
            raise ConfigError(f"config key '{key}' must be positive; got {flat[key]!r}")
    if cfg.method != "edm" and not cfg.teacher:
        raise ConfigError(f"method '{cfg.method}' distils a teacher: set config key 'teacher' to a teacher run directory")
    if cfg.data.kind == "folder" and not cfg.data.path:
        raise ConfigError("config key 'data.path' must name an image folder or .npz file when data.kind=folder")
    for key, path in (("eval.inception", cfg.eval.inception), ("eval.fid_ref", cfg.eval.fid_ref)):
        if path and not os.path.isfile(path):  # checked now, not after hours of training
            raise ConfigError(f"config key '{key}': file '{path}' does not exist")
    if cfg.diffratio.sigma_min >= cfg.diffratio.sigma_max:
        raise ConfigError("config keys 'diffratio.sigma_min' < 'diffratio.sigma_max' required")
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
    return validate(from_dict(apply_overrides(d, overrides)))


def save_config(cfg: Config, path: str) -> None:
    from fastonestep.engine.checkpoint import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))
