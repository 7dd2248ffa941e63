"""Standard FID: the InceptionV3 network of TF-FID, in pure torch, run from a LOCAL weights file.

The network is the one the common PyTorch FID port uses with the "pt_inception-2015-12-05" weights (the
2015-12-05 TF-FID graph converted to a torchvision-style `Inception3` module tree). Parameter and buffer names
follow torchvision's `Inception3` without `AuxLogits` (Conv2d_1a_3x3 ... Mixed_7c, each BasicConv2d as `conv` +
`bn`, plus `fc`: Linear 2048 -> 1008), so that state dict loads with strict key matching. No weights ship
with fastonestep and none are downloaded: pass the path of a file you already have to `load_inception`.

Differences from torchvision's ImageNet Inception3 (they are what make the features match TF-FID):
  * the pool branch of InceptionA / InceptionC / the first InceptionE (Mixed_7b) averages with
    `count_include_pad=False` (TF's "SAME" average pooling ignores the padding);
  * the pool branch of the last block, Mixed_7c, uses 3x3 MAX pooling (stride 1, padding 1), not average;
  * no `transform_input` and no auxiliary classifier; `fc` has 1008 outputs (unused for FID).

Exact preprocessing in `inception_features` (for images (N, C, H, W), C in {1, 3}):
  1. float images are taken to be in [-1, 1] (fastonestep's range) and clamped to it; uint8 images are
     taken to be in [0, 255];
  2. with `quantize=True` (default) float images are rounded to the 256 levels of an 8-bit image,
     round((x + 1) * 127.5) / 255, as if the samples had been saved as PNG files (FID reference statistics
     are computed from 8-bit images); then every image is in [0, 1];
  3. one channel is repeated to three (grayscale -> RGB);
  4. resize to 299x299 with `F.interpolate(mode="bilinear", align_corners=False)`, no antialiasing (an
     identity at 299x299);
  5. normalise [0, 1] -> [-1, 1] with x * 2 - 1;
  6. the network up to Mixed_7c, then a global average pool: the 2048-d "pool3" features, as float64.
Steps 4-6 are those of the PyTorch FID port. Scores are therefore comparable with that port and with
reference statistics (.npz with 'mu' and 'sigma') made by it; they differ slightly from the original
TensorFlow FID, whose resize is not the same, and a lot from FIDs computed with torchvision's ImageNet weights.
"""
from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..data.errors import DataError
from .frechet import feature_stats, frechet_distance, load_stats

FEATURE_DIM = 2048
NUM_CLASSES = 1008  # the TF-FID graph's logits: 1000 ImageNet classes + 8 unused
INPUT_SIZE = 299


class BasicConv2d(nn.Module):
    """Conv (no bias) -> BatchNorm (eps 0.001) -> ReLU."""

    def __init__(self, in_channels: int, out_channels: int, **conv_kwargs):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, bias=False, **conv_kwargs)
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _avg_pool_no_pad(x: torch.Tensor) -> torch.Tensor:
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    """Mixed_5b/5c/5d: 1x1 | 1x1 -> 5x5 | 1x1 -> 3x3 -> 3x3 | avgpool (no pad count) -> 1x1."""

    def __init__(self, in_channels: int, pool_features: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(in_channels, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(in_channels, pool_features, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b1 = self.branch1x1(x)
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = self.branch_pool(_avg_pool_no_pad(x))
        return torch.cat([b1, b5, b3, bp], 1)


class InceptionB(nn.Module):
    """Mixed_6a (grid reduction 35 -> 17): 3x3/2 | 1x1 -> 3x3 -> 3x3/2 | maxpool/2."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.branch3x3 = BasicConv2d(in_channels, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3(x)
        bd = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([b3, bd, bp], 1)


class InceptionC(nn.Module):
    """Mixed_6b..6e: 1x1 | factorised 7x7 | double factorised 7x7 | avgpool (no pad count) -> 1x1."""

    def __init__(self, in_channels: int, channels_7x7: int):
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b1 = self.branch1x1(x)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = x
        for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                      self.branch7x7dbl_5):
            bd = layer(bd)
        bp = self.branch_pool(_avg_pool_no_pad(x))
        return torch.cat([b1, b7, bd, bp], 1)


class InceptionD(nn.Module):
    """Mixed_7a (grid reduction 17 -> 8): 1x1 -> 3x3/2 | 1x1 -> 1x7 -> 7x1 -> 3x3/2 | maxpool/2."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        bp = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([b3, b7, bp], 1)


class InceptionE(nn.Module):
    """Mixed_7b / Mixed_7c: 1x1 | 1x1 -> (1x3, 3x1) | 1x1 -> 3x3 -> (1x3, 3x1) | pool -> 1x1.

    `pool` is "avg" (average, count_include_pad=False; Mixed_7b) or "max" (Mixed_7c in the FID network)."""

    def __init__(self, in_channels: int, pool: str = "avg"):
        super().__init__()
        if pool not in ("avg", "max"):
            raise ValueError(f"pool must be 'avg' or 'max', got {pool!r}")
        self.pool = pool
        self.branch1x1 = BasicConv2d(in_channels, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(in_channels, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

    def extra_repr(self) -> str:
        return f"pool={self.pool!r}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b1 = self.branch1x1(x)
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)
        if self.pool == "max":
            pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        else:
            pooled = _avg_pool_no_pad(x)
        bp = self.branch_pool(pooled)
        return torch.cat([b1, b3, bd, bp], 1)


class FIDInceptionV3(nn.Module):
    """The TF-FID InceptionV3 with torchvision `Inception3` names (no AuxLogits). `forward` takes images
    already preprocessed to (N, 3, 299, 299) in [-1, 1] (see the module docstring; `inception_features` does
    it) and returns the 2048-d pool3 features; `logits` gives the 1008-way classifier output."""

    def __init__(self, num_classes: int = NUM_CLASSES):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.maxpool1 = nn.MaxPool2d(kernel_size=3, stride=2)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.maxpool2 = nn.MaxPool2d(kernel_size=3, stride=2)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, channels_7x7=128)
        self.Mixed_6c = InceptionC(768, channels_7x7=160)
        self.Mixed_6d = InceptionC(768, channels_7x7=160)
        self.Mixed_6e = InceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, pool="avg")
        self.Mixed_7c = InceptionE(2048, pool="max")
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(FEATURE_DIM, num_classes)
        self.fc_loaded = False  # set by load_inception: whether the weights file carried fc.*

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for name in ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "maxpool1", "Conv2d_3b_1x1",
                     "Conv2d_4a_3x3", "maxpool2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b",
                     "Mixed_6c", "Mixed_6d", "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c"):
            x = getattr(self, name)(x)
        return torch.flatten(self.avgpool(x), 1)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.forward(x))


# --- loading -------------------------------------------------------------------------------------------

# The PyTorch FID port's wrapper module (`blocks.<i>.<j>.*`) holds the same layers in four Sequentials.
_WRAPPER_BLOCKS = (
    ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3"),
    ("Conv2d_3b_1x1", "Conv2d_4a_3x3"),
    ("Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e"),
    ("Mixed_7a", "Mixed_7b", "Mixed_7c"),
)


def _read_state_dict(path: str) -> dict:
    is_safetensors = path.lower().endswith(".safetensors")
    try:
        if is_safetensors:
            from safetensors.torch import load_file

            return load_file(path, device="cpu")
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any reader failure is "this file is not usable weights"
        kind = "a safetensors file" if is_safetensors else "a PyTorch state dict (torch.load, weights_only)"
        raise DataError(f"cannot read Inception weights {path!r} as {kind}: {type(err).__name__}: {err}") from err


def _normalise_keys(state: dict, path: str) -> dict:
    """Unwrap {'state_dict': ...} / {'model': ...}, strip a DataParallel 'module.' prefix and map the FID
    port's wrapper names ('blocks.i.j.*') to Inception3 names."""
    for wrapper in ("state_dict", "model"):
        if set(state) == {wrapper} and isinstance(state[wrapper], dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not state:
        raise DataError(f"Inception weights {path!r} hold no state dict (got {type(state).__name__})")
    bad = [k for k, v in state.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise DataError(f"Inception weights {path!r} are not a state dict of tensors (e.g. entry {bad[0]!r})")
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    if all(k.startswith("blocks.") for k in state):
        renamed = {}
        for key, value in state.items():
            _, i, j, rest = key.split(".", 3)
            try:
                renamed[f"{_WRAPPER_BLOCKS[int(i)][int(j)]}.{rest}"] = value
            except (ValueError, IndexError):
                renamed[key] = value  # reported as unexpected below
        state = renamed
    return state


def _preview(keys) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:5]) + (f", ... ({len(keys)} in all)" if len(keys) > 5 else "")


def load_inception(weights_path: str | os.PathLike, device: str | torch.device = "cpu") -> FIDInceptionV3:
    """The FID InceptionV3 (eval mode, no gradients) with weights from a local .pth/.pt state dict or a
    .safetensors file, e.g. "pt_inception-2015-12-05-6726825d.pth". Every backbone key must be present and
    no foreign key may be; `fc.*` may be absent (pool3 features do not use it) and BatchNorm
    `num_batches_tracked` counters are optional. Raises FileNotFoundError for a missing file and DataError
    (a ValueError) naming the file for an unreadable one or mismatched keys or shapes."""
    path = os.fspath(weights_path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Inception weights file {path!r} does not exist (FID needs a local copy of "
                                f"the pt_inception-2015-12-05 weights; nothing is downloaded)")
    state = _normalise_keys(_read_state_dict(path), path)
    model = FIDInceptionV3()
    expected = model.state_dict()
    optional = {k for k in expected if k.startswith("fc.") or k.endswith(".num_batches_tracked")}
    missing = set(expected) - set(state) - optional
    unexpected = set(state) - set(expected)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys: {_preview(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_preview(unexpected)}")
        raise DataError(f"Inception weights {path!r} do not match the FID InceptionV3 "
                        f"(torchvision Inception3 names, no AuxLogits): {'; '.join(parts)}")
    wrong_shape = [f"{k} {tuple(v.shape)} (expected {tuple(expected[k].shape)})"
                   for k, v in state.items() if v.shape != expected[k].shape]
    if wrong_shape:
        raise DataError(f"Inception weights {path!r} have tensors of the wrong shape: "
                        f"{', '.join(wrong_shape[:5])}" + (f", ... ({len(wrong_shape)} in all)"
                                                          if len(wrong_shape) > 5 else ""))
    model.load_state_dict(state, strict=False)  # keys checked above; fc.* may legitimately be absent
    model.fc_loaded = "fc.weight" in state and "fc.bias" in state
    return model.to(device).eval().requires_grad_(False)


# --- features and FID ----------------------------------------------------------------------------------

def _check_images(images) -> torch.Tensor:
    images = torch.as_tensor(images)
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must be (N, C, H, W) with C in {{1, 3}}, got shape {tuple(images.shape)}")
    if images.shape[0] == 0:
        raise ValueError("images must not be empty")
    return images


def preprocess(images: torch.Tensor, quantize: bool = True) -> torch.Tensor:
    """(B, C, H, W) in [-1, 1] (float) or [0, 255] (uint8), C in {1, 3} -> (B, 3, 299, 299) float32 in
    [-1, 1], exactly as in the module docstring."""
    if images.dtype == torch.uint8:
        x = images.float() / 255.0
    else:
        x = images.float().clamp(-1.0, 1.0)
        x = torch.round((x + 1.0) * 127.5) / 255.0 if quantize else (x + 1.0) / 2.0
    if x.shape[1] == 1:
        x = x.repeat(1, 3, 1, 1)
    if tuple(x.shape[2:]) != (INPUT_SIZE, INPUT_SIZE):
        x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)
    return x * 2.0 - 1.0


@torch.no_grad()
def inception_features(model: nn.Module, images, batch_size: int = 100, quantize: bool = True) -> np.ndarray:
    """Pool3 features (N, 2048) as float64 numpy for images (N, C, H, W), C in {1, 3}, in [-1, 1] (or uint8
    in [0, 255]); batches go to the model's device."""
    images = _check_images(images)
    model.eval()
    device = next(model.parameters()).device
    chunks = [model(preprocess(chunk.to(device), quantize)).double().cpu() for chunk in images.split(batch_size)]
    return torch.cat(chunks).numpy()


def inception_stats(model: nn.Module, images, batch_size: int = 100,
                    quantize: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(mu (2048,), sigma (2048, 2048)) of the pool3 features; save with `save_stats` to make a reference."""
    return feature_stats(inception_features(model, images, batch_size, quantize))


def fid_from_images(images, ref_stats_or_images, weights_path: str | os.PathLike | None = None, *,
                    model: nn.Module | None = None, batch_size: int = 100, device: str | torch.device = "cpu",
                    quantize: bool = True) -> float:
    """FID of `images` (N, C, H, W) in [-1, 1] (N >= 2) against a reference: the path of a .npz with 'mu'
    and 'sigma' (from the FID port or `save_stats`), a (mu, sigma) pair, or a second image tensor. The
    network comes from `model` if given, else is loaded from `weights_path`."""
    if model is None:
        if weights_path is None:
            raise ValueError("fid_from_images needs weights_path (a local Inception weights file) or model")
        model = load_inception(weights_path, device=device)
    mu, sigma = inception_stats(model, images, batch_size, quantize)
    ref = ref_stats_or_images
    if isinstance(ref, (str, os.PathLike)):
        mu_ref, sigma_ref = load_stats(os.fspath(ref))
    elif isinstance(ref, (tuple, list)) and len(ref) == 2:
        mu_ref, sigma_ref = ref
    else:
        mu_ref, sigma_ref = inception_stats(model, ref, batch_size, quantize)
    return frechet_distance(mu, sigma, mu_ref, sigma_ref)
