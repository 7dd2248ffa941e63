"""Data loader benchmark: images/s of the DALI pipelines, the torch DataLoader fallback and (where training
would use it) the in-memory loader, on a synthetic dataset; optionally against the training step's consumption.

Two kinds of data (--data):
- `images` (default): a folder of JPEGs (smooth colour fields plus noise, so they compress like photographs
  rather than like white noise), two class subfolders, at --source-size; the loaders decode, resize (shorter
  side) and centre-crop them to --resolution, flip, normalise and deliver NCHW float32 batches.
- `latents`: a latent dataset in exactly the layout `fastonestep dataset encode` writes (per image a float32
  .npy of the VAE posterior [mean; std], 2C x H x W, and dataset.json; fastonestep.data.latents), with
  random moments of --latent-shape C x H x W (4x64x64: ImageNet 512 through the SD-VAE). The loaders read the
  moments and, as in training, draw latent = (mean + std * z) * scale + bias on the device (EDM2 scaling).

Every loader is built the way training builds it (`open_dataset` + `make_loader` of a config with
data.loader set to it, train.kernels=fused as the ImageNet presets) and delivers its batches on the device
(CUDA when there is one). `--loaders auto` (the default) times torch and dali, plus memory when data.loader=auto
would keep this dataset in memory (up to AUTO_MEMORY_BYTES: true at the sizes used here; full ImageNet latents,
1.28M x 128 KiB, stream). After --warmup batches (pipeline build, worker start) the next --batches are timed,
with a device synchronisation at the end. The files are read from the page cache: this measures the pipelines,
not the disk.

`--step-csv PATH` compares each row with the training step's consumption measured by `fastonestep bench step`
(bench/results/step.csv): the fastest per-GPU data images/s (`data_images_per_s / world_size`: the step draws
several real batches per iteration; `images_per_s` for older rows without it) among its `ok` rows measured on
the same device type at the same latent shape (those of this commit when there are any), and records
loader / step against the target of TARGET_RATIO. The step trains on latents only, so images rows get no ratio.

Rows are appended to a CSV (default bench/results/loader.csv) tagged with the data kind, device, torch / DALI /
Pillow versions, git commit and UTC date. Rows measured on a CPU are tagged is_claim=false: harness smoke runs,
not performance claims.

    fastonestep bench loader [--data images|latents] [--images 512] [--source-size 160x128] [--resolution 64]
                             [--latent-shape 4x64x64] [--batch 64] [--batches 20] [--workers 4]
                             [--loaders auto|torch,dali,memory] [--step-csv CSV] [--out CSV]
"""
from __future__ import annotations

import argparse
import csv
import datetime
import os
import sys
import tempfile
import time
from dataclasses import replace

import numpy as np
import torch

from fastonestep.benchmark.kernels import _device_info, _one_line, append_rows, git_commit

DATA_KINDS = ("images", "latents")
LOADER_KINDS = ("torch", "dali", "memory")
STREAMING = ("torch", "dali")  # what `--loaders auto` always times; memory only where data.loader=auto picks it
TARGET_RATIO = 3.0  # the issue: the loader delivers at least 3x what the step consumes
COLUMNS = ("data", "loader", "images_per_sec", "seconds", "batches", "batch", "workers", "num_images", "source_size",
           "resolution", "sample_shape", "step_images_per_sec", "loader_over_step", "meets_target", "step_case",
           "device", "device_type", "torch", "dali", "pillow", "commit", "date", "is_claim", "status", "note")
CPU_NOTE = "CPU smoke run, not a performance claim"


# ---------------------------------------------------------------------------------------------- synthetic data
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


def _channel_stats(channels: int) -> tuple[np.ndarray, np.ndarray]:
    """SD-VAE raw latent statistics (EDM2) for 4 channels, standard ones otherwise."""
    from fastonestep.data.latents import EDM2_RAW_MEAN, EDM2_RAW_STD

    if channels == len(EDM2_RAW_MEAN):
        return np.array(EDM2_RAW_MEAN, np.float32), np.array(EDM2_RAW_STD, np.float32)
    return np.zeros(channels, np.float32), np.ones(channels, np.float32)


def write_synthetic_latents(root: str, num_images: int, shape=(4, 64, 64), seed: int = 0,
                            num_classes: int = 2) -> str:
    """A latent dataset of num_images random posteriors (mean around the SD-VAE channel statistics, small
    positive std) in the `fastonestep dataset encode` layout, labels i % num_classes. Returns root."""
    from fastonestep.data.latents import FORMAT, save_moments, write_latent_index

    channels, height, width = shape
    rng = np.random.default_rng(seed)
    mean_c, std_c = _channel_stats(channels)
    names = []
    for i in range(num_images):
        mean = mean_c[:, None, None] + std_c[:, None, None] * rng.standard_normal((channels, height, width))
        std = rng.uniform(0.01, 0.1, (channels, height, width))  # SD-VAE posteriors are narrow
        names.append(save_moments(root, i, np.concatenate([mean, std]).astype(np.float32)))
    meta = {"format": FORMAT, "source": "synthetic (fastonestep bench loader)", "vae": "none (random moments)",
            "resolution": 8 * height,  # an SD-VAE latent is 1/8 of the image side
            "class_names": [f"class{c}" for c in range(num_classes)], "num_images": num_images,
            "files_sha256": ""}
    write_latent_index(root, meta, names, [i % num_classes for i in range(num_images)], channels)
    return root


# ------------------------------------------------------------------------------------------------ the loaders
def bench_config(data: str, root: str, loader: str, batch: int, workers: int, resolution: int = 64):
    """The training config of this benchmark's data: what `open_dataset` and `make_loader` read."""
    from fastonestep.config import Config, validate

    cfg = Config()
    cfg.data.kind = "latent" if data == "latents" else "folder"
    cfg.data.path, cfg.data.resolution, cfg.data.loader, cfg.data.workers = root, resolution, loader, workers
    cfg.data.xflip = data == "images"  # flips apply to image folders only
    cfg.train.batch_size = batch
    cfg.train.kernels = "fused"  # as the ImageNet presets: latents are sampled by the fused kernel on CUDA
    return validate(cfg)


def with_loader(cfg, kind: str):
    """cfg with data.loader = kind (cfg itself unchanged)."""
    return replace(cfg, data=replace(cfg.data, loader=kind))


def auto_picks_memory(cfg) -> bool:
    """Whether data.loader=auto would keep this config's dataset in memory."""
    from fastonestep.data.files import scan_image_folder, scan_latent_folder
    from fastonestep.data.loaders import resolve_loader

    d = cfg.data
    files = scan_latent_folder(d.path) if d.kind == "latent" else scan_image_folder(d.path, d.resolution)
    return resolve_loader(with_loader(cfg, "auto").data, files) == "memory"


def choose_loaders(requested: list[str], cfg) -> list[str]:
    """The loaders to time: `auto` = torch and dali, plus memory where training would use it."""
    if requested != ["auto"]:
        return requested
    return [*STREAMING, "memory"] if auto_picks_memory(cfg) else list(STREAMING)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_loader(cfg, device: torch.device, warmup: int, batches: int) -> tuple[float, float, torch.Tensor]:
    """(seconds for `batches` batches after `warmup`, images/s, the last batch) of the loader training would
    build from cfg; building it (for memory: reading every file) is not timed."""
    from fastonestep.data.loaders import make_loader, open_dataset

    loader = make_loader(cfg, open_dataset(cfg), device)
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
        close = getattr(loader, "close", None)  # the in-memory loader holds no workers
        if close is not None:
            close()
    return seconds, batches * cfg.train.batch_size / seconds, x


def _versions() -> dict:
    import PIL

    try:
        import nvidia.dali as dali

        dali_version = dali.__version__
    except Exception:  # noqa: BLE001 - not installed or broken: recorded as such
        dali_version = "none"
    return {"torch": torch.__version__, "dali": dali_version, "pillow": PIL.__version__}


def _tags(device: torch.device) -> dict:
    name, device_type = _device_info(device)
    return {"device": name, "device_type": device_type, **_versions(), "commit": git_commit(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "is_claim": "true" if device_type == "cuda" else "false"}


def _shape_text(shape) -> str:
    return "x".join(str(int(v)) for v in shape)


def _wrong_batch(x: torch.Tensor, batch: int, sample_shape, device: torch.device) -> str:
    """Why x is not the float32 batch training expects on the device ('' when it is)."""
    expected = (batch, *sample_shape)
    if tuple(x.shape) != expected or x.dtype != torch.float32 or x.device.type != device.type:
        return (f"delivered {x.dtype} {tuple(x.shape)} on {x.device.type}, "
                f"expected torch.float32 {expected} on {device.type}")
    return ""


def measure(kind: str, cfg, sample_shape, device: torch.device, warmup: int, batches: int) -> dict:
    """One loader's row fields: status ok with the rate, skipped (DALI missing) or error (the loader failed or
    delivered something else than training expects)."""
    from fastonestep.data.dali import dali_available

    if kind == "dali":
        ok, reason = dali_available()
        if not ok:
            return {"status": "skipped", "note": f"DALI not installed: {reason}"}
    try:
        seconds, rate, x = time_loader(with_loader(cfg, kind), device, warmup, batches)
    except Exception as err:  # noqa: BLE001 - one failing loader must not cost the others their rows
        return {"status": "error", "note": _one_line(f"{type(err).__name__}: {err}")}
    wrong = _wrong_batch(x, cfg.train.batch_size, sample_shape, device)
    if wrong:
        return {"status": "error", "note": wrong}
    return {"seconds": f"{seconds:.4f}", "images_per_sec": f"{rate:.1f}", "status": "ok",
            "note": "" if device.type == "cuda" else CPU_NOTE}


# ------------------------------------------------------------------------------------------ against the step
def read_step_rows(path: str) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _number(text) -> float | None:
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value if value > 0 else None


def step_consumption(row: dict) -> tuple[float, str] | None:
    """(data images/s one GPU's loader must deliver, how it was read) of one step row; None without a rate."""
    world = _number(row.get("world_size")) or 1.0
    data_rate = _number(row.get("data_images_per_s"))
    if data_rate is not None:
        return data_rate / world, "data images/s"
    generator_rate = _number(row.get("images_per_s"))
    if generator_rate is not None:  # a row from before the step counted its real batches: a lower bound
        return generator_rate / world, "generator images/s (older step row; the step may draw more)"
    return None


def fastest_step(step_rows: list[dict], device_type: str, sample_shape: str, commit: str = "") -> dict | None:
    """The step row that consumes data fastest among ok rows on this device type at this latent shape; rows of
    `commit` (the loader's: measured in the same run) when there are any, so older results cannot decide."""
    candidates = [r for r in step_rows if r.get("status") == "ok" and r.get("device_type") == device_type
                  and r.get("latent_shape") == sample_shape and step_consumption(r) is not None]
    same_commit = [r for r in candidates if commit and r.get("commit") == commit]
    return max(same_commit or candidates, key=lambda r: step_consumption(r)[0], default=None)


def _step_label(row: dict) -> str:
    return (f"{row.get('method')}/{row.get('size')}/{row.get('backend')}x{row.get('world_size')}"
            f"/b{row.get('batch_per_gpu')} @{row.get('commit')} on {row.get('device')}")


def compare_with_step(row: dict, step_rows: list[dict]) -> dict:
    """The step-comparison fields of one loader row (empty ratio with a reason where there is none)."""
    if row.get("status") != "ok":
        return {}
    if row["data"] != "latents":
        return {"note": _join(row.get("note"), "no step ratio: the step benchmark trains on latents")}
    step = fastest_step(step_rows, row["device_type"], row["sample_shape"], row.get("commit", ""))
    if step is None:
        return {"note": _join(row.get("note"), f"no ok step row on {row['device_type']} at latents "
                                               f"{row['sample_shape']} to compare with")}
    rate, how = step_consumption(step)
    ratio = float(row["images_per_sec"]) / rate
    note = row.get("note")
    if "older" in how:
        note = _join(note, f"step rate is {how}")
    if step.get("is_claim") != "true":
        note = _join(note, "the step row is not a claim")
    return {"step_images_per_sec": f"{rate:.1f}", "loader_over_step": f"{ratio:.2f}",
            "meets_target": "true" if ratio >= TARGET_RATIO else "false", "step_case": _step_label(step),
            "note": note}


def _join(*parts) -> str:
    return "; ".join(p for p in parts if p)


# ---------------------------------------------------------------------------------------------------- the run
def write_dataset(data: str, root: str, num_images: int, source_size, latent_shape) -> str:
    if data == "latents":
        write_synthetic_latents(root, num_images, latent_shape)
        return f"{num_images} latent moment files of {_shape_text((2 * latent_shape[0], *latent_shape[1:]))}"
    write_synthetic_folder(root, num_images, *source_size)
    return f"{num_images} JPEGs of {source_size[0]}x{source_size[1]}"


def sample_shape(data: str, resolution: int, latent_shape) -> tuple[int, ...]:
    """One sample as training receives it: an RGB image, or a latent (not its 2C moments)."""
    return tuple(latent_shape) if data == "latents" else (3, resolution, resolution)


def _row_line(row: dict) -> str:
    kind = f"{row['data']}/{row['loader']}"
    if row["status"] != "ok":
        return f"{kind:>15}: {row['status']} ({row['note']})"
    line = (f"{kind:>15}: {float(row['images_per_sec']):9.1f} images/s ({row['batches']} batches of {row['batch']} "
            f"x {row['sample_shape']}, {row['workers']} workers, {float(row['seconds']):.2f}s)")
    if row.get("loader_over_step"):
        verdict = "meets" if row["meets_target"] == "true" else "MISSES"
        line += (f"; {row['loader_over_step']}x the step's {row['step_images_per_sec']} images/s per GPU "
                 f"({row['step_case']}): {verdict} the {TARGET_RATIO:g}x target")
    return line + (f" [{row['note']}]" if row.get("note") else "")


def run(num_images: int = 512, source_size=(160, 128), resolution: int = 64, batch: int = 64, batches: int = 20,
        warmup: int = 2, workers: int = 4, loaders=("auto",), out_csv="bench/results/loader.csv",
        device=None, log=print, data: str = "images", latent_shape=(4, 64, 64), step_csv: str | None = None
        ) -> list[dict]:
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    tags = _tags(device)
    step_rows = _load_step_rows(step_csv, log) if step_csv else None
    rows = []
    with tempfile.TemporaryDirectory(prefix="fastonestep-loader-bench-") as root:
        t0 = time.perf_counter()
        what = write_dataset(data, root, num_images, source_size, latent_shape)
        log(f"wrote {what} in {time.perf_counter() - t0:.1f}s; device {tags['device']}")
        cfg = bench_config(data, root, "auto", batch, workers, resolution)
        shape = sample_shape(data, resolution, latent_shape)
        for kind in choose_loaders(list(loaders), cfg):
            row = {"data": data, "loader": kind, "batches": batches, "batch": batch, "workers": workers,
                   "num_images": num_images, "source_size": f"{source_size[0]}x{source_size[1]}" if data == "images"
                   else "", "resolution": resolution if data == "images" else 8 * latent_shape[1],
                   "sample_shape": _shape_text(shape), **tags}
            row.update(measure(kind, cfg, shape, device, warmup, batches))
            if step_rows is not None:
                row.update(compare_with_step(row, step_rows))
            rows.append(row)
            log(_row_line(row))
            if out_csv:  # row by row: a run cut by a time limit keeps what it measured
                append_rows(out_csv, [row], COLUMNS)
    if out_csv:
        log(f"appended {len(rows)} rows to {out_csv}")
    return rows


def _load_step_rows(path: str, log) -> list[dict]:
    """The step CSV's rows; a missing file leaves the rows without a ratio (said so) rather than failing."""
    if not os.path.isfile(path):
        log(f"WARNING: --step-csv {path!r} does not exist: no loader/step ratios")
        return []
    return read_step_rows(path)


# ---------------------------------------------------------------------------------------------------- the CLI
def _dims(text: str, count: int, example: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {example}; got {text!r}") from None
    if len(values) != count or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"expected {count} positive sizes like {example}; got {text!r}")
    return values


def _size(text: str) -> tuple[int, int]:
    return _dims(text, 2, "WIDTHxHEIGHT, e.g. 160x128")


def _latent_shape(text: str) -> tuple[int, int, int]:
    return _dims(text, 3, "CxHxW, e.g. 4x64x64")


def _positive(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastonestep bench loader",
                                description="images/s of the DALI, torch DataLoader and in-memory loaders on a "
                                            "synthetic JPEG folder or latent dataset; appends CSV rows. Only GPU "
                                            "rows are performance claims.")
    p.add_argument("--data", choices=DATA_KINDS, default="images",
                   help="images: JPEG folder; latents: `dataset encode` layout (default %(default)s)")
    p.add_argument("--images", type=_positive, default=512, help="synthetic samples to write (default %(default)s)")
    p.add_argument("--source-size", type=_size, default=(160, 128), help="images: WIDTHxHEIGHT of the JPEGs "
                                                                         "(default 160x128)")
    p.add_argument("--resolution", type=_positive, default=64, help="images: output resolution (default %(default)s)")
    p.add_argument("--latent-shape", type=_latent_shape, default=(4, 64, 64),
                   help="latents: CxHxW of a latent (default 4x64x64, ImageNet 512 through the SD-VAE)")
    p.add_argument("--batch", type=_positive, default=64, help="batch size (default %(default)s)")
    p.add_argument("--batches", type=_positive, default=20, help="timed batches (default %(default)s)")
    p.add_argument("--warmup", type=int, default=2, help="untimed batches first (default %(default)s)")
    p.add_argument("--workers", type=int, default=4,
                   help="torch: DataLoader worker processes; dali: CPU threads (default %(default)s)")
    p.add_argument("--loaders", default="auto",
                   help="auto (torch, dali, and memory where data.loader=auto picks it) or a comma list of "
                        "torch,dali,memory (default %(default)s)")
    p.add_argument("--step-csv", help="`bench step` results (e.g. bench/results/step.csv): record each latents "
                                      f"row's ratio to the step's consumption (target {TARGET_RATIO:g}x)")
    p.add_argument("--out", default="bench/results/loader.csv", help="CSV to append to (default %(default)s)")
    p.add_argument("--device", help="cpu | cuda (default: cuda when available)")
    return p


def _loader_list(text: str) -> list[str]:
    loaders = [v.strip() for v in text.split(",") if v.strip()]
    if loaders == ["auto"]:
        return loaders
    unknown = [v for v in loaders if v not in LOADER_KINDS]
    if unknown or not loaders:
        raise ValueError(f"--loaders: unknown {', '.join(unknown) or '(empty)'}; "
                         f"choose auto or from {', '.join(LOADER_KINDS)}")
    return loaders


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "loader":
        argv = argv[1:]
    args = build_parser().parse_args(argv)
    loaders = _loader_list(args.loaders)
    if args.workers < 0 or args.warmup < 0:
        raise ValueError("--workers and --warmup must be >= 0")
    if args.images < args.batch:
        raise ValueError(f"--images {args.images} is fewer than one --batch {args.batch}")
    rows = run(args.images, args.source_size, args.resolution, args.batch, args.batches, args.warmup, args.workers,
               loaders, args.out, args.device, data=args.data, latent_shape=args.latent_shape,
               step_csv=args.step_csv)
    return 1 if any(r["status"] == "error" for r in rows) else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except ValueError as err:
        print(f"fastonestep bench loader: error: {err}", file=sys.stderr)
        sys.exit(2)
