"""The teacher of a distillation run: named by its resolved path, identified by its weights, and a denoiser."""
import json
import shutil
import subprocess
import sys

import torch

from conftest import CONFIGS, TOY_STUDENT
from fastonestep.cli import main
from fastonestep.engine.export import export_model, load_model

PRESET = str(CONFIGS / "toy2d" / "diffratio.yaml")
SHORT = TOY_STUDENT + ["train.checkpoint_every=3", "eval.num_samples=200", "eval.batch_size=200", "--no-progress"]


def run_cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "fastonestep", *args], capture_output=True, text=True, timeout=300,
                          cwd=cwd)


def test_a_relative_teacher_works_from_any_directory(tmp_path, toy_teacher):
    """teacher=runs/edm means "from where I typed it": eval and resume from elsewhere find the same teacher."""
    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    shutil.copytree(toy_teacher, work / "teachers" / "edm")
    elsewhere.mkdir()
    run = tmp_path / "run"
    common = ["train", PRESET, *SHORT, "teacher=teachers/edm", "--out", str(run)]
    first = run_cli(*common, "train.steps=3", cwd=work)
    assert first.returncode == 0, first.stderr
    saved = (run / "config.yaml").read_text()
    assert f"teacher: {work / 'teachers' / 'edm'}" in saved
    resumed = run_cli(*common[:-2], f"teacher={work / 'teachers' / 'edm'}", "--out", str(run), "train.steps=6",
                      cwd=elsewhere)
    assert resumed.returncode == 0 and "resuming from" in resumed.stdout, resumed.stderr
    evaluated = run_cli("eval", str(run), "--num", "100", cwd=elsewhere)
    assert evaluated.returncode == 0, evaluated.stderr


def _perturbed_copy(teacher, dest):
    """The teacher's model file with every weight moved a little: same architecture, other weights."""
    net, info = load_model(str(teacher))
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.01)
    dest.mkdir()
    export_model(str(dest / "model.safetensors"), net, info)
    return dest


def test_a_changed_teacher_is_refused_on_resume(tmp_path, toy_teacher, capsys):
    teacher = tmp_path / "teacher"
    shutil.copytree(toy_teacher, teacher)
    args = ["train", PRESET, *SHORT, f"teacher={teacher}", "--out", str(tmp_path / "run")]
    assert main(args + ["train.steps=3"]) == 0
    moved = tmp_path / "moved-teacher"  # the same weights elsewhere: the path may change
    shutil.move(str(teacher), str(moved))
    assert main(args[:-3] + [f"teacher={moved}", "--out", str(tmp_path / "run"), "train.steps=6"]) == 0
    capsys.readouterr()
    retrained = _perturbed_copy(moved, tmp_path / "retrained")
    assert main(args[:-3] + [f"teacher={retrained}", "--out", str(tmp_path / "run"), "train.steps=9"]) == 2
    err = capsys.readouterr().err
    assert "is not the one this run was trained from" in err and str(retrained) in err


def test_a_generator_is_not_a_teacher(tmp_path, toy_teacher, capsys):
    student = tmp_path / "student"
    assert main(["train", PRESET, *SHORT, f"teacher={toy_teacher}", "--out", str(student), "train.steps=3"]) == 0
    capsys.readouterr()
    assert main(["train", PRESET, *SHORT, f"teacher={student}", "--out", str(tmp_path / "r"),
                 "train.steps=3"]) == 2
    assert "is a generator network of a 'diffratio' run, not a denoiser" in capsys.readouterr().err
    # nor is the teacher's model the model of a generator run, for `eval --model`
    assert main(["eval", str(student), "--model", str(toy_teacher / "model.safetensors")]) == 2
    assert "its role is 'denoiser', the run's 'generator'" in capsys.readouterr().err


def test_a_missing_teacher_says_how_to_get_one(tmp_path, capsys):
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    for teacher, what in ((tmp_path / "none", "does not exist"), (unfinished, "has no model.safetensors")):
        assert main(["train", PRESET, f"teacher={teacher}", "--out", str(tmp_path / "r")]) == 2
        err = capsys.readouterr().err
        assert f"config key 'teacher': '{teacher}' {what}" in err and "train a teacher first" in err


def test_eval_keeps_the_training_record(tmp_path, toy_teacher):
    """Re-evaluating a run recomputes its metrics; the steps and training time it recorded stay."""
    run = tmp_path / "run"
    assert main(["train", PRESET, *SHORT, f"teacher={toy_teacher}", "--out", str(run), "train.steps=3"]) == 0
    trained = json.loads((run / "metrics.json").read_text())
    assert main(["eval", str(run), "--num", "100"]) == 0
    evaluated = json.loads((run / "metrics.json").read_text())
    assert evaluated["steps"] == trained["steps"] == 3
    assert evaluated["train_seconds_this_session"] == trained["train_seconds_this_session"]
    assert evaluated["one_step"]["num_samples"] == 100
