"""Engine pieces: atomic writes never leave a torn file, stats count non-finite values, EMA follows its
half-life."""
import contextlib
import json
import os
import re

import pytest
import torch

from fastonestep.engine.checkpoint import atomic_path, atomic_write_json, save_checkpoint, list_checkpoints
from fastonestep.engine.ema import EMA
from fastonestep.engine.stats import StatsLogger


def test_failed_atomic_write_keeps_the_old_file(tmp_path):
    target = tmp_path / "metrics.json"
    atomic_write_json(str(target), {"v": 1})
    with pytest.raises(RuntimeError):
        with atomic_path(str(target)) as tmp:
            with open(tmp, "w") as f:
                f.write('{"v": 2, "torn')
            raise RuntimeError("killed mid-write")
    assert json.loads(target.read_text()) == {"v": 1}
    assert os.listdir(tmp_path) == ["metrics.json"]  # no temporary left behind
    mask = os.umask(0)
    os.umask(mask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~mask  # not mkstemp's private 0600


def test_checkpoints_keep_the_newest(tmp_path):
    for step in (10, 20, 30):
        save_checkpoint(str(tmp_path), step, {"step": step}, keep=2)
    assert [s for s, _ in list_checkpoints(str(tmp_path))] == [20, 30]


def test_stats_average_finite_values_and_count_the_rest(tmp_path):
    log = StatsLogger(str(tmp_path), torch.device("cpu"))
    log.add({"loss": torch.tensor(1.0), "grad_norm": 2.0}, images=8)
    log.add({"loss": torch.tensor(3.0), "grad_norm": float("inf")}, images=8)
    log.add({"loss": torch.tensor(float("nan")), "grad_norm": 4.0}, images=8)
    row = log.flush(step=3, nimg=24)
    assert row["loss"] == 2.0 and row["grad_norm"] == 3.0
    assert row["nonfinite/loss"] == 1 and row["nonfinite/grad_norm"] == 1
    assert json.loads((tmp_path / "stats.jsonl").read_text())["step"] == 3


def test_ema_half_life():
    net = torch.nn.Linear(1, 1, bias=False)
    torch.nn.init.zeros_(net.weight)
    ema = EMA(net, halflife_kimg=0.1, rampup=0)  # half-life of 100 samples
    with torch.no_grad():
        net.weight.fill_(1.0)
    for i in range(10):  # 10 updates of 10 samples = one half-life
        ema.update(net, nimg=(i + 1) * 10, batch_size=10)
    assert ema.net.weight.item() == pytest.approx(0.5, rel=1e-6)


@pytest.mark.parametrize("step, expected", [(0, 0.25), (2, 0.75), (3, 1.0), (10, 1.0), (40, 0.5), (90, 1 / 3)])
def test_lr_schedule_is_a_warm_up_then_edm2s_inverse_square_root_decay(step, expected):
    """lr 1, warm-up 4 steps, decay_steps 10: (step + 1) / 4 up to step 3, then 1 / sqrt(step / 10) past step 10;
    the optimiser of a real update gets exactly that lr."""
    from fastonestep.config import OptimConfig
    from fastonestep.engine.distributed import make_optimizer, optimizer_step

    cfg = OptimConfig(lr=1.0, warmup_steps=4, decay_steps=10)
    net = torch.nn.Linear(3, 1)
    opt = make_optimizer(net.parameters(), cfg)
    net(torch.randn(2, 3)).sum().backward()
    optimizer_step(opt, net, cfg, step)
    assert opt.param_groups[0]["lr"] == pytest.approx(expected, rel=1e-12)


def test_lr_schedule_keys_are_validated():
    from fastonestep.config import ConfigError, load_config

    for key in ("optim.decay_steps", "diffratio.ratio_optim.warmup_steps", "dmd.fake_optim.grad_clip"):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_config(None, [f"{key}=-1"])


def test_peak_memory_on_a_gpu_is_that_of_each_log_interval_without_evaluation(tmp_path, monkeypatch):
    """The CUDA allocator's peak is restarted at every line and after an evaluation, so a line shows what its
    own training steps needed, not the largest evaluation batch ever run (the CUDA calls are stood in for)."""
    allocator = {"peak": 0}
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: allocator["peak"])
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: allocator.update(peak=0))
    stats = StatsLogger(str(tmp_path), torch.device("cuda"))
    mib = 2**20
    for used in (3 * mib, mib):
        allocator["peak"] = used
        stats.add({"loss": 1.0}, 4)
        assert stats.flush(1, 4)["peak_memory_mb"] == used / mib
    allocator["peak"] = 50 * mib  # an evaluation between two steps
    stats.exclude(0.0)
    allocator["peak"] = max(allocator["peak"], 2 * mib)
    stats.add({"loss": 1.0}, 4)
    assert stats.flush(2, 8)["peak_memory_mb"] == 2


def test_a_sharded_ema_must_follow_the_trainables_parameters(tmp_path):
    """shard_like matches the optimizer's master slices to the EMA's parameters by order: a trainable whose
    parameters differ in shape is refused rather than averaged into the wrong tensors."""
    from types import SimpleNamespace

    ema = EMA(torch.nn.Linear(3, 4), halflife_kimg=1.0)
    other = torch.nn.Linear(4, 3)
    slices = [(p.detach().reshape(-1), 0) for p in other.parameters()]
    trainable = SimpleNamespace(name="generator", network=other, backend=None, master_slices=lambda part: slices)
    with pytest.raises(ValueError, match="not those of trainable 'generator'"):
        ema.shard_like(trainable)
    assert not ema.sharded and ema.net.weight.shape == (4, 3)


def flip_bytes_inside(path, marker: bytes) -> None:
    """Corrupts a file in place without changing its size: the bytes after the first `marker` are inverted."""
    data = bytearray(path.read_bytes())
    at = data.index(marker) + len(marker)
    data[at:at + 4] = bytes(255 - b for b in data[at:at + 4])
    path.write_bytes(bytes(data))


def test_a_corrupted_or_truncated_checkpoint_is_refused_by_name(tmp_path):
    """Flipped bytes inside a tensor's data (same size, the zip still reads) or a cut-off file: the checksum
    written with the checkpoint no longer matches."""
    from fastonestep.engine.checkpoint import CheckpointError, load_checkpoint

    weights = torch.arange(64, dtype=torch.float32)
    path = save_checkpoint(str(tmp_path), 5, {"step": 5, "w": weights})
    assert torch.equal(load_checkpoint(path)["w"], weights)
    flip_bytes_inside(tmp_path / os.path.basename(path), weights[:8].numpy().tobytes())
    with pytest.raises(CheckpointError, match=f"checkpoint '{re.escape(path)}' is damaged"):
        load_checkpoint(path)
    path = save_checkpoint(str(tmp_path), 6, {"step": 6, "w": weights})
    data = (tmp_path / os.path.basename(path)).read_bytes()
    (tmp_path / os.path.basename(path)).write_bytes(data[:len(data) // 2])
    with pytest.raises(CheckpointError, match=f"checkpoint '{re.escape(path)}' is damaged"):
        load_checkpoint(path)


@contextlib.contextmanager
def torch_crc32(enabled: bool):
    """torch's global switch for the CRC-32s of torch.save (not monkeypatch: its undo deletes the setting)."""
    from torch.utils.serialization import config

    saved = config.save.compute_crc32
    config.save.compute_crc32 = enabled
    try:
        yield config.save
    finally:
        config.save.compute_crc32 = saved


def test_checkpoints_stay_torch_save_files_with_their_checksums_forced_on(tmp_path):
    """The checksums are the CRC-32s of torch.save's zip records: torch.load still reads a checkpoint, one written
    by an earlier version is checked alike, and torch's global switch that leaves them out does not apply to
    checkpoints; a file written with it off (every CRC 0) loads unchecked."""
    from fastonestep.engine.checkpoint import CheckpointError, load_checkpoint

    weights = torch.arange(8.0)
    with torch_crc32(False) as setting:
        path = save_checkpoint(str(tmp_path), 5, {"step": 5, "w": weights})
        assert setting.compute_crc32 is False  # restored
        torch.save({"step": 7}, tmp_path / "checkpoint-00000007.pt")  # as a foreign tool might write it
    assert torch.load(path, weights_only=False)["step"] == 5
    flip_bytes_inside(tmp_path / os.path.basename(path), weights[:2].numpy().tobytes())
    with pytest.raises(CheckpointError, match="is damaged: record '.*' fails its CRC-32 check"):
        load_checkpoint(path)
    assert load_checkpoint(str(tmp_path / "checkpoint-00000007.pt"))["step"] == 7
    torch.save({"step": 9, "w": weights}, tmp_path / "checkpoint-00000009.pt")  # as an earlier version wrote it
    assert load_checkpoint(str(tmp_path / "checkpoint-00000009.pt"))["step"] == 9
    flip_bytes_inside(tmp_path / "checkpoint-00000009.pt", weights[:2].numpy().tobytes())
    with pytest.raises(CheckpointError, match="is damaged"):
        load_checkpoint(str(tmp_path / "checkpoint-00000009.pt"))


def test_a_damaged_newest_checkpoint_falls_back_to_the_older_one(tmp_path):
    """The run resumes from the older of the two kept checkpoints, with a warning naming the damaged one, which
    the next checkpoint saved removes; with none readable, the error names them all."""
    from fastonestep.engine.checkpoint import CheckpointError, load_latest_checkpoint

    paths = [save_checkpoint(str(tmp_path), step, {"step": step, "w": torch.full((16,), float(step))})
             for step in (10, 20)]
    flip_bytes_inside(tmp_path / os.path.basename(paths[1]), torch.full((2,), 20.0).numpy().tobytes())
    warnings = []
    path, state = load_latest_checkpoint(str(tmp_path), warn=warnings.append)
    assert (path, state["step"]) == (paths[0], 10)
    assert len(warnings) == 1 and paths[1] in warnings[0] and paths[0] in warnings[0]
    save_checkpoint(str(tmp_path), 15, {"step": 15})  # the resumed run's next checkpoint
    assert [s for s, _ in list_checkpoints(str(tmp_path))] == [10, 15]
    (tmp_path / "checkpoint-00000015.pt").write_bytes(b"")  # now both are damaged
    flip_bytes_inside(tmp_path / os.path.basename(paths[0]), torch.full((2,), 10.0).numpy().tobytes())
    with pytest.raises(CheckpointError, match="no checkpoint in run directory.*checkpoint-00000015.pt.*"
                                              "checkpoint-00000010.pt"):
        load_latest_checkpoint(str(tmp_path), warn=warnings.append)


def test_a_torn_last_log_line_is_dropped_and_a_bad_line_is_named(tmp_path):
    """A kill while a line is appended leaves it torn (no newline): the resume's truncation drops it, since it is
    past the checkpoint. A bad line elsewhere is an error naming the file and the line."""
    from fastonestep.engine.periodic_eval import read_eval_log, truncate_eval_log
    from fastonestep.engine.stats import truncate_stats

    good = "".join(json.dumps({"step": s, "loss": 0.5}) + "\n" for s in (1, 2))
    for name, truncate in (("stats.jsonl", truncate_stats), ("eval.jsonl", truncate_eval_log)):
        log = tmp_path / name
        log.write_text(good + '{"step": 3, "lo')
        truncate(str(tmp_path), 2)
        assert log.read_text() == good
        log.write_text(good + '{"step": 3, "lo\n' + json.dumps({"step": 4}) + "\n")
        with pytest.raises(ValueError, match=f"log file '{re.escape(str(log))}' line 3 is not valid JSON"):
            truncate(str(tmp_path), 2)
    (tmp_path / "eval.jsonl").write_text(good + '{"step": 3')
    assert [row["step"] for row in read_eval_log(str(tmp_path))] == [1, 2]


def test_only_stale_atomic_write_temporaries_are_removed(tmp_path):
    """What a killed process left from atomic_path (anywhere under the run directory) goes; DeepSpeed's shard
    directories under a temporary tag and other files stay."""
    import tempfile

    from fastonestep.engine.rundir import remove_stale_temporaries

    fd, stale = tempfile.mkstemp(prefix=".tmp-", suffix="-checkpoint-00000005.pt", dir=tmp_path)  # atomic_path's
    os.close(fd)
    (tmp_path / "ema").mkdir()
    (tmp_path / "ema" / ".tmp-abcd_123-ema-0.050-000001.safetensors").write_bytes(b"x")
    shards = tmp_path / "ds" / "generator" / ".tmp-step00000012"
    shards.mkdir(parents=True)
    (shards / "mp_rank_00_model_states.pt").write_bytes(b"x")
    (tmp_path / ".tmp-notes").write_text("mine")
    removed = remove_stale_temporaries(str(tmp_path))
    assert sorted(os.path.basename(p) for p in removed) == sorted(
        [os.path.basename(stale), ".tmp-abcd_123-ema-0.050-000001.safetensors"])
    assert (shards / "mp_rank_00_model_states.pt").exists() and (tmp_path / ".tmp-notes").exists()


def test_a_second_lock_on_a_run_directory_is_refused_with_the_holders_pid(tmp_path):
    from fastonestep.engine.rundir import RunDirectoryInUse, RunLock

    held = RunLock(str(tmp_path))
    with pytest.raises(RunDirectoryInUse, match=f"run directory '{re.escape(str(tmp_path))}' is in use by another process "
                                                 rf"\(pid {os.getpid()}\)"):
        RunLock(str(tmp_path))
    held.release()
    RunLock(str(tmp_path)).release()  # free again


def test_a_damaged_or_partial_deepspeed_checkpoint_is_named(tmp_path):
    """The checkpoint records the files of each engine's DeepSpeed directory and their sizes; a missing or
    truncated shard, or any error while DeepSpeed loads one, names the directory."""
    from types import SimpleNamespace

    from fastonestep.engine.checkpoint import CheckpointError
    from fastonestep.engine.distributed import DeepSpeedTrainable, shard_files

    tag = tmp_path / "ds" / "generator" / "step00000004"
    tag.mkdir(parents=True)
    (tag / "mp_rank_00_model_states.pt").write_bytes(b"m" * 100)
    (tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"o" * 300)
    ref = {"deepspeed": {"dir": os.path.join("ds", "generator"), "tag": "step00000004", "files": shard_files(str(tag))}}

    def failing_load(*args, **kwargs):
        raise RuntimeError("PytorchStreamReader failed reading zip archive")

    trainable = DeepSpeedTrainable.__new__(DeepSpeedTrainable)  # no engine needed to reach the checks
    trainable.name, trainable.backend = "generator", SimpleNamespace(run_dir=str(tmp_path), world_size=1)
    trainable.engine = SimpleNamespace(load_checkpoint=failing_load)
    with pytest.raises(CheckpointError, match=f"DeepSpeed checkpoint '{re.escape(str(tag))}' cannot be loaded: PytorchStream"):
        trainable.load_state_dict(ref)
    (tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"o" * 120)
    with pytest.raises(CheckpointError, match=f"DeepSpeed checkpoint '{re.escape(str(tag))}' is damaged: "
                                              "'zero_pp_rank_0_mp_rank_00_optim_states.pt' has 120 bytes, 300"):
        trainable.load_state_dict(ref)
    (tag / "mp_rank_00_model_states.pt").unlink()
    with pytest.raises(CheckpointError, match=f"'{re.escape(str(tag))}' is incomplete: 'mp_rank_00_model_states.pt' is missing"):
        trainable.load_state_dict(ref)


def test_a_file_system_without_flock_trains_unlocked_with_a_warning(tmp_path, monkeypatch):
    """Lustre mounted without flock answers ENOSYS: the run goes on, unprotected, and says so."""
    import errno
    from types import SimpleNamespace

    from fastonestep.engine import rundir

    def no_flock(fd, op):
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(rundir.fcntl, "flock", no_flock)
    (tmp_path / ".tmp-abcdefgh-stats.jsonl").write_text("{}")  # maybe another live process's: kept
    said = []
    backend = SimpleNamespace(is_main=True, broadcast_object=lambda obj: obj)
    with rundir.claimed_run_dir(str(tmp_path), backend, said.append):
        pass
    assert len(said) == 1 and "cannot be locked" in said[0]
    assert (tmp_path / ".tmp-abcdefgh-stats.jsonl").exists()
