"""Engine pieces: atomic writes never leave a torn file, stats count non-finite values, EMA follows its
half-life."""
import json
import os

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
