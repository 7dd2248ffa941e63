"""Evaluation of a trained method: generate with fixed seeds, write samples.png and the metrics.

Toys: energy distance, MMD, mode coverage / high-quality fraction and log-likelihood under the true density.
MNIST: "MNIST FD" (Frechet distance in the features of the project's own small MNIST classifier; not FID)
and class coverage. Any image data: the standard Inception FID when eval.inception names a local weights
file (against eval.fid_ref statistics, or the training images).
"""
from __future__ import annotations

import os
import time

import torch

from fastonestep.engine.images import save_image_grid, save_scatter

EVAL_SEED = 1234  # evaluation noise is fixed, so metrics of different runs compare like for like


def fixed_noise(n: int, shape, device, seed: int = EVAL_SEED) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn((n, *shape), generator=g).to(device)


def fixed_labels(n: int, num_classes: int, device):
    if not num_classes:
        return None
    return (torch.arange(n) % num_classes).to(device)


@torch.no_grad()
def generate(sampler, n: int, shape, num_classes: int, device, batch_size: int, seed: int = EVAL_SEED):
    noise = fixed_noise(n, shape, device, seed)
    labels = fixed_labels(n, num_classes, device)
    chunks = []
    for i in range(0, n, batch_size):
        lab = None if labels is None else labels[i:i + batch_size]
        chunks.append(sampler(noise[i:i + batch_size], lab).float().cpu())
    return torch.cat(chunks)


def sample_metrics(samples: torch.Tensor, dataset, eval_cfg=None) -> dict:
    """Toys: toy_metrics against reference points drawn with EVAL_SEED. MNIST: mnist_fd and class coverage.
    Inception FID when eval.inception is set. Plus, in the feature space eval.features picks
    (fastonestep.eval.features): the FD under that space's key (mnist_fd | fid | raw_fd), precision, recall,
    density, coverage (k = eval.prdc_k) and diversity, with ref_diversity of real data for scale."""
    from fastonestep.eval.features import dataset_feature_metrics, make_features

    inception = getattr(eval_cfg, "inception", "")
    fid_ref = getattr(eval_cfg, "fid_ref", "")
    metrics = {}
    if dataset.distribution is not None:
        from fastonestep.eval.toy_metrics import toy_metrics

        metrics.update(toy_metrics(samples, dataset.distribution, generator=torch.Generator().manual_seed(EVAL_SEED)))
    extractor = make_features(getattr(eval_cfg, "features", "auto"), dataset.shape, inception)
    if extractor is not None and getattr(dataset, "data", None) is not None:
        metrics.update(dataset_feature_metrics(samples, dataset, extractor, getattr(eval_cfg, "prdc_k", 5),
                                               fid_ref if extractor.name == "inception" else "", seed=EVAL_SEED))
    if dataset.name == "mnist":
        from fastonestep.eval.mnist_features import class_coverage, get_mnist_classifier, mnist_fd

        model = get_mnist_classifier()
        finite = samples[torch.isfinite(samples.flatten(1)).all(1)]  # as compare_features drops them
        if "mnist_fd" not in metrics and len(finite) >= 2:  # other features were chosen: keep the MNIST FD anyway
            metrics["mnist_fd"] = float(mnist_fd(finite, dataset.data, model=model))
        if len(finite):
            metrics.update(class_coverage(model, finite))
    if inception and "fid" not in metrics:  # FID besides another feature space: the cached model, on the GPU
        from fastonestep.eval.features import dataset_fd

        fid = dataset_fd(samples, dataset, make_features("inception", dataset.shape, inception), fid_ref)
        if fid is not None:
            metrics["fid"] = float(fid)
    return metrics


def write_samples_png(samples: torch.Tensor, dataset, path: str, grid: int) -> None:
    if samples.ndim == 2:
        save_scatter(samples[:4000], dataset.data[:4000], path)
    else:
        save_image_grid(samples[: grid * grid], path, nrow=grid)


def evaluate(method, dataset, cfg, run_dir: str, progress=print, on_samples=None) -> dict:
    """Runs every sampler of the method; the first one is the run's model and gives samples.png.
    on_samples(name, samples), if given, sees every generated set (e.g. to save its feature statistics)."""
    device = method.device
    metrics = {}
    known = method.known_metrics()
    for i, (name, sampler) in enumerate(method.samplers().items()):
        if name in known:
            metrics[name] = known[name]
            progress(f"eval {name}: taken from {known[name].get('measured_in', 'an earlier run')}")
            continue
        t0 = time.perf_counter()
        samples = generate(sampler, cfg.eval.num_samples, dataset.shape, method.num_classes, device,
                           cfg.eval.batch_size)
        gen_time = time.perf_counter() - t0
        if on_samples is not None:
            on_samples(name, samples)
        if i == 0:
            write_samples_png(samples, dataset, os.path.join(run_dir, "samples.png"), cfg.eval.grid)
        else:
            write_samples_png(samples, dataset, os.path.join(run_dir, f"samples_{name}.png"), cfg.eval.grid)
        metrics[name] = {**sample_metrics(samples, dataset, cfg.eval), "num_samples": cfg.eval.num_samples,
                         "generation_seconds": gen_time}
        progress(f"eval {name}: " + ", ".join(f"{k}={v:.4g}" for k, v in metrics[name].items()
                                                if isinstance(v, (int, float))))
    return metrics
