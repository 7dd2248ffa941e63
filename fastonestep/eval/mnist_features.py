"""MNIST FD: a Frechet distance in the feature space of a small MNIST classifier trained here.

No FID Inception weights can be downloaded on our machines, so MNIST samples are scored with a small
convolutional classifier trained on the 5,000 offline MNIST digits. Its penultimate activations (128-d) are
the features; "MNIST FD" is the Frechet distance between Gaussians fitted to them. It is NOT FID: the values
are comparable only with other MNIST FD values computed by the same classifier version (CLASSIFIER_VERSION).

The classifier trains once (fixed seed, 8 epochs, about 15 s on one CPU core, 98.4% accuracy on 500 held-out
digits) and is cached as safetensors under `cache_dir` (default $FASTONESTEP_CACHE or ~/.cache/fastonestep),
keyed by CLASSIFIER_VERSION, so a change of architecture or recipe retrains instead of loading stale weights.
"""
from __future__ import annotations

import contextlib
import functools
import math
import os
import tempfile
import time
import weakref

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..data.mnist import load_mnist
from .frechet import feature_stats, frechet_distance

# Bump whenever the architecture or the training recipe changes: it names the cache file.
CLASSIFIER_VERSION = "mnistcls-v1"
FEATURE_DIM = 128
NUM_CLASSES = 10
HELDOUT_PER_CLASS = 50  # 500 held-out images, 4,500 for training
_SEED = 0
_EPOCHS = 8
_BATCH = 128
_LR = 3e-3
_MAX_SHIFT = 2  # pixels of random translation (augmentation)


class MnistClassifier(nn.Module):
    """1x32x32 in [-1, 1] -> 10 logits; `features` is the 128-d penultimate activation. About 81k parameters,
    most in the fully connected layer: strided convolutions keep the compute small enough for CPU training."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(1, 16, 5, stride=2, padding=2), nn.BatchNorm2d(16), nn.ReLU(),   # 16x16
            nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(),  # 8x8
            nn.Conv2d(32, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(),  # 4x4
        )
        self.hidden = nn.Sequential(nn.Flatten(), nn.Linear(32 * 4 * 4, FEATURE_DIM), nn.ReLU())
        self.head = nn.Linear(FEATURE_DIM, NUM_CLASSES)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.hidden(self.conv(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@contextlib.contextmanager
def _one_cpu_thread():
    """Run the tiny convolutions on one intra-op thread. Their ops are too small to split well: on 2 shared
    cores, training took 17 s with one thread and 91 s with two (spin-waiting threads), and one thread also
    makes the trained weights independent of the machine's core count."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _default_cache_dir() -> str:
    return os.environ.get("FASTONESTEP_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "fastonestep")


def _split(labels: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (train, held-out) with HELDOUT_PER_CLASS held-out images of every digit."""
    order = torch.randperm(len(labels), generator=generator)
    heldout = torch.cat([order[labels[order] == c][:HELDOUT_PER_CLASS] for c in range(NUM_CLASSES)])
    is_heldout = torch.zeros(len(labels), dtype=torch.bool)
    is_heldout[heldout] = True
    return order[~is_heldout[order]], heldout


def _random_shift(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Translate each image by up to _MAX_SHIFT pixels, filling with the background value -1."""
    b, _, h, w = x.shape
    s = _MAX_SHIFT
    padded = F.pad(x, (s, s, s, s), value=-1.0)
    dy, dx = torch.randint(0, 2 * s + 1, (2, b), generator=generator)
    rows = (dy[:, None] + torch.arange(h))[:, :, None]  # (B, H, 1)
    cols = (dx[:, None] + torch.arange(w))[:, None, :]  # (B, 1, W)
    return padded[torch.arange(b)[:, None, None], 0, rows, cols].unsqueeze(1)


@torch.no_grad()
def _accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    model.eval()
    return float((model(images).argmax(1) == labels).float().mean())


def _train_classifier() -> tuple[MnistClassifier, float, float]:
    """(model in eval mode, held-out accuracy, training seconds). Leaves the global RNG state untouched."""
    start = time.perf_counter()
    images, labels = load_mnist(pad_to=32)
    generator = torch.Generator().manual_seed(_SEED)
    train_idx, heldout_idx = _split(labels, generator)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_SEED)
        model = MnistClassifier()
    steps_per_epoch = math.ceil(len(train_idx) / _BATCH)
    optimizer = torch.optim.Adam(model.parameters(), lr=_LR)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=_LR, total_steps=_EPOCHS * steps_per_epoch)
    for _ in range(_EPOCHS):
        model.train()
        order = train_idx[torch.randperm(len(train_idx), generator=generator)]
        for batch in order.split(_BATCH):
            loss = F.cross_entropy(model(_random_shift(images[batch], generator)), labels[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    accuracy = _accuracy(model, images[heldout_idx], labels[heldout_idx])
    return model.eval(), accuracy, time.perf_counter() - start


def _save_atomic(model: nn.Module, path: str, metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
    os.close(fd)
    try:
        state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        save_file(state, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _load(path: str) -> MnistClassifier | None:
    """The cached classifier, or None if the file is missing or unreadable (then we retrain)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    if not os.path.isfile(path):
        return None
    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
        model = MnistClassifier()
        model.load_state_dict(load_file(path))
    except Exception:  # a truncated or foreign file is not worth failing for: retrain and overwrite it
        return None
    model.heldout_accuracy = float(metadata.get("heldout_accuracy", "nan"))
    model.train_seconds = float(metadata.get("train_seconds", "nan"))
    return model.eval()


def get_mnist_classifier(cache_dir: str | None = None) -> MnistClassifier:
    """The MNIST FD classifier in eval mode, loaded from the cache or trained and cached. The returned model
    carries `heldout_accuracy` (on 500 held-out digits) and `train_seconds` from when it was trained."""
    path = os.path.join(cache_dir or _default_cache_dir(), f"{CLASSIFIER_VERSION}.safetensors")
    model = _load(path)
    if model is not None:
        return model
    with _one_cpu_thread():
        model, accuracy, seconds = _train_classifier()
    _save_atomic(model, path, {"version": CLASSIFIER_VERSION, "heldout_accuracy": f"{accuracy:.4f}",
                               "train_seconds": f"{seconds:.1f}"})
    model.heldout_accuracy, model.train_seconds = accuracy, seconds
    return model


def _check_images(images: torch.Tensor) -> None:
    if images.ndim != 4 or tuple(images.shape[1:]) != (1, 32, 32):
        raise ValueError(f"MNIST images must be (N, 1, 32, 32) in [-1, 1], got shape {tuple(images.shape)}")


@torch.no_grad()
def _batched(model: nn.Module, images: torch.Tensor, fn, batch_size: int) -> torch.Tensor:
    _check_images(images)
    model.eval()
    device = next(model.parameters()).device
    with _one_cpu_thread() if device.type == "cpu" else contextlib.nullcontext():
        return torch.cat([fn(chunk.to(device, torch.float32)).cpu() for chunk in images.split(batch_size)])


def mnist_features(model: nn.Module, images: torch.Tensor, batch_size: int = 500) -> np.ndarray:
    """Penultimate features (N, 128) as float64 numpy, for images (N, 1, 32, 32) in [-1, 1]."""
    return _batched(model, images, model.features, batch_size).double().numpy()


# Feature statistics of the default reference (the 5k MNIST set), per classifier object.
_reference_stats: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()


def _mnist_reference_stats(model: nn.Module) -> tuple[np.ndarray, np.ndarray]:
    if model not in _reference_stats:
        _reference_stats[model] = feature_stats(mnist_features(model, load_mnist(pad_to=32)[0]))
    return _reference_stats[model]


@functools.lru_cache(maxsize=1)
def _default_classifier() -> MnistClassifier:
    """One shared classifier from the default cache, so repeated mnist_fd calls neither reload it nor
    recompute the reference statistics."""
    return get_mnist_classifier()


def mnist_fd(images: torch.Tensor, ref_images: torch.Tensor | None = None, model: nn.Module | None = None) -> float:
    """MNIST FD between images and ref_images (default: the 5,000 offline MNIST digits). Both
    (N, 1, 32, 32) in [-1, 1]. Lower is better; like FID it is biased upwards for small N."""
    if model is None:
        model = _default_classifier()
    mu1, sigma1 = feature_stats(mnist_features(model, images))
    if ref_images is None:
        mu2, sigma2 = _mnist_reference_stats(model)
    else:
        mu2, sigma2 = feature_stats(mnist_features(model, ref_images))
    return frechet_distance(mu1, sigma1, mu2, sigma2)


def class_coverage(model: nn.Module, images: torch.Tensor, batch_size: int = 500) -> dict:
    """How the classifier's predictions spread over the 10 digits.

    A digit is covered if at least max(1, 10% of N/10) images are predicted as it. Returns
    num_classes_covered, class_histogram (counts), class_entropy (nats; log 10 = 2.303 when uniform),
    kl_to_uniform (= log 10 - entropy) and mean_confidence (mean max softmax probability: a sharpness proxy).
    """
    probs = _batched(model, images, lambda x: model(x).softmax(dim=1), batch_size).double()
    counts = torch.bincount(probs.argmax(1), minlength=NUM_CLASSES).double()
    hist = counts / counts.sum()
    entropy = float(-(hist[hist > 0] * hist[hist > 0].log()).sum())
    threshold = max(1.0, 0.1 * len(images) / NUM_CLASSES)
    return {
        "num_classes_covered": int((counts >= threshold).sum()),
        "class_histogram": [int(c) for c in counts],
        "class_entropy": entropy,
        "kl_to_uniform": math.log(NUM_CLASSES) - entropy,
        "mean_confidence": float(probs.max(1).values.mean()),
    }
