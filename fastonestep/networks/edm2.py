"""EDM2-style magnitude-preserving UNet, written from the description in Karras et al. 2024, "Analyzing and
Improving the Training Dynamics of Diffusion Models" (config G): the raw network F(x_in, c_noise, labels)
behind EDMPrecond for latent (or pixel) images.

What makes it "magnitude preserving" (MP): every layer is built so that unit-variance inputs give
unit-variance outputs at initialisation and stay so during training.
- Convolutions and linear layers have no bias; their weight is normalised at every forward (each output
  row to unit norm, then scaled by 1/sqrt(fan_in) so a unit-variance input stays unit-variance), and in
  training the stored weight is also rescaled in place to norm sqrt(fan_in) ("forced weight
  normalisation"), which keeps the effective learning rate from drifting as the weights grow.
- mp_silu = silu / 0.596 (0.596 is the RMS of silu(x) for x ~ N(0, 1)); mp_sum / mp_cat blend two branches
  with a fixed balance and rescale so the result keeps unit magnitude; pixel norm instead of group norm.
- The only learned scales are scalar gains that start at 0: the embedding modulation of each block and
  the output layer, so the untrained network outputs exactly 0 (EDMPrecond then starts as c_skip * x).

Sizes (network.size): model channels 128 / 192 / 256 / 320 / 384 / 448 for xs / s / m / l / xl / xxl; with
channel_mult (1, 2, 3, 4), 3 blocks per level, attention at 16x16 and 8x8 on 64x64x4 latents and 1000
classes these have the parameter counts EDM2 publishes (125M / 280M / 498M / 777M / 1.1B / 1.5B;
tests/test_edm2.py checks xs/s/m within 5 %).

The encoder half (embedding + down path) is its own module, `EDM2Encoder`, held by the UNet as `encoder`;
the DiffRatio ratio network (`EDM2EncoderRatioNet`) holds an identical one, so initialising it from a
teacher is a plain `load_state_dict`.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from fastonestep.networks.checkpointing import CheckpointableBlock, run_block
from fastonestep.networks.unet import check_unet_geometry, resample

# network.size -> model channels (EDM2's presets), and the parameter counts EDM2 publishes for them on
# class-conditional ImageNet-512 latents (64x64x4, 1000 classes).
EDM2_SIZES = {"xs": 128, "s": 192, "m": 256, "l": 320, "xl": 384, "xxl": 448}
EDM2_PUBLISHED_PARAMS = {"xs": 125e6, "s": 280e6, "m": 498e6, "l": 777e6, "xl": 1119e6, "xxl": 1523e6}

SILU_RMS = 0.596  # sqrt(E[silu(x)^2]) for x ~ N(0, 1)


# ---------------------------------------------------------------------------------------------------------
# magnitude-preserving primitives


def rms(x: torch.Tensor, dim=None) -> torch.Tensor:
    """Root-mean-square over `dim` (default: every dim but the first, i.e. per output row of a weight), fp32,
    keeping the reduced dims."""
    dims = tuple(range(1, x.ndim)) if dim is None else dim
    n = x[0].numel() if dim is None else math.prod(x.shape[d] for d in ([dim] if isinstance(dim, int) else dim))
    return torch.linalg.vector_norm(x, dim=dims, keepdim=True, dtype=torch.float32) / math.sqrt(n)


def normalize(x: torch.Tensor, dim=None, eps: float = 1e-4) -> torch.Tensor:
    """Scales x to unit root-mean-square over `dim` (default: every dim but the first, i.e. per output row
    of a weight), so each normalised slice of n elements has norm sqrt(n)."""
    return x / (rms(x, dim) + eps).to(x.dtype)


def mp_silu(x: torch.Tensor) -> torch.Tensor:
    return F.silu(x) / SILU_RMS


def mp_sum(a: torch.Tensor, b: torch.Tensor, t: float = 0.5) -> torch.Tensor:
    """(1 - t) a + t b, rescaled so two independent unit-variance inputs give a unit-variance output."""
    return a.lerp(b, t) / math.sqrt((1 - t) ** 2 + t**2)


def mp_cat(a: torch.Tensor, b: torch.Tensor, t: float = 0.5, dim: int = 1) -> torch.Tensor:
    """Concatenation where a's channels carry weight (1 - t) and b's weight t of the total magnitude,
    independently of how many channels each has; unit-variance inputs give a unit-variance result."""
    na, nb = a.shape[dim], b.shape[dim]
    scale = math.sqrt((na + nb) / ((1 - t) ** 2 + t**2))
    return torch.cat([a * (scale * (1 - t) / math.sqrt(na)), b * (scale * t / math.sqrt(nb))], dim=dim)


class MPConv(nn.Module):
    """Magnitude-preserving convolution (kernel (k, k)) or linear layer (kernel ()), without bias.

    forward(x, gain=1): the weight used is normalise(weight) * gain / sqrt(fan_in). In training mode the
    stored weight is first rescaled in place to unit RMS (forced weight normalisation). That rescale is
    skipped while the parameter's version counter shows it untouched since the last one, so a network
    can be run several times before one backward (an in-place change would invalidate the saved graph).

    An owner that updates the weight without the version counter seeing it, or that keeps other copies of
    it (DeepSpeed: engine/zero_weight_norm.py), sets `stale` after each update and `on_normalize`, which gets
    each rescale's row divisors (rms + eps, one per output row) to apply to its copies.

    Whether the stored weight is already rescaled (`normalized`) is part of the training state: the rescale
    is not idempotent bit for bit (normalize(normalize(w)) != normalize(w) in its last bits), so a layer
    whose rescaled weight was checkpointed (one run again after its update, e.g. a ratio network or a fake
    score used frozen in the generator step) must not rescale it again after the resume. Loading a state
    dict moves the version counter, so the owner records `normalized_layers` with the weights and calls
    `restore_normalized_layers` after loading them (methods/base.py).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel=()):
        super().__init__()
        self.in_channels, self.out_channels, self.kernel = in_channels, out_channels, tuple(kernel)
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, *self.kernel))
        self._normalized_at_version = -1
        self.stale = False  # set by an owner whose weight updates the version counter does not see
        self.on_normalize = None  # fn(row divisors): an owner's rescale of its other copies of the weight

    @property
    def fan_in(self) -> int:
        return self.weight[0].numel()

    @property
    def normalized(self) -> bool:
        """True while the stored weight is this layer's last rescale, untouched since: the next training
        forward will not rescale it."""
        return not self.stale and self.weight._version == self._normalized_at_version

    def mark_normalized(self) -> None:
        """Declares the stored weight rescaled as it is (restored from a checkpoint that held it so)."""
        self._normalized_at_version = self.weight._version
        self.stale = False

    def force_normalize_(self) -> None:
        if self.weight._version == self._normalized_at_version and not self.stale:
            return
        with torch.no_grad():
            w = self.weight.float()
            divisors = rms(w) + 1e-4  # w / divisors is normalize(w), bit for bit
            self.weight.copy_(w / divisors)
            if self.on_normalize is not None:
                self.on_normalize(divisors.reshape(-1))
        self._normalized_at_version = self.weight._version
        self.stale = False

    def forward(self, x: torch.Tensor, gain=1.0) -> torch.Tensor:
        if self.training:
            self.force_normalize_()
        w = normalize(self.weight.float()) * (gain / math.sqrt(self.fan_in))
        w = w.to(x.dtype)
        if w.ndim == 2:
            return F.linear(x, w)
        return F.conv2d(x, w, padding=w.shape[-1] // 2)


def normalized_layers(network: nn.Module) -> list[str]:
    """Names (in `network.named_modules()`) of the MP layers whose stored weight is already rescaled, which
    their next training forward leaves as it is; saved with the weights (see MPConv)."""
    return [name for name, m in network.named_modules() if isinstance(m, MPConv) and m.normalized]


def restore_normalized_layers(network: nn.Module, names) -> None:
    """After the weights of `network` were loaded from a checkpoint: the layers `normalized_layers` listed at
    save time are marked rescaled again (the load moved their version counters), so their next training forward
    does what it would have done in the uninterrupted run: nothing. The other MP layers rescale at their next
    training forward, as after any update."""
    layers = {name: m for name, m in network.named_modules() if isinstance(m, MPConv)}
    unknown = [n for n in names if n not in layers]
    if unknown:
        raise ValueError(f"the checkpoint lists normalised weights of layers this network does not have as MP "
                         f"layers ({', '.join(unknown[:3])})")
    for name in names:
        layers[name].mark_normalized()


class MPFourier(nn.Module):
    """Fourier features of the scalar c_noise: sqrt(2) cos(2 pi (f c + phi)) with fixed random f ~ N(0, 1)
    and phi ~ U(0, 1); unit RMS for any c. Kept as fp32 buffers and evaluated in fp32."""

    def __init__(self, num_channels: int):
        super().__init__()
        self.register_buffer("freqs", 2 * math.pi * torch.randn(num_channels))
        self.register_buffer("phases", 2 * math.pi * torch.rand(num_channels))

    def forward(self, c: torch.Tensor) -> torch.Tensor:
        y = c.float()[:, None] * self.freqs.float()[None] + self.phases.float()[None]
        return y.cos() * math.sqrt(2)


# ---------------------------------------------------------------------------------------------------------
# blocks


class EDM2Block(CheckpointableBlock):
    """One residual block of either flavour.

    Encoder ("enc"): resample, 1x1 channel projection if the width changes, pixel norm; the residual branch
    (mp_silu, 3x3 conv, modulation by 1 + gain * linear(emb), mp_silu, dropout, 3x3 conv) is blended back
    with mp_sum(t=res_balance). Decoder ("dec"): the input (main path concatenated with a skip) feeds the
    residual branch directly and the projection is applied to the main path only afterwards; no pixel norm.
    Optional cosine self-attention (q, k, v pixel-normalised per head) follows, blended with
    mp_sum(t=attn_balance); activations are clipped to +-clip_act (a guard against rare outliers).
    """

    def __init__(self, in_channels: int, out_channels: int, emb_channels: int, flavor: str = "enc",
                 resample: str = "keep", attention: bool = False, channels_per_head: int = 64,
                 dropout: float = 0.0, res_balance: float = 0.3, attn_balance: float = 0.3,
                 clip_act: float | None = 256.0):
        super().__init__()
        if flavor not in ("enc", "dec"):
            raise ValueError(f"flavor must be 'enc' or 'dec', got {flavor!r}")
        if resample not in ("keep", "down", "up"):
            raise ValueError(f"resample must be 'keep', 'down' or 'up', got {resample!r}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.flavor, self.resample = flavor, resample
        self.dropout, self.res_balance, self.attn_balance, self.clip_act = dropout, res_balance, attn_balance, clip_act
        self.takes_skip = False  # set by the decoder for blocks that consume an encoder skip
        self.emb_gain = nn.Parameter(torch.zeros([1]))  # shape [1], not 0-d: DeepSpeed cannot broadcast 0-d parameters
        self.conv_res0 = MPConv(out_channels if flavor == "enc" else in_channels, out_channels, (3, 3))
        self.emb_linear = MPConv(emb_channels, out_channels)
        self.conv_res1 = MPConv(out_channels, out_channels, (3, 3))
        self.conv_skip = MPConv(in_channels, out_channels, (1, 1)) if in_channels != out_channels else None
        self.num_heads = 0
        if attention:
            self.num_heads = max(1, out_channels // channels_per_head)
            if out_channels % self.num_heads:
                raise ValueError(f"{out_channels} channels do not split into {self.num_heads} attention heads")
            self.attn_qkv = MPConv(out_channels, 3 * out_channels, (1, 1))
            self.attn_proj = MPConv(out_channels, out_channels, (1, 1))

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        x = resample(x, self.resample)  # EDM2's [1, 1] filter: 2x2 box down, nearest up
        if self.flavor == "enc":
            if self.conv_skip is not None:
                x = self.conv_skip(x)
            x = normalize(x, dim=1)  # pixel norm

        y = self.conv_res0(mp_silu(x))
        scale = self.emb_linear(emb, gain=self.emb_gain) + 1  # starts at exactly 1 (gain 0)
        y = mp_silu(y * scale[:, :, None, None].to(y.dtype))
        if self.training and self.dropout:
            y = F.dropout(y, p=self.dropout)
        y = self.conv_res1(y)

        if self.flavor == "dec" and self.conv_skip is not None:
            x = self.conv_skip(x)
        x = mp_sum(x, y, t=self.res_balance)

        if self.num_heads:
            b, c, height, width = x.shape
            qkv = self.attn_qkv(x).reshape(b, 3, self.num_heads, c // self.num_heads, height * width)
            qkv = normalize(qkv, dim=3)  # cosine attention: unit-RMS q, k, v per head and pixel
            q, k, v = qkv.transpose(-1, -2).unbind(1)  # (B, heads, pixels, channels per head)
            y = F.scaled_dot_product_attention(q, k, v)  # logits q.k / sqrt(d), bounded by sqrt(d)
            y = self.attn_proj(y.transpose(-1, -2).reshape(b, c, height, width))
            x = mp_sum(x, y, t=self.attn_balance)

        if self.clip_act is not None:
            x = x.clamp(-self.clip_act, self.clip_act)
        return x


class EDM2Encoder(nn.Module):
    """Noise/label embedding and the down path of the EDM2 UNet.

    Level l (resolution `resolution / 2**l`) has `channels * channel_mult[l]` channels: the input conv
    (level 0, on the image plus a constant-ones channel, EDM2's substitute for biases) or a downsampling
    block, followed by `num_blocks` blocks. Every output is kept as a skip for the decoder. The embedding:
    MP Fourier features of c_noise (channels * channel_mult[0] of them) -> MP linear to the embedding width
    (channels * max(channel_mult)); with classes, mp_sum(t=label_balance) with an MP linear of the scaled
    one-hot label; then mp_silu. `config` holds the constructor arguments so a twin can be built.
    """

    def __init__(self, img_channels: int = 4, resolution: int = 64, channels: int = 192,
                 channel_mult=(1, 2, 3, 4), num_blocks: int = 3, attn_resolutions=(16, 8), num_classes: int = 0,
                 dropout: float = 0.0, label_balance: float = 0.5, channels_per_head: int = 64):
        super().__init__()
        channel_mult, attn_resolutions = check_unet_geometry(resolution, channel_mult, num_blocks, attn_resolutions,
                                                             channels)
        levels = len(channel_mult)
        self.config = dict(img_channels=img_channels, resolution=resolution, channels=channels,
                           channel_mult=channel_mult, num_blocks=num_blocks, attn_resolutions=attn_resolutions,
                           num_classes=num_classes, dropout=dropout, label_balance=label_balance,
                           channels_per_head=channels_per_head)
        widths = [channels * m for m in channel_mult]
        self.num_classes, self.label_balance = num_classes, label_balance
        self.emb_channels = max(widths)
        self.emb_fourier = MPFourier(widths[0])
        self.emb_noise = MPConv(widths[0], self.emb_channels)
        self.emb_label = MPConv(num_classes, self.emb_channels) if num_classes else None

        block = dict(emb_channels=self.emb_channels, flavor="enc", dropout=dropout,
                     channels_per_head=channels_per_head)
        self.conv_in = MPConv(img_channels + 1, widths[0], (3, 3))
        self.enc = nn.ModuleList()
        self.skip_channels = [widths[0]]
        width = widths[0]
        for level, out in enumerate(widths):
            res = resolution >> level
            if level > 0:
                self.enc.append(EDM2Block(width, width, resample="down", **block))
                self.skip_channels.append(width)
            for _ in range(num_blocks):
                self.enc.append(EDM2Block(width, out, attention=res in attn_resolutions, **block))
                width = out
                self.skip_channels.append(width)
        self.out_channels = width
        self.out_resolution = resolution >> (levels - 1)

    def embed(self, c_noise: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        emb = self.emb_noise(self.emb_fourier(c_noise))
        if self.emb_label is not None:
            if labels is None:  # unconditional use: a zero label vector, whose MP linear output is 0
                emb = emb * ((1 - self.label_balance) / math.sqrt((1 - self.label_balance) ** 2 + self.label_balance**2))
            else:
                emb = mp_sum(emb, self.emb_label(self._label_vector(labels, emb.dtype)), t=self.label_balance)
        return mp_silu(emb)

    def _label_vector(self, labels: torch.Tensor, dtype) -> torch.Tensor:
        """Class ids (B,) or class vectors (B, num_classes) -> vectors scaled by sqrt(num_classes), so a
        one-hot label has unit RMS like every other MP input."""
        if labels.ndim == 1:
            if labels.dtype.is_floating_point:
                raise ValueError(f"class labels must be integer ids (B,) or vectors (B, {self.num_classes}); "
                                 f"got a float tensor of shape {tuple(labels.shape)}")
            labels = F.one_hot(labels.long(), self.num_classes)
        elif labels.ndim != 2 or labels.shape[1] != self.num_classes:
            raise ValueError(f"class labels must be ids (B,) or vectors (B, {self.num_classes}); "
                             f"got shape {tuple(labels.shape)}")
        return labels.to(dtype) * math.sqrt(self.num_classes)

    def forward(self, x_in: torch.Tensor, c_noise: torch.Tensor, labels: torch.Tensor | None = None):
        """Returns (bottleneck feature map, embedding, skips), skips ordered shallowest first."""
        emb = self.embed(c_noise, labels)
        h = self.conv_in(torch.cat([x_in, torch.ones_like(x_in[:, :1])], dim=1))
        skips = [h]
        for block in self.enc:
            h = run_block(block, h, emb)
            skips.append(h)
        return h, emb, skips


class EDM2UNet(nn.Module):
    """Raw denoiser F: forward(x_in, c_noise, labels=None) -> tensor shaped like x_in (MP, EDM2 config G).

    Decoder: at the lowest resolution two blocks (the first with attention) before the up path; each level
    then has an upsampling block (all but the lowest) and num_blocks + 1 blocks that each take one encoder
    skip through mp_cat(t=concat_balance). The output conv's gain starts at 0, so an untrained F is 0.
    """

    def __init__(self, img_channels: int = 4, resolution: int = 64, channels: int = 192,
                 channel_mult=(1, 2, 3, 4), num_blocks: int = 3, attn_resolutions=(16, 8), num_classes: int = 0,
                 dropout: float = 0.0, label_balance: float = 0.5, concat_balance: float = 0.5,
                 channels_per_head: int = 64):
        super().__init__()
        self.encoder = EDM2Encoder(img_channels, resolution, channels, channel_mult, num_blocks, attn_resolutions,
                                   num_classes, dropout, label_balance, channels_per_head)
        cfg = self.encoder.config
        self.concat_balance = concat_balance
        block = dict(emb_channels=self.encoder.emb_channels, flavor="dec", dropout=dropout,
                     channels_per_head=channels_per_head)
        skips = list(self.encoder.skip_channels)
        width = self.encoder.out_channels
        levels = len(cfg["channel_mult"])
        self.dec = nn.ModuleList()
        for level in reversed(range(levels)):
            res = resolution >> level
            if level == levels - 1:
                self.dec.append(EDM2Block(width, width, attention=True, **block))
                self.dec.append(EDM2Block(width, width, **block))
            else:
                self.dec.append(EDM2Block(width, width, resample="up", **block))
            for _ in range(num_blocks + 1):
                out = channels * cfg["channel_mult"][level]
                blk = EDM2Block(width + skips.pop(), out, attention=res in cfg["attn_resolutions"], **block)
                blk.takes_skip = True
                self.dec.append(blk)
                width = out
        assert not skips
        self.out_conv = MPConv(width, img_channels, (3, 3))
        self.out_gain = nn.Parameter(torch.zeros([1]))  # shape [1], not 0-d: DeepSpeed cannot broadcast 0-d parameters

    @property
    def config(self) -> dict:
        return dict(self.encoder.config)

    @property
    def feature_dim(self) -> int:
        return self.encoder.out_channels

    def features(self, x_in: torch.Tensor, c_noise: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """The encoder output averaged over pixels, (B, feature_dim): what a GAN head on this denoiser sees."""
        h, _, _ = self.encoder(x_in, c_noise, labels)
        return h.mean(dim=(2, 3))

    def forward(self, x_in: torch.Tensor, c_noise: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        h, emb, skips = self.encoder(x_in, c_noise, labels)
        for block in self.dec:
            if block.takes_skip:
                h = mp_cat(h, skips.pop(), t=self.concat_balance)
            h = run_block(block, h, emb)
        return self.out_conv(h, gain=self.out_gain)


class EDM2EncoderRatioNet(nn.Module):
    """DiffRatio's ratio network on an EDM2 teacher: forward(x_in, c_noise, labels=None) -> (B,) logits.

    `encoder` is an `EDM2Encoder` (same parameter names as the UNet's, so build_ratio copies a teacher's);
    the head stays magnitude preserving: mp_silu, 1x1 MP conv to `head_channels` (default: the bottleneck
    width), global average pool, pixel norm, mp_sum with an MP projection of the embedding (so the logit
    can move with sigma and the class directly), mp_silu, and an MP linear to one logit whose gain starts at
    0: an untrained ratio network outputs 0 (r = 1).
    """

    def __init__(self, img_channels: int = 4, resolution: int = 64, channels: int = 192,
                 channel_mult=(1, 2, 3, 4), num_blocks: int = 3, attn_resolutions=(16, 8), num_classes: int = 0,
                 dropout: float = 0.0, label_balance: float = 0.5, channels_per_head: int = 64,
                 head_channels: int | None = None):
        super().__init__()
        self.encoder = EDM2Encoder(img_channels, resolution, channels, channel_mult, num_blocks, attn_resolutions,
                                   num_classes, dropout, label_balance, channels_per_head)
        width = self.encoder.out_channels
        head_channels = head_channels or width
        self.head_conv = MPConv(width, head_channels, (1, 1))
        self.head_emb = MPConv(self.encoder.emb_channels, head_channels)
        self.head_out = MPConv(head_channels, 1)
        self.out_gain = nn.Parameter(torch.zeros([1]))  # shape [1], not 0-d: DeepSpeed cannot broadcast 0-d parameters

    def forward(self, x_in: torch.Tensor, c_noise: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        h, emb, _ = self.encoder(x_in, c_noise, labels)
        pooled = normalize(self.head_conv(mp_silu(h)).mean(dim=(2, 3)), dim=1)
        features = mp_sum(pooled, self.head_emb(emb), t=0.5)
        return self.head_out(mp_silu(features), gain=self.out_gain)[:, 0]


# ---------------------------------------------------------------------------------------------------------
# config -> architecture


def edm2_channels(size: str, channels: int | None, default_channels: int | None = None) -> int:
    """The model width of an EDM2 net from `size` and/or `channels`. `size` wins over a `channels` equal to
    `default_channels` (the config's untouched default); any other disagreement is an error."""
    if not size:
        if not channels:
            raise ValueError("an edm2 network needs 'size' (xs, s, m, l, xl, xxl) or 'channels'")
        return int(channels)
    if size not in EDM2_SIZES:
        raise ValueError(f"unknown edm2 size {size!r}; expected one of {', '.join(EDM2_SIZES)}")
    width = EDM2_SIZES[size]
    if channels and channels != width and channels != default_channels:
        raise ValueError(f"edm2 size {size!r} means channels={width}, but channels={channels} was given "
                         "(config keys 'network.size' and 'network.channels'): set one of them")
    return width
