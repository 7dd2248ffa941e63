"""EDM/EDM2-style UNet: the raw network F(x_in, c_noise, labels) behind EDMPrecond for images.

The encoder half (noise/label embedding, down path, middle blocks) is a module of its own, `UNetEncoder`.
The UNet holds it as `self.encoder`, and the light density-ratio network (networks/ratio.py) holds an
identical one under the same name, so copying the denoiser's encoder into a ratio network is a plain
`load_state_dict` and the ratio network never builds a decoder.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from fastonestep.networks.checkpointing import CheckpointableBlock, run_block


def group_norm(channels: int, max_groups: int = 32, min_channels_per_group: int = 4) -> nn.GroupNorm:
    """GroupNorm with at most `max_groups` groups of at least `min_channels_per_group` channels each,
    using the largest such group count that divides `channels`."""
    groups = max(1, min(max_groups, channels // min_channels_per_group))
    while channels % groups:
        groups -= 1
    return nn.GroupNorm(groups, channels, eps=1e-6)


def zero_init(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def resample(x: torch.Tensor, mode: str) -> torch.Tensor:
    """2x box-filter downsampling or nearest-neighbour upsampling; both are parameter-free."""
    if mode == "down":
        return F.avg_pool2d(x, 2)
    if mode == "up":
        return F.interpolate(x, scale_factor=2.0, mode="nearest")
    return x


def check_unet_geometry(resolution: int, channel_mult, num_blocks: int, attn_resolutions, channels: int = 1):
    """Validates a UNet's level structure (UNet and EDM2 UNet); returns channel_mult, attn_resolutions as int tuples."""
    channel_mult, attn_resolutions = tuple(int(m) for m in channel_mult), tuple(int(r) for r in attn_resolutions)
    levels = len(channel_mult)
    if levels < 1 or num_blocks < 1 or channels < 1:
        raise ValueError("the UNet needs channels >= 1, at least one level and one block per level")
    if resolution % 2 ** (levels - 1):
        raise ValueError(f"resolution {resolution} is not divisible by 2**(levels-1) = {2 ** (levels - 1)}")
    return channel_mult, attn_resolutions


class NoiseEmbedding(nn.Module):
    """c_noise (B,) and optional class ids (B,) -> embedding (B, emb_channels), already through SiLU.

    c_noise = ln(sigma)/4 spans roughly [-1.6, 1.1] over sigma in [0.002, 80]. Its sinusoids use fixed
    log-spaced frequencies from `min_freq` to `max_freq` cycles per unit: the low ones carry the overall
    noise level, the high ones separate noise levels a few percent apart. They are recomputed in fp32 on
    every call (not stored as a buffer), so casting the model to bf16 never coarsens them.
    """

    def __init__(self, fourier_channels: int, emb_channels: int, num_classes: int = 0,
                 min_freq: float = 0.125, max_freq: float = 16.0):
        super().__init__()
        if fourier_channels % 2:
            raise ValueError(f"fourier_channels must be even, got {fourier_channels}")
        self.fourier_channels, self.min_freq, self.max_freq = fourier_channels, min_freq, max_freq
        self.map0 = nn.Linear(fourier_channels, emb_channels)
        self.map1 = nn.Linear(emb_channels, emb_channels)
        self.label_embed = nn.Embedding(num_classes, emb_channels) if num_classes > 0 else None

    def forward(self, c_noise: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        half = self.fourier_channels // 2
        log_freqs = torch.linspace(math.log(self.min_freq), math.log(self.max_freq), half,
                                   device=c_noise.device, dtype=torch.float32)
        arg = (2 * math.pi) * c_noise.float()[:, None] * log_freqs.exp()[None]
        feats = torch.cat([arg.cos(), arg.sin()], dim=1).to(self.map0.weight.dtype)
        emb = self.map1(F.silu(self.map0(feats)))
        # Without labels a conditional model sees a zero class embedding (unconditional use).
        if self.label_embed is not None and labels is not None:
            emb = emb + self.label_embed(labels).to(emb.dtype)
        return F.silu(emb)


class SelfAttention(nn.Module):
    """Multi-head self-attention over all pixels, as a residual; the output projection starts at zero."""

    def __init__(self, channels: int, channels_per_head: int = 64):
        super().__init__()
        heads = max(1, channels // channels_per_head)
        while channels % heads:
            heads -= 1
        self.num_heads = heads
        self.norm = group_norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = zero_init(nn.Conv2d(channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, height, width = x.shape
        qkv = self.qkv(self.norm(x)).reshape(b, 3, self.num_heads, c // self.num_heads, height * width)
        q, k, v = qkv.transpose(-1, -2).unbind(1)  # each (B, heads, pixels, channels per head)
        h = F.scaled_dot_product_attention(q, k, v)
        return x + self.proj(h.transpose(-1, -2).reshape(b, c, height, width))


class ResBlock(CheckpointableBlock):
    """GroupNorm-SiLU-conv twice, with the embedding applied as a per-channel scale and shift after the
    second norm (ADM/EDM). `resample` ("none", "down", "up") rescales both branches; the second conv
    starts at zero so every block starts as (a resampled, channel-projected) identity. Optional
    self-attention follows the residual sum."""

    def __init__(self, in_channels: int, out_channels: int, emb_channels: int, resample: str = "none",
                 attention: bool = False, dropout: float = 0.0):
        super().__init__()
        if resample not in ("none", "down", "up"):
            raise ValueError(f"resample must be 'none', 'down' or 'up', got {resample!r}")
        self.resample = resample
        self.norm0 = group_norm(in_channels)
        self.conv0 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.affine = nn.Linear(emb_channels, 2 * out_channels)
        self.norm1 = group_norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv1 = zero_init(nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None
        self.attn = SelfAttention(out_channels) if attention else None

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv0(resample(F.silu(self.norm0(x)), self.resample))
        x = resample(x, self.resample)
        scale, shift = self.affine(emb)[:, :, None, None].chunk(2, dim=1)
        h = F.silu(torch.addcmul(shift, self.norm1(h), scale + 1))
        h = self.conv1(self.dropout(h))
        x = h + (x if self.skip is None else self.skip(x))
        return x if self.attn is None else self.attn(x)


class UNetEncoder(nn.Module):
    """Embedding, input conv, down path and middle blocks of the UNet.

    Level l (resolution `resolution / 2**l`) has `channels * channel_mult[l]` channels: a downsampling
    block (levels > 0) followed by `num_blocks` blocks. Every activation of the down path, the input
    conv's first, is kept as a skip for the decoder. `config` holds the constructor arguments so a twin
    (e.g. the ratio network's encoder) can be built with exactly this architecture.
    """

    def __init__(self, img_channels: int = 1, resolution: int = 32, channels: int = 32,
                 channel_mult=(1, 2, 2), num_blocks: int = 1, attn_resolutions=(), num_classes: int = 0,
                 dropout: float = 0.0, emb_channels: int | None = None, mid_attention: bool = True):
        super().__init__()
        channel_mult, attn_resolutions = check_unet_geometry(resolution, channel_mult, num_blocks, attn_resolutions)
        levels = len(channel_mult)
        self.config = dict(img_channels=img_channels, resolution=resolution, channels=channels,
                           channel_mult=channel_mult, num_blocks=num_blocks, attn_resolutions=attn_resolutions,
                           num_classes=num_classes, dropout=dropout, emb_channels=emb_channels,
                           mid_attention=mid_attention)
        self.emb_channels = emb_channels or 4 * channels
        self.embed = NoiseEmbedding(channels, self.emb_channels, num_classes)
        self.conv_in = nn.Conv2d(img_channels, channels, 3, padding=1)

        self.down = nn.ModuleList()
        self.skip_channels = [channels]
        width = channels
        for level, mult in enumerate(channel_mult):
            res = resolution >> level
            if level > 0:
                self.down.append(ResBlock(width, width, self.emb_channels, resample="down", dropout=dropout))
                self.skip_channels.append(width)
            for _ in range(num_blocks):
                block = ResBlock(width, channels * mult, self.emb_channels, attention=res in attn_resolutions,
                                 dropout=dropout)
                width = channels * mult
                self.down.append(block)
                self.skip_channels.append(width)

        self.mid = nn.ModuleList([
            ResBlock(width, width, self.emb_channels, attention=mid_attention, dropout=dropout),
            ResBlock(width, width, self.emb_channels, dropout=dropout),
        ])
        self.out_channels = width
        self.out_resolution = resolution >> (levels - 1)

    def forward(self, x_in: torch.Tensor, c_noise: torch.Tensor, labels: torch.Tensor | None = None):
        """Returns (bottleneck feature map, embedding, skips), skips ordered shallowest first."""
        emb = self.embed(c_noise, labels)
        h = self.conv_in(x_in)
        skips = [h]
        for block in self.down:
            h = run_block(block, h, emb)
            skips.append(h)
        for block in self.mid:
            h = run_block(block, h, emb)
        return h, emb, skips


class UNet(nn.Module):
    """Raw denoiser network F: forward(x_in, c_noise, labels=None) -> tensor shaped like x_in.

    Sizes follow EDM's ADM-style UNet scaled down for 28/32 px: e.g. channels=32, channel_mult=(1, 2, 2)
    gives 32 -> 16 -> 8 px with 32/64/64 channels. Works at any resolution divisible by
    2**(len(channel_mult) - 1). The output conv starts at zero, so an untrained F is 0 and
    EDMPrecond's D starts as c_skip * x.
    """

    def __init__(self, img_channels: int = 1, resolution: int = 32, channels: int = 32,
                 channel_mult=(1, 2, 2), num_blocks: int = 1, attn_resolutions=(), num_classes: int = 0,
                 dropout: float = 0.0, emb_channels: int | None = None, mid_attention: bool = True):
        super().__init__()
        self.encoder = UNetEncoder(img_channels, resolution, channels, channel_mult, num_blocks, attn_resolutions,
                                   num_classes, dropout, emb_channels, mid_attention)
        cfg, emb_ch = self.encoder.config, self.encoder.emb_channels
        skips = list(self.encoder.skip_channels)
        width = self.encoder.out_channels

        # Mirror of the down path: an upsampling block (all levels but the lowest), then num_blocks + 1
        # blocks that each take one skip, so every skip the encoder kept is used exactly once.
        self.up = nn.ModuleList()
        for level in reversed(range(len(cfg["channel_mult"]))):
            res = resolution >> level
            if level < len(cfg["channel_mult"]) - 1:
                self.up.append(ResBlock(width, width, emb_ch, resample="up", dropout=dropout))
            for _ in range(num_blocks + 1):
                out = channels * cfg["channel_mult"][level]
                self.up.append(ResBlock(width + skips.pop(), out, emb_ch,
                                        attention=res in cfg["attn_resolutions"], dropout=dropout))
                width = out
        assert not skips
        self.out_norm = group_norm(width)
        self.out_conv = zero_init(nn.Conv2d(width, img_channels, 3, padding=1))

    @property
    def config(self) -> dict:
        return dict(self.encoder.config)

    @property
    def bottleneck_channels(self) -> int:
        return self.encoder.out_channels

    @property
    def feature_dim(self) -> int:
        return self.encoder.out_channels

    def features(self, x_in: torch.Tensor, c_noise: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """The middle-block output, averaged over pixels: (B, bottleneck channels). Runs the encoder only;
        what a GAN head on this denoiser sees (DMD2)."""
        h, _, _ = self.encoder(x_in, c_noise, labels)
        return h.mean(dim=(2, 3))

    def encode(self, x_in: torch.Tensor, c_noise: torch.Tensor, labels: torch.Tensor | None = None):
        """Down path + middle: returns (bottleneck feature map, embedding) -- what the ratio network sees."""
        h, emb, _ = self.encoder(x_in, c_noise, labels)
        return h, emb

    def forward(self, x_in: torch.Tensor, c_noise: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        h, emb, skips = self.encoder(x_in, c_noise, labels)
        for block in self.up:
            if block.resample != "up":
                h = torch.cat([h, skips.pop()], dim=1)
            h = run_block(block, h, emb)
        return self.out_conv(F.silu(self.out_norm(h)))
