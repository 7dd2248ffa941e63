"""Evaluation of latent data (data.kind=latent): what generated latents are compared with, and how they
become images for image features.

- Reference points: the dataset's latents as training sees them, mean + std * z with z from a fixed seed, then
  data.latent_scale / data.latent_bias. The generator learns exactly that distribution (posterior noise
  included), so this is what its outputs are compared with; the stored moments [mean; std] are not samples.
- Image features (inception, mnist) with eval.vae: latents are decoded by the local diffusers AutoencoderKL
  (scale and bias undone, as `fastonestep sample --vae` does) one eval batch at a time, on the run's device,
  without gradients, and only the features are kept (50k decoded 512x512 images would need 150 GB).
  `raw` features stay the latents themselves. The FID of latents is always against eval.fid_ref (statistics
  of the real images): decoded training latents are VAE reconstructions, and an FID against them is not
  comparable with published ones (check_eval_settings refuses the FID without it). PRDC in Inception space
  uses decoded reference latents, as it needs points.
"""
from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass

import numpy as np
import torch

from ..data.errors import DataError

IMAGE_FEATURES = ("inception", "mnist")  # feature kinds computed on decoded images when eval.vae is set


@dataclass(frozen=True)
class LatentEval:
    """How latent samples are evaluated: their per-channel scale and bias (data.latent_scale/_bias) and the VAE
    that decodes them ("" = no decoding: only latent-space features)."""

    scale: tuple
    bias: tuple
    vae: str = ""
    batch_size: int = 250

    @classmethod
    def from_configs(cls, data_cfg, eval_cfg) -> "LatentEval":
        vae = getattr(eval_cfg, "vae", "")
        return cls(tuple(float(v) for v in data_cfg.latent_scale), tuple(float(v) for v in data_cfg.latent_bias),
                   os.path.abspath(vae) if vae else "", int(getattr(eval_cfg, "batch_size", 250)))

    def reference(self, moments: torch.Tensor, seed: int) -> torch.Tensor:
        """The latents of moments (N, 2C, H, W) as training draws them, with z from `seed` (CPU, eager: the
        same numbers on every machine)."""
        from ..data.latents import sample_latents, split_moments

        mean, _ = split_moments(moments)
        z = torch.randn(mean.shape, generator=torch.Generator().manual_seed(seed))
        return sample_latents(moments.float(), self.scale, self.bias, z=z, impl="torch")

    def decodes(self, kind: str) -> bool:
        return bool(self.vae) and kind in IMAGE_FEATURES

    def image_shape(self, latent_shape) -> tuple:
        """The shape of one decoded image, from the VAE's config.json (nothing loaded)."""
        return decoded_shape(self.vae, latent_shape)

    def decoding(self, extractor, device):
        """`extractor` (image features) applied to latents decoded batch by batch; only features are kept."""
        from .features import FeatureExtractor

        vae = _vae_model(self.vae, str(device))

        def features(latents: torch.Tensor) -> np.ndarray:
            from ..data.latents import decode_latents

            return np.concatenate([extractor(decode_latents(vae, chunk, self.scale, self.bias, len(chunk)))
                                   for chunk in latents.split(self.batch_size)])

        return FeatureExtractor(extractor.name, features, extractor.dim,
                                key=(extractor.key, "vae", self.vae, self.scale, self.bias))


@functools.lru_cache(maxsize=2)
def _vae_model(path: str, device: str):
    from ..data.latents import load_vae

    return load_vae(path, device)


def _vae_config(path: str) -> dict:
    file = os.path.join(path, "config.json")
    try:
        with open(file, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as err:
        raise DataError(f"config key 'eval.vae': {path!r} is not a diffusers AutoencoderKL folder "
                        f"(cannot read {file}: {err})") from err


def decoded_shape(vae_path: str, latent_shape) -> tuple:
    """(out_channels, H * f, W * f) for latents (C, H, W); f = 2 per downsampling block of the VAE."""
    cfg = _vae_config(vae_path)
    factor = 2 ** (len(cfg.get("block_out_channels", (0,))) - 1)
    _, h, w = latent_shape
    return (int(cfg.get("out_channels", 3)), h * factor, w * factor)


def check_vae(vae_path: str, latent_shape) -> None:
    """Raises now if eval.vae cannot decode these latents: not loadable, or another channel count."""
    shape = tuple(int(s) for s in latent_shape)
    channels = _vae_config(vae_path).get("latent_channels")
    if len(shape) != 3 or channels != shape[0]:
        raise DataError(f"config key 'eval.vae': the VAE {vae_path!r} decodes {channels}-channel latents, but the "
                        f"samples have shape {shape} (eval.vae is for data.kind=latent, the VAE the data were "
                        "encoded with)")
    from ..data.latents import load_vae

    load_vae(vae_path, "cpu")  # loaded once and dropped: a broken folder fails now, not after training
