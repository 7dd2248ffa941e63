"""NVIDIA DALI pipelines for streamed data: image folders (decode, resize, crop, flip, normalise) and numpy
latents, with the interface and the batches of the torch fallback (fastonestep.data.torch_loader).

The file order is ours, not DALI's: an external_source asks for batch `start + iteration` of this rank's
EpochOrder and hands DALI the encoded file bytes (images) or the arrays (latents) and the flip flags. So
the samples, their order, sharding and flips equal the fallback's, and a resume just rebuilds the pipeline at
the saved batch number (skipped files are never read). File reads run in a small thread pool; decoding and
resizing run in DALI: on the GPU ("mixed" decoder, GPU resize / crop / normalise) when the loader's device is
CUDA, on the CPU (device_id=None) otherwise; only the device placement differs.

Geometry matches files.read_image: shorter side resized to the resolution (Lanczos 3, antialiased; DALI leaves
an image already at that size untouched), centre crop with the odd pixel before the window.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from .errors import DataError
from .files import FileDataset, read_moments, read_sample
from .order import EpochOrder


def dali_available() -> tuple[bool, str]:
    try:
        import nvidia.dali  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install
        return False, f"nvidia.dali cannot be imported ({type(exc).__name__}: {exc}); pip install '.[dali]'"
    return True, ""


def _read_bytes(file: str) -> np.ndarray:
    try:
        with open(file, "rb") as f:
            return np.frombuffer(f.read(), dtype=np.uint8)
    except OSError as err:
        raise DataError(f"cannot read image {file!r}: {err}") from err


class _BatchSource:
    """DALI external_source callable: batch_info.iteration -> the inputs of batch start + iteration."""

    def __init__(self, dataset: FileDataset, order: EpochOrder, start: int, pool: ThreadPoolExecutor):
        self.dataset, self.order, self.start, self.pool = dataset, order, start, pool

    def __call__(self, batch_info):
        _, idx, flips = self.order.batch(self.start + batch_info.iteration)
        files = [self.dataset.files[int(i)] for i in idx]
        if self.dataset.is_latent:
            shape = self.dataset.stored_shape
            return (list(self.pool.map(lambda f: read_moments(f, shape), files)),)
        encoded = list(self.pool.map(_read_bytes, files))
        mirror = np.zeros(len(idx), np.int32) if flips is None else flips.astype(np.int32)
        return encoded, [np.array(m, dtype=np.int32) for m in mirror]


def _build_pipeline(dataset: FileDataset, source: _BatchSource, batch_size: int, device_id, threads: int,
                    prefetch: int):
    from nvidia.dali import fn, pipeline_def, types

    gpu = device_id is not None

    @pipeline_def(batch_size=batch_size, num_threads=threads, device_id=device_id, prefetch_queue_depth=prefetch,
                  exec_dynamic=True)
    def pipeline():
        if dataset.is_latent:
            (moments,) = fn.external_source(source=source, num_outputs=1, batch=True, batch_info=True,
                                            dtype=types.FLOAT, ndim=3)
            return moments.gpu() if gpu else moments
        encoded, mirror = fn.external_source(source=source, num_outputs=2, batch=True, batch_info=True,
                                             dtype=[types.UINT8, types.INT32], ndim=[1, 0])
        channels = dataset.channels
        img = fn.decoders.image(encoded, device="mixed" if gpu else "cpu",
                                output_type=types.GRAY if channels == 1 else types.RGB)
        img = fn.resize(img, resize_shorter=dataset.resolution, interp_type=types.INTERP_LANCZOS3, antialias=True)
        return fn.crop_mirror_normalize(img, crop=(dataset.resolution, dataset.resolution), crop_pos_x=0.5,
                                        crop_pos_y=0.5, mirror=mirror, mean=[127.5] * channels,
                                        std=[127.5] * channels, output_layout="CHW", dtype=types.FLOAT)

    pipe = pipeline()
    pipe.build()
    return pipe


def _to_torch(tensor_list, device: torch.device) -> torch.Tensor:
    dense = tensor_list.as_tensor()
    if device.type == "cuda":
        from nvidia.dali.plugin.pytorch import feed_ndarray

        out = torch.empty(dense.shape(), dtype=torch.float32, device=device)
        feed_ndarray(dense, out, cuda_stream=torch.cuda.current_stream(device))
        return out
    return torch.from_numpy(np.array(dense))


class DaliLoader:
    kind = "dali"

    def __init__(self, dataset: FileDataset, batch_size: int, seed: int, device="cpu", rank: int = 0,
                 world_size: int = 1, workers: int = 0, flip: bool = False, prefetch: int = 2):
        ok, reason = dali_available()
        if not ok:
            raise DataError(f"config key 'data.loader' is 'dali' but {reason}")
        self.dataset, self.device = dataset, torch.device(device)
        self.batch_size, self.threads, self.prefetch = batch_size, max(1, workers), prefetch
        self.order = EpochOrder(len(dataset), batch_size, seed, rank, world_size,
                                flip=flip and not dataset.is_latent)
        self.consumed = 0
        self._pipe = None
        self._pool = ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="fastonestep-dali-read")

    def _start(self):
        if self.device.type == "cuda":
            device_id = self.device.index if self.device.index is not None else torch.cuda.current_device()
        else:
            device_id = None
        source = _BatchSource(self.dataset, self.order, self.consumed, self._pool)
        self._pipe = _build_pipeline(self.dataset, source, self.batch_size, device_id, self.threads, self.prefetch)

    def next(self):
        if self._pipe is None:
            self._start()
        try:
            (out,) = self._pipe.run()
        except RuntimeError as err:  # DALI's decode errors name a sample number, not the file
            raise self._failed_file(err) from err
        _, idx, _ = self.order.batch(self.consumed)  # the labels: same pure function of the batch number
        self.consumed += 1
        x = _to_torch(out, self.device)
        labels = self.dataset.labels
        y = None if labels is None else labels[torch.from_numpy(idx)].to(self.device, non_blocking=True)
        return x, y

    def _failed_file(self, err: Exception) -> DataError:
        """The file DALI failed on: the files of this batch and of those it reads ahead, re-read on the host
        until one fails (that DataError names it); else DALI's own message."""
        for k in range(self.consumed, self.consumed + self.prefetch + 1):
            for i in self.order.batch(k)[1]:
                try:
                    read_sample(self.dataset, int(i))
                except DataError as failed:
                    return failed
        return DataError(f"the DALI pipeline failed at batch {self.consumed}: {err}")

    def state_dict(self) -> dict:
        return {"kind": self.kind, **self.order.position_of(self.consumed)}

    def load_state_dict(self, state: dict) -> None:
        self.consumed = self.order.batches_done(state)
        self.close()  # rebuilt at the saved batch number on the next call

    def close(self) -> None:
        self._pipe = None  # DALI frees the pipeline's buffers when it is collected
