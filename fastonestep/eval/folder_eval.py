"""`fastonestep eval FOLDER`: metrics of a folder of images (e.g. another tool's samples) against a reference.

Features as in fastonestep.eval.features (auto: mnist for 1x32x32 images, inception with a weights file).
The reference is an image folder (FD, PRDC, diversity), a statistics .npz with mu and sigma (FD only: PRDC
needs the reference's points), or by default for 1x32x32 images the 5,000 offline MNIST digits.
"""
from __future__ import annotations

import os

import numpy as np
import torch
from PIL import Image

from ..data.errors import DataError
from ..data.images import _find_images, load_image_folder
from .features import MNIST_SHAPE, compare_features, load_reference_stats, make_features
from .frechet import feature_stats, save_stats


def is_image_folder(path: str) -> bool:
    return os.path.isdir(path) and bool(_find_images(path))


def _first_image_side(path: str) -> int:
    files = _find_images(path)
    if not files:
        raise DataError(f"image folder {path!r} holds no PNG/JPEG files")
    try:
        with Image.open(files[0]) as img:
            return min(img.size)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise DataError(f"cannot read image {files[0]!r}: {err}") from err


def load_folder_images(path: str, resolution: int = 0, channels: int | None = None) -> torch.Tensor:
    """(N, C, R, R) in [-1, 1]; resolution 0: the smaller side of the first image."""
    images, _, _ = load_image_folder(path, resolution or _first_image_side(path), channels)
    return images


def evaluate_images(images: torch.Tensor, ref: str | None = None, features: str = "auto", inception: str = "",
                    k: int = 5, save_stats_path: str = "") -> dict:
    """FD, precision/recall/density/coverage and diversity of images (N, C, H, W) in [-1, 1] against `ref`
    (an image folder, a stats .npz, or None: MNIST for 1x32x32 images). save_stats_path: also write the
    images' feature statistics (mu, sigma) there."""
    shape = tuple(images.shape[1:])
    extractor = make_features(features, shape, inception)
    if extractor is None:
        raise ValueError(f"no default feature space for images of shape {shape}: pass --inception WEIGHTS "
                         "(FID features) or --features raw")
    gen = extractor(images)
    if save_stats_path:
        save_stats(save_stats_path, *feature_stats(gen))
    ref_feats = ref_stats = None
    if ref is None:
        if shape != MNIST_SHAPE:
            raise ValueError(f"images of shape {shape} have no default reference: pass --ref (an image folder or "
                             "a statistics .npz)")
        from ..data.mnist import load_mnist

        ref_name, ref_feats = "mnist (5,000 offline digits)", extractor(load_mnist(pad_to=32)[0])
    elif os.path.isdir(ref):
        ref_name, ref_feats = ref, extractor(load_folder_images(ref, shape[-1], shape[0]))
    elif os.path.isfile(ref) and ref.lower().endswith(".npz"):
        ref_name, ref_stats = ref, load_reference_stats(ref, gen.shape[1])
    else:
        raise DataError(f"reference {ref!r} is neither an image folder nor a statistics .npz file")
    result = {"num_images": int(len(images)), "feature_space": extractor.name, "reference": ref_name}
    result.update(compare_features(gen, extractor.fd_key, ref_feats, ref_stats, k=k))
    return result


def save_sample_stats(samples: torch.Tensor, path: str, features: str = "auto", inception: str = "",
                      extractor=None) -> None:
    """Feature statistics (mu, sigma) of samples, written as a .npz usable as --ref / eval.fid_ref; in the
    given extractor's space (e.g. latents decoded by a VAE), else that of features / inception."""
    extractor = extractor or make_features(features, tuple(samples.shape[1:]), inception)
    if extractor is None:
        raise ValueError(f"no default feature space for samples of shape {tuple(samples.shape[1:])}: "
                         "pass --features or --inception")
    save_stats(path, *feature_stats(np.asarray(extractor(samples))))
