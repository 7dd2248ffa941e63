"""Distributed backends on CPU (gloo, 2 processes via torchrun): a tiny DiffRatio toy job under ddp and
DeepSpeed ZeRO-1/2/3 follows the single-process trajectory, with and without gradient accumulation; checkpoints
round-trip under every backend; a run stopped after step 3 and resumed ends where the uninterrupted run ends;
the ZeRO-3 export is the gathered EMA. The teacher-distillation methods with a frozen teacher follow their
single-process trajectories too: DMD2 (GAN head, backward simulation) under ddp and ZeRO-2/3, DP-DMD under ddp
and ZeRO-2, backward distillation under ddp, several with gradient accumulation. UNet DiffRatio and DMD2 jobs on a
tiny MNIST teacher run under ZeRO-3 with activation checkpointing, and EDM pretraining of an EDM2 UNet under
ZeRO-2/3. One torchrun launch runs all distributed jobs
(tests/distributed_worker.py).

Tolerance for "same trajectory" (RTOL below): the distributed runs compute the same global-batch gradient in a
different fp32 summation order (the mean of two rank means instead of one mean, the all-reduce, DeepSpeed's
clip as a division), i.e. differences of ~1e-7 relative per step; over 6 Adam steps they stay below 1e-5
relative on every logged loss and weight. 2e-5 leaves margin while a real semantic error (a wrong slice of the
batch or of the noise, a missed reduction, a gradient leaking into the other network) changes the losses in
the 3rd digit or more.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import CONFIGS, MNIST_TINY, TOY_STUDENT
from fastonestep.config import ConfigError, load_config
from fastonestep.engine.checkpoint import latest_checkpoint, load_checkpoint
from fastonestep.engine.export import load_model
from fastonestep.engine.loop import build, train

try:
    import deepspeed  # noqa: F401

    HAVE_DEEPSPEED = True
except ImportError:  # CI installs the [deepspeed] extra; elsewhere the DeepSpeed cases skip
    HAVE_DEEPSPEED = False

RTOL = 2e-5
QUIET = dict(progress=False, log=lambda *_: None)
PRESET = str(CONFIGS / "toy2d" / "diffratio.yaml")
LOSSES = ("gen/loss", "ratio/loss", "ratio/accuracy", "gen/logit", "gen/grad_magnitude")
DS = ["distributed.backend=deepspeed"]
DDP = ["distributed.backend=ddp"]


# Post-hoc power EMAs (snapshots every 2 steps): sharded like the EMA, restored on resume, compared with the
# single-process run's snapshots.
POSTHOC = ["train.ema_stds=[0.05, 0.1]", "train.ema_snapshot_kimg=0.128"]


def base(teacher):
    return TOY_STUDENT + [f"teacher={teacher}", "train.steps=6", "train.batch_size=64", "train.log_every=1",
                          "train.checkpoint_every=2", "eval.num_samples=64", "eval.batch_size=64", "eval.grid=2",
                          "optim.warmup_steps=2", "diffratio.ratio_steps=2"] + POSTHOC


# name -> (overrides, round trip check); "<name>-split" jobs stop at step 3 (checkpoints 2, 3) and are resumed
# from step 3 to step 6 by the same command with train.steps=6.
JOBS = {
    "ddp": (DDP, True),
    "ddp-accum": (DDP + ["train.batch_per_gpu=16"], False),
    "zero1": (DS + ["distributed.zero_stage=1"], True),
    "zero2": (DS + ["distributed.zero_stage=2"], True),
    # Every parameter partitioned (see ZERO3_ALL_SHARDED): the frozen-ratio and EMA gathers are really exercised.
    "zero3": (DS + ["distributed.zero_stage=3", "distributed.deepspeed_config={zero3_json}"], True),
    "zero2-accum": (DS + ["distributed.zero_stage=2", "train.batch_per_gpu=8"], False),
}
SPLIT = ("ddp", "zero3")
# "<name>-stopped": rank 0 alone gets SIGTERM during step STOP_AT (between the checkpoints at 2 and 4); both ranks
# must stop after that step with its checkpoint, and the job re-run resumes there.
STOPPED = ("ddp", "zero3")
STOP_AT = 3

# bf16 DeepSpeed (the GPU setting; DeepSpeed's CPU accelerator runs it too): the module's weights are bf16 copies of
# fp32 master weights, under ZeRO-3 partitioned. The exports (EMA generator, DiffRatio's ratio network) must be
# whole and hold the fp32 masters. Not compared with the fp32 trajectory: bf16 forwards differ in the 3rd digit.
BF16_JOBS = {"zero2-bf16": DS + ["distributed.zero_stage=2", "distributed.precision=bf16"],
             "zero3-bf16": DS + ["distributed.zero_stage=3", "distributed.precision=bf16",
                                 "distributed.deepspeed_config={zero3_bf16_json}"]}

# Distillation methods with a frozen teacher: name -> (preset, overrides, logged values compared). Each is
# compared with its own single-process run. DMD2 gets a strong GAN (so a GAN gradient leaking into the critic
# or missing from the generator would show) and two levels with backward simulation; backward distillation
# three levels with a 2-step teacher ODE target. 4 steps each, checkpoints only at the end. The gradient norms
# (of the reduced global-batch gradient) are compared too: Adam hides a wrongly scaled gradient in the losses.
GRAD_NORMS = ("grad_norm/generator", "grad_norm/fake")
DISTILL_STEPS = 4
DISTILL = {
    "dmd2": ("dmd2.yaml", ["dmd.fake_steps=2", "dmd.student_sigmas=[40.0, 1.0]", "dmd.gan_weight=0.1",
                           "dmd.gan_disc_weight=1.0"],
             ("gen/loss", "gen/dmd_loss", "gen/gan_loss", "fake/loss", "fake/gan_loss") + GRAD_NORMS),
    "dpdmd": ("dpdmd.yaml", ["dpdmd.teacher_steps=2"],
              ("gen/loss", "gen/dmd_loss", "gen/target_loss", "fake/loss") + GRAD_NORMS),
    "backward": ("backward.yaml", ["backward.student_sigmas=[40,2,0.5]", "backward.teacher_steps=2"],
                 ("gen/loss", "backward/step_mean", "grad_norm/generator")),
}
# ZeRO-3 with every parameter partitioned (the shipped zero3-cpu.json keeps tensors under 1e5 elements whole,
# i.e. all of a toy net): the frozen critic's GAN pass and the EMA then really need gathered parameters.
ZERO3_ALL_SHARDED = {"zero_optimization": {"stage": 3, "overlap_comm": False, "contiguous_gradients": True,
                                           "stage3_param_persistence_threshold": 0},
                     "bf16": {"enabled": False}}
DISTILL_JOBS = {  # name -> (method, overrides, round trip check); "{zero3_json}" is filled in by the fixture
    "dmd2-ddp": ("dmd2", DDP + ["train.batch_per_gpu=16"], False),
    "dmd2-zero2": ("dmd2", DS + ["distributed.zero_stage=2"], False),
    "dmd2-zero3": ("dmd2", DS + ["distributed.zero_stage=3", "distributed.deepspeed_config={zero3_json}",
                                 "train.batch_per_gpu=16"], True),
    "dpdmd-ddp": ("dpdmd", DDP, False),
    "dpdmd-zero2": ("dpdmd", DS + ["distributed.zero_stage=2", "train.batch_per_gpu=16"], False),
    "backward-ddp": ("backward", DDP + ["train.batch_per_gpu=8"], True),
}

# UNet jobs on the tiny MNIST teacher with train.activation_checkpointing under ZeRO-3, every parameter
# partitioned: the blocks' recomputation in the backward must gather their parameters again (through the
# module hooks). Each is compared with its single-process run without checkpointing.
MNIST_STEPS = 3
MNIST_JOBS = {  # name -> (preset, overrides, logged values compared)
    "mnist-diffratio-zero3-ckpt": ("diffratio.yaml", [], LOSSES),
    "mnist-dmd2-zero3-ckpt": ("dmd2.yaml", ["dmd.fake_steps=2", "dmd.gan_weight=0.1", "dmd.gan_disc_weight=1.0"],
                              DISTILL["dmd2"][2]),
}
CHECKPOINTED_ZERO3 = DS + ["distributed.zero_stage=3", "distributed.deepspeed_config={zero3_json}",
                           "train.activation_checkpointing=true"]

# EDM pretraining of a tiny EDM2 UNet with EDM2's learned loss weighting, under ZeRO-2 and ZeRO-3 (every parameter
# partitioned, so weight rows are split between the ranks): the forced weight normalisation must reach
# DeepSpeed's fp32 master weights (engine/zero_weight_norm.py), else the runs drift from the single-process one
# by ~1e-3 within 4 steps at this lr. The EMA follows the denoiser only, not the log-variance head.
EDM2_STEPS = 4
EDM2_BASE = MNIST_TINY + ["network.kind=edm2", "edm.logvar_channels=16", "optim.lr=0.01", f"train.steps={EDM2_STEPS}",
                          "train.log_every=1", f"train.checkpoint_every={EDM2_STEPS}", "train.ema_stds=[0.05, 0.1]",
                          "train.ema_snapshot_kimg=0.016"]
EDM2_JOBS = {"edm2-zero2": DS + ["distributed.zero_stage=2"],
             "edm2-zero3": DS + ["distributed.zero_stage=3", "distributed.deepspeed_config={zero3_json}"]}
EDM2_KEYS = ("loss", "edm/logvar", "grad_norm/denoiser")
# DiffRatio from that EDM2 teacher under ZeRO-3: the ratio network's first forward after its update is the frozen
# one of the generator step, whose rescale must reach the fp32 master weights too.
EDM2_DIFFRATIO = ["optim.lr=0.01", "diffratio.ratio_optim.lr=0.01", "train.steps=3", "train.log_every=1",
                  "train.checkpoint_every=3"]


def mnist_base(teacher, name):
    preset, extra, _ = MNIST_JOBS[name]
    return str(CONFIGS / "mnist" / preset), MNIST_TINY + [
        f"teacher={teacher}", f"train.steps={MNIST_STEPS}", "train.log_every=1",
        f"train.checkpoint_every={MNIST_STEPS}"] + extra


def distill_base(teacher, method):
    preset, extra, _ = DISTILL[method]
    return str(CONFIGS / "toy2d" / preset), TOY_STUDENT + [
        f"teacher={teacher}", f"train.steps={DISTILL_STEPS}", "train.batch_size=64", "train.log_every=1",
        f"train.checkpoint_every={DISTILL_STEPS}", "eval.num_samples=64", "eval.batch_size=64", "eval.grid=2",
        "optim.warmup_steps=2"] + POSTHOC + extra


def rows(run):
    return [json.loads(line) for line in (Path(run) / "stats.jsonl").read_text().splitlines()]


def trajectory(run, keys=LOSSES):
    return [{k: r[k] for k in keys} | {"step": r["step"]} for r in rows(run)]


def assert_close_trajectory(run, ref, keys=LOSSES, steps=6):
    got, want = trajectory(run, keys), trajectory(ref, keys)
    assert [r["step"] for r in got] == [r["step"] for r in want] == list(range(1, steps + 1))
    for g, w in zip(got, want):
        for k in keys:
            assert g[k] == pytest.approx(w[k], rel=RTOL, abs=1e-7), (run, g["step"], k)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, toy_teacher, mnist_teacher):
    """The single-process reference runs in this process, then every distributed job in one torchrun launch."""
    root = tmp_path_factory.mktemp("distributed")
    train(load_config(PRESET, base(toy_teacher)), str(root / "single"), **QUIET)
    train(load_config(PRESET, base(toy_teacher) + ["train.batch_per_gpu=16"]), str(root / "single-accum"), **QUIET)
    for method in DISTILL:
        train(load_config(*distill_base(toy_teacher, method)), str(root / f"single-{method}"), **QUIET)
    for name in MNIST_JOBS:
        train(load_config(*mnist_base(mnist_teacher, name)), str(root / f"single-{name}"), **QUIET)
    edm2_preset = str(CONFIGS / "mnist" / "teacher.yaml")
    train(load_config(edm2_preset, EDM2_BASE), str(root / "single-edm2"), **QUIET)
    diffratio_preset = str(CONFIGS / "mnist" / "diffratio.yaml")
    edm2_diffratio = MNIST_TINY + [f"teacher={root / 'single-edm2'}"] + EDM2_DIFFRATIO
    train(load_config(diffratio_preset, edm2_diffratio), str(root / "single-edm2-diffratio"), **QUIET)
    zero3_json = root / "zero3-all-sharded.json"
    zero3_json.write_text(json.dumps(ZERO3_ALL_SHARDED))
    zero3_bf16_json = root / "zero3-all-sharded-bf16.json"
    zero3_bf16_json.write_text(json.dumps({**ZERO3_ALL_SHARDED, "bf16": {"enabled": True}}))
    jobs = []
    for name, (extra, check) in JOBS.items():
        if "distributed.backend=deepspeed" in extra and not HAVE_DEEPSPEED:
            continue
        extra = [o.format(zero3_json=zero3_json) for o in extra]
        jobs.append({"run": str(root / name), "overrides": extra, "roundtrip": check})
        if name in SPLIT:
            split = str(root / f"{name}-split")
            jobs += [{"run": split, "overrides": extra + ["train.steps=3"]}, {"run": split, "overrides": extra}]
        if name in STOPPED:
            jobs.append({"run": str(root / f"{name}-stopped"), "overrides": extra, "signal_at": STOP_AT})
    for name, extra in BF16_JOBS.items() if HAVE_DEEPSPEED else ():
        jobs.append({"run": str(root / name), "overrides": [o.format(zero3_bf16_json=zero3_bf16_json) for o in extra]})
    for name, (method, extra, check) in DISTILL_JOBS.items():
        if "distributed.backend=deepspeed" in extra and not HAVE_DEEPSPEED:
            continue
        preset, method_base = distill_base(toy_teacher, method)
        jobs.append({"run": str(root / name), "preset": preset, "base": method_base, "roundtrip": check,
                     "overrides": [o.format(zero3_json=zero3_json) for o in extra]})
    for name in MNIST_JOBS if HAVE_DEEPSPEED else ():
        preset, method_base = mnist_base(mnist_teacher, name)
        jobs.append({"run": str(root / name), "preset": preset, "base": method_base,
                     "overrides": [o.format(zero3_json=zero3_json) for o in CHECKPOINTED_ZERO3]})
    for name, extra in EDM2_JOBS.items() if HAVE_DEEPSPEED else ():
        jobs.append({"run": str(root / name), "preset": edm2_preset, "base": EDM2_BASE,
                     "overrides": [o.format(zero3_json=zero3_json) for o in extra]})
        if name == "edm2-zero3":
            jobs.append({"run": str(root / "edm2-diffratio-zero3"), "preset": diffratio_preset,
                         "base": edm2_diffratio, "overrides": [o.format(zero3_json=zero3_json) for o in extra]})
    spec = root / "spec.json"
    spec.write_text(json.dumps({"preset": PRESET, "base": base(toy_teacher), "jobs": jobs}))
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parent)}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or "torchrun"
    done = subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2",
                           str(Path(__file__).parent / "distributed_worker.py"), str(spec)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    return root


@pytest.mark.parametrize("name", list(JOBS))
def test_two_processes_follow_the_single_process_trajectory(runs, name):
    if name.startswith("zero") and not HAVE_DEEPSPEED:
        pytest.skip("deepspeed is not installed (pip install 'fastonestep[deepspeed]')")
    assert_close_trajectory(runs / name, runs / "single")
    ref = load_file(str(runs / "single" / "model.safetensors"))
    got = load_file(str(runs / name / "model.safetensors"))
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=RTOL, atol=1e-6)


def test_accumulation_keeps_the_trajectory(runs):
    """batch_per_gpu changes only how the global batch is split into micro-chunks: same losses (in 1 process)."""
    assert_close_trajectory(runs / "single-accum", runs / "single")


@pytest.mark.parametrize("name", list(DISTILL_JOBS))
def test_distillation_methods_follow_the_single_process_trajectory(runs, name):
    method, extra, _ = DISTILL_JOBS[name]
    if "distributed.backend=deepspeed" in extra and not HAVE_DEEPSPEED:
        pytest.skip("deepspeed is not installed (pip install 'fastonestep[deepspeed]')")
    ref_run = runs / f"single-{method}"
    assert_close_trajectory(runs / name, ref_run, DISTILL[method][2], DISTILL_STEPS)
    ref = load_file(str(ref_run / "model.safetensors"))
    got = load_file(str(runs / name / "model.safetensors"))
    assert got.keys() == ref.keys()
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=RTOL, atol=1e-6)
    if DISTILL_JOBS[name][2]:  # a fresh method loading the checkpoint holds exactly the trained state
        for rank in (0, 1):
            result = json.loads((runs / name / f"roundtrip-rank{rank}.json").read_text())
            assert result["differs"] == [] and "generator/optimizer" in result["checked"], result


@pytest.mark.parametrize("name", list(MNIST_JOBS))
def test_zero3_with_activation_checkpointing_follows_the_single_process_trajectory(runs, name):
    if not HAVE_DEEPSPEED:
        pytest.skip("deepspeed is not installed (pip install 'fastonestep[deepspeed]')")
    assert_close_trajectory(runs / name, runs / f"single-{name}", MNIST_JOBS[name][2], MNIST_STEPS)
    ref = load_file(str(runs / f"single-{name}" / "model.safetensors"))
    got = load_file(str(runs / name / "model.safetensors"))
    assert got.keys() == ref.keys()
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=RTOL, atol=1e-6)


@pytest.mark.parametrize("name", list(EDM2_JOBS))
def test_edm2_under_zero_keeps_its_forced_weight_normalisation(runs, name):
    if not HAVE_DEEPSPEED:
        pytest.skip("deepspeed is not installed (pip install 'fastonestep[deepspeed]')")
    assert_close_trajectory(runs / name, runs / "single-edm2", EDM2_KEYS, EDM2_STEPS)
    ref = load_file(str(runs / "single-edm2" / "model.safetensors"))
    got = load_file(str(runs / name / "model.safetensors"))
    assert got.keys() == ref.keys() and not any("logvar" in k for k in ref)
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=RTOL, atol=1e-6)


def test_edm2_ratio_network_used_frozen_keeps_its_normalisation_under_zero3(runs):
    if not HAVE_DEEPSPEED:
        pytest.skip("deepspeed is not installed (pip install 'fastonestep[deepspeed]')")
    assert_close_trajectory(runs / "edm2-diffratio-zero3", runs / "single-edm2-diffratio", LOSSES, 3)
    ref = load_file(str(runs / "single-edm2-diffratio" / "model.safetensors"))
    got = load_file(str(runs / "edm2-diffratio-zero3" / "model.safetensors"))
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=RTOL, atol=1e-6)


@pytest.mark.parametrize("name", ["ddp", "zero1", "zero2", "zero3"])
def test_checkpoint_round_trip(runs, name):
    if name.startswith("zero") and not HAVE_DEEPSPEED:
        pytest.skip("deepspeed is not installed")
    for rank in (0, 1):
        result = json.loads((runs / name / f"roundtrip-rank{rank}.json").read_text())
        assert result["differs"] == [], result
        assert {"generator/params", "ratio/params", "generator/optimizer", "ratio/optimizer", "ema",
                "posthoc_ema"} <= set(result["checked"])


@pytest.mark.parametrize("name", SPLIT)
def test_stopped_and_resumed_run_equals_uninterrupted(runs, name):
    """Bit-identical: the resumed run reloads exact parameters, Adam moments, EMA, RNG and data position."""
    if name.startswith("zero") and not HAVE_DEEPSPEED:
        pytest.skip("deepspeed is not installed")
    full, split = runs / name, runs / f"{name}-split"
    assert trajectory(split) == trajectory(full)
    a, b = load_file(str(full / "model.safetensors")), load_file(str(split / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("name", STOPPED)
def test_a_signal_on_one_rank_stops_every_rank_after_the_same_step(runs, name):
    """Ranks agree on the stop (a CPU all-reduce after each step), checkpoint that step together, and the re-run
    ends bit-identical to the uninterrupted run."""
    if name.startswith("zero") and not HAVE_DEEPSPEED:
        pytest.skip("deepspeed is not installed")
    run = runs / f"{name}-stopped"
    for rank in (0, 1):
        result = json.loads((run / f"stopped-rank{rank}.json").read_text())
        assert result == {"stopped": True, "step": STOP_AT, "signal": "SIGTERM", "checkpoints": [2, STOP_AT]}, (
            rank, result)
    assert trajectory(run) == trajectory(runs / name)
    a, b = load_file(str(runs / name / "model.safetensors")), load_file(str(run / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("name, ref", [("ddp", "single"), ("zero1", "single"), ("zero2", "single"),
                                       ("zero3", "single"), ("zero2-accum", "single"), ("edm2-zero2", "single-edm2"),
                                       ("edm2-zero3", "single-edm2")]
                         + [(name, f"single-{method}") for name, (method, _, _) in DISTILL_JOBS.items()])
def test_post_hoc_ema_snapshots_follow_the_single_process_run(runs, name, ref):
    """The power EMAs, sharded over the ranks under ZeRO (the EDM2 jobs: of the denoiser part only), give the
    single-process run's snapshots, for every method; a resumed run (ddp/zero3 "-split", "-stopped") gives them
    bit-identical."""
    if "zero" in name and not HAVE_DEEPSPEED:
        pytest.skip("deepspeed is not installed")
    from fastonestep.engine.posthoc_ema import list_snapshots

    want = list_snapshots(str(runs / ref))
    got = list_snapshots(str(runs / name))
    assert [(s.nimg, s.std) for s in got] == [(s.nimg, s.std) for s in want] and len(want) >= 4
    for g, w in zip(got, want):
        a, b = load_file(g.path), load_file(w.path)
        assert a.keys() == b.keys() and not any("logvar" in k for k in a)
        for k in b:
            torch.testing.assert_close(a[k], b[k], rtol=RTOL, atol=1e-6)
    for resumed in (f"{name}-split", f"{name}-stopped"):
        if (runs / resumed).is_dir():
            again = {(s.nimg, s.std): s.path for s in list_snapshots(str(runs / resumed))}
            for g in got:
                a, b = load_file(g.path), load_file(again[(g.nimg, g.std)])
                assert all(torch.equal(a[k], b[k]) for k in a), (resumed, g)


def test_zero3_export_is_the_gathered_ema(runs):
    if not HAVE_DEEPSPEED:
        pytest.skip("deepspeed is not installed")
    run = runs / "zero3"
    net, info = load_model(str(run))
    ema = load_checkpoint(latest_checkpoint(str(run)))["method"]["ema"]
    assert info["role"] == "generator"
    for k, v in net.state_dict().items():
        assert torch.equal(v, ema[k]), k
    # shards of the last two checkpoints only (steps 2, 4, 6 were saved), published under their final tags
    for net in ("generator", "ratio"):
        tags = sorted(e for e in os.listdir(run / "ds" / net) if e.startswith(("step", ".tmp")))
        assert tags == ["step00000004", "step00000006"]


@pytest.mark.parametrize("name", list(BF16_JOBS))
def test_bf16_exports_are_whole_fp32_master_weights(runs, name):
    if not HAVE_DEEPSPEED:
        pytest.skip("deepspeed is not installed")
    assert trajectory(runs / name)[0] == pytest.approx(trajectory(runs / "single")[0], rel=0.05)  # it trains
    for stem in ("model", "ratio"):
        ref = load_file(str(runs / "single" / f"{stem}.safetensors"))
        got = load_file(str(runs / name / f"{stem}.safetensors"))
        assert got.keys() == ref.keys()
        for k in ref:
            assert got[k].dtype == torch.float32 and got[k].shape == ref[k].shape, (stem, k, got[k].dtype)
            assert torch.isfinite(got[k]).all(), (stem, k)
        # fp32 masters, not their bf16 copies: after 6 Adam steps almost no weight is a bf16 number
        weights = torch.cat([got[k].flatten() for k in got if k.endswith("weight")])
        assert (weights.bfloat16().float() == weights).float().mean() < 0.1, stem


@pytest.mark.parametrize("name", ["ddp", "zero1", "zero2", "zero3", "zero3-bf16", "dmd2-zero3", "edm2-zero3"])
def test_zero_shards_the_ema_over_the_ranks(runs, name):
    """Under ZeRO each rank averages only its slice of the fp32 master weights: the ranks' slices partition the
    EMA (about half each here) instead of each rank holding a whole fp32 copy. The runs above check that its
    numbers are unchanged (exports and resumes against single-process runs)."""
    if name.startswith(("zero", "dmd2-zero", "edm2-zero")) and not HAVE_DEEPSPEED:
        pytest.skip("deepspeed is not installed")
    held = [json.loads((runs / name / f"ema-rank{rank}.json").read_text()) for rank in (0, 1)]
    total = held[0]["numel"]
    assert held[1]["numel"] == total > 0
    if name == "ddp":
        assert [h["sharded"] for h in held] == [False, False] and [h["local_numel"] for h in held] == [total, total]
        assert [h["posthoc"] for h in held] == [[[False, total]] * 2] * 2
        return
    assert [h["sharded"] for h in held] == [True, True]
    assert sum(h["local_numel"] for h in held) == total
    assert all(abs(h["local_numel"] - total / 2) <= 0.02 * total for h in held), held
    assert [h["posthoc"] for h in held] == [[[True, h["local_numel"]]] * 2 for h in held]  # post-hoc: alike


def test_unconverted_method_and_bad_batch_split_are_refused(toy_teacher, monkeypatch, tmp_path):
    from fastonestep import methods

    class SingleProcessDMD(methods.DMD):  # every shipped method is distributed: stand in for one that is not
        supports_distributed = False

    monkeypatch.setitem(methods.METHODS, "dmd", SingleProcessDMD)
    dmd = load_config(str(CONFIGS / "toy2d" / "diffratio.yaml"),
                      base(toy_teacher) + ["method=dmd", "distributed.backend=ddp"])
    with pytest.raises(ConfigError, match="method 'dmd' does not support distributed.backend='ddp'"):
        build(dmd)
    with pytest.raises(ConfigError, match="train.batch_per_gpu"):
        load_config(PRESET, base(toy_teacher) + ["train.batch_per_gpu=24"])
    with pytest.raises(ConfigError, match="distributed.zero_stage"):
        load_config(PRESET, base(toy_teacher) + ["distributed.zero_stage=4"])
    from fastonestep.engine.distributed import load_deepspeed_config

    stage2 = load_config(PRESET, base(toy_teacher) + [f"distributed.deepspeed_config={CONFIGS}/deepspeed/zero3-cpu.json"])
    with pytest.raises(ConfigError, match="zero_optimization.stage=3 but config key 'distributed.zero_stage' is 2"):
        load_deepspeed_config(stage2, "fp32")
    gpu_json = load_config(PRESET, base(toy_teacher) + ["distributed.zero_stage=3",
                                                        f"distributed.deepspeed_config={CONFIGS}/deepspeed/zero3.json"])
    with pytest.raises(ConfigError, match="bf16.enabled=True"):
        load_deepspeed_config(gpu_json, "fp32")
    for section, key in (("zero_optimization", "compute_grad_norm"), ("bf16", "check_grad_overflow")):
        unguarded = tmp_path / f"{key}.json"
        unguarded.write_text(json.dumps({section: {key: False}}))
        with pytest.raises(ConfigError, match=f"{section}.{key}=false"):
            load_deepspeed_config(load_config(PRESET, base(toy_teacher) + [
                f"distributed.deepspeed_config={unguarded}"]), "fp32")
