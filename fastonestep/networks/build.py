"""Factories the trainer uses to turn a config (kind + data shape + architecture keys) into networks.

Denoisers come back wrapped in EDMPrecond, ratio networks in RatioPrecond, so callers only ever see
D(x, sigma, labels) and c(x, sigma, labels). Architecture keys are checked per kind: a typo in a config
is an error, never a silently ignored setting.
"""
from __future__ import annotations

from torch import nn

from fastonestep.diffusion.precond import EDMPrecond
from fastonestep.networks.edm2 import EDM2Block, EDM2EncoderRatioNet, EDM2UNet, edm2_channels
from fastonestep.networks.mlp import MLP
from fastonestep.networks.ratio import EncoderRatioNet, RatioPrecond
from fastonestep.networks.unet import UNet

MLP_ARCH_KEYS = ("hidden", "depth", "emb_dim")
UNET_ARCH_KEYS = ("channels", "channel_mult", "num_blocks", "attn_resolutions", "dropout", "emb_channels",
                  "mid_attention")
ENCODER_RATIO_ARCH_KEYS = UNET_ARCH_KEYS + ("head_channels",)
# EDM2 (networks/edm2.py): `size` (xs ... xxl) picks `channels` (EDM2's model_channels); give one or both.
EDM2_ARCH_KEYS = ("size", "channels", "channel_mult", "num_blocks", "attn_resolutions", "dropout")
EDM2_RATIO_ARCH_KEYS = EDM2_ARCH_KEYS + ("head_channels",)
_EDM2_STRUCTURAL_KEYS = ("img_channels", "resolution", "channels", "channel_mult", "num_blocks", "attn_resolutions",
                         "num_classes")
# Keys that change parameter shapes: a ratio encoder initialised from a UNet must agree on all of them.
_STRUCTURAL_KEYS = ("img_channels", "resolution", "channels", "channel_mult", "num_blocks", "attn_resolutions",
                    "num_classes", "emb_channels", "mid_attention")


def set_dropout(net: nn.Module, p: float) -> nn.Module:
    """Sets the dropout probability of every layer of `net` (UNet nn.Dropout, EDM2 blocks) in place, and the
    `dropout` of the architecture records (`config`) that a rebuild reads. Returns `net`."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout must be in [0, 1); got {p!r}")
    for module in net.modules():
        if isinstance(module, nn.Dropout):
            module.p = p
        elif isinstance(module, EDM2Block):
            module.dropout = p
        config = getattr(module, "config", None)
        if isinstance(config, dict) and "dropout" in config:
            config["dropout"] = p
    return net


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def _check_arch(arch: dict, allowed: tuple, kind: str, role: str) -> None:
    unknown = sorted(set(arch) - set(allowed))
    if unknown:
        raise ValueError(f"unknown {role} architecture key(s) {unknown} for kind {kind!r}; "
                         f"allowed: {list(allowed)}")


def _vector_dim(data_shape, kind: str) -> int:
    if len(data_shape) != 1:
        raise ValueError(f"kind {kind!r} needs data_shape (D,), got {tuple(data_shape)}")
    return int(data_shape[0])


def _image_shape(data_shape, kind: str) -> tuple[int, int]:
    """(C, H, W) with H == W -> (img_channels, resolution)."""
    if len(data_shape) != 3 or data_shape[1] != data_shape[2]:
        raise ValueError(f"kind {kind!r} needs square images, data_shape (C, H, H); got {tuple(data_shape)}")
    return int(data_shape[0]), int(data_shape[1])


def build_denoiser(kind: str, data_shape, num_classes: int = 0, sigma_data: float = 0.5, **arch) -> EDMPrecond:
    """kind "mlp": data_shape (D,), arch keys hidden, depth, emb_dim.
    kind "unet": data_shape (C, H, H), arch keys channels, channel_mult, num_blocks, attn_resolutions,
    dropout (and emb_channels, mid_attention).
    kind "edm2": the magnitude-preserving EDM2 UNet, data_shape (C, H, H), arch keys size (xs ... xxl, which
    picks channels) and/or channels, channel_mult, num_blocks, attn_resolutions, dropout."""
    if kind == "mlp":
        _check_arch(arch, MLP_ARCH_KEYS, kind, "denoiser")
        net = MLP(dim=_vector_dim(data_shape, kind), num_classes=num_classes, **arch)
    elif kind == "unet":
        _check_arch(arch, UNET_ARCH_KEYS, kind, "denoiser")
        img_channels, resolution = _image_shape(data_shape, kind)
        net = UNet(img_channels=img_channels, resolution=resolution, num_classes=num_classes, **arch)
    elif kind == "edm2":
        _check_arch(arch, EDM2_ARCH_KEYS, kind, "denoiser")
        img_channels, resolution = _image_shape(data_shape, kind)
        net = EDM2UNet(img_channels=img_channels, resolution=resolution, num_classes=num_classes,
                       **_edm2_arch(arch))
    else:
        raise ValueError(f"unknown denoiser kind {kind!r}; expected 'mlp', 'unet' or 'edm2'")
    return EDMPrecond(net, sigma_data=sigma_data)


def _edm2_arch(arch: dict) -> dict:
    """EDM2 arch keys -> EDM2UNet/EDM2EncoderRatioNet keyword arguments (size resolved into channels)."""
    arch = dict(arch)
    size = arch.pop("size", "")
    arch["channels"] = edm2_channels(size, arch.get("channels"))
    return arch


def _unet_of(init_from) -> UNet:
    net = init_from.net if isinstance(init_from, EDMPrecond) else init_from
    if not isinstance(net, UNet):
        raise TypeError(f"init_from must be a UNet or an EDMPrecond wrapping one, got {type(net).__name__}")
    return net


def _edm2_of(init_from) -> EDM2UNet:
    net = init_from.net if isinstance(init_from, EDMPrecond) else init_from
    if not isinstance(net, EDM2UNet):
        raise TypeError(f"init_from must be an EDM2UNet or an EDMPrecond wrapping one, got {type(net).__name__}")
    return net


def _copy_encoder(net, unet, structural_keys, what: str) -> None:
    """Initialises a ratio network's encoder from the teacher's (same structure required), on its device."""
    mismatched = [k for k in structural_keys if net.encoder.config[k] != unet.config[k]]
    if mismatched:
        detail = ", ".join(f"{k}: {net.encoder.config[k]!r} vs {unet.config[k]!r}" for k in mismatched)
        raise ValueError(f"ratio encoder cannot be initialised from this {what} ({detail})")
    net.encoder.load_state_dict(unet.encoder.state_dict())
    net.to(next(unet.parameters()).device)


def build_ratio(kind: str, data_shape, num_classes: int = 0, sigma_data: float = 0.5, init_from=None,
                **arch) -> RatioPrecond:
    """kind "mlp": MLP(out_dim=1) with a zero-initialised output, arch keys hidden, depth, emb_dim.
    kind "encoder": EncoderRatioNet, the UNet arch keys plus head_channels. With `init_from` (a UNet
    denoiser, bare or in EDMPrecond) the architecture keys not given default to that UNet's, and its
    encoder weights are copied; any given key that changes parameter shapes must then agree with it.
    kind "edm2_encoder": EDM2EncoderRatioNet, the EDM2 arch keys plus head_channels; `init_from` an EDM2
    denoiser, with the same defaulting and checks."""
    if kind == "mlp":
        _check_arch(arch, MLP_ARCH_KEYS, kind, "ratio")
        if init_from is not None:
            raise ValueError("init_from is supported only for ratio kind 'encoder' (a UNet encoder)")
        net = MLP(dim=_vector_dim(data_shape, kind), out_dim=1, num_classes=num_classes, zero_init_output=True,
                  **arch)
    elif kind == "encoder":
        _check_arch(arch, ENCODER_RATIO_ARCH_KEYS, kind, "ratio")
        img_channels, resolution = _image_shape(data_shape, kind)
        unet = None if init_from is None else _unet_of(init_from)
        defaults = {} if unet is None else {k: v for k, v in unet.config.items() if k in UNET_ARCH_KEYS}
        net = EncoderRatioNet(img_channels=img_channels, resolution=resolution, num_classes=num_classes,
                              **{**defaults, **arch})
        if unet is not None:
            _copy_encoder(net, unet, _STRUCTURAL_KEYS, "UNet")
    elif kind == "edm2_encoder":
        _check_arch(arch, EDM2_RATIO_ARCH_KEYS, kind, "ratio")
        img_channels, resolution = _image_shape(data_shape, kind)
        unet = None if init_from is None else _edm2_of(init_from)
        defaults = {} if unet is None else {k: v for k, v in unet.config.items() if k in EDM2_ARCH_KEYS}
        merged = {**defaults, **arch}
        if "size" in arch and "channels" not in arch:  # a given size, not the teacher's width, decides
            merged.pop("channels", None)
        net = EDM2EncoderRatioNet(img_channels=img_channels, resolution=resolution, num_classes=num_classes,
                                  **_edm2_arch(merged))
        if unet is not None:
            _copy_encoder(net, unet, _EDM2_STRUCTURAL_KEYS, "EDM2 UNet")
    else:
        raise ValueError(f"unknown ratio kind {kind!r}; expected 'mlp', 'encoder' or 'edm2_encoder'")
    return RatioPrecond(net, sigma_data=sigma_data)
