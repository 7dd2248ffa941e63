"""One factory for every data loader, chosen by config key `data.loader`.

Every loader has the same interface: `next() -> (x, labels or None)` with x on the loader's device,
`state_dict()` / `load_state_dict()` (the data position: epoch, index within the epoch, shuffle seed; a
resume draws exactly the batches an uninterrupted run would) and a constructor taking (rank, world_size):
rank r reads its own disjoint slice of every epoch's permutation (fastonestep.data.order).

- "memory": EpochLoader over a dataset held in memory (toys, MNIST, .npz, small folders).
- "torch":  torch DataLoader streaming image folders (PIL) or latent files (numpy).
- "dali":   NVIDIA DALI pipelines over the same files (GPU decode when CUDA is there, CPU mode otherwise).
- "auto":   memory for toys, MNIST, .npz files and folders whose decoded size is at most AUTO_MEMORY_BYTES;
            otherwise dali when nvidia.dali imports, else torch.

Latent datasets (data.kind=latent) store VAE posterior moments; the loader returned here wraps the reader in
fastonestep.data.latents.LatentSampling, so what `next()` yields is already the clean latent
(mean + std * z) * data.latent_scale + data.latent_bias that methods train on.
"""
from __future__ import annotations

import os

import numpy as np

from .datasets import TensorDataset, make_dataset
from .errors import DataError
from .files import FileDataset, scan_image_folder, scan_latent_folder

LOADERS = ("auto", "memory", "torch", "dali")
AUTO_MEMORY_BYTES = 1 << 30  # "auto" keeps a folder in memory when its float32 tensors fit in 1 GiB


def _is_streamable(kind: str, path: str) -> bool:
    return kind == "latent" or (kind == "folder" and os.path.isdir(path))


def _scan(data_cfg) -> FileDataset:
    if data_cfg.kind == "latent":
        return scan_latent_folder(data_cfg.path, data_cfg.size)
    return scan_image_folder(data_cfg.path, data_cfg.resolution, data_cfg.size)


def _stored_bytes(dataset: FileDataset) -> int:
    return len(dataset) * int(np.prod(dataset.stored_shape)) * 4


def resolve_loader(data_cfg, dataset=None) -> str:
    """The loader kind ("memory" | "torch" | "dali") that data.loader resolves to for this data config."""
    from .dali import dali_available

    choice = data_cfg.loader
    if choice not in LOADERS:
        raise DataError(f"config key 'data.loader' must be one of {', '.join(LOADERS)}; got {choice!r}")
    streamable = _is_streamable(data_cfg.kind, data_cfg.path)
    if data_cfg.kind in ("folder", "latent") and data_cfg.path and not os.path.exists(data_cfg.path):
        raise DataError(f"config key 'data.path': {data_cfg.path!r} does not exist")
    if choice != "auto":
        if choice != "memory" and not streamable:
            raise DataError(f"config key 'data.loader' is {choice!r}, which streams image folders and latent "
                            f"datasets; data.kind={data_cfg.kind!r} (path {data_cfg.path!r}) is loaded in memory: "
                            "use data.loader=memory or auto")
        return choice
    if isinstance(dataset, TensorDataset) or not streamable:
        return "memory"
    if isinstance(dataset, FileDataset) and _stored_bytes(dataset) <= AUTO_MEMORY_BYTES:
        return "memory"
    return "dali" if dali_available()[0] else "torch"


def open_dataset(cfg):
    """The dataset object for a config: a TensorDataset when the resolved loader is "memory", else a
    FileDataset (file list and metadata; nothing decoded)."""
    d = cfg.data
    if _is_streamable(d.kind, d.path):
        files = _scan(d)
        if resolve_loader(d, files) != "memory":
            return files
    elif d.loader not in ("auto", "memory"):
        resolve_loader(d)  # raises the explanation
    return make_dataset(d.kind, name=d.name, path=d.path, resolution=d.resolution, size=d.size, seed=cfg.seed)


def _flip(cfg, dataset) -> bool:
    """data.xflip applies to image folders (directories), never to toys, MNIST, arrays or latents."""
    return bool(cfg.data.xflip) and cfg.data.kind == "folder" and os.path.isdir(cfg.data.path)


def make_loader(cfg, dataset_or_path, device, rank: int = 0, world_size: int = 1):
    """A loader for `dataset_or_path` (a TensorDataset, a FileDataset, or a path read as cfg.data.kind)."""
    from fastonestep.engine.loader import EpochLoader

    dataset = dataset_or_path
    if isinstance(dataset, (str, os.PathLike)):
        dataset = open_dataset(_with_path(cfg, str(dataset)))
    # Each rank reads its contiguous slice of every global batch of train.batch_size (data/order.py).
    batch, seed, flip = cfg.train.batch_size // world_size, cfg.seed, _flip(cfg, dataset)
    if isinstance(dataset, TensorDataset):
        if cfg.data.loader not in ("auto", "memory"):
            raise DataError(f"config key 'data.loader' is {cfg.data.loader!r} but the dataset is held in memory "
                            "(open it with fastonestep.data.loaders.open_dataset)")
        loader = EpochLoader(dataset.data, dataset.labels, batch, seed, device, rank, world_size, flip=flip)
    elif isinstance(dataset, FileDataset):
        kind = resolve_loader(cfg.data, dataset)
        if kind == "memory":  # a small file dataset under "auto": read it into memory after all
            return make_loader(cfg, make_dataset(cfg.data.kind, path=dataset.root, resolution=cfg.data.resolution,
                                                 size=cfg.data.size, seed=seed), device, rank, world_size)
        if kind == "dali":
            from .dali import DaliLoader as cls
        else:
            from .torch_loader import TorchLoader as cls
        loader = cls(dataset, batch, seed, device, rank, world_size, workers=cfg.data.workers, flip=flip)
    else:
        raise TypeError(f"make_loader needs a TensorDataset, a FileDataset or a path, got {type(dataset).__name__}")
    if cfg.data.kind == "latent":
        from .latents import LatentSampling

        loader = LatentSampling(loader, cfg.data.latent_scale, cfg.data.latent_bias, seed=seed, rank=rank,
                                impl="auto" if cfg.train.kernels == "fused" else "torch", world_size=world_size)
    return loader


def _with_path(cfg, path: str):
    import copy

    cfg = copy.deepcopy(cfg)
    cfg.data.path = path
    return cfg
