"""File-backed datasets for the streaming loaders: a list of files plus labels, nothing decoded up front.

Two kinds:
- "folder": PNG/JPEG files under a directory (recursively, sorted; two or more class subfolders give labels,
  as in images.load_image_folder). Each image is resized so its shorter side is `resolution`, then centre
  cropped to resolution x resolution. The colour type (1 or 3 channels) is the first file's.
- "latent": a folder written by `fastonestep dataset encode` (fastonestep.data.latents): one float32 .npy
  per image holding the VAE posterior [mean; std] as 2C channels, listed with labels in dataset.json.
  A sample's shape is the latent's (C, H, W); loaders yield the 2C-channel moments and the latent sampler
  turns them into latents.

`read_image` and `read_moments` are the host-side readers the torch fallback uses (DALI decodes itself);
both loaders share the same geometry so their batches agree.
"""
from __future__ import annotations

import json
import os

import numpy as np
import torch
from PIL import Image

from .errors import DataError
from .images import (_GRAY_MODES, IMAGE_EXTENSIONS, _class_of, _find_images, center_crop_box,  # noqa: F401
                     read_image, resized_shorter)

LATENT_INDEX = "dataset.json"


class FileDataset:
    """Metadata of a streamed dataset; duck-types TensorDataset where methods and evaluation look
    (shape, num_classes, name, distribution, class_names, labels) and has no `data` tensor."""

    data = None
    distribution = None

    def __init__(self, kind: str, root: str, files: list[str], labels: torch.Tensor | None, num_classes: int,
                 class_names: list[str] | None, sample_shape: tuple[int, ...], stored_shape: tuple[int, ...],
                 resolution: int = 0, info: dict | None = None):
        self.kind, self.root, self.files = kind, root, files
        self.labels, self.num_classes, self.class_names = labels, int(num_classes), class_names
        self.shape, self.stored_shape = tuple(sample_shape), tuple(stored_shape)
        self.resolution = resolution
        self.info = info or {}
        self.name = os.path.basename(os.path.normpath(root))

    @property
    def channels(self) -> int:
        return self.shape[0]

    @property
    def is_latent(self) -> bool:
        return self.kind == "latent"

    def __len__(self) -> int:
        return len(self.files)

    def __repr__(self) -> str:
        return (f"FileDataset(kind={self.kind!r}, root={self.root!r}, size={len(self)}, shape={self.shape}, "
                f"num_classes={self.num_classes})")


# ------------------------------------------------------------------------------------------------ images
def _file_is_gray(file: str) -> bool:
    try:
        with Image.open(file) as img:  # reads the header only
            return img.mode in _GRAY_MODES
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise DataError(f"cannot read image {file!r}: {err}") from err


def scan_image_folder(path: str, resolution: int, size: int = 0) -> FileDataset:
    if resolution <= 0:
        raise DataError(f"data.resolution must be positive, got {resolution}")
    if not os.path.isdir(path):
        raise DataError(f"data.path {path!r} is not a folder of images")
    files = _find_images(path)
    if not files:
        raise DataError(f"image folder {path!r} holds no image files ({', '.join(IMAGE_EXTENSIONS)})")
    class_per_file = [_class_of(path, f) for f in files]
    class_names = sorted({c for c in class_per_file if c is not None})
    labels = None
    if len(class_names) >= 2:
        if None in class_per_file:
            raise DataError(f"image folder {path!r} has class subfolders ({', '.join(class_names)}) but also "
                            "images directly inside it; move them into a class subfolder")
        index = {name: i for i, name in enumerate(class_names)}
        labels = torch.tensor([index[c] for c in class_per_file], dtype=torch.int64)
    else:
        class_names = None
    if size:
        files = files[:size]
        labels = None if labels is None else labels[:size]
    # 1 only if every file is grayscale, as the memory loader decides (a colour file stops the scan at once)
    channels = 1 if all(_file_is_gray(f) for f in files) else 3
    shape = (channels, resolution, resolution)
    return FileDataset("folder", path, files, labels, len(class_names or ()), class_names, shape, shape,
                       resolution=resolution)


def images_to_tensor(pixels: list[np.ndarray], flips: np.ndarray | None) -> torch.Tensor:
    """uint8 HWC images -> float32 NCHW in [-1, 1], flipped left-right where flips[i]."""
    batch = np.stack(pixels)
    if flips is not None and flips.any():
        batch[flips] = batch[flips, :, ::-1]
    x = torch.from_numpy(batch).permute(0, 3, 1, 2).float()
    return x.sub_(127.5).div_(127.5)


# ------------------------------------------------------------------------------------------------ latents
def _read_index(path: str) -> dict:
    index = os.path.join(path, LATENT_INDEX)
    if not os.path.isfile(index):
        raise DataError(f"latent dataset {path!r} has no {LATENT_INDEX} (write one with `fastonestep dataset encode`)")
    try:
        with open(index, encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, ValueError) as err:
        raise DataError(f"cannot read {index!r}: {err}") from err
    if not isinstance(meta, dict) or not isinstance(meta.get("labels"), list):
        raise DataError(f"{index!r} must hold a mapping with a list 'labels' of [file, label] pairs")
    return meta


def scan_latent_folder(path: str, size: int = 0) -> FileDataset:
    if not os.path.isdir(path):
        raise DataError(f"data.path {path!r} is not a latent dataset folder")
    meta = _read_index(path)
    pairs = meta["labels"]
    if not pairs:
        raise DataError(f"latent dataset {path!r} lists no files in {LATENT_INDEX}")
    try:
        names = [str(p[0]) for p in pairs]
        raw_labels = [p[1] for p in pairs]
    except (TypeError, IndexError) as err:
        raise DataError(f"{path!r}/{LATENT_INDEX}: 'labels' entries must be [file, label] pairs") from err
    labelled = all(lab is not None for lab in raw_labels)
    if size:
        names, raw_labels = names[:size], raw_labels[:size]
    files = [os.path.join(path, n) for n in names]
    first = read_moments(files[0])
    if first.ndim != 3 or first.shape[0] % 2:
        raise DataError(f"{files[0]!r} has shape {first.shape}; expected (2C, H, W): posterior mean and std "
                        "stacked on the channel axis")
    labels = torch.tensor(raw_labels, dtype=torch.int64) if labelled else None
    class_names = meta.get("class_names")
    num_classes = len(class_names) if class_names else (int(labels.max()) + 1 if labels is not None else 0)
    c2, h, w = first.shape
    return FileDataset("latent", path, files, labels, num_classes, class_names, (c2 // 2, h, w), first.shape,
                       resolution=int(meta.get("resolution", 0)), info=meta)


def read_moments(file: str, shape: tuple[int, ...] | None = None) -> np.ndarray:
    """float32 (2C, H, W) posterior mean and std of one image."""
    try:
        arr = np.load(file, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise DataError(f"cannot read latent file {file!r}: {err}") from err
    if shape is not None and tuple(arr.shape) != tuple(shape):
        raise DataError(f"latent file {file!r} has shape {tuple(arr.shape)}, the dataset's first file {tuple(shape)}")
    if not np.issubdtype(arr.dtype, np.floating):
        raise DataError(f"latent file {file!r} has dtype {arr.dtype}; expected float")
    return np.ascontiguousarray(arr, dtype=np.float32)


def read_sample(dataset: FileDataset, index: int) -> np.ndarray:
    """One sample as the host readers produce it: uint8 HWC image, or float32 moments."""
    if dataset.is_latent:
        return read_moments(dataset.files[index], dataset.stored_shape)
    return read_image(dataset.files[index], dataset.resolution, dataset.channels == 1)
