"""train.eval_every_kimg: fixed-seed evaluation lines in eval.jsonl, identical on resume, training unaffected."""
import json
import os

import pytest

from conftest import CONFIGS, TOY_TEACHER
from fastonestep.config import ConfigError, load_config
from fastonestep.engine.loop import train
from fastonestep.engine.periodic_eval import eval_due, read_eval_log

PRESET = str(CONFIGS / "toy2d" / "edm.yaml")
# 256 images per step: eval every 6 steps (1.536 kimg); checkpoints every 4 steps.
BASE = TOY_TEACHER + ["train.steps=12", "train.checkpoint_every=4", "eval.num_samples=200", "eval.batch_size=200",
                      "diffusion.sample_steps=4"]


def _train(run, *extra):
    return train(load_config(PRESET, BASE + list(extra)), str(run), progress=False, log=lambda *_: None)


def _losses(run):
    return [row["loss"] for row in map(json.loads, open(os.path.join(run, "stats.jsonl")))]


def test_eval_due_counts_crossings():
    assert [d for d in range(1, 13) if eval_due(d, 256, 0.768)] == [3, 6, 9, 12]
    assert [d for d in range(1, 9) if eval_due(d, 300, 1.0)] == [4, 7]  # 1200, 2100 images cross 1k, 2k
    assert not any(eval_due(d, 256, 0.0) for d in range(1, 10))


def test_eval_lines_identical_on_resume_and_training_unaffected(tmp_path):
    full, resumed, off = tmp_path / "full", tmp_path / "resumed", tmp_path / "off"
    _train(full, "train.eval_every_kimg=1.536")
    rows = read_eval_log(str(full))
    assert [r["step"] for r in rows] == [6, 12]
    assert [r["kimg"] for r in rows] == pytest.approx([1.536, 3.072])
    assert {"energy_distance", "log_likelihood", "precision", "coverage", "raw_fd", "diversity"} <= rows[0]["metrics"].keys()
    assert rows[0]["metrics"] != rows[-1]["metrics"]  # the model changed between evaluations

    # Interrupted after the evaluation at step 6 but before the checkpoint at step 8: the line of step 6 is
    # dropped on resume (from step 4) and written again by the resumed run.
    _train(resumed, "train.steps=8", "train.eval_every_kimg=1.536")
    assert [r["step"] for r in read_eval_log(str(resumed))] == [6]
    os.unlink(resumed / "checkpoint-00000008.pt")
    os.unlink(resumed / "metrics.json")
    _train(resumed, "train.eval_every_kimg=1.536")
    again = read_eval_log(str(resumed))
    assert [r["step"] for r in again] == [6, 12]
    for a, b in zip(rows, again):
        assert a["metrics"] == b["metrics"], a["step"]

    # Evaluation forks the RNG: the same training without it draws the same numbers.
    _train(off)
    assert not (off / "eval.jsonl").exists()
    assert _losses(off) == _losses(full)


def test_eval_every_kimg_is_validated_and_resumable(tmp_path):
    with pytest.raises(ConfigError, match="train.eval_every_kimg"):
        load_config(PRESET, ["train.eval_every_kimg=-1"])
    from fastonestep.engine.loop import RESUMABLE_CHANGES

    assert "train.eval_every_kimg" in RESUMABLE_CHANGES
