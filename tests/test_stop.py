"""SIGTERM / SIGINT during training (engine/stop.py): the step in progress finishes, is checkpointed, and the run
stops with TrainingStopped (the command exits with 128 + the signal); re-running the same command ends exactly
where the uninterrupted run ends, stats.jsonl included: the running means of a half-logged interval travel in
the checkpoint. Forwarded copies of the signal are ignored; Ctrl-C pressed again acts at once. Distributed runs (ranks agreeing on the step) are in
tests/test_distributed.py; the torch loader's readers ignoring the signal, in tests/test_loaders.py."""
import json
import os
import signal

import pytest

from conftest import CONFIGS, TOY_STUDENT
from fastonestep import cli
from fastonestep.config import load_config
from fastonestep.engine import loop, stop
from fastonestep.engine.checkpoint import list_checkpoints
from fastonestep.engine.stop import TrainingStopped

QUIET = dict(progress=False, log=lambda *_: None)
PRESET = str(CONFIGS / "toy2d" / "diffratio.yaml")
TIMING = ("images_per_sec", "sec_per_kimg", "peak_memory_mb", "time")


def overrides(teacher):
    # logged every 4 steps and checkpointed only at the end: a stop after step 3 is inside a log interval
    return TOY_STUDENT + [f"teacher={teacher}", "train.steps=6", "train.batch_size=64", "train.log_every=4",
                          "train.checkpoint_every=100", "eval.num_samples=64", "eval.batch_size=64", "eval.grid=2"]


@pytest.fixture(autouse=True)
def default_handlers():
    """The handlers of an interactive process, whatever this one inherited (a background job ignores SIGINT)."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    for s, handler in saved.items():
        signal.signal(s, handler)


@pytest.fixture
def signal_during_step(monkeypatch):
    """signal_during_step(step, *signals): the method's step `step` (1-based) sends these signals to this process."""
    def arm(at: int, *signals):
        original = loop.build

        def build(cfg, backend=None):
            dataset, method = original(cfg, backend)
            step = method.step

            def stepping(next_batch, index, nimg):
                if index + 1 == at:
                    for sig in signals:
                        os.kill(os.getpid(), sig)
                return step(next_batch, index, nimg)

            method.step = stepping
            return dataset, method

        monkeypatch.setattr(loop, "build", build)
    return arm


def stats_rows(run):
    lines = (run / "stats.jsonl").read_text().splitlines() if (run / "stats.jsonl").exists() else []
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in lines]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_checkpoints_the_step_and_resume_equals_the_uninterrupted_run(toy_teacher, tmp_path, monkeypatch,
                                                                              signal_during_step, sig):
    cfg = load_config(PRESET, overrides(toy_teacher))
    loop.train(cfg, str(tmp_path / "full"), **QUIET)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    signal_during_step(3, sig)
    with pytest.raises(TrainingStopped) as stopped:
        loop.train(cfg, str(tmp_path / "stopped"), **QUIET)
    assert (stopped.value.step, stopped.value.signal_name) == (3, signal.Signals(sig).name)
    assert stopped.value.exit_code == 128 + sig
    assert [s for s, _ in list_checkpoints(str(tmp_path / "stopped"))] == [3]
    assert stats_rows(tmp_path / "stopped") == []  # the first line is due at step 4
    assert {s: signal.getsignal(s) for s in handlers} == handlers  # handlers restored
    monkeypatch.undo()
    loop.train(cfg, str(tmp_path / "stopped"), **QUIET)  # the same command again
    assert stats_rows(tmp_path / "stopped") == stats_rows(tmp_path / "full") != []
    full, resumed = tmp_path / "full" / "model.safetensors", tmp_path / "stopped" / "model.safetensors"
    assert resumed.read_bytes() == full.read_bytes()


def test_forwarded_copies_of_the_signal_do_not_cut_the_stop_short(toy_teacher, tmp_path, signal_during_step):
    """A scheduler's SIGTERM plus torchrun's forwarded one, then the launcher's SIGINT: still one clean stop."""
    signal_during_step(2, signal.SIGTERM, signal.SIGTERM, signal.SIGINT)
    with pytest.raises(TrainingStopped) as stopped:
        loop.train(load_config(PRESET, overrides(toy_teacher)), str(tmp_path / "run"), **QUIET)
    assert (stopped.value.step, stopped.value.signal_name) == (2, "SIGTERM")
    assert [s for s, _ in list_checkpoints(str(tmp_path / "run"))] == [2]


def test_a_second_sigint_interrupts_at_once(toy_teacher, tmp_path, signal_during_step, monkeypatch):
    monkeypatch.setattr(stop, "REPEAT_WINDOW_S", -1.0)  # as if Ctrl-C were pressed again seconds later
    signal_during_step(2, signal.SIGINT, signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        loop.train(load_config(PRESET, overrides(toy_teacher)), str(tmp_path / "run"), **QUIET)
    assert list_checkpoints(str(tmp_path / "run")) == []
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_signal_the_process_ignores_stays_ignored(toy_teacher, tmp_path, signal_during_step):
    """A background job: SIGINT is ignored before training starts, and training does not take it over."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal_during_step(2, signal.SIGINT)
    loop.train(load_config(PRESET, overrides(toy_teacher)), str(tmp_path / "run"), **QUIET)  # runs to the end
    assert [s for s, _ in list_checkpoints(str(tmp_path / "run"))] == [6]
    assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN


def test_the_command_says_how_to_resume_and_exits_with_the_signal(toy_teacher, tmp_path, signal_during_step, capsys):
    signal_during_step(1, signal.SIGTERM)
    code = cli.main(["train", PRESET, *overrides(toy_teacher), "--out", str(tmp_path / "run"), "--no-progress"])
    assert code == 128 + signal.SIGTERM
    err = capsys.readouterr().err
    assert "stopped by SIGTERM after step 1" in err and "re-run the same command to resume" in err
