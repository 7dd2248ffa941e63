"""The user's own images: a folder of PNG/JPEG files, or a .npz file of arrays.

Both return float tensors in NCHW layout; 8-bit pixels are mapped to [-1, 1]. Large datasets belong in the
DALI / DataLoader pipelines; these loaders hold everything in memory and suit small sets and tests.
"""
from __future__ import annotations

import os
import zipfile

import numpy as np
import torch
from PIL import Image

from .errors import DataError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
_GRAY_MODES = {"1", "L", "LA", "I", "I;16", "F"}


def _is_hidden(name: str) -> bool:
    return name.startswith(".")


def _find_images(root: str) -> list[str]:
    """Image files under root, recursively, sorted; hidden files and folders are skipped."""
    found = []
    for folder, subdirs, files in os.walk(root):
        subdirs[:] = sorted(d for d in subdirs if not _is_hidden(d))
        found += [os.path.join(folder, f) for f in sorted(files)
                  if not _is_hidden(f) and f.lower().endswith(IMAGE_EXTENSIONS)]
    return found


def _class_of(root: str, file: str) -> str | None:
    """The immediate subfolder of root that holds file, or None for a file directly in root."""
    parts = os.path.relpath(file, root).split(os.sep)
    return parts[0] if len(parts) > 1 else None


def center_crop_box(width: int, height: int, crop: int) -> tuple[int, int, int, int]:
    """The centred crop window; an odd margin puts the extra pixel before the window (round half up),
    which is what DALI's crop_pos 0.5 does, so every loader cuts the same pixels."""
    left, top = (width - crop + 1) // 2, (height - crop + 1) // 2
    return left, top, left + crop, top + crop


def resized_shorter(width: int, height: int, resolution: int) -> tuple[int, int]:
    """Size after scaling the shorter side to `resolution` (longer side rounded to nearest, as DALI does)."""
    if width <= height:
        return resolution, max(resolution, int(height * resolution / width + 0.5))
    return max(resolution, int(width * resolution / height + 0.5)), resolution


def read_image(file: str, resolution: int, gray: bool | None) -> np.ndarray:
    """uint8 (H, W, C): decoded, shorter side resized to `resolution` (Lanczos; skipped when it already is),
    centre-cropped to a square; the same pixels in every loader (memory, torch, DALI). gray=None keeps the
    file's own colour type."""
    try:
        with Image.open(file) as img:
            img.load()
            if gray is None:
                gray = img.mode in _GRAY_MODES
            img = img.convert("L" if gray else "RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise DataError(f"cannot read image {file!r}: {err}") from err
    w, h = img.size
    if min(w, h) != resolution:
        img = img.resize(resized_shorter(w, h, resolution), Image.Resampling.LANCZOS)
    img = img.crop(center_crop_box(*img.size, resolution))
    pixels = np.asarray(img, dtype=np.uint8)
    return pixels[..., None] if pixels.ndim == 2 else pixels


def _uint8_to_unit(pixels: np.ndarray) -> torch.Tensor:
    """uint8 -> [-1, 1], rounded as the streaming loaders round it ((x - 127.5) / 127.5)."""
    return torch.from_numpy(np.ascontiguousarray(pixels)).float().sub_(127.5).div_(127.5)


def load_image_folder(path: str, resolution: int, channels: int | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor | None, list[str] | None]:
    """Every PNG/JPEG under `path` (recursively) as float32 (N, C, resolution, resolution) in [-1, 1].

    Returns (images, labels, class_names). When two or more immediate subfolders hold images, each such
    subfolder is a class (sorted by name, labels int64 in 0..K-1); otherwise labels and class_names are None.
    channels: 1 (grayscale), 3 (RGB) or None, which gives 1 if every file is grayscale and 3 otherwise.
    Images are resized (shorter side to `resolution`, Lanczos), then centre-cropped: as the streaming loaders do.
    """
    if channels not in (None, 1, 3):
        raise DataError(f"channels must be 1, 3 or None (infer from the files), got {channels}")
    if resolution <= 0:
        raise DataError(f"resolution must be positive, got {resolution}")
    if not os.path.exists(path):
        raise DataError(f"image folder {path!r} does not exist")
    if not os.path.isdir(path):
        raise DataError(f"{path!r} is not a folder (expected a folder of images or a .npz file)")
    files = _find_images(path)
    if not files:
        what = "is empty" if not os.listdir(path) else f"holds no image files ({', '.join(IMAGE_EXTENSIONS)})"
        raise DataError(f"image folder {path!r} {what}")

    class_per_file = [_class_of(path, f) for f in files]
    class_names = sorted({c for c in class_per_file if c is not None})
    labelled = len(class_names) >= 2
    if labelled and None in class_per_file:
        loose = [os.path.basename(f) for f, c in zip(files, class_per_file) if c is None]
        raise DataError(f"image folder {path!r} has class subfolders ({', '.join(class_names)}) but also images "
                        f"directly inside it ({', '.join(loose[:3])}{', ...' if len(loose) > 3 else ''}); "
                        "move them into a class subfolder")

    gray = None if channels is None else channels == 1
    arrays = [read_image(f, resolution, gray) for f in files]
    num_channels = max(a.shape[-1] for a in arrays)
    # Under channel inference a mix of gray and colour files becomes RGB: repeat the gray channel.
    pixels = np.stack([np.broadcast_to(a, a.shape[:2] + (num_channels,)) for a in arrays])
    images = _uint8_to_unit(pixels).permute(0, 3, 1, 2).contiguous()
    if not labelled:
        return images, None, None
    index = {name: i for i, name in enumerate(class_names)}
    labels = torch.tensor([index[c] for c in class_per_file], dtype=torch.int64)
    return images, labels, class_names


def _to_nchw(images: np.ndarray, path: str) -> np.ndarray:
    """Channels are the axis (1 or 3) of size <= 4; when both could be, the smaller one is taken."""
    if images.ndim != 4:
        raise DataError(f"{path!r}: array 'images' has shape {images.shape}; expected 4 dimensions, "
                        "(N, C, H, W) or (N, H, W, C)")
    c_first, c_last = images.shape[1], images.shape[3]
    if c_first > 4 and c_last > 4:
        raise DataError(f"{path!r}: array 'images' has shape {images.shape}; cannot find a channel axis "
                        "of size <= 4 in (N, C, H, W) or (N, H, W, C)")
    if c_first <= 4 and c_first <= c_last:
        return images
    return images.transpose(0, 3, 1, 2)


def _check_labels(labels: np.ndarray, num_images: int, path: str) -> torch.Tensor:
    if labels.ndim != 1 or labels.shape[0] != num_images:
        raise DataError(f"{path!r}: array 'labels' has shape {labels.shape}; expected ({num_images},), "
                        "one label per image")
    if not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{path!r}: array 'labels' has dtype {labels.dtype}; expected integers")
    if num_images and labels.min() < 0:
        raise DataError(f"{path!r}: array 'labels' has negative values; expected 0..K-1")
    return torch.from_numpy(labels.astype(np.int64))


def load_npz(path: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(images float32 (N, C, H, W), labels int64 (N,) or None) from a .npz file.

    'images' is (N, C, H, W) or (N, H, W, C); uint8 pixels are mapped to [-1, 1], float arrays (e.g.
    latents) are taken as given. 'labels' is optional. No resizing is done.
    """
    if not os.path.exists(path):
        raise DataError(f"npz file {path!r} does not exist")
    try:
        with np.load(path, allow_pickle=False) as archive:
            if "images" not in archive.files:
                raise DataError(f"{path!r} has no array 'images' (found: {', '.join(archive.files) or 'nothing'})")
            images = archive["images"]
            labels = archive["labels"] if "labels" in archive.files else None
    except DataError:
        raise
    except (OSError, ValueError, zipfile.BadZipFile) as err:
        raise DataError(f"cannot read {path!r} as a .npz file: {err}") from err

    images = _to_nchw(images, path)
    if images.shape[0] == 0:
        raise DataError(f"{path!r}: array 'images' holds no images (shape {images.shape})")
    if images.dtype == np.uint8:
        tensor = _uint8_to_unit(images)
    elif np.issubdtype(images.dtype, np.floating):
        if not np.isfinite(images).all():
            raise DataError(f"{path!r}: array 'images' has NaN or infinite values")
        tensor = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))
    else:
        raise DataError(f"{path!r}: array 'images' has dtype {images.dtype}; expected uint8 or float")
    label_tensor = None if labels is None else _check_labels(labels, images.shape[0], path)
    return tensor, label_tensor
