"""The light density-ratio network of DiffRatio (design.md 4.1): c(x_t, sigma) -> one logit per sample.

At the classifier's optimum c = log q_t(x) - log p_t(x), so grad_x c is the score difference that
DMD/VSD get from a teacher and a fake score network. Here one small network replaces both: the
denoiser's encoder half (down path + middle) plus a pooled linear head.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fastonestep.diffusion.precond import _as_batch, _per_sample, edm_coefficients
from fastonestep.networks.unet import UNet, UNetEncoder, group_norm, zero_init


class EncoderRatioNet(nn.Module):
    """Raw ratio network: forward(x_in, c_noise, labels=None) -> (B,) logits.

    `encoder` is a `UNetEncoder` with the same constructor arguments (and so the same parameter names)
    as a `UNet`'s, which is what lets `from_unet` copy a pretrained denoiser's encoder. The head is
    GroupNorm, SiLU, a 1x1 conv to `head_channels` (default: the bottleneck width), a global average
    pool, plus a projection of the noise/label embedding (so the logit can shift with sigma directly),
    SiLU and a zero-initialised Linear to one logit: an untrained ratio network outputs 0 (r = 1).
    """

    def __init__(self, img_channels: int = 1, resolution: int = 32, channels: int = 32,
                 channel_mult=(1, 2, 2), num_blocks: int = 1, attn_resolutions=(), num_classes: int = 0,
                 dropout: float = 0.0, emb_channels: int | None = None, mid_attention: bool = True,
                 head_channels: int | None = None):
        super().__init__()
        self.encoder = UNetEncoder(img_channels, resolution, channels, channel_mult, num_blocks, attn_resolutions,
                                   num_classes, dropout, emb_channels, mid_attention)
        width = self.encoder.out_channels
        head_channels = head_channels or width
        self.head_norm = group_norm(width)
        self.head_conv = nn.Conv2d(width, head_channels, 1)
        self.head_emb = nn.Linear(self.encoder.emb_channels, head_channels)
        self.head_out = zero_init(nn.Linear(head_channels, 1))

    @classmethod
    def from_unet(cls, unet: UNet, init_weights: bool = True, head_channels: int | None = None) -> "EncoderRatioNet":
        """Same encoder architecture as `unet` (its decoder is not built); with `init_weights`, the
        encoder starts from `unet`'s weights. The head is always fresh. Placed on `unet`'s device."""
        net = cls(**unet.encoder.config, head_channels=head_channels)
        if init_weights:
            net.encoder.load_state_dict(unet.encoder.state_dict())
        return net.to(next(unet.parameters()).device)

    def forward(self, x_in: torch.Tensor, c_noise: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        h, emb, _ = self.encoder(x_in, c_noise, labels)
        h = self.head_conv(F.silu(self.head_norm(h)))
        features = h.mean(dim=(2, 3)) + self.head_emb(emb)
        return self.head_out(F.silu(features))[:, 0]


class RatioPrecond(nn.Module):
    """EDM input preconditioning for a raw ratio network (EncoderRatioNet, or MLP(out_dim=1) on 2-D toys).

    forward(x, sigma, labels=None) -> (B,) logits of net(c_in * x, ln(sigma) / 4, labels), in fp32 (fp64 for
    fp64 x), with c_in = 1 / sqrt(sigma^2 + sigma_data^2) computed in fp32. sigma is a float, a 0-d tensor or
    a (B,) tensor. Gradients flow to x: the generator is trained through grad_x of the logit.
    """

    def __init__(self, net: nn.Module, sigma_data: float = 0.5):
        super().__init__()
        self.net = net
        self.sigma_data = float(sigma_data)

    def forward(self, x: torch.Tensor, sigma, labels: torch.Tensor | None = None) -> torch.Tensor:
        sigma = _as_batch(sigma, x)
        _, _, c_in, c_noise = edm_coefficients(sigma, self.sigma_data)
        dtype = torch.promote_types(x.dtype, torch.float32)  # fp32, or fp64 for fp64 checks
        x_in = (_per_sample(c_in, x).to(dtype) * x.to(dtype)).to(x.dtype)
        return self.net(x_in, c_noise, labels).to(dtype).reshape(x.shape[0])
