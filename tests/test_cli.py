"""The `fastonestep` command: train -> resume -> sample -> eval, and one clear error line for bad input."""
import json
import subprocess
import sys

import numpy as np
import pytest

from conftest import CONFIGS, TOY_STUDENT
from fastonestep.cli import main

PRESET = str(CONFIGS / "toy2d" / "diffratio.yaml")


def run_cli(*args):
    """Runs the installed console entry point in a subprocess, as a user would."""
    return subprocess.run([sys.executable, "-m", "fastonestep", *args], capture_output=True, text=True, timeout=300)


def test_train_resume_sample_eval_round_trip(tmp_path, toy_teacher, capsys):
    out = tmp_path / "run"
    common = ["train", PRESET, *TOY_STUDENT, f"teacher={toy_teacher}", "train.checkpoint_every=6",
              "eval.num_samples=300", "eval.batch_size=300"]
    args = common + ["train.steps=12", "--out", str(out), "--no-progress"]
    assert main(common + ["train.steps=6", "--out", str(out), "--no-progress"]) == 0
    assert "resuming from" not in capsys.readouterr().out
    assert main(args) == 0  # the same command, more steps: resumes at step 6
    assert "resuming from" in capsys.readouterr().out
    for name in ("config.yaml", "stats.jsonl", "samples.png", "metrics.json", "model.safetensors",
                 "checkpoint-00000012.pt"):
        assert (out / name).exists(), name
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"one_step", "init_one_step", "parameters"} <= metrics.keys()
    rows = [json.loads(line) for line in (out / "stats.jsonl").read_text().splitlines()]
    assert {"ratio/accuracy", "gen/loss", "grad_norm/generator", "grad_norm/ratio", "images_per_sec",
            "peak_memory_mb"} <= rows[-1].keys()

    assert main(args) == 0  # a finished run re-run: nothing to train
    assert "is complete" in capsys.readouterr().out

    png, npz = tmp_path / "s.png", tmp_path / "s.npz"
    assert main(["sample", str(out), "--num", "50", "--out", str(png), "--npz", str(npz)]) == 0
    samples = np.load(npz)["samples"]
    assert samples.shape == (50, 2) and np.isfinite(samples).all() and png.exists()

    (out / "metrics.json").unlink()
    assert main(["eval", str(out), "--num", "200"]) == 0
    assert json.loads((out / "metrics.json").read_text())["one_step"]["num_samples"] == 200


@pytest.mark.parametrize("args, message", [
    (["train", PRESET, "train.stepz=3"], "unknown config key 'train.stepz'"),
    (["train", PRESET, "train.steps=many"], "config key 'train.steps' expects int"),
    (["train", "no/such/preset.yaml"], "config file 'no/such/preset.yaml' does not exist"),
    (["train", PRESET, "teacher=/no/such/teacher"], "config key 'teacher': '/no/such/teacher' does not exist"),
    (["train", str(CONFIGS / "toy2d" / "edm.yaml"), "data.kind=folder", "data.path=/no/such/images"],
     "/no/such/images"),
    (["train", str(CONFIGS / "toy2d" / "edm.yaml"), "data.name=spiral"], "spiral"),
    (["eval", "/no/such/run"], "is not a run directory"),
    (["sample", "/no/such/model.safetensors"], "does not exist"),
    (["experiment", "nope", "--out", "x.json"], "unknown experiment 'nope'"),
])
def test_bad_input_is_one_clear_line(tmp_path, args, message):
    result = run_cli(*args, *(["--out", str(tmp_path / "r")] if args[0] == "train" else []))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fastonestep: error:"), result.stderr
    assert message in lines[0]


def test_malformed_teacher_file(tmp_path):
    bogus = tmp_path / "model.safetensors"
    bogus.write_bytes(b"not a safetensors file")
    result = run_cli("train", PRESET, f"teacher={bogus}", "--out", str(tmp_path / "r"))
    assert result.returncode == 2 and f"model file '{bogus}' cannot be read" in result.stderr


def test_more_bad_input_is_one_clear_line(tmp_path, capsys):
    """Each of these raised a traceback (or silently did something else) before."""
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    looping = tmp_path / "loop.yaml"
    looping.write_text("base: loop.yaml\n")
    cases = [
        (["train", PRESET, "--out", str(a_file)], f"--out '{a_file}' is a file"),
        (["train", str(looping)], "its 'base:' chain loops"),
        (["train", PRESET, "--gpus", "8"], "--gpus applies to --dry-run"),
        (["sample", str(tmp_path), "--num", "0"], "--num must be a positive number of samples; got 0"),
        (["sample", str(tmp_path), "--num", "-3"], "--num must be a positive number of samples; got -3"),
        (["eval", str(tmp_path), "--num", "0"], "--num must be positive; got 0"),
        (["dataset", "encode", str(tmp_path / "nofolder"), "--vae", "v", "--out", "o"],
         f"image folder '{tmp_path / 'nofolder'}' does not exist"),
        (["ema", str(tmp_path / "nothere"), "--std", "0.1"], f"run directory '{tmp_path / 'nothere'}' does not exist"),
        (["eval", str(tmp_path)], f"cannot read image '{tmp_path / 'img.png'}'"),
        # evaluation settings that cannot work are refused before training, not after it
        (["train", str(CONFIGS / "toy2d" / "edm.yaml"), "eval.features=inception", "--out", str(tmp_path / "r")],
         "eval.features=inception needs a local FID Inception weights file"),
        (["train", str(CONFIGS / "toy2d" / "edm.yaml"), "eval.features=mnist", "--out", str(tmp_path / "r")],
         "eval.features=mnist needs 1x32x32 images"),
    ]
    (tmp_path / "img.png").write_bytes(b"")  # makes tmp_path an image folder for eval
    for args, message in cases:
        assert main(args) == 2, args
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], (args, err)
    assert not list(tmp_path.glob("r/checkpoint-*"))


def test_overrides_may_follow_options(tmp_path, toy_teacher, capsys):
    assert main(["train", str(CONFIGS / "toy2d" / "edm.yaml"), "--dry-run", "--no-activations", "train.steps=7",
                 "network.hidden=48"]) == 0
    printed = capsys.readouterr().out
    assert "steps: 7" in printed and "hidden: 48" in printed
    with pytest.raises(SystemExit):
        main(["train", PRESET, "--dry-run", "--no-such-flag"])


def test_sample_steps_apply_to_a_denoiser_only(tmp_path, toy_teacher, capsys):
    assert main(["sample", str(toy_teacher), "--num", "8", "--steps", "4", "--out", str(tmp_path / "a" / "s.png"),
                 "--npz", str(tmp_path / "b" / "s.npz")]) == 0  # missing folders are made before sampling
    assert np.load(tmp_path / "b" / "s.npz")["samples"].shape == (8, 2)
    student = tmp_path / "student"
    assert main(["train", PRESET, *TOY_STUDENT, f"teacher={toy_teacher}", "train.steps=2", "eval.num_samples=100",
                 "eval.batch_size=100", "--out", str(student), "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["sample", str(student), "--num", "8", "--steps", "4", "--out", str(tmp_path / "s.png")]) == 2
    assert "--steps applies to a denoiser" in capsys.readouterr().err
