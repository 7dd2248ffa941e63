"""train.tensorboard: the stats.jsonl and eval.jsonl lines as TensorBoard events, right after a resume too."""
import json
import os
import sys

import pytest
import torch

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader  # noqa: E402

from conftest import CONFIGS, TOY_TEACHER  # noqa: E402
from fastonestep.config import load_config  # noqa: E402
from fastonestep.engine.loop import train  # noqa: E402
from fastonestep.engine.periodic_eval import read_eval_log  # noqa: E402
from fastonestep.engine.tensorboard import LOG_DIR, MISSING, TensorBoardLog  # noqa: E402

PRESET = str(CONFIGS / "toy2d" / "edm.yaml")
# 256 images per step: a stats line every 2 steps, an evaluation every 6 steps, checkpoints every 4 steps.
BASE = TOY_TEACHER + ["train.log_every=2", "train.checkpoint_every=4", "eval.num_samples=200", "eval.batch_size=200",
                      "diffusion.sample_steps=4", "train.eval_every_kimg=1.536"]


def _train(run, *extra, log=lambda *_: None):
    return train(load_config(PRESET, BASE + list(extra)), str(run), progress=False, log=log)


def _stats(run):
    return [json.loads(line) for line in open(os.path.join(run, "stats.jsonl"))]


def _board(run):
    acc = EventAccumulator(os.path.join(run, LOG_DIR), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc


def _event_files(run):
    folder = os.path.join(run, LOG_DIR)
    return sorted((os.path.join(folder, f) for f in os.listdir(folder)), key=os.path.getmtime)


def test_events_match_the_json_logs_after_a_crash_and_resume(tmp_path):
    run = tmp_path / "run"
    # Interrupted after logging step 8 (and evaluating at step 6) but before its checkpoint was kept: the
    # resumed run restarts from step 4 and must replace everything logged after it.
    _train(run, "train.steps=8")
    os.unlink(run / "checkpoint-00000008.pt")
    os.unlink(run / "metrics.json")
    _train(run, "train.steps=12")

    stats, evals, board = _stats(run), read_eval_log(str(run)), _board(run)
    assert [row["step"] for row in stats] == [2, 4, 6, 8, 10, 12]
    scalar_keys = [k for k, v in stats[0].items() if k not in ("step", "kimg", "time") and v is not None]
    assert {"loss", "grad_norm/denoiser", "images_per_sec", "peak_memory_mb"} <= set(scalar_keys)
    for key in scalar_keys:
        events = board.Scalars(key)
        assert [e.step for e in events] == [row["step"] for row in stats], key
        assert [e.value for e in events] == pytest.approx([row[key] for row in stats], rel=1e-6), key
    metrics = evals[0]["metrics"]
    for key in ("energy_distance", "log_likelihood", "coverage"):
        events = board.Scalars(f"eval/{key}")
        assert [e.step for e in events] == [6, 12]
        assert [e.value for e in events] == pytest.approx([row["metrics"][key] for row in evals], rel=1e-6)
    assert metrics["energy_distance"] != evals[1]["metrics"]["energy_distance"]
    assert "eval/samples" not in board.Tags()["images"]  # 2-D toy samples are no images

    # The resumed attempt's event file starts by telling readers to drop the first attempt's steps >= 5.
    first, second = _event_files(run)
    starts = [(e.step, e.session_log.status) for e in EventFileLoader(second).Load() if e.HasField("session_log")]
    assert starts and starts[0][0] == 5
    assert max(e.step for e in EventFileLoader(first).Load()) == 8


def test_off_and_missing_package(tmp_path, monkeypatch):
    _train(tmp_path / "off", "train.steps=2", "train.tensorboard=false")
    assert not (tmp_path / "off" / LOG_DIR).exists()

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # `import` now raises ImportError
    said = []
    _train(tmp_path / "missing", "train.steps=2", log=said.append)
    assert MISSING in said
    assert not (tmp_path / "missing" / LOG_DIR).exists()
    assert [row["step"] for row in _stats(tmp_path / "missing")] == [2]


def test_a_fresh_start_after_a_crash_before_any_checkpoint_logs_each_step_once(tmp_path):
    run = tmp_path / "run"
    _train(run, "train.steps=4", "train.checkpoint_every=1000", "train.eval_every_kimg=0")
    os.unlink(run / "checkpoint-00000004.pt")  # as if the run died before its first checkpoint
    os.unlink(run / "metrics.json")
    _train(run, "train.steps=4", "train.checkpoint_every=1000", "train.eval_every_kimg=0")
    assert [row["step"] for row in _stats(run)] == [2, 4]
    assert [e.step for e in _board(run).Scalars("loss")] == [2, 4]


def test_eval_images_are_a_grid_of_the_first_samples(tmp_path):
    board = TensorBoardLog(str(tmp_path), first_step=1)
    samples = torch.rand(20, 1, 8, 6) * 2 - 1
    board.eval({"step": 3, "metrics": {"fd": 1.5, "classes": [1, 2], "ok": True}}, samples, grid=4)
    board.close()
    acc = _board(tmp_path)
    assert acc.Tags()["scalars"] == ["eval/fd"]  # lists and bools are not scalars
    (image,) = acc.Images("eval/samples")
    assert image.step == 3
    assert (image.height, image.width) == (4 * (8 + 2) + 2, 4 * (6 + 2) + 2)  # 16 of the 20, 4 per row


def test_a_run_continued_past_a_partial_last_line_shows_the_stats_lines_and_keeps_that_steps_evaluation(tmp_path):
    """Steps 7 then 12 (a line every 2 steps, an evaluation every 6): the partial line at 7 leaves stats.jsonl
    and TensorBoard alike; the evaluation logged at 6 stays in both; one at the old last step would come back."""
    run = tmp_path / "run"
    _train(run, "train.steps=7", "train.eval_every_kimg=1.792")  # an evaluation at step 7, the last one
    _train(run, "train.steps=12", "train.eval_every_kimg=1.792")
    stats, evals, board = _stats(run), read_eval_log(str(run)), _board(run)
    assert [row["step"] for row in stats] == [2, 4, 6, 8, 10, 12]
    assert [e.step for e in board.Scalars("loss")] == [row["step"] for row in stats]
    assert [e.value for e in board.Scalars("loss")] == pytest.approx([row["loss"] for row in stats], rel=1e-6)
    assert [row["step"] for row in evals] == [7]
    assert [e.step for e in board.Scalars("eval/energy_distance")] == [7]
