"""Exported models: one safetensors file holding the (EMA) weights and, in its metadata, everything needed
to rebuild the network (kind, architecture, data shape, classes, sigma_data, generator noise levels).

An exported file is self-contained: a distillation run can be moved away from its teacher and still load.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os

import torch
from safetensors.torch import load_file, save_file, safe_open

from fastonestep.engine.checkpoint import CheckpointError, atomic_path
from fastonestep.networks.build import build_denoiser, build_ratio

UNET_KEYS = ("channels", "channel_mult", "num_blocks", "attn_resolutions", "dropout")
MLP_KEYS = ("hidden", "depth", "emb_dim")


EDM2_KEYS = ("size", "channels", "channel_mult", "num_blocks", "attn_resolutions", "dropout")


def network_spec(net_cfg) -> dict:
    """The architecture-defining subset of a NetworkConfig, as {"kind", "arch"}. For edm2, `size` is
    resolved into `channels` here, so the spec (and an exported file) states the width it was built with."""
    d = dataclasses.asdict(net_cfg) if dataclasses.is_dataclass(net_cfg) else dict(net_cfg)
    if d["kind"] == "edm2":
        from fastonestep.config import NetworkConfig
        from fastonestep.networks.edm2 import edm2_channels

        arch = {k: d[k] for k in EDM2_KEYS}
        arch["channels"] = edm2_channels(arch["size"], arch["channels"], default_channels=NetworkConfig().channels)
        return {"kind": "edm2", "arch": arch}
    keys = UNET_KEYS if d["kind"] == "unet" else MLP_KEYS
    return {"kind": d["kind"], "arch": {k: d[k] for k in keys}}


def export_model(path: str, net: torch.nn.Module, info: dict) -> None:
    """`info` holds at least: network (network_spec), data_shape, num_classes, sigma_data."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in net.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata={"fastonestep": json.dumps(info)})


def read_info(path: str) -> dict:
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
    except FileNotFoundError:
        raise CheckpointError(f"model file '{path}' does not exist") from None
    except Exception as e:
        raise CheckpointError(f"model file '{path}' cannot be read: {e}") from None
    if "fastonestep" not in meta:
        raise CheckpointError(f"model file '{path}' was not written by fastonestep (no 'fastonestep' metadata)")
    return json.loads(meta["fastonestep"])


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def model_path(path: str) -> str:
    """A model is named by its run directory (its model.safetensors) or by the file itself."""
    return os.path.join(path, "model.safetensors") if os.path.isdir(path) else path


def build_from_info(info: dict) -> torch.nn.Module:
    """The (untrained) network a model file's metadata describes, on the current default device."""
    spec = info["network"]
    build = build_ratio if info.get("role") == "ratio" else build_denoiser
    return build(spec["kind"], tuple(info["data_shape"]), info["num_classes"], info["sigma_data"], **spec["arch"])


def load_model(path: str, device="cpu"):
    """Returns (network in eval mode, info); `path` is a run directory or a model file. A denoiser/generator
    comes back as EDMPrecond; a file with role "ratio" (DiffRatio's ratio.safetensors) as RatioPrecond."""
    path = model_path(path)
    info = read_info(path)
    net = build_from_info(info)
    try:
        net.load_state_dict(load_file(path))
    except RuntimeError as e:
        raise CheckpointError(f"model file '{path}' does not match its own architecture: {e}") from None
    return net.to(device).eval(), info
