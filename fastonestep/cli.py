"""The `fastonestep` command: train | sample | eval | experiment | bench | demo.

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
    from fastonestep.engine.loop import train

    cfg = load_config(args.config, args.overrides)
    out = args.out or os.path.join("runs", Path(args.config).stem)
    metrics = train(cfg, out, progress=not args.no_progress)
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

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    net, info = load_model(args.model, device)
    if info.get("role") == "generator":
        def sampler(noise, labels):
            return student_sample(net, noise, info["sigma_g"], labels=labels)
    else:
        def sampler(noise, labels):
            return edm_sample(net, noise, num_steps=args.steps, labels=labels)
    samples = generate(sampler, args.num, info["data_shape"], info["num_classes"], device, batch_size=256,
                       seed=args.seed)
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


def _cmd_eval(args) -> int:
    from fastonestep.config import load_config
    from fastonestep.engine.checkpoint import CheckpointError, atomic_write_json, latest_checkpoint, load_checkpoint
    from fastonestep.engine.evaluate import evaluate
    from fastonestep.engine.loop import build

    cfg_path = os.path.join(args.run, "config.yaml")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"'{args.run}' is not a run directory (no config.yaml)")
    overrides = [f"eval.num_samples={args.num}"] if args.num else []
    overrides += [f"eval.inception={args.inception}"] if args.inception else []
    overrides += [f"eval.fid_ref={args.fid_ref}"] if args.fid_ref else []
    cfg = load_config(cfg_path, overrides)
    ckpt = latest_checkpoint(args.run)
    if ckpt is None:
        raise CheckpointError(f"run directory '{args.run}' has no checkpoint to evaluate")
    dataset, method = build(cfg)
    method.load_state_dict(load_checkpoint(ckpt)["method"])
    metrics = evaluate(method, dataset, cfg, args.run)
    metrics["parameters"] = method.parameter_counts
    atomic_write_json(os.path.join(args.run, "metrics.json"), metrics)
    print(json.dumps(_headline(metrics), indent=2))
    return 0


def _cmd_experiment(args) -> int:
    from fastonestep.experiments import EXPERIMENTS

    if args.name not in EXPERIMENTS:
        raise ValueError(f"unknown experiment '{args.name}'; available: {', '.join(sorted(EXPERIMENTS))}")
    kwargs = {k: v for k, v in (("steps", args.steps), ("seed", args.seed)) if v is not None}
    if args.quick:
        kwargs["quick"] = True
    result = EXPERIMENTS[args.name](args.out, **kwargs)
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
    if args.what != "kernels":
        raise ValueError(f"unknown benchmark '{args.what}'; available: kernels")
    from fastonestep.benchmark.kernels import main as bench_kernels

    return bench_kernels(args.rest)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastonestep", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a method from a YAML preset (re-run the same command to resume)")
    t.add_argument("config", help="YAML preset, e.g. configs/toy2d/diffratio.yaml")
    t.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=200 diffratio.divergence=rkl")
    t.add_argument("--out", help="run directory (default runs/<preset name>)")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.set_defaults(fn=_cmd_train)

    s = sub.add_parser("sample", help="draw samples from a run directory or model.safetensors")
    s.add_argument("model")
    s.add_argument("--num", type=int, default=64)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--steps", type=int, default=18, help="sampler steps for a (teacher) denoiser")
    s.add_argument("--out", help="PNG path (default samples.png)")
    s.add_argument("--npz", help="also save the raw samples to this .npz")
    s.set_defaults(fn=_cmd_sample)

    e = sub.add_parser("eval", help="recompute metrics.json of a run directory")
    e.add_argument("run")
    e.add_argument("--num", type=int, default=0, help="number of samples (default: the run's eval.num_samples)")
    e.add_argument("--inception", help="local FID Inception weights file: adds the standard FID")
    e.add_argument("--fid-ref", help="reference statistics .npz (mu, sigma) for FID (default: training images)")
    e.set_defaults(fn=_cmd_eval)

    x = sub.add_parser("experiment", help="paper experiments, e.g. score-difference")
    x.add_argument("name")
    x.add_argument("--out", required=True, help="result JSON (a PNG plot is written next to it)")
    x.add_argument("--quick", action="store_true", help="tiny setting (for CI)")
    x.add_argument("--steps", type=int)
    x.add_argument("--seed", type=int)
    x.set_defaults(fn=_cmd_experiment)

    b = sub.add_parser("bench", help="benchmarks: `bench kernels [--quick] [--plot PNG] ...`")
    b.add_argument("what", help="kernels")
    b.add_argument("rest", nargs=argparse.REMAINDER, help="options of that benchmark (see `bench kernels --help`)")
    b.set_defaults(fn=_cmd_bench)

    d = sub.add_parser("demo", help="MNIST teacher + DiffRatio one-step generator on the CPU")
    d.add_argument("--out", default="runs/demo")
    d.add_argument("overrides", nargs="*", help="overrides for the teacher preset")
    d.add_argument("--no-progress", action="store_true")
    d.set_defaults(fn=_cmd_demo)
    return p


def main(argv=None) -> int:
    from fastonestep.config import ConfigError
    from fastonestep.engine.checkpoint import CheckpointError

    args = build_parser().parse_args(argv)
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
    except KeyboardInterrupt:
        print("fastonestep: interrupted; re-run the same command to resume from the last checkpoint",
              file=sys.stderr)
        return 130
