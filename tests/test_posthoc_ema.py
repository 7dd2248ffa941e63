"""Post-hoc EMA (engine/posthoc_ema.py): the power-function EMA's width and per-batch weights against their
definitions, the reconstruction against EMAs of the target width tracked directly, and a training run that
writes snapshots, resumes bit-identically and is reconstructed through `fastonestep ema`."""
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from conftest import CONFIGS, TOY_TEACHER
from fastonestep.cli import main
from fastonestep.config import ConfigError, load_config
from fastonestep.engine.dryrun import NetworkPlan, state_bytes
from fastonestep.engine.export import load_model
from fastonestep.engine.loop import train
from fastonestep.engine.posthoc_ema import (MAX_STD, PowerEMA, gamma_to_std, list_snapshots, solve_coefficients,
                                            std_to_gamma)

QUIET = dict(progress=False, log=lambda *_: None)


@pytest.mark.parametrize("std", [0.01, 0.05, 0.1, 0.2, MAX_STD])
def test_gamma_gives_a_profile_of_that_width(std):
    """The std of t ~ p(t) = (gamma+1) t^gamma on [0, 1], by quadrature, is the requested relative width."""
    gamma = std_to_gamma(std)
    t = np.linspace(0.0, 1.0, 2_000_001)
    p = (gamma + 1) * t ** gamma
    mean = np.trapezoid(t * p, t)
    width = math.sqrt(np.trapezoid((t - mean) ** 2 * p, t))
    assert width == pytest.approx(std, rel=1e-4)
    assert gamma_to_std(gamma) == pytest.approx(std, rel=1e-12)


def test_edm2s_published_exponents():
    """EDM2 (Karras et al. 2024) tracks sigma_rel 0.05 and 0.10, i.e. gamma 16.97 and 6.94."""
    assert std_to_gamma(0.05) == pytest.approx(16.97, abs=0.005)
    assert std_to_gamma(0.10) == pytest.approx(6.94, abs=0.005)


@pytest.mark.parametrize("std", [0.0, -0.1, 0.3])
def test_widths_outside_the_power_family_are_refused(std):
    with pytest.raises(ValueError, match="relative std must be in"):
        std_to_gamma(std)


class Weights(nn.Module):
    def __init__(self, n):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(n, dtype=torch.float64))


def test_each_batch_gets_the_profiles_mass_over_its_images():
    """With batch k holding a one-hot weight vector, the EMA is the weight of each batch: the mass of
    p(t) = (gamma+1) t^gamma / T^(gamma+1) over that batch's images, for batches of different sizes."""
    batches = [3, 5, 2, 8, 8, 1, 4, 7]
    net, ema = Weights(len(batches)), PowerEMA(Weights(len(batches)), 0.1)
    nimg = 0
    for k, b in enumerate(batches):
        net.w.data.zero_()
        net.w.data[k] = 1.0
        nimg += b
        ema.update(net, nimg, b)
    ends = np.cumsum(batches, dtype=np.float64)
    g1 = ema.gamma + 1
    want = (ends ** g1 - np.concatenate([[0.0], ends[:-1]]) ** g1) / ends[-1] ** g1
    np.testing.assert_allclose(ema.net.w.detach().numpy(), want, rtol=1e-12, atol=1e-15)
    assert want.sum() == pytest.approx(1.0)


def test_reconstruction_matches_an_ema_of_that_width_tracked_directly():
    """Snapshots of the 0.05 and 0.10 EMAs every 25 steps of a drifting random walk; the reconstruction of
    other widths (inside and outside that range, at the end and at an earlier snapshot) is compared with EMAs
    of those widths tracked from the start. The error is measured against how far the target is from the
    nearest tracked EMA (what choosing the wrong width costs)."""
    torch.manual_seed(0)
    steps, batch, dim = 1000, 8, 64
    walk = (torch.cumsum(torch.randn(steps, dim, dtype=torch.float64), 0) * 0.1
            + torch.linspace(0, 5, steps, dtype=torch.float64)[:, None])
    net = Weights(dim)
    tracked = {s: PowerEMA(net, s) for s in (0.05, 0.10)}
    direct = {s: PowerEMA(net, s) for s in (0.03, 0.07, 0.15)}
    snapshots, direct_at_600 = [], {}
    for k in range(steps):
        net.w.data.copy_(walk[k])
        for ema in (*tracked.values(), *direct.values()):
            ema.update(net, (k + 1) * batch, batch)
        if (k + 1) % 25 == 0:
            snapshots += [((k + 1) * batch, s, ema.net.w.detach().clone()) for s, ema in tracked.items()]
        if k + 1 == 600:
            direct_at_600 = {s: ema.net.w.detach().clone() for s, ema in direct.items()}
    cases = [(s, steps, ema.net.w.detach()) for s, ema in direct.items()] + [(0.07, 600, direct_at_600[0.07])]
    for std, at, want in cases:
        used = [s for s in snapshots if s[0] <= at * batch]
        c, fit_error = solve_coefficients([s[0] for s in used], [s[1] for s in used], at * batch, std)
        got = sum(ci * w for ci, (_, _, w) in zip(c, used))
        nearest = min(((want - w).norm() for n, _, w in used if n == at * batch))
        assert float((got - want).norm() / nearest) < 1e-2, (std, at)
        assert fit_error < 1e-2, (std, at, fit_error)


def test_a_tracked_width_at_a_snapshot_is_that_snapshot():
    c, error = solve_coefficients([1000, 1000, 2000, 2000], [0.05, 0.1, 0.05, 0.1], 2000, 0.1)
    np.testing.assert_allclose(c, [0, 0, 0, 1], atol=1e-9)
    assert error < 1e-6


# -- in training ------------------------------------------------------------------------------------------------
POSTHOC = TOY_TEACHER + ["train.batch_size=256", "train.ema_stds=[0.05, 0.1]", "train.ema_snapshot_kimg=0.512",
                         "train.checkpoint_every=4", "eval.num_samples=256", "eval.batch_size=256"]
EDM_TOY = str(CONFIGS / "toy2d" / "edm.yaml")


@pytest.fixture(scope="module")
def posthoc_runs(tmp_path_factory):
    """A 9-step toy EDM run with post-hoc EMAs (snapshots every 2 steps and at the end), the same run tracking a
    third width directly, and the first run stopped after 5 steps and resumed by the same command."""
    root = tmp_path_factory.mktemp("posthoc")
    train(load_config(EDM_TOY, POSTHOC + ["train.steps=9"]), str(root / "full"), **QUIET)
    # the same training (the power EMAs draw no random numbers) with a 0.07 EMA tracked directly
    train(load_config(EDM_TOY, POSTHOC + ["train.steps=9", "train.ema_stds=[0.05, 0.07, 0.1]"]),
          str(root / "direct"), **QUIET)
    train(load_config(EDM_TOY, POSTHOC + ["train.steps=5"]), str(root / "split"), **QUIET)
    train(load_config(EDM_TOY, POSTHOC + ["train.steps=9"]), str(root / "split"), **QUIET)
    return root


def test_snapshots_are_written_every_interval_and_at_the_end(posthoc_runs):
    snapshots = list_snapshots(str(posthoc_runs / "full"))
    assert [(s.nimg, s.std) for s in snapshots] == [(n * 256, std) for n in (2, 4, 6, 8, 9) for std in (0.05, 0.1)]
    net, info = load_model(snapshots[-1].path)  # a snapshot is a model file like model.safetensors
    assert info["posthoc_ema"] == {"std": 0.1, "nimg": 9 * 256}
    final = load_file(str(posthoc_runs / "full" / "model.safetensors"))
    assert set(net.state_dict()) == set(final)


def test_a_resumed_run_writes_the_same_snapshots(posthoc_runs):
    """The first part ends at step 5 (a snapshot and a checkpoint there); the resumed part restores the power
    EMAs from that checkpoint and writes the later snapshots bit-identical to the uninterrupted run's."""
    full, split = list_snapshots(str(posthoc_runs / "full")), list_snapshots(str(posthoc_runs / "split"))
    ends_of_part_one = {(5 * 256, 0.05), (5 * 256, 0.1)}
    assert {(s.nimg, s.std) for s in split} == {(s.nimg, s.std) for s in full} | ends_of_part_one
    for s in full:
        a, b = load_file(s.path), load_file(s.path.replace(str(posthoc_runs / "full"), str(posthoc_runs / "split")))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), s


def test_the_cli_reconstructs_any_width(posthoc_runs, tmp_path, capsys):
    run = posthoc_runs / "full"
    assert main(["ema", str(run), "--std", "0.07", "0.1"]) == 0
    printed = capsys.readouterr().out
    assert "model-ema0.0700.safetensors: post-hoc EMA std 0.07" in printed and "WARNING" not in printed
    net, info = load_model(str(run / "model-ema0.0700.safetensors"))
    assert info["posthoc_ema"]["std"] == 0.07 and info["posthoc_ema"]["nimg"] == 9 * 256
    assert info["posthoc_ema"]["snapshots"] == 10
    # against the 0.07 EMA the same training tracked directly: far closer than the nearest tracked width is
    rebuilt = load_file(str(run / "model-ema0.0700.safetensors"))
    direct = {s.std: load_file(s.path) for s in list_snapshots(str(posthoc_runs / "direct")) if s.nimg == 9 * 256}
    names = [k for k, _ in net.named_parameters()]
    error = sum(float((rebuilt[k] - direct[0.07][k]).double().norm() ** 2) for k in names) ** 0.5
    gap = sum(float((direct[0.05][k] - direct[0.07][k]).double().norm() ** 2) for k in names) ** 0.5
    assert error < 0.1 * gap, (error, gap)  # 0.03 here; 3.0 with unconstrained coefficients
    # buffers are copied by an EMA, not averaged: the latest snapshot's, not scaled by the coefficients' sum
    buffers = [k for k, _ in net.named_buffers()]
    assert buffers and all(torch.equal(rebuilt[k], direct[0.07][k]) for k in buffers)
    # the tracked width at the last snapshot is that snapshot (up to the float64 sum of the others times ~0)
    tracked = load_file(list_snapshots(str(run))[-1].path)
    rebuilt = load_file(str(run / "model-ema0.1000.safetensors"))
    for k in tracked:
        torch.testing.assert_close(rebuilt[k], tracked[k], rtol=1e-5, atol=1e-6)
    # at an earlier time, from the snapshots up to it
    out = tmp_path / "early.safetensors"
    assert main(["ema", str(run), "--std", "0.08", "--kimg", str(4 * 0.256), "--out", str(out)]) == 0
    assert load_model(str(out))[1]["posthoc_ema"]["snapshots"] == 4
    assert main(["sample", str(out), "--num", "16", "--steps", "4", "--out", str(tmp_path / "s.png")]) == 0


def test_eval_scores_a_post_hoc_ema_in_place_of_the_runs_ema(posthoc_runs, tmp_path, capsys):
    """`eval RUN --model FILE` samples with FILE's weights (a snapshot of another average than the EMA: other
    metrics) and leaves the run's own metrics.json alone."""
    run = posthoc_runs / "full"
    own = (run / "metrics.json").read_text()
    snapshot = list_snapshots(str(run))[-2].path  # std 0.05 at the end
    assert main(["eval", str(run), "--model", snapshot, "--num", "256"]) == 0
    scored = json.loads((run / Path(snapshot).name.replace(".safetensors", "-metrics.json")).read_text())
    assert scored["model"] == snapshot and (run / "metrics.json").read_text() == own
    assert main(["eval", str(run), "--num", "256", "--json", str(tmp_path / "ema.json")]) == 0
    by_ema = json.loads((tmp_path / "ema.json").read_text())
    model = next(iter(by_ema))  # the run's model: the first sampler

    def sample_metrics(row):
        return {k: v for k, v in row.items() if k != "generation_seconds"}

    assert sample_metrics(scored[model]) != sample_metrics(by_ema[model])
    assert main(["eval", str(run), "--model", str(tmp_path / "none.safetensors")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_cli_errors_name_the_problem(posthoc_runs, tmp_path, capsys):
    assert main(["ema", str(tmp_path), "--std", "0.07"]) == 2
    assert "has no post-hoc EMA snapshots" in capsys.readouterr().err
    assert main(["ema", str(posthoc_runs / "full"), "--std", "0.4"]) == 2
    assert "relative std must be in" in capsys.readouterr().err
    for kimg in ("0.1", "1.1", "2.9"):  # before the first, between two, after the last snapshot
        assert main(["ema", str(posthoc_runs / "full"), "--std", "0.07", "--kimg", kimg]) == 2
        assert f"no snapshot at {kimg} kimg" in capsys.readouterr().err


@pytest.mark.parametrize("overrides, message", [
    (["train.ema_stds=[0.5]"], "train.ema_stds"),
    (["train.ema_stds=[0.05, 0.05]"], "same width twice"),
    (["train.ema_stds=[0.05, 0.12345]"], "4 decimals"),
    (["train.ema_stds=[0.05]"], "train.ema_snapshot_kimg"),
])
def test_config_errors_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(EDM_TOY, overrides)


@pytest.mark.parametrize("stage, gpus, per_gpu", [(0, 8, 8.0), (1, 8, 1.0), (3, 4, 2.0)])
def test_dry_run_counts_the_power_emas(stage, gpus, per_gpu):
    """Each power EMA is 4 fp32 bytes per parameter, sharded over the GPUs under ZeRO like the EMA."""
    net = nn.Linear(10, 10)  # 110 parameters
    without = state_bytes(NetworkPlan("g", net, "trainable", ema=True), "bf16", gpus, stage)
    with_two = state_bytes(NetworkPlan("g", net, "trainable", ema=True, posthoc=2), "bf16", gpus, stage)
    assert with_two["ema"] - without["ema"] == pytest.approx(per_gpu * 110)
    assert with_two["total"] - without["total"] == pytest.approx(per_gpu * 110)
