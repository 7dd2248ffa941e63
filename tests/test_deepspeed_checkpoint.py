"""A DeepSpeed checkpoint resumes on the number of processes that wrote it only (ZeRO partitions the optimizer
state per process): another count is refused up front, naming both, on every rank alike."""
import os

import pytest
import torch

from conftest import CONFIGS, TOY_TEACHER
from fastonestep.config import load_config
from fastonestep.engine.checkpoint import CheckpointError
from fastonestep.engine.loop import train

pytest.importorskip("deepspeed")


def _cfg(steps):
    return load_config(str(CONFIGS / "toy2d" / "edm.yaml"),
                       TOY_TEACHER + [f"train.steps={steps}", "distributed.backend=deepspeed",
                                      "eval.num_samples=100", "eval.batch_size=100"])


def test_a_deepspeed_checkpoint_of_another_process_count_is_refused_naming_both(tmp_path, monkeypatch):
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    run = tmp_path / "run"
    train(_cfg(2), str(run), progress=False, log=lambda *_: None)
    path = run / "checkpoint-00000002.pt"
    state = torch.load(path, weights_only=False)
    recorded = state["method"]["denoiser"]["deepspeed"]
    assert recorded["world_size"] == 1  # what this one-process run wrote
    recorded["world_size"] = 2  # as a two-process run would have written it
    torch.save(state, path)
    os.remove(run / "metrics.json")  # not finished: the next start resumes
    with pytest.raises(CheckpointError, match=r"written by 2 process\(es\) and this run has 1.*start it with 2"):
        train(_cfg(4), str(run), progress=False, log=lambda *_: None)
