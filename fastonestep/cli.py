"""The `fastonestep` command: train | sample | eval | ema | dataset | experiment | bench | demo.

Errors a user can fix (a bad config key or value, a missing or malformed file) print one line naming the
problem and exit with status 2; no traceback (set FASTONESTEP_DEBUG=1 to see one).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

REPO_CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _cmd_train(args) -> int:
    from fastonestep.config import load_config
    from fastonestep.engine.distributed import close_process_group
    from fastonestep.engine.loop import train

    if args.gpus is not None and not args.dry_run:
        raise ValueError("--gpus applies to --dry-run (the memory estimate); a launch's GPUs are torchrun's "
                         "--nproc_per_node")
    cfg = load_config(args.config, args.overrides)
    if args.dry_run:  # config, parameter counts, memory estimate; reads no data, needs no teacher or GPU
        from fastonestep.engine.dryrun import dry_run

        dry_run(cfg, gpus=1 if args.gpus is None else args.gpus, activations=not args.no_activations)
        return 0
    out = args.out or os.path.join("runs", Path(args.config).stem)
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"--out '{out}' is a file; the run directory must be a directory (new or a run's)")
    metrics = train(cfg, out, progress=not args.no_progress)
    close_process_group()
    if os.environ.get("RANK", "0") == "0":  # under torchrun every rank returns rank 0's metrics: print them once
        print(json.dumps(_headline(metrics), indent=2))
    return 0


def _headline(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if isinstance(v, dict) and k != "parameters"}


def _cmd_sample(args) -> int:
    import torch

    from fastonestep.diffusion.samplers import edm_sample, student_sample
    from fastonestep.engine.evaluate import generate
    from fastonestep.engine.export import load_model
    from fastonestep.engine.images import save_image_grid, save_scatter

    if args.num <= 0:
        raise ValueError(f"--num must be a positive number of samples; got {args.num}")
    for path in (args.out, args.npz):  # made before sampling, not found missing after it
        if path and os.path.dirname(path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    net, info = load_model(args.model, device)
    if args.steps is not None and (info.get("role") != "denoiser" or args.steps <= 0):
        raise ValueError(f"--steps must be a positive number of steps of a denoiser's sampler; got {args.steps}"
                         if info.get("role") == "denoiser" else
                         f"--steps applies to a denoiser (teacher) model; '{args.model}' is a {info.get('role')} "
                         "network whose sampling steps were fixed by its training")
    if info.get("sampler") == "backward":  # backward distillation: its parameterisation and noise correction
        from fastonestep.diffusion.backward_sampler import backward_sample

        renoise = torch.Generator(device=device).manual_seed(args.seed + 1)

        def sampler(noise, labels):
            return backward_sample(net, noise, info["sigma_g"], info["parameterization"], info["noise_correction"],
                                   labels=labels, generator=renoise)
    elif info.get("role") == "generator":
        def sampler(noise, labels):
            return student_sample(net, noise, info["sigma_g"], labels=labels)
    else:
        def sampler(noise, labels):
            return edm_sample(net, noise, num_steps=args.steps or 18, labels=labels)
    if args.verifier:  # DiffRatio: best-of-N (or resampled) candidates scored by the run's ratio network
        from fastonestep.engine.verifier import sample_with_verifier

        samples = sample_with_verifier(sampler, args.model, args.num, info["data_shape"], info["num_classes"],
                                       device, args.verifier, args.verifier_mode, args.verifier_sigma, seed=args.seed)
    else:
        samples = generate(sampler, args.num, info["data_shape"], info["num_classes"], device, batch_size=256,
                           seed=args.seed)
    if info.get("data_kind") == "latent":  # a model of VAE latents: decode to images
        samples = _decode_latents(samples, info, args.vae, device)
    out = args.out or "samples.png"
    if samples.ndim == 2:
        save_scatter(samples, None, out)
    else:
        save_image_grid(samples, out, nrow=max(1, int(round(args.num**0.5))))
    if args.npz:
        import numpy as np

        np.savez(args.npz, samples=samples.numpy())
    print(f"wrote {args.num} samples to {out}" + (f" and {args.npz}" if args.npz else ""))
    return 0


def _decode_latents(samples, info: dict, vae_path, device):
    from fastonestep.data.latents import decode_latents, load_vae

    if not vae_path:
        raise ValueError("this model generates VAE latents (data.kind=latent): pass --vae PATH (the local "
                         "diffusers AutoencoderKL folder the dataset was encoded with) to decode them to images")
    vae = load_vae(vae_path, device)
    return decode_latents(vae, samples, info.get("latent_scale"), info.get("latent_bias"))


def _cmd_dataset(args) -> int:
    from fastonestep.data.latents import encode_folder

    if not os.path.isdir(args.images):
        raise FileNotFoundError(f"image folder '{args.images}' does not exist")
    meta = encode_folder(args.images, args.vae, args.out, resolution=args.resolution, batch_size=args.batch)
    print(f"wrote {len(meta['labels'])} latent files ({2 * meta['latent_channels']} channels: mean, std) and "
          f"{os.path.join(args.out, 'dataset.json')}; train with data.kind=latent data.path={args.out}")
    return 0


def _check_counts(args) -> None:
    for flag, value in (("--num", args.num), ("--k", args.k)):
        if value is not None and value <= 0:
            raise ValueError(f"{flag} must be positive; got {value}")


def _training_record(metrics_path: str) -> dict:
    """What training wrote into metrics.json that an evaluation does not recompute (steps, training time)."""
    if not os.path.isfile(metrics_path):
        return {}
    with open(metrics_path, encoding="utf-8") as f:
        old = json.load(f)
    return {k: old[k] for k in ("steps", "train_seconds_this_session") if k in old}


def _load_into(net, path: str, run_info: dict) -> None:
    """The weights of model file `path` into `net`: a model of this run (`run_info`), same role and data."""
    from safetensors.torch import load_file

    from fastonestep.engine.checkpoint import CheckpointError
    from fastonestep.engine.export import read_info

    info = read_info(path)  # a fastonestep model file, or a clear error
    for key in ("role", "data_shape", "num_classes"):
        if info.get(key) != run_info.get(key):
            raise CheckpointError(f"model file '{path}' is not a model of this run: its {key} is {info.get(key)!r}, "
                                  f"the run's {run_info.get(key)!r}")
    try:
        net.load_state_dict(load_file(path))
    except RuntimeError as e:
        raise CheckpointError(f"model file '{path}' is not a model of this run's architecture: {e}") from None


def _cmd_eval(args) -> int:
    from fastonestep.config import load_config
    from fastonestep.engine.checkpoint import CheckpointError, atomic_write_json, latest_checkpoint, load_checkpoint
    from fastonestep.engine.evaluate import evaluate
    from fastonestep.engine.loop import build, model_info

    cfg_path = os.path.join(args.run, "config.yaml")
    if not os.path.isfile(cfg_path):
        from fastonestep.eval.folder_eval import is_image_folder

        if is_image_folder(args.run):
            return _eval_image_folder(args)
        raise FileNotFoundError(f"'{args.run}' is not a run directory (no config.yaml), nor a folder of images")
    if args.ref:
        raise ValueError("--ref applies to an image folder; for a run directory use --fid-ref (FID statistics)")
    if args.model and not os.path.isfile(args.model):
        raise FileNotFoundError(f"--model: file '{args.model}' does not exist")
    _check_counts(args)
    overrides = [f"eval.num_samples={args.num}"] if args.num is not None else []
    overrides += [f"eval.inception={args.inception}"] if args.inception else []
    overrides += [f"eval.fid_ref={args.fid_ref}"] if args.fid_ref else []
    overrides += [f"eval.vae={args.vae}"] if args.vae else []
    overrides += [f"eval.features={args.features}"] if args.features else []
    overrides += [f"eval.prdc_k={args.k}"] if args.k is not None else []
    cfg = load_config(cfg_path, overrides)
    ckpt = latest_checkpoint(args.run)
    if ckpt is None:
        raise CheckpointError(f"run directory '{args.run}' has no checkpoint to evaluate")
    dataset, method = build(cfg)
    method.load_state_dict(load_checkpoint(ckpt)["method"])
    if args.model:  # e.g. a post-hoc EMA (`fastonestep ema`): evaluated in place of the run's EMA
        _load_into(method.ema.net, args.model, model_info(cfg, method, dataset))
    first = []

    def save_first_stats(name, samples):  # --save-stats: the run's model (the first sampler)
        if args.save_stats and not first:
            from fastonestep.engine.evaluate import sample_features
            from fastonestep.eval.folder_eval import save_sample_stats

            first.append(name)
            save_sample_stats(samples, args.save_stats, extractor=sample_features(dataset, cfg.eval, cfg.data,
                                                                                  method.device))

    metrics = evaluate(method, dataset, cfg, args.run, on_samples=save_first_stats)
    metrics["parameters"] = method.parameter_counts
    if args.model:  # the run's own metrics.json stays that of its EMA; results go to the run evaluated
        metrics["model"] = os.path.abspath(args.model)
        stem = os.path.splitext(os.path.basename(args.model))[0]
        atomic_write_json(args.json or os.path.join(args.run, stem + "-metrics.json"), metrics)
    else:
        path = os.path.join(args.run, "metrics.json")
        metrics.update(_training_record(path))
        atomic_write_json(path, metrics)
        if args.json:
            atomic_write_json(args.json, metrics)
    print(json.dumps(_headline(metrics), indent=2))
    return 0


def _eval_image_folder(args) -> int:
    from fastonestep.engine.checkpoint import atomic_write_json
    from fastonestep.eval.folder_eval import evaluate_images, load_folder_images

    if args.fid_ref:
        raise ValueError("--fid-ref applies to a run directory; for an image folder use --ref")
    if args.model:
        raise ValueError("--model applies to a run directory (a model file of that run), not to an image folder")
    if args.vae:
        raise ValueError("--vae applies to a run directory of latent data, not to an image folder (already images)")
    _check_counts(args)
    images = load_folder_images(args.run, args.resolution)
    if args.num:
        images = images[:args.num]
    result = evaluate_images(images, args.ref, args.features or "auto", args.inception or "", args.k or 5,
                             args.save_stats or "")
    result["path"] = args.run
    if args.json:
        atomic_write_json(args.json, result)
    print(json.dumps(result, indent=2))
    return 0


def _cmd_experiment(args) -> int:
    from fastonestep.experiments import EXPERIMENTS

    if args.name not in EXPERIMENTS:
        raise ValueError(f"unknown experiment '{args.name}'; available: {', '.join(sorted(EXPERIMENTS))}")
    kwargs = {k: v for k, v in (("steps", args.steps), ("seed", args.seed)) if v is not None}
    compare_only = [f for f in ("setups", "methods", "toy_teacher", "mnist_teacher") if getattr(args, f)]
    if compare_only and args.name != "compare":
        raise ValueError(f"--{compare_only[0].replace('_', '-')} applies to the compare experiment only")
    if args.setups:
        kwargs["setups"] = [s.strip() for s in args.setups.split(",") if s.strip()]
    if args.methods:
        kwargs["methods"] = [m.strip() for m in args.methods.split(",") if m.strip()]
    teachers = {k: v for k, v in (("toy", args.toy_teacher), ("mnist", args.mnist_teacher)) if v}
    if teachers:
        kwargs["teachers"] = teachers
    if args.quick:
        kwargs["quick"] = True
    result = EXPERIMENTS[args.name](args.out, **kwargs)
    if args.name == "compare":
        from fastonestep.experiments.compare import markdown_table

        print(markdown_table(result["rows"]))
    else:
        print(json.dumps({k: v for k, v in result.items() if k != "settings"}, indent=2))
    return 0


def _cmd_demo(args) -> int:
    """MNIST teacher (EDM) then a DiffRatio one-step generator from it; both resume when re-run."""
    from fastonestep.config import load_config
    from fastonestep.engine.loop import train

    teacher_dir, student_dir = os.path.join(args.out, "teacher"), os.path.join(args.out, "diffratio")
    print("== 1/2: EDM teacher on MNIST (5k images, 32x32)")
    train(load_config(str(REPO_CONFIGS / "mnist" / "teacher.yaml"), args.overrides), teacher_dir,
          progress=not args.no_progress)
    print("== 2/2: DiffRatio one-step generator from the teacher")
    metrics = train(load_config(str(REPO_CONFIGS / "mnist" / "diffratio.yaml"), [f"teacher={teacher_dir}"]),
                    student_dir, progress=not args.no_progress)
    print(f"\nresults ({os.path.join(student_dir, 'metrics.json')}):")
    print(f"  {'model':<24}{'MNIST FD':>10}{'classes':>9}")
    for name, m in _headline(metrics).items():
        print(f"  {name:<24}{m.get('mnist_fd', float('nan')):>10.2f}{m.get('num_classes_covered', 0):>9}")
    print(f"samples: {os.path.join(student_dir, 'samples.png')}")
    return 0


def _cmd_bench(args) -> int:
    if args.what == "loader":
        from fastonestep.benchmark.loader import main as bench_loader

        return bench_loader(args.rest)
    if args.what == "step":
        from fastonestep.benchmark.step import main as bench_step

        return bench_step(args.rest)
    if args.what != "kernels":
        raise ValueError(f"unknown benchmark '{args.what}'; available: kernels, loader, step")
    from fastonestep.benchmark.kernels import main as bench_kernels

    return bench_kernels(args.rest)


def _cmd_ema(args) -> int:
    from fastonestep.engine.posthoc_ema import reconstruct

    if not os.path.isdir(args.run):
        raise FileNotFoundError(f"run directory '{args.run}' does not exist")
    if args.out and len(args.std) > 1:
        raise ValueError("--out names one file: give one --std with it")
    nimg = None if args.kimg is None else round(args.kimg * 1000)
    for std in args.std:
        path, error = reconstruct(args.run, std, nimg=nimg, out=args.out)
        note = "" if error < args.max_fit_error else (
            f"  WARNING: the snapshots do not reach this width well (fit error above {args.max_fit_error:g}); "
            "track a closer train.ema_stds or snapshot more often")
        print(f"{path}: post-hoc EMA std {std:g}, profile fit error {error:.2e}{note}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastonestep", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a method from a YAML preset (re-run the same command to resume)")
    t.add_argument("config", help="YAML preset, e.g. configs/toy2d/diffratio.yaml")
    t.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=200 diffratio.divergence=rkl")
    t.add_argument("--out", help="run directory (default runs/<preset name>)")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.add_argument("--dry-run", action="store_true",
                   help="print the resolved config, parameter counts and a per-GPU memory estimate; train nothing")
    t.add_argument("--gpus", type=int, help="--dry-run: number of GPUs for the memory estimate (default 1)")
    t.add_argument("--no-activations", action="store_true", help="--dry-run: skip the activation estimate")
    t.set_defaults(fn=_cmd_train)

    s = sub.add_parser("sample", help="draw samples from a run directory or model.safetensors")
    s.add_argument("model")
    s.add_argument("--num", type=int, default=64)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--steps", type=int, help="sampler steps for a (teacher) denoiser (default 18)")
    s.add_argument("--out", help="PNG path (default samples.png)")
    s.add_argument("--npz", help="also save the raw samples to this .npz")
    s.add_argument("--vae", help="models of latents (data.kind=latent): local diffusers AutoencoderKL folder to decode with")
    s.add_argument("--verifier", type=int, default=0, metavar="N",
                   help="DiffRatio runs: draw N candidates per sample, score them with ratio.safetensors")
    s.add_argument("--verifier-mode", choices=("best", "resample"), default="best",
                   help="keep the best-scored candidate, or resample by weight p/q")
    s.add_argument("--verifier-sigma", type=float, default=None,
                   help="noise level at which candidates are scored (default: the one stored in ratio.safetensors)")
    s.set_defaults(fn=_cmd_sample)

    e = sub.add_parser("eval", help="recompute metrics.json of a run directory, or score a folder of images")
    e.add_argument("run", help="a run directory, or a folder of PNG/JPEG images")
    e.add_argument("--features", choices=("auto", "mnist", "inception", "raw"),
                   help="feature space of FD / PRDC / diversity (default: the run's eval.features, or auto)")
    e.add_argument("--k", type=int, help="k of precision/recall/density/coverage (default 5)")
    e.add_argument("--ref", help="image folder: reference image folder or statistics .npz (default for 1x32x32: MNIST)")
    e.add_argument("--resolution", type=int, default=0, help="image folder: resize to this (default: first image)")
    e.add_argument("--save-stats", help="write the feature statistics (mu, sigma) of the samples/images to this .npz")
    e.add_argument("--json", help="also write the metrics to this JSON file")
    e.add_argument("--model", help="run directory: evaluate this model file of the run (e.g. a post-hoc EMA from "
                                   "`fastonestep ema`) instead of its EMA; metrics to --json or <model>-metrics.json")
    e.add_argument("--num", type=int, help="number of samples (default: the run's eval.num_samples)")
    e.add_argument("--inception", help="local FID Inception weights file: adds the standard FID")
    e.add_argument("--fid-ref", help="reference statistics .npz (mu, sigma) for FID (default: training images)")
    e.add_argument("--vae", help="run directory of latent data: the local diffusers AutoencoderKL folder the data "
                                 "were encoded with; samples are decoded by it for image features (FID)")
    e.set_defaults(fn=_cmd_eval)

    m = sub.add_parser("ema", help="post-hoc EMA: build the EMA of any width from a run's power-EMA snapshots "
                                   "(train.ema_stds)")
    m.add_argument("run", help="run directory trained with train.ema_stds (its posthoc_ema/ snapshots)")
    m.add_argument("--std", type=float, nargs="+", required=True,
                   help="relative width(s) of the EMA profile, e.g. 0.05 0.1 (EDM2's sigma_rel)")
    m.add_argument("--kimg", type=float, help="at this many thousand images (default: the last snapshot)")
    m.add_argument("--out", help="model file to write (one --std; default RUN/model-ema<std>.safetensors)")
    m.add_argument("--max-fit-error", type=float, default=0.05,
                   help="warn above this relative L2 error of the reconstructed profile (default %(default)s)")
    m.set_defaults(fn=_cmd_ema)

    x = sub.add_parser("experiment", help="experiments: score-difference | compare")
    x.add_argument("name")
    x.add_argument("--out", required=True, help="result JSON (a PNG plot is written next to it)")
    x.add_argument("--quick", action="store_true", help="tiny setting (for CI)")
    x.add_argument("--steps", type=int)
    x.add_argument("--seed", type=int)
    x.add_argument("--setups", help="compare: comma-separated setups (toy,mnist)")
    x.add_argument("--methods", help="compare: comma-separated method labels or presets (e.g. DMD,dpdmd)")
    x.add_argument("--toy-teacher", help="compare: reuse this toy teacher run directory")
    x.add_argument("--mnist-teacher", help="compare: reuse this MNIST teacher run directory")
    x.set_defaults(fn=_cmd_experiment)

    b = sub.add_parser("bench", help="benchmarks: `bench kernels [--quick] [--plot PNG] ...`")
    b.add_argument("what", help="kernels | loader | step")
    b.add_argument("rest", nargs=argparse.REMAINDER, help="options of that benchmark (see `bench kernels --help`)")
    b.set_defaults(fn=_cmd_bench)

    ds = sub.add_parser("dataset", help="dataset tools: `dataset encode IMAGE_FOLDER --vae PATH --out DIR`")
    ds_sub = ds.add_subparsers(dest="action", required=True)
    enc = ds_sub.add_parser("encode", help="image folder -> VAE posterior moments (mean, std) per image, for "
                                           "data.kind=latent")
    enc.add_argument("images", help="folder of PNG/JPEG images (class subfolders give labels)")
    enc.add_argument("--vae", required=True, help="local diffusers AutoencoderKL folder (save_pretrained layout)")
    enc.add_argument("--out", required=True, help="output folder (re-running resumes a partial encode)")
    enc.add_argument("--resolution", type=int, default=512, help="images are resized/cropped to this (default 512)")
    enc.add_argument("--batch", type=int, default=32, help="images per VAE call (default 32)")
    enc.set_defaults(fn=_cmd_dataset)

    d = sub.add_parser("demo", help="MNIST teacher + DiffRatio one-step generator on the CPU")
    d.add_argument("--out", default="runs/demo")
    d.add_argument("overrides", nargs="*", help="overrides for the teacher preset")
    d.add_argument("--no-progress", action="store_true")
    d.set_defaults(fn=_cmd_demo)
    return p


def main(argv=None) -> int:
    from fastonestep.config import ConfigError
    from fastonestep.engine.checkpoint import CheckpointError
    from fastonestep.engine.stop import TrainingStopped

    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and hasattr(args, "overrides") and all("=" in a and not a.startswith("-") for a in extra):
        args.overrides += extra  # key=value after an option (`train P --out R train.steps=9`) is an override too
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        from fastonestep.data.errors import DataError
    except ImportError:  # pragma: no cover - data package always ships
        DataError = ConfigError
    try:
        return args.fn(args)
    except (ConfigError, DataError, CheckpointError, FileNotFoundError, ValueError) as e:
        if os.environ.get("FASTONESTEP_DEBUG"):
            raise
        print(f"fastonestep: error: {e}", file=sys.stderr)
        return 2
    except TrainingStopped as e:  # every rank agreed to stop at the same step: the group can close
        from fastonestep.engine.distributed import close_process_group

        close_process_group()
        print(f"fastonestep: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("fastonestep: interrupted; re-run the same command to resume from the last checkpoint",
              file=sys.stderr)
        return 130
