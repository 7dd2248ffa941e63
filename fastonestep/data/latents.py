"""Latent datasets: VAE posterior moments on disk, latents sampled on the fly (EDM2 style).

Format written by `fastonestep dataset encode IMAGE_FOLDER --vae PATH --out DIR` (the layout EDM2 uses):

    DIR/00000/img-mean-std-00000000.npy   float32 (2C, H, W): posterior mean (C channels) then std (C)
    DIR/00000/img-mean-std-00000001.npy   ... 1000 files per subfolder
    DIR/dataset.json                      {"labels": [[file, label or null], ...], "class_names": [...] or null,
                                           "resolution", "latent_channels", "vae", "source", "format"}

Moments are the VAE's raw posterior (diffusers AutoencoderKL latent_dist.mean / .std, no scaling factor).
Training draws latent = (mean + std * z) * scale_c + bias_c every time a sample is used (config keys
data.latent_scale / data.latent_bias; the EDM2 defaults map SD-VAE latents to std 0.5), via
`sample_latents`, which runs the fused Triton kernel on CUDA when the run uses fused kernels.

How methods get latents: make_loader wraps the reader in `LatentSampling`, so next_batch() already returns
sampled, scaled latents and no method changes. A method that wants the one-pass fused path instead can take
the raw moments and call fastonestep.losses.add_noise(mean, alpha, sigma, latent_std=std,
latent_scale=scale, latent_bias=bias, return_x0=True), which returns (x_t, clean latent).
"""
from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import torch

from .errors import DataError

EDM2_RAW_MEAN = (5.81, 3.25, 0.12, -2.15)  # SD-VAE raw latent channel statistics (EDM2)
EDM2_RAW_STD = (4.17, 4.62, 3.71, 3.28)
EDM2_FINAL_STD = 0.5
EDM2_SCALE = tuple(EDM2_FINAL_STD / s for s in EDM2_RAW_STD)
EDM2_BIAS = tuple(-m * k for m, k in zip(EDM2_RAW_MEAN, EDM2_SCALE))
FORMAT = "fastonestep-latents-v1 (EDM2 img-mean-std layout)"
ENCODE_PROGRESS = "encode-progress.json"  # an encode's inputs, while it runs (dataset.json comes last)
FILES_PER_FOLDER = 1000


def latent_file_name(i: int) -> str:
    return f"{i // FILES_PER_FOLDER:05d}/img-mean-std-{i:08d}.npy"


def _channel_vector(values, channels: int, key: str, device) -> torch.Tensor:
    v = torch.as_tensor(list(values) if not torch.is_tensor(values) else values, dtype=torch.float32,
                        device=device).reshape(-1)
    if v.numel() not in (1, channels):
        raise DataError(f"config key '{key}' has {v.numel()} values; the latents have {channels} channels "
                        "(give one value per channel)")
    return v.expand(channels).contiguous()


def split_moments(moments: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if moments.ndim < 2 or moments.shape[1] % 2:
        raise DataError(f"latent moments have shape {tuple(moments.shape)}; expected (N, 2C, ...): mean then std")
    return moments.chunk(2, dim=1)


def sample_latents(moments: torch.Tensor, scale=None, bias=None, generator: torch.Generator | None = None, *,
                   seed: int | None = None, z: torch.Tensor | None = None, impl: str = "auto") -> torch.Tensor:
    """(mean + std * z) * scale_c + bias_c from moments (N, 2C, H, W) = [mean; std], z ~ N(0, 1).

    z is given, or comes from `seed`, or from a seed drawn from `generator`, or from torch's default generator
    (with a seed the fused kernel draws z itself and never stores it). impl as in
    fastonestep.losses ("auto": the fused Triton kernel for CUDA tensors when available, else the eager
    reference); the z drawn for a seed differs between implementations but is reproducible within one."""
    from fastonestep import losses
    from fastonestep.kernels import reference

    mean, std = split_moments(moments)
    c = mean.shape[1]
    scale_v = None if scale is None else _channel_vector(scale, c, "data.latent_scale", mean.device)
    bias_v = None if bias is None else _channel_vector(bias, c, "data.latent_bias", mean.device)
    if z is not None and tuple(z.shape) != tuple(mean.shape):
        raise ValueError(f"z has shape {tuple(z.shape)}; the latents have {tuple(mean.shape)}")
    if seed is None and z is None:
        seed = int(torch.randint(0, 2**62, (1,), generator=generator).item())
    if losses.resolve_impl(impl, mean.device) == "triton":
        from fastonestep.kernels import triton_noise

        return triton_noise.sample_latents(mean, std, seed=seed, z=z, scale=scale_v, bias=bias_v)
    return reference.latent_sample(mean, std, z, scale_v, bias_v, seed)


def _batch_seed(seed: int, draw: int) -> int:
    """A distinct, reproducible z seed per (run seed, batch)."""
    return (seed * 1_000_000_007 + draw) % (2**62)


class LatentSampling:
    """Wraps a loader of moments; next() -> (sampled latents, labels). Its state is the inner loader's data
    position plus the number of batches drawn, so z resumes exactly too.

    Like every random draw of a step, z is drawn for the whole global batch (world_size x the local batch,
    from a generator seeded by (seed, batch number)) and each rank keeps its own rows: the latents, hence the
    run, do not depend on the number of processes."""

    def __init__(self, loader, scale, bias, seed: int, rank: int = 0, impl: str = "auto", world_size: int = 1):
        self.loader, self.scale, self.bias = loader, scale, bias
        self.seed, self.rank, self.world_size, self.impl = seed, rank, world_size, impl
        self.draws = 0
        self.kind = getattr(loader, "kind", "") + "+latent"
        self._vectors = {}  # (device, channels) -> (scale, bias) as device tensors, built once

    def _channel_vectors(self, device, channels: int):
        """scale and bias on `device`, copied there once: a copy of Python numbers to a GPU blocks the host,
        and this runs every step."""
        key = (device, channels)
        if key not in self._vectors:
            self._vectors[key] = tuple(
                None if v is None else _channel_vector(v, channels, f"data.latent_{name}", device)
                for v, name in ((self.scale, "scale"), (self.bias, "bias")))
        return self._vectors[key]

    def next(self):
        moments, labels = self.loader.next()
        n, c = moments.shape[0], moments.shape[1] // 2
        scale, bias = self._channel_vectors(moments.device, c)
        g = torch.Generator(device=moments.device).manual_seed(_batch_seed(self.seed, self.draws))
        z = torch.randn((n * self.world_size, c, *moments.shape[2:]), generator=g, device=moments.device)
        x = sample_latents(moments, scale, bias, z=z.narrow(0, self.rank * n, n), impl=self.impl)
        self.draws += 1
        return x, labels

    def state_dict(self) -> dict:
        return {**self.loader.state_dict(), "latent_draws": self.draws}

    def load_state_dict(self, state: dict) -> None:
        self.loader.load_state_dict(state)
        self.draws = int(state.get("latent_draws", 0))

    def __getattr__(self, name):  # order, consumed, close, ... of the wrapped loader
        return getattr(self.loader, name)


# ---------------------------------------------------------------------------------------------------- VAE
def load_vae(path: str, device="cpu"):
    """diffusers AutoencoderKL from a local folder (save_pretrained layout); no downloads."""
    if not os.path.isdir(path):
        raise DataError(f"--vae {path!r} is not a folder (a diffusers AutoencoderKL saved with save_pretrained)")
    try:
        from diffusers import AutoencoderKL
    except ImportError as err:
        raise DataError(f"latent datasets need diffusers ({err}); pip install '.[latent]'") from err
    try:
        # low_cpu_mem_usage=False: the default wants `accelerate` and warns without it
        vae = AutoencoderKL.from_pretrained(path, local_files_only=True, low_cpu_mem_usage=False)
    except (OSError, ValueError, EnvironmentError) as err:
        raise DataError(f"cannot load an AutoencoderKL from {path!r}: {err}") from err
    return vae.to(device).eval().requires_grad_(False)


@torch.no_grad()
def encode_images(vae, images: torch.Tensor) -> torch.Tensor:
    """float32 (N, 2C, h, w) posterior [mean; std] of images in [-1, 1] (N, 3, H, W)."""
    dist = vae.encode(images.to(vae.device, vae.dtype)).latent_dist
    return torch.cat([dist.mean, dist.std], dim=1).float()


@torch.no_grad()
def decode_latents(vae, latents: torch.Tensor, scale=None, bias=None, batch_size: int = 32) -> torch.Tensor:
    """Images in [-1, 1] (N, 3, H, W) on the CPU from scaled latents (N, C, h, w): undo bias and scale, decode."""
    c = latents.shape[1]
    out = []
    for chunk in latents.split(batch_size):
        raw = chunk.to(vae.device, torch.float32)
        if bias is not None:
            raw = raw - _channel_vector(bias, c, "latent_bias", raw.device).view(1, -1, 1, 1)
        if scale is not None:
            raw = raw / _channel_vector(scale, c, "latent_scale", raw.device).view(1, -1, 1, 1)
        out.append(vae.decode(raw.to(vae.dtype)).sample.float().clamp(-1, 1).cpu())
    return torch.cat(out)


def _save_npy_atomic(path: str, array: np.ndarray) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp.npy"
    np.save(tmp, array)
    os.replace(tmp, path)


def encode_folder(image_folder: str, vae_path: str, out_dir: str, resolution: int = 512, batch_size: int = 32,
                  device=None, log=print) -> dict:
    """Encodes every image of `image_folder` (resized shorter side + centre crop to `resolution`, as the
    streaming loaders do) into DIR/.../img-mean-std-*.npy and writes DIR/dataset.json last. Re-running the
    same command skips files already written (a killed encode resumes). Returns the dataset.json content."""
    from fastonestep.engine.checkpoint import atomic_write_json

    from .files import images_to_tensor, read_image, scan_image_folder

    if batch_size <= 0:
        raise DataError(f"--batch must be positive, got {batch_size}")
    images = scan_image_folder(image_folder, resolution)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    vae = load_vae(vae_path, device)
    index_path = os.path.join(out_dir, "dataset.json")
    progress_path = os.path.join(out_dir, ENCODE_PROGRESS)
    meta = {"format": FORMAT, "source": os.path.abspath(image_folder), "vae": os.path.abspath(vae_path),
            "resolution": resolution, "class_names": images.class_names, "num_images": len(images),
            "files_sha256": _file_list_digest(image_folder, images.files)}
    # Files are matched to images by position, so an encode resumes only with the same inputs: the same VAE and
    # size, and the same image files (an added or removed image shifts every later one). A killed encode has
    # no dataset.json (written last) but the progress record written first.
    for path in (index_path, progress_path):
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                old = json.load(f)
            changed = [k for k in ("source", "vae", "resolution", "num_images", "files_sha256")
                       if k in old and old[k] != meta[k]]
            if changed:
                why = f"; {old['num_images']} images then, {len(images)} now" if "num_images" in changed else ""
                why += "; the image files changed" if "files_sha256" in changed and not why else ""
                raise DataError(f"{out_dir!r} holds latents of a different encode ({', '.join(changed)} {'differs' if len(changed) == 1 else 'differ'}"
                                f"{why}); use another --out, or the same inputs to resume")
    os.makedirs(out_dir, exist_ok=True)
    atomic_write_json(progress_path, meta)
    n = len(images)
    names = [latent_file_name(i) for i in range(n)]
    todo = [i for i in range(n) if not os.path.isfile(os.path.join(out_dir, names[i]))]
    log(f"encoding {len(todo)} of {n} images of {image_folder!r} at {resolution}px with {vae_path!r} on {device}")
    channels = None
    for start in range(0, len(todo), batch_size):
        chunk = todo[start:start + batch_size]
        pixels = [read_image(images.files[i], resolution, gray=False) for i in chunk]
        moments = encode_images(vae, images_to_tensor(pixels, None)).cpu().numpy()
        channels = moments.shape[1] // 2
        for i, m in zip(chunk, moments):
            save_moments(out_dir, i, m)
    if channels is None:  # everything was there already: read one file for the channel count
        channels = np.load(os.path.join(out_dir, names[0]), mmap_mode="r").shape[0] // 2
    labels = images.labels.tolist() if images.labels is not None else [None] * n
    write_latent_index(out_dir, meta, names, labels, channels)
    os.remove(progress_path)
    return meta


def save_moments(out_dir: str, index: int, moments: np.ndarray) -> str:
    """Writes image `index`'s float32 (2C, H, W) posterior [mean; std] where the dataset format puts it;
    returns its name relative to out_dir."""
    name = latent_file_name(index)
    _save_npy_atomic(os.path.join(out_dir, name), np.asarray(moments, dtype=np.float32))
    return name


def write_latent_index(out_dir: str, meta: dict, names: list[str], labels: list, channels: int) -> dict:
    """Completes `meta` with the channel count and the [file, label] list and writes it as DIR/dataset.json
    (last: its presence marks a finished dataset). Returns meta."""
    from fastonestep.engine.checkpoint import atomic_write_json

    meta.update(latent_channels=int(channels), labels=[[name, lab] for name, lab in zip(names, labels)])
    atomic_write_json(os.path.join(out_dir, "dataset.json"), meta)
    return meta


def _file_list_digest(folder: str, files: list[str]) -> str:
    """sha256 of the images' paths relative to `folder`, in encode order."""
    digest = hashlib.sha256()
    for file in files:
        digest.update(os.path.relpath(file, folder).encode("utf-8") + b"\0")
    return digest.hexdigest()


def latent_model_info(data_cfg) -> dict:
    """What model.safetensors records so `fastonestep sample --vae` can decode: the data are latents and how
    they were scaled."""
    return {"data_kind": "latent", "latent_scale": [float(v) for v in data_cfg.latent_scale],
            "latent_bias": [float(v) for v in data_cfg.latent_bias]}
