"""Data loader benchmark: images/s of the DALI pipelines vs the torch DataLoader fallback on a synthetic folder.

A folder of JPEGs (smooth colour fields plus noise, so they compress like photographs rather than like white
noise) is written to a temporary directory, two class subfolders, at --source-size; each loader then decodes,
resizes (shorter side) and centre-crops them to --resolution, flips, normalises and delivers NCHW float32
batches on the device (CUDA when there is one). After --warmup batches (pipeline build, worker start) the next
--batches are timed, with a device synchronisation at the end.

Rows are appended to a CSV (default bench/results/loader.csv) tagged with device, torch / DALI / Pillow
versions, git commit and UTC date. Rows measured on a CPU are tagged is_claim=false: harness smoke runs, not
performance claims.

    fastonestep bench loader [--images 512] [--source-size 160x128] [--resolution 64] [--batch 64]
                             [--batches 20] [--workers 4] [--loaders torch,dali] [--out CSV]
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
import tempfile
import time

import numpy as np
import torch

from fastonestep.benchmark.kernels import _device_info, append_rows, git_commit

LOADER_KINDS = ("torch", "dali")
COLUMNS = ("loader", "images_per_sec", "seconds", "batches", "batch", "workers", "num_images", "source_size",
           "resolution", "device", "device_type", "torch", "dali", "pillow", "commit", "date", "is_claim", "status",
           "note")


def write_synthetic_folder(root: str, num_images: int, width: int, height: int, seed: int = 0) -> str:
    """num_images JPEGs (quality 90) in root/class0, root/class1."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    for i in range(num_images):
        folder = os.path.join(root, f"class{i % 2}")
        os.makedirs(folder, exist_ok=True)
        freq = rng.uniform(0.02, 0.2, size=(3, 2))
        phase = rng.uniform(0, 6.3, size=3)
        field = np.stack([np.sin(xx * fx + yy * fy + p) for (fx, fy), p in zip(freq, phase)], -1)
        pixels = np.clip(127.5 + 100 * field + rng.normal(0, 12, field.shape), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(os.path.join(folder, f"{i:07d}.jpg"), quality=90)
    return root


def _versions() -> dict:
    import PIL

    try:
        import nvidia.dali as dali

        dali_version = dali.__version__
    except Exception:  # noqa: BLE001 - not installed or broken: recorded as such
        dali_version = "none"
    return {"torch": torch.__version__, "dali": dali_version, "pillow": PIL.__version__}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_loader(kind: str, dataset, batch: int, workers: int, device: torch.device, warmup: int,
                batches: int) -> tuple[float, float]:
    """(seconds for `batches` batches after `warmup`, images/s)."""
    if kind == "dali":
        from fastonestep.data.dali import DaliLoader as cls
    else:
        from fastonestep.data.torch_loader import TorchLoader as cls
    loader = cls(dataset, batch, seed=0, device=device, workers=workers, flip=True)
    try:
        for _ in range(warmup):
            loader.next()
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(batches):
            x, _ = loader.next()
        _sync(device)
        seconds = time.perf_counter() - t0
    finally:
        loader.close()
    assert x.shape == (batch, *dataset.shape)
    return seconds, batches * batch / seconds


def run(num_images: int = 512, source_size=(160, 128), resolution: int = 64, batch: int = 64, batches: int = 20,
        warmup: int = 2, workers: int = 4, loaders=LOADER_KINDS, out_csv="bench/results/loader.csv",
        device=None, log=print) -> list[dict]:
    from fastonestep.data.dali import dali_available
    from fastonestep.data.files import scan_image_folder

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    name, device_type = _device_info(device)
    tags = {"device": name, "device_type": device_type, **_versions(), "commit": git_commit(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "is_claim": "true" if device_type == "cuda" else "false"}
    rows = []
    with tempfile.TemporaryDirectory(prefix="fastonestep-loader-bench-") as root:
        t0 = time.perf_counter()
        write_synthetic_folder(root, num_images, *source_size)
        log(f"wrote {num_images} JPEGs of {source_size[0]}x{source_size[1]} in {time.perf_counter() - t0:.1f}s; "
            f"device {name}")
        dataset = scan_image_folder(root, resolution)
        for kind in loaders:
            row = {"loader": kind, "batches": batches, "batch": batch, "workers": workers, "num_images": num_images,
                   "source_size": f"{source_size[0]}x{source_size[1]}", "resolution": resolution, **tags}
            ok, reason = dali_available() if kind == "dali" else (True, "")
            if not ok:
                rows.append({**row, "status": "skipped", "note": reason})
                log(f"{kind:>6}: skipped ({reason})")
                continue
            seconds, rate = time_loader(kind, dataset, batch, workers, device, warmup, batches)
            rows.append({**row, "seconds": f"{seconds:.4f}", "images_per_sec": f"{rate:.1f}", "status": "ok",
                         "note": "" if device_type == "cuda" else "CPU smoke run, not a performance claim"})
            log(f"{kind:>6}: {rate:9.1f} images/s ({batches} batches of {batch} at {resolution}px, "
                f"{workers} workers, {seconds:.2f}s)")
    if out_csv:
        append_rows(out_csv, rows, COLUMNS)
        log(f"appended {len(rows)} rows to {out_csv}")
    return rows


def _size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT, e.g. 160x128; got {text!r}") from None
    if w <= 0 or h <= 0:
        raise argparse.ArgumentTypeError(f"sizes must be positive, got {text!r}")
    return w, h


def _positive(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastonestep bench loader",
                                description="images/s of the DALI and torch DataLoader loaders on a synthetic "
                                            "JPEG folder; appends CSV rows. Only GPU rows are performance claims.")
    p.add_argument("--images", type=_positive, default=512, help="synthetic images to write (default %(default)s)")
    p.add_argument("--source-size", type=_size, default=(160, 128), help="WIDTHxHEIGHT of the JPEGs (default 160x128)")
    p.add_argument("--resolution", type=_positive, default=64, help="output resolution (default %(default)s)")
    p.add_argument("--batch", type=_positive, default=64, help="batch size (default %(default)s)")
    p.add_argument("--batches", type=_positive, default=20, help="timed batches (default %(default)s)")
    p.add_argument("--warmup", type=int, default=2, help="untimed batches first (default %(default)s)")
    p.add_argument("--workers", type=int, default=4,
                   help="torch: DataLoader worker processes; dali: CPU threads (default %(default)s)")
    p.add_argument("--loaders", default="torch,dali", help="comma list of torch,dali (default %(default)s)")
    p.add_argument("--out", default="bench/results/loader.csv", help="CSV to append to (default %(default)s)")
    p.add_argument("--device", help="cpu | cuda (default: cuda when available)")
    return p


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "loader":
        argv = argv[1:]
    args = build_parser().parse_args(argv)
    loaders = [v.strip() for v in args.loaders.split(",") if v.strip()]
    unknown = [v for v in loaders if v not in LOADER_KINDS]
    if unknown or not loaders:
        raise ValueError(f"--loaders: unknown {', '.join(unknown) or '(empty)'}; choose from {', '.join(LOADER_KINDS)}")
    if args.workers < 0 or args.warmup < 0:
        raise ValueError("--workers and --warmup must be >= 0")
    if args.images < args.batch:
        raise ValueError(f"--images {args.images} is fewer than one --batch {args.batch}")
    run(args.images, args.source_size, args.resolution, args.batch, args.batches, args.warmup, args.workers,
        loaders, args.out, args.device)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except ValueError as err:
        print(f"fastonestep bench loader: error: {err}", file=sys.stderr)
        sys.exit(2)
