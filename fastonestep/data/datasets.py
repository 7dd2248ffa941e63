"""One entry point, `make_dataset`, that turns a data config (kind, name, path, ...) into tensors in memory."""
from __future__ import annotations

import os

import numpy as np
import torch

from .errors import DataError
from .images import load_image_folder, load_npz
from .mnist import load_mnist
from .toy2d import make_toy

DEFAULT_TOY_SIZE = 100_000


class TensorDataset:
    """A dataset held in memory.

    data: float tensor (N, ...); labels: int64 (N,) or None; num_classes: 0 when unlabelled;
    shape: one sample's shape; name: for logs; distribution: the toy object (exact density/score for
    metrics) for 2-D toys, else None; class_names: folder names of an image-folder dataset, else None.
    """

    is_latent = False  # LatentTensorDataset: data are VAE moments, not samples

    def __init__(self, data: torch.Tensor, labels: torch.Tensor | None = None, num_classes: int = 0,
                 name: str = "", distribution=None, class_names: list[str] | None = None):
        if labels is not None and len(labels) != len(data):
            raise DataError(f"dataset {name!r}: {len(labels)} labels for {len(data)} samples")
        self.data = data
        self.labels = labels
        self.num_classes = int(num_classes)
        self.name = name
        self.distribution = distribution
        self.class_names = class_names

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.data.shape[1:])

    def __len__(self) -> int:
        return len(self.data)

    def __repr__(self) -> str:
        return (f"TensorDataset(name={self.name!r}, size={len(self)}, shape={self.shape}, "
                f"num_classes={self.num_classes})")


def _toy_dataset(name: str, size: int, seed: int) -> TensorDataset:
    toy = make_toy(name)
    generator = torch.Generator().manual_seed(seed)
    return TensorDataset(toy.sample(size or DEFAULT_TOY_SIZE, generator=generator), name=name, distribution=toy)


def _mnist_dataset(resolution: int, size: int, seed: int) -> TensorDataset:
    images, labels = load_mnist(pad_to=resolution)
    if size:
        # The bundled file is sorted by digit, so "the first `size`" is taken after a fixed shuffle:
        # a prefix of the raw file would hold only zeros.
        keep = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:size]
        images, labels = images[keep], labels[keep]
    return TensorDataset(images, labels, num_classes=10, name="mnist")


def _folder_dataset(path: str, resolution: int, size: int) -> TensorDataset:
    if not path:
        raise DataError("data.path is empty: give a folder of images or a .npz file")
    if not os.path.exists(path):
        raise DataError(f"data.path {path!r} does not exist")
    class_names = None
    if os.path.isdir(path):
        images, labels, class_names = load_image_folder(path, resolution)
    elif path.lower().endswith(".npz"):
        images, labels = load_npz(path)
    else:
        raise DataError(f"data.path {path!r} is neither a folder of images nor a .npz file")
    if size:
        images = images[:size]
        labels = None if labels is None else labels[:size]
    num_classes = len(class_names) if class_names else (int(labels.max()) + 1 if labels is not None else 0)
    name = os.path.basename(os.path.normpath(path))
    return TensorDataset(images, labels, num_classes=num_classes, name=name, class_names=class_names)


class LatentTensorDataset(TensorDataset):
    """VAE posterior moments held in memory: data is (N, 2C, H, W) = [mean; std]; a sample (what methods
    see, after fastonestep.data.latents.LatentSampling) has shape (C, H, W)."""

    is_latent = True

    @property
    def shape(self) -> tuple[int, ...]:
        c2, *rest = self.data.shape[1:]
        return (c2 // 2, *rest)


def _latent_dataset(path: str, size: int) -> TensorDataset:
    from .files import read_moments, scan_latent_folder

    if not path:
        raise DataError("data.path is empty: give a latent dataset folder (`fastonestep dataset encode`)")
    files = scan_latent_folder(path, size)
    moments = torch.from_numpy(np.stack([read_moments(f, files.stored_shape) for f in files.files]))
    return LatentTensorDataset(moments, files.labels, num_classes=files.num_classes, name=files.name,
                               class_names=files.class_names)


DATASET_KINDS = ("toy2d", "mnist", "folder", "latent")


def make_dataset(kind: str, name: str = "", path: str = "", resolution: int = 32, size: int = 0,
                 seed: int = 0) -> TensorDataset:
    """Load a dataset into memory.

    kind "toy2d": `size or 100_000` samples of the toy `name` ("grid25", "rings", "moons") drawn with `seed`.
    kind "mnist": the 5,000 offline MNIST digits padded to `resolution`; size > 0 keeps the first `size`
    of a fixed shuffle (by `seed`), so every digit is represented.
    kind "folder": `path` is a folder of images (resized to `resolution`) or a .npz file (taken as stored);
    size > 0 keeps the first `size`.
    kind "latent": `path` is a `fastonestep dataset encode` folder; the VAE moments of every file, in memory.
    """
    if size < 0:
        raise DataError(f"dataset size must be >= 0 (0 means all), got {size}")
    if kind == "toy2d":
        return _toy_dataset(name, size, seed)
    if kind == "mnist":
        return _mnist_dataset(resolution, size, seed)
    if kind == "folder":
        return _folder_dataset(path, resolution, size)
    if kind == "latent":
        return _latent_dataset(path, size)
    raise DataError(f"unknown dataset kind {kind!r}; valid kinds: {', '.join(DATASET_KINDS)}")
