"""Evaluation of a trained method: generate with fixed seeds, write samples.png and the metrics.

Toys: energy distance, MMD, mode coverage / high-quality fraction and log-likelihood under the true density.
MNIST: "MNIST FD" (Frechet distance in the features of the project's own small MNIST classifier; not FID)
and class coverage. Any image data: the standard Inception FID when eval.inception names a local weights
file (against eval.fid_ref statistics, or the training images). Latent data: the same, on the latents decoded
by eval.vae (fastonestep.eval.latent_eval).

When no metric applies (e.g. latents without eval.vae and eval.inception, large images without
eval.inception), the final evaluation generates only the eval.grid^2 samples of samples.png, not
eval.num_samples, and logs why: 50k samples that nothing measures would only cost time.
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


def latent_eval(dataset, eval_cfg, data_cfg):
    """The LatentEval of latent data (scale and bias of data_cfg, eval.vae), None for other data."""
    if not getattr(dataset, "is_latent", False):
        return None
    if data_cfg is None:
        raise ValueError("evaluating latent data needs the data config (data.latent_scale, data.latent_bias): "
                         "pass data_cfg")
    from fastonestep.eval.latent_eval import LatentEval

    return LatentEval.from_configs(data_cfg, eval_cfg)


def sample_features(dataset, eval_cfg, data_cfg=None, device=None):
    """The extractor of eval.features for this data's samples (latents decoded by eval.vae where needed)."""
    from fastonestep.eval.features import make_sample_features

    return make_sample_features(getattr(eval_cfg, "features", "auto"), dataset.shape,
                                getattr(eval_cfg, "inception", ""), device, latent_eval(dataset, eval_cfg, data_cfg))


def sample_metrics(samples: torch.Tensor, dataset, eval_cfg=None, data_cfg=None, device=None) -> dict:
    """Toys: toy_metrics against reference points drawn with EVAL_SEED. MNIST: mnist_fd and class coverage.
    Inception FID when eval.inception is set. Plus, in the feature space eval.features picks
    (fastonestep.eval.features): the FD under that space's key (mnist_fd | fid | raw_fd), precision, recall,
    density, coverage (k = eval.prdc_k) and diversity, with ref_diversity of real data for scale.
    Latent data need data_cfg (their scale and bias); device: where Inception and the VAE run."""
    from fastonestep.eval.features import dataset_feature_metrics, make_sample_features

    inception = getattr(eval_cfg, "inception", "")
    fid_ref = getattr(eval_cfg, "fid_ref", "")
    latent = latent_eval(dataset, eval_cfg, data_cfg)
    in_memory = getattr(dataset, "data", None) is not None
    metrics = {}
    if dataset.distribution is not None:
        from fastonestep.eval.toy_metrics import toy_metrics

        metrics.update(toy_metrics(samples, dataset.distribution, generator=torch.Generator().manual_seed(EVAL_SEED)))
    extractor = sample_features(dataset, eval_cfg, data_cfg, device)
    if extractor is not None and in_memory:
        metrics.update(dataset_feature_metrics(samples, dataset, extractor, getattr(eval_cfg, "prdc_k", 5),
                                               fid_ref if extractor.name == "inception" else "", seed=EVAL_SEED,
                                               latent=latent))
    if dataset.name == "mnist":
        from fastonestep.eval.mnist_features import class_coverage, get_mnist_classifier, mnist_fd

        model = get_mnist_classifier()
        finite = samples[torch.isfinite(samples.flatten(1)).all(1)]  # as compare_features drops them
        if "mnist_fd" not in metrics and len(finite) >= 2:  # other features were chosen: keep the MNIST FD anyway
            metrics["mnist_fd"] = float(mnist_fd(finite, dataset.data, model=model))
        if len(finite):
            metrics.update(class_coverage(model, finite))
    if inception and "fid" not in metrics and (in_memory or fid_ref):  # FID besides another feature space
        from fastonestep.eval.features import dataset_fd

        fid_features = make_sample_features("inception", dataset.shape, inception, device, latent)
        fid = dataset_fd(samples, dataset, fid_features, fid_ref, seed=EVAL_SEED, latent=latent)
        if fid is not None:
            metrics["fid"] = float(fid)
    return metrics


def unmeasured_reason(dataset, eval_cfg, data_cfg=None) -> str:
    """Why sample_metrics would measure nothing but the sample count for this data and config; "" when some
    metric applies. Loads no model (check_eval_settings has vetted the settings)."""
    from fastonestep.eval.features import resolve_kind

    if dataset.distribution is not None or dataset.name == "mnist":
        return ""
    latent = latent_eval(dataset, eval_cfg, data_cfg)
    kind, inception = getattr(eval_cfg, "features", "auto"), getattr(eval_cfg, "inception", "")
    in_memory = getattr(dataset, "data", None) is not None
    shape = dataset.shape if latent is None or not latent.vae or kind == "raw" else latent.image_shape(dataset.shape)
    if in_memory and resolve_kind(kind, shape, inception) is not None:
        return ""
    if inception and (in_memory or getattr(eval_cfg, "fid_ref", "")) and (latent is None or latent.vae):
        return ""
    if latent is not None:
        return (f"no metric applies to latent samples of shape {tuple(dataset.shape)}: FID needs eval.vae (the "
                "AutoencoderKL the data were encoded with), eval.inception (FID Inception weights) and, for "
                "streamed data, eval.fid_ref (reference statistics)")
    return (f"no metric applies to samples of shape {tuple(dataset.shape)}: set eval.inception (FID; with "
            "eval.fid_ref for streamed data) or eval.features=raw")


def write_samples_png(samples: torch.Tensor, dataset, path: str, grid: int, latent=None, device=None) -> None:
    """A scatter plot of points, or a grid of images: latents are decoded first when latent.vae is set."""
    if samples.ndim == 2:
        save_scatter(samples[:4000], dataset.data[:4000], path)
        return
    shown = samples[: grid * grid]
    if latent is not None and latent.vae:
        from fastonestep.data.latents import decode_latents
        from fastonestep.eval.latent_eval import _vae_model

        vae = _vae_model(latent.vae, str(device or ("cuda" if torch.cuda.is_available() else "cpu")))
        shown = decode_latents(vae, shown, latent.scale, latent.bias, latent.batch_size)
    save_image_grid(shown, path, nrow=grid)


def evaluate(method, dataset, cfg, run_dir: str, progress=print, on_samples=None) -> dict:
    """Runs every sampler of the method; the first one is the run's model and gives samples.png.
    on_samples(name, samples), if given, sees every generated set (e.g. to save its feature statistics)."""
    device = method.device
    metrics = {}
    known = method.known_metrics()
    latent = latent_eval(dataset, cfg.eval, cfg.data)
    skipped = unmeasured_reason(dataset, cfg.eval, cfg.data)
    num = min(cfg.eval.num_samples, cfg.eval.grid ** 2) if skipped else cfg.eval.num_samples
    if skipped:
        progress(f"eval: {skipped}; generating {num} samples per sampler for the sample grids only, "
                 f"not eval.num_samples={cfg.eval.num_samples}")
    for i, (name, sampler) in enumerate(method.samplers().items()):
        if name in known:
            metrics[name] = known[name]
            progress(f"eval {name}: taken from {known[name].get('measured_in', 'an earlier run')}")
            continue
        t0 = time.perf_counter()
        samples = generate(sampler, num, dataset.shape, method.num_classes, device, cfg.eval.batch_size)
        gen_time = time.perf_counter() - t0
        if on_samples is not None:
            on_samples(name, samples)
        png = "samples.png" if i == 0 else f"samples_{name}.png"
        write_samples_png(samples, dataset, os.path.join(run_dir, png), cfg.eval.grid, latent, device)
        metrics[name] = {**sample_metrics(samples, dataset, cfg.eval, cfg.data, device), "num_samples": num,
                         "generation_seconds": gen_time}
        if skipped:
            metrics[name]["not_measured"] = skipped
        progress(f"eval {name}: " + ", ".join(f"{k}={v:.4g}" for k, v in metrics[name].items()
                                                if isinstance(v, (int, float))))
    return metrics
