"""Training runs on the 2-D toy: resume equals an uninterrupted run, a crash mid-run resumes cleanly,
DiffRatio measurably improves on its initialisation, and the generator gradient matches its formula."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file

from conftest import CONFIGS, MNIST_TINY, TOY_STUDENT, TOY_TEACHER
from fastonestep.config import ConfigError, load_config
from fastonestep.engine import loader as loader_mod
from fastonestep.engine.checkpoint import load_checkpoint
from fastonestep.engine.loop import build, train

QUIET = dict(progress=False, log=lambda *_: None)


def teacher_cfg(*extra):
    return load_config(str(CONFIGS / "toy2d" / "edm.yaml"), TOY_TEACHER + list(extra))


def student_cfg(teacher, *extra):
    return load_config(str(CONFIGS / "toy2d" / "diffratio.yaml"), TOY_STUDENT + [f"teacher={teacher}", *extra])


def weights(run):
    return load_file(str(run / "model.safetensors"))


def assert_same_weights(a, b):
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def stats_rows(run):
    return [json.loads(line) for line in (run / "stats.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("method", ["edm", "diffratio"])
def test_resume_equals_uninterrupted(tmp_path, toy_teacher, method):
    make = (lambda *e: teacher_cfg("train.steps=20", *e)) if method == "edm" else \
        (lambda *e: student_cfg(toy_teacher, "train.steps=20", "diffratio.ratio_steps=2", *e))
    extra = ["eval.num_samples=200", "eval.batch_size=200"]
    train(make(*extra), str(tmp_path / "full"), **QUIET)
    train(make("train.steps=10", *extra), str(tmp_path / "split"), **QUIET)
    train(make(*extra), str(tmp_path / "split"), **QUIET)  # same command, longer: resumes at step 10
    assert_same_weights(tmp_path / "full", tmp_path / "split")
    drop = ("images_per_sec", "sec_per_kimg", "peak_memory_mb", "time")
    strip = lambda rows: [{k: v for k, v in r.items() if k not in drop} for r in rows]  # noqa: E731
    assert strip(stats_rows(tmp_path / "full")) == strip(stats_rows(tmp_path / "split"))


# A tiny EDM2 teacher (MNIST, 8 channels, 3 EDM steps at a high lr: its gains have moved off 0).
EDM2_TINY = MNIST_TINY + ["network.kind=edm2"]


@pytest.fixture(scope="module")
def edm2_teacher(tmp_path_factory, cache_dir):  # cache_dir: the session's MNIST feature classifier
    run = tmp_path_factory.mktemp("edm2-teacher")
    train(load_config(str(CONFIGS / "mnist" / "teacher.yaml"), EDM2_TINY + ["train.steps=3", "optim.lr=0.01"]),
          str(run), **QUIET)
    return run


@pytest.mark.parametrize("method", ["diffratio", "dmd2"])
def test_resume_from_an_edm2_teacher_equals_uninterrupted(tmp_path, edm2_teacher, method):
    """The ratio network (DiffRatio) and the fake score (DMD) are run again, frozen, after their update in the same
    step, which rescales their EDM2 weights (forced weight normalisation): the checkpoint holds rescaled weights.
    The rescale is not idempotent bit for bit, so a resume that rescaled them again drifted from the uninterrupted
    run in the last bits at the first step after it (the checkpoint now records which layers are rescaled)."""
    preset = str(CONFIGS / "mnist" / f"{method}.yaml")
    extra = {"diffratio": ["diffratio.ratio_optim.lr=0.01"], "dmd2": ["dmd.fake_steps=1", "dmd.fake_optim.lr=0.01"]}
    make = lambda *e: load_config(preset, EDM2_TINY + [  # noqa: E731
        f"teacher={edm2_teacher}", "optim.lr=0.01", "train.log_every=1", "train.checkpoint_every=2",
        *extra[method], *e])
    train(make("train.steps=4"), str(tmp_path / "full"), **QUIET)
    train(make("train.steps=2"), str(tmp_path / "split"), **QUIET)
    critic = "ratio" if method == "diffratio" else "critic"
    state = load_checkpoint(str(tmp_path / "split" / "checkpoint-00000002.pt"))["method"]
    assert state["normalized_layers"][critic], "the frozen use after the update should have rescaled the critic"
    train(make("train.steps=4"), str(tmp_path / "split"), **QUIET)  # resumes at step 2
    assert_same_weights(tmp_path / "full", tmp_path / "split")
    drop = ("images_per_sec", "sec_per_kimg", "peak_memory_mb", "time")
    strip = lambda rows: [{k: v for k, v in r.items() if k not in drop} for r in rows]  # noqa: E731
    assert strip(stats_rows(tmp_path / "full")) == strip(stats_rows(tmp_path / "split"))
    if method == "diffratio":
        ra, rb = (load_file(str(tmp_path / run / "ratio.safetensors")) for run in ("full", "split"))
        assert all(torch.equal(ra[k], rb[k]) for k in ra)


def test_more_steps_after_a_run_that_ended_inside_a_log_interval_log_that_interval_whole(tmp_path):
    """15 steps (log_every 10: a partial line at 15), then 20: stats.jsonl as if the run had always been 20."""
    extra = ["eval.num_samples=200", "eval.batch_size=200"]
    train(teacher_cfg("train.steps=20", *extra), str(tmp_path / "full"), **QUIET)
    train(teacher_cfg("train.steps=15", *extra), str(tmp_path / "split"), **QUIET)
    assert [r["step"] for r in stats_rows(tmp_path / "split")] == [10, 15]
    train(teacher_cfg("train.steps=20", *extra), str(tmp_path / "split"), **QUIET)
    assert_same_weights(tmp_path / "full", tmp_path / "split")
    drop = ("images_per_sec", "sec_per_kimg", "peak_memory_mb", "time")
    strip = lambda rows: [{k: v for k, v in r.items() if k not in drop} for r in rows]  # noqa: E731
    assert strip(stats_rows(tmp_path / "split")) == strip(stats_rows(tmp_path / "full"))
    train(teacher_cfg("train.steps=20", *extra), str(tmp_path / "split"), **QUIET)  # finished: nothing dropped
    assert [r["step"] for r in stats_rows(tmp_path / "split")] == [10, 20]


def test_crash_mid_run_resumes_cleanly(tmp_path, monkeypatch):
    cfg = teacher_cfg("train.steps=30", "train.checkpoint_every=10", "eval.num_samples=200")
    train(cfg, str(tmp_path / "full"), **QUIET)

    calls = {"n": 0}
    original = loader_mod.EpochLoader.next

    def crashing_next(self):
        calls["n"] += 1
        if calls["n"] == 25:  # dies between checkpoints 20 and 30
            raise KeyboardInterrupt
        return original(self)

    monkeypatch.setattr(loader_mod.EpochLoader, "next", crashing_next)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, str(tmp_path / "crash"), **QUIET)
    assert not (tmp_path / "crash" / "model.safetensors").exists()
    monkeypatch.setattr(loader_mod.EpochLoader, "next", original)
    train(cfg, str(tmp_path / "crash"), **QUIET)
    assert_same_weights(tmp_path / "full", tmp_path / "crash")
    assert [r["step"] for r in stats_rows(tmp_path / "crash")] == [10, 20, 30]


def test_changed_config_is_refused(tmp_path):
    train(teacher_cfg("train.steps=5", "eval.num_samples=100"), str(tmp_path), **QUIET)
    with pytest.raises(ValueError, match="different config.*optim.lr"):
        train(teacher_cfg("train.steps=5", "optim.lr=0.1"), str(tmp_path), **QUIET)


SHORT = ["train.checkpoint_every=5", "eval.num_samples=100", "eval.batch_size=100"]


def test_a_changed_config_is_refused_from_the_checkpoint_when_config_yaml_is_gone(tmp_path):
    """The checkpoint records the config: deleting config.yaml does not let another config resume the run."""
    train(teacher_cfg("train.steps=5", *SHORT), str(tmp_path), **QUIET)
    (tmp_path / "config.yaml").unlink()
    with pytest.raises(ConfigError, match=r"different config \(optim.lr\) \(recorded in checkpoint "
                                          r"'.*checkpoint-00000005.pt'; config.yaml is missing\)"):
        train(teacher_cfg("train.steps=10", *SHORT, "optim.lr=0.1"), str(tmp_path), **QUIET)
    assert not (tmp_path / "config.yaml").exists()
    train(teacher_cfg("train.steps=10", *SHORT), str(tmp_path), **QUIET)  # the same settings resume
    assert (tmp_path / "config.yaml").exists()


def test_train_steps_below_the_newest_checkpoint_are_refused(tmp_path):
    """A run at step 10 re-run with train.steps=7 would export the step-10 model as a 7-step one: refused,
    naming the key, the step and the file; the run's files stay as they were. Equal steps report the metrics."""
    done = train(teacher_cfg("train.steps=10", *SHORT), str(tmp_path), **QUIET)
    files = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    with pytest.raises(ConfigError, match=r"'train.steps' is 7 but the run has reached step 10 "
                                          r"\(checkpoint '.*checkpoint-00000010.pt'\)"):
        train(teacher_cfg("train.steps=7", *SHORT), str(tmp_path), **QUIET)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == files
    assert train(teacher_cfg("train.steps=10", *SHORT), str(tmp_path), **QUIET) == done
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == files  # config.yaml too


def test_a_failed_start_writes_no_config_and_leaves_no_directory(tmp_path, monkeypatch):
    """config.yaml is written once every check passed and the state is restored: a start that fails before (here
    a config error of the data loader) neither leaves a config that would refuse the corrected command, nor the
    empty run directory it created."""
    from fastonestep.engine import loop

    def bad_loader(*args, **kwargs):
        raise ConfigError("config key 'data.workers' is bad")

    run = tmp_path / "run"
    real_loader = loop.make_loader
    monkeypatch.setattr(loop, "make_loader", bad_loader)
    with pytest.raises(ConfigError, match="data.workers"):
        train(teacher_cfg("train.steps=5", *SHORT, "optim.lr=0.1"), str(run), **QUIET)
    assert not (run / "config.yaml").exists()
    assert not run.exists()
    monkeypatch.setattr(loop, "make_loader", real_loader)
    train(teacher_cfg("train.steps=5", *SHORT), str(run), **QUIET)  # the corrected command
    assert "lr: 0.1" not in (run / "config.yaml").read_text()


def test_a_damaged_newest_checkpoint_resumes_from_the_older_one(tmp_path):
    """Checkpoint 10 corrupted (bytes flipped, size unchanged) before the run's export: the re-run warns, naming
    it, resumes from checkpoint 5 and ends with the uninterrupted run's weights."""
    cfg = teacher_cfg("train.steps=10", *SHORT)
    train(cfg, str(tmp_path / "full"), **QUIET)
    run = tmp_path / "damaged"
    train(cfg, str(run), **QUIET)
    (run / "metrics.json").unlink()  # as if killed before the export
    ckpt = run / "checkpoint-00000010.pt"
    rng_bytes = load_checkpoint(str(ckpt))["torch_rng"].numpy().tobytes()[64:96]  # in the middle of a tensor
    data = bytearray(ckpt.read_bytes())
    at = data.index(rng_bytes)
    data[at:at + 4] = bytes(255 - b for b in data[at:at + 4])
    ckpt.write_bytes(bytes(data))
    logged = []
    train(cfg, str(run), progress=False, log=logged.append)
    assert any("warning" in line and str(ckpt) in line and "checkpoint-00000005.pt" in line for line in logged)
    assert_same_weights(tmp_path / "full", run)
    assert load_checkpoint(str(ckpt))["step"] == 10  # written again, whole
    assert [r["step"] for r in stats_rows(run)] == [10]


def test_a_second_training_on_the_same_run_directory_is_refused(tmp_path):
    """Rank 0 holds an flock on run_dir/.lock for the whole train() call (here: held by this process through
    another open file description, as a second process would)."""
    from fastonestep.engine.rundir import RunDirectoryInUse, RunLock

    other = RunLock(str(tmp_path))
    with pytest.raises(RunDirectoryInUse, match=rf"is in use by another process \(pid {os.getpid()}\)"):
        train(teacher_cfg("train.steps=5", *SHORT), str(tmp_path), **QUIET)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock"]  # nothing written
    other.release()
    train(teacher_cfg("train.steps=5", *SHORT), str(tmp_path), **QUIET)
    RunLock(str(tmp_path)).release()  # released when train() returned


def test_stale_temporaries_of_a_killed_run_are_removed_on_start(tmp_path):
    (tmp_path / ".tmp-k1ll3d_x-checkpoint-00000005.pt").write_bytes(b"partial")
    (tmp_path / ".tmp-abcdefgh-stats.jsonl").write_text("{}")
    train(teacher_cfg("train.steps=5", *SHORT), str(tmp_path), **QUIET)
    assert not list(tmp_path.glob(".tmp-*"))


def test_teacher_learns_the_toy(toy_teacher):
    from fastonestep.engine.evaluate import generate, sample_metrics

    metrics = json.loads((toy_teacher / "metrics.json").read_text())
    (trained,) = [v for k, v in metrics.items() if k.startswith("teacher_")]
    dataset, untrained = build(teacher_cfg())
    (sampler,) = untrained.samplers().values()
    before = sample_metrics(generate(sampler, 1000, dataset.shape, 0, "cpu", 1000), dataset)
    assert trained["energy_distance"] < 0.1 * before["energy_distance"]
    assert trained["log_likelihood"] > before["log_likelihood"] + 5


def test_a_checkpoint_of_another_layout_is_named_and_a_finished_run_never_reads_it(tmp_path):
    """A checkpoint missing a network's state (another method, an older layout) stops the resume with an error
    naming the file and the missing state; a run that is already complete returns its metrics unread."""
    extra = ["train.checkpoint_every=5", "eval.num_samples=200"]
    done = train(teacher_cfg("train.steps=5", *extra), str(tmp_path), **QUIET)
    (ckpt,) = sorted(tmp_path.glob("checkpoint-*.pt"))
    state = torch.load(ckpt, weights_only=False)
    del state["method"]["denoiser"]
    torch.save(state, ckpt)
    assert train(teacher_cfg("train.steps=5", *extra), str(tmp_path), **QUIET) == done
    with pytest.raises(ValueError, match=f"cannot resume from '{ckpt}'.*no state for denoiser"):
        train(teacher_cfg("train.steps=10", *extra), str(tmp_path), **QUIET)


@pytest.mark.parametrize("divergence", ["dijs", "rkl"])
def test_diffratio_improves_on_its_initialisation(tmp_path, toy_teacher, divergence):
    cfg = student_cfg(toy_teacher, "train.steps=150", f"diffratio.divergence={divergence}")
    metrics = train(cfg, str(tmp_path), **QUIET)
    trained, init = metrics["one_step"], metrics["init_one_step"]
    assert trained["energy_distance"] < 0.3 * init["energy_distance"]
    assert trained["modes_covered"] > init["modes_covered"] + 3
    assert metrics["parameters"]["ratio"] < metrics["parameters"]["replaced_score_networks"]


@pytest.mark.parametrize("realisation", ["logit", "grad"])
@pytest.mark.parametrize("divergence", ["rkl", "dijs", "fkl", "hellinger"])
def test_generator_gradient_is_weighted_logit_gradient(toy_teacher, realisation, divergence):
    """d loss / d x = w h(r) grad_x l (per sample; normalised and / numel for grad, / B for logit)."""
    cfg = student_cfg(toy_teacher, f"diffratio.realisation={realisation}", f"diffratio.divergence={divergence}",
                      "diffratio.weighting=sigma2")
    _, method = build(cfg)
    with torch.no_grad():  # a non-trivial ratio network (its head starts at zero)
        for p in method.ratio.parameters():
            p.add_(0.3 * torch.randn_like(p))
    x = torch.randn(16, 2, requires_grad=True)
    state = method.rng.get_state()
    loss, _ = method.generator_loss(x)
    (gx,) = torch.autograd.grad(loss, x)

    method.rng.set_state(state)  # replay the same noise levels and noise
    sigma = method._sigma(16, "gen")
    eps = method.noise_like(x)
    x_t = (x.detach() + sigma[:, None] * eps).requires_grad_(True)
    logit = method.ratio(x_t, sigma)
    (dl,) = torch.autograd.grad(logit.sum(), x_t)
    r = torch.exp(-logit.detach().clamp(-10, 10))
    h = {"rkl": torch.ones_like(r), "dijs": r / (1 + r), "fkl": r, "hellinger": r.sqrt() / 2}[divergence]
    coef = sigma**2 * h
    if realisation == "grad":
        want = coef[:, None] * dl / (dl.abs().mean(1, keepdim=True) + 1e-8) / x.numel()
    else:
        want = coef[:, None] * dl / x.shape[0]
    torch.testing.assert_close(gx, want, rtol=1e-4, atol=1e-10)


def test_teacher_metrics_are_reused_only_when_comparable(toy_teacher):
    teacher_metrics = json.loads((toy_teacher / "metrics.json").read_text())
    _, method = build(student_cfg(toy_teacher, "eval.teacher_fd=true"))  # same sampler, seeds and count
    (name,) = method.known_metrics()
    assert method.known_metrics()[name]["energy_distance"] == teacher_metrics[name]["energy_distance"]
    _, method = build(student_cfg(toy_teacher, "eval.teacher_fd=true", "eval.num_samples=999"))
    assert method.known_metrics() == {}


def test_several_ratio_updates_log_their_mean(toy_teacher, monkeypatch):
    """diffratio.ratio_steps=3: each logged ratio stat is the mean over the 3 updates, not the last one's."""
    _, method = build(student_cfg(toy_teacher, "diffratio.ratio_steps=3", "train.batch_size=64"))
    seen = []
    real_step = method.ratio_step
    monkeypatch.setattr(method, "ratio_step", lambda *a: seen.append(real_step(*a)) or seen[-1])
    batches = iter(torch.randn(3, 64, 2))
    stats = method.step(lambda: (next(batches), None), 0, 0)
    assert len(seen) == 3
    for key in ("ratio/loss", "ratio/accuracy", "grad_norm/ratio"):
        values = [float(row[key]) for row in seen]
        assert len(set(values)) > 1, key  # the updates differ, so the mean differs from the last value
        assert float(stats[key]) == pytest.approx(sum(values) / 3, rel=1e-6), key
    assert "gen/loss" in stats
