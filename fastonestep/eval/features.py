"""Pluggable feature spaces for the Frechet distance, precision/recall/density/coverage and diversity.

- "mnist": the 128-d penultimate features of the project's own MNIST classifier (1x32x32 images in [-1, 1]);
  its Frechet distance is "MNIST FD" (metric key mnist_fd), comparable only with itself, not with FID.
- "inception": the 2048-d pool3 features of the FID InceptionV3 from a local weights file (eval.inception);
  its Frechet distance is the standard FID (key fid).
- "raw": the samples themselves, flattened (2-D toys; key raw_fd).
- "auto": raw for vector data, mnist for 1x32x32 images, inception for other images when a weights file is
  given, else none (no feature metrics: raw pixels of large images make a huge, meaningless covariance).

Latent data (data.kind=latent, fastonestep.eval.latent_eval): samples are compared with the dataset's latents
as training draws them (fixed z, data.latent_scale/_bias applied), never with the stored moments; the image
spaces (inception, mnist, and auto's choice) see latents decoded by eval.vae, raw sees the latents themselves.
"""
from __future__ import annotations

import functools
import os
import weakref

import numpy as np
import torch

from .frechet import feature_stats, frechet_distance, load_stats
from .prdc import diversity, prdc

FEATURE_KINDS = ("auto", "mnist", "inception", "raw")
FD_KEYS = {"mnist": "mnist_fd", "inception": "fid", "raw": "raw_fd"}
# PRDC and diversity cost O(N^2): larger sets use a fixed random 10k of their points (not the first 10k: an image
# folder's files come sorted by class subfolder, so its first rows are a few classes only).
PRDC_MAX_POINTS = 10_000
MNIST_SHAPE = (1, 32, 32)


class FeatureExtractor:
    """samples (N, ...) -> features (N, F) float64 numpy. `name` is the feature kind, `fd_key` the metric key of
    the Frechet distance in this space."""

    def __init__(self, name: str, fn, dim: int | None = None, key=None):
        self.name, self.fd_key, self._fn, self.dim = name, FD_KEYS[name], fn, dim
        self.key = key or name  # identifies the feature space for caching reference features

    def __call__(self, samples: torch.Tensor) -> np.ndarray:
        return self._fn(samples)

    def __repr__(self) -> str:
        return f"FeatureExtractor({self.name!r})"


def resolve_kind(kind: str, data_shape, inception: str = "") -> str | None:
    """The concrete feature kind for `kind` (one of FEATURE_KINDS) and data of shape data_shape; None when
    "auto" finds no suitable space. Explicit kinds that cannot work raise ValueError naming eval.features."""
    shape = tuple(int(s) for s in data_shape)
    if kind not in FEATURE_KINDS:
        raise ValueError(f"config key 'eval.features' must be one of {', '.join(FEATURE_KINDS)}; got {kind!r}")
    if kind == "auto":
        if len(shape) == 1:
            return "raw"
        if shape == MNIST_SHAPE:
            return "mnist"
        return "inception" if inception and is_image_shape(shape) else None
    if kind == "mnist" and shape != MNIST_SHAPE:
        raise ValueError(f"eval.features=mnist needs 1x32x32 images (MNIST-like), the data has shape {shape}")
    if kind == "inception":
        if not inception:
            raise ValueError("eval.features=inception needs a local FID Inception weights file: set eval.inception "
                             "(or pass --inception)")
        if not is_image_shape(shape):
            raise ValueError(f"eval.features=inception needs images with 1 or 3 channels, the data has shape {shape}"
                             + _LATENT_HINT)
    return kind


_LATENT_HINT = ("; latents (data.kind=latent) are decoded to images for it by eval.vae (or `fastonestep eval "
                "--vae`): the local diffusers AutoencoderKL folder the data were encoded with")


def is_image_shape(shape) -> bool:
    return len(shape) == 3 and int(shape[0]) in (1, 3)


def check_eval_settings(eval_cfg, data_shape, dataset=None) -> None:
    """Raises now what evaluation would raise after training: a feature space that cannot work for this data,
    an eval.vae that cannot decode it, Inception weights or reference statistics that cannot be read or have
    the wrong dimension; with `dataset`, also an FID without reference (streamed data and no eval.fid_ref)."""
    shape = tuple(int(s) for s in data_shape)
    vae = getattr(eval_cfg, "vae", "")
    if eval_cfg.features == "inception":
        _check_fid_keys(eval_cfg, shape, dataset)
    image_shape = shape
    if vae:
        from .latent_eval import check_vae, decoded_shape

        check_vae(vae, shape)
        image_shape = decoded_shape(vae, shape)
    resolve_kind(eval_cfg.features, shape if eval_cfg.features == "raw" else image_shape, eval_cfg.inception)
    if eval_cfg.inception:
        _check_inception_settings(eval_cfg, image_shape, dataset)


def _streamed(dataset) -> bool:
    return dataset is not None and getattr(dataset, "data", None) is None


def _check_fid_keys(eval_cfg, shape, dataset) -> None:
    """eval.features=inception asked for FID: one message naming every key it still lacks."""
    missing = []
    if not eval_cfg.inception:
        missing.append("a local FID Inception weights file: set eval.inception (or pass --inception)")
    if not is_image_shape(shape) and len(shape) == 3 and not getattr(eval_cfg, "vae", ""):
        missing.append(f"for latents of shape {shape}, eval.vae: the local diffusers AutoencoderKL folder the data "
                       "were encoded with (decodes samples to images)")
    if (_streamed(dataset) or not is_image_shape(shape)) and not eval_cfg.fid_ref:
        missing.append("eval.fid_ref: Inception statistics .npz (mu, sigma) of the real images (latent or "
                       "streamed data cannot be the reference)")
    if missing:
        raise ValueError("eval.features=inception needs " + "; and ".join(missing)
                         + " (or eval.features=auto to train without FID)")


def _check_inception_settings(eval_cfg, image_shape, dataset) -> None:
    """eval.inception gives an FID whatever eval.features is: the samples must be images (or decoded to them),
    the weights loadable, and the reference statistics 2048-d (or the training data in memory)."""
    from .inception import FEATURE_DIM, load_inception

    if not is_image_shape(image_shape):
        raise ValueError(f"eval.inception is set (FID), but the samples are not images: shape {image_shape}"
                         + _LATENT_HINT)
    load_inception(eval_cfg.inception)  # on the CPU and dropped: a file that is not the weights fails now
    if eval_cfg.fid_ref:
        load_reference_stats(eval_cfg.fid_ref, FEATURE_DIM)
    elif getattr(eval_cfg, "vae", "") or _streamed(dataset):
        # decoded training latents are VAE reconstructions, not the images: an FID against them is no FID
        raise ValueError("eval.inception is set (FID) but eval.fid_ref is empty, and the training data cannot be "
                         "the reference (" + ("VAE latents" if getattr(eval_cfg, "vae", "") else "streamed, not in "
                         "memory") + "): set eval.fid_ref, Inception statistics .npz of the real images, e.g. from "
                         "`fastonestep eval IMAGE_FOLDER --inception W --save-stats ref.npz`")


@functools.lru_cache(maxsize=4)
def _inception_model(path: str, device: str):
    from .inception import load_inception

    return load_inception(path, device=device)


def make_sample_features(kind: str, data_shape, inception: str = "", device=None,
                         latent=None) -> FeatureExtractor | None:
    """make_features for the samples of a dataset: with `latent` (a LatentEval with a VAE), the image feature
    spaces see the decoded latents; raw stays on the latents."""
    if latent is None or not latent.vae or kind == "raw":
        return make_features(kind, data_shape, inception, device)
    extractor = make_features(kind, latent.image_shape(data_shape), inception, device)
    return None if extractor is None else latent.decoding(extractor, device or _default_device())


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def make_features(kind: str, data_shape, inception: str = "", device=None) -> FeatureExtractor | None:
    """A FeatureExtractor for `kind` (see resolve_kind), or None when "auto" finds none."""
    name = resolve_kind(kind, data_shape, inception)
    if name is None:
        return None
    if name == "raw":
        return FeatureExtractor("raw", lambda x: x.detach().reshape(len(x), -1).double().cpu().numpy(),
                                int(np.prod(data_shape)))
    if name == "mnist":
        from .mnist_features import FEATURE_DIM, get_mnist_classifier, mnist_features

        model = get_mnist_classifier()  # the cached classifier (trained once per cache directory)
        return FeatureExtractor("mnist", lambda x: mnist_features(model, x.float()), FEATURE_DIM)
    from .inception import FEATURE_DIM as INCEPTION_DIM
    from .inception import inception_features

    dev = str(device or _default_device())
    model = _inception_model(os.path.abspath(inception), dev)
    return FeatureExtractor("inception", lambda x: inception_features(model, x), INCEPTION_DIM,
                            key=("inception", os.path.abspath(inception)))


def reference_subset(n_total: int, n: int, seed: int) -> torch.Tensor:
    """Indices of a fixed random subset of size min(n, n_total): the real points PRDC compares against."""
    return torch.randperm(n_total, generator=torch.Generator().manual_seed(seed))[:min(n, n_total)]


def _prdc_points(x: np.ndarray, seed: int) -> np.ndarray:
    """All rows of x, or a fixed random PRDC_MAX_POINTS of them."""
    if len(x) <= PRDC_MAX_POINTS:
        return x
    return x[np.sort(reference_subset(len(x), PRDC_MAX_POINTS, seed).numpy())]


def _checked_stats(stats, dim: int, source: str):
    mu, sigma = stats
    if mu.shape != (dim,) or sigma.shape != (dim, dim):
        raise ValueError(f"reference statistics {source} have dimension {mu.shape}, but the features are "
                         f"{dim}-dimensional (computed with other features?)")
    return mu, sigma


def compare_features(gen_feats: np.ndarray, fd_key: str, ref_feats: np.ndarray | None = None,
                     ref_stats=None, prdc_ref: np.ndarray | None = None, k: int = 5) -> dict:
    """FD (under fd_key) against ref_stats (mu, sigma) or, if None, the stats of ref_feats; precision, recall,
    density, coverage against prdc_ref (default ref_feats); diversity of gen_feats and ref_diversity of
    prdc_ref. Generated rows with non-finite features are dropped (their fraction is in nonfinite_features)."""
    gen = np.asarray(gen_feats, dtype=np.float64)
    finite = np.isfinite(gen).all(axis=1)
    gen = gen[finite]
    out = {}
    if not finite.all():
        out["nonfinite_features"] = float(1.0 - finite.mean())
    if ref_stats is None and ref_feats is None:
        raise ValueError("compare_features needs ref_feats or ref_stats")
    if len(gen) < 2:
        return out  # nothing finite to measure: every metric would be undefined
    mu, sigma = feature_stats(gen)
    ref_mu, ref_sigma = (feature_stats(ref_feats) if ref_stats is None
                         else _checked_stats(ref_stats, gen.shape[1], "given"))
    out[fd_key] = frechet_distance(mu, sigma, ref_mu, ref_sigma)
    prdc_ref = ref_feats if prdc_ref is None else prdc_ref
    gen = _prdc_points(gen, seed=1)
    out["diversity"] = diversity(gen)
    if prdc_ref is not None:
        prdc_ref = _prdc_points(np.asarray(prdc_ref, dtype=np.float64), seed=0)
        kk = min(k, len(gen) - 1, len(prdc_ref) - 1)  # tiny sets: the largest k that is defined
        out.update(prdc(prdc_ref, gen, kk))
        out["ref_diversity"] = diversity(prdc_ref)
    return out


def load_reference_stats(path: str, dim: int):
    """(mu, sigma) from a stats .npz, checked against the feature dimension."""
    return _checked_stats(load_stats(path), dim, repr(path))


# Reference features per dataset object and feature space: evaluation during training reuses them.
_REFERENCE_CACHE: "weakref.WeakKeyDictionary[object, dict]" = weakref.WeakKeyDictionary()


def _cached(owner, key, compute):
    store = _REFERENCE_CACHE.setdefault(owner, {})
    if key not in store:
        store[key] = compute()
    return store[key]


def reference_points(dataset, latent=None, seed: int = 0) -> tuple[torch.Tensor, tuple]:
    """(what samples are compared with, a key for caching their features): dataset.data, or for latent data
    the latents as training draws them (z from `seed`; `latent` a LatentEval with the run's scale and bias)."""
    if not getattr(dataset, "is_latent", False):
        return dataset.data, ()
    if latent is None:
        raise ValueError("latent data are compared as training sees them: pass latent= (a LatentEval with "
                         "data.latent_scale / data.latent_bias), not the stored moments")
    key = ("latents", latent.scale, latent.bias, seed)
    return _cached(dataset, key, lambda: latent.reference(dataset.data, seed)), key


def dataset_feature_metrics(samples: torch.Tensor, dataset, extractor: FeatureExtractor, k: int = 5,
                            ref_stats_path: str = "", seed: int = 0, latent=None) -> dict:
    """Feature metrics of samples against a dataset's images/points (reference_points): FD against all of
    them (or the statistics file ref_stats_path), PRDC and ref_diversity against a fixed random subset of them
    as large as the sample set (seed), diversity of the samples. Adds feature_space (the kind used)."""
    data, data_key = reference_points(dataset, latent, seed)
    idx = reference_subset(len(data), len(samples), seed)
    prdc_ref = _cached(dataset, (extractor.key, data_key, "subset", len(idx), seed), lambda: extractor(data[idx]))
    if ref_stats_path:
        ref_feats, ref_stats = None, load_reference_stats(ref_stats_path, prdc_ref.shape[1])
    else:
        ref_feats, ref_stats = _cached(dataset, (extractor.key, data_key, "all"), lambda: extractor(data)), None
    return {"feature_space": extractor.name,
            **compare_features(extractor(samples), extractor.fd_key, ref_feats, ref_stats, prdc_ref, k)}


def dataset_fd(samples: torch.Tensor, dataset, extractor: FeatureExtractor, ref_stats_path: str = "",
               seed: int = 0, latent=None) -> float | None:
    """Only the Frechet distance of dataset_feature_metrics, in the extractor's space (e.g. Inception FID next to
    metrics in another space): the same cached reference features (or the statistics file) and the same rule
    for non-finite samples (dropped). None when fewer than two samples are finite."""
    gen = np.asarray(extractor(samples), dtype=np.float64)
    gen = gen[np.isfinite(gen).all(axis=1)]
    if len(gen) < 2:
        return None
    if ref_stats_path:
        ref_mu, ref_sigma = load_reference_stats(ref_stats_path, gen.shape[1])
    else:
        data, data_key = reference_points(dataset, latent, seed)
        ref_mu, ref_sigma = feature_stats(_cached(dataset, (extractor.key, data_key, "all"), lambda: extractor(data)))
    return frechet_distance(*feature_stats(gen), ref_mu, ref_sigma)
