"""`fastonestep bench step` on CPU: the smoke sweep's rows and provenance, the per-network state accounting,
skipped cases, the child-process path with DeepSpeed, and one-line option errors. No timing assertions."""
import csv
import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastonestep.benchmark import step as S
from fastonestep.cli import main as cli_main

ROOT = Path(__file__).resolve().parents[1]
PROVENANCE = ("device", "device_type", "torch", "triton", "deepspeed", "commit", "date", "is_claim")

HAVE_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench-step") / "results" / "step.csv"
    assert S.main(["step", "--quick", "--device", "cpu", "--out", str(path)]) == 0
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return tuple(reader.fieldnames), list(reader)


def test_quick_smoke_writes_both_methods_with_provenance(quick):
    header, rows = quick
    assert header == S.COLUMNS
    assert sorted(r["method"] for r in rows) == ["diffratio", "dmd"]
    for r in rows:
        assert r["status"] == "ok", r["note"]
        assert (r["size"], r["backend"], r["world_size"], r["latent_shape"]) == ("tiny", "single", "1", "4x8x8")
        for col in PROVENANCE:
            assert r[col], col
        assert r["device_type"] == "cpu" and r["torch"] == torch.__version__ and r["precision"] == "fp32"
        assert r["is_claim"] == "false" and "not a performance claim" in r["note"]
        assert r["peak_alloc_gib"] == "" and r["phase_peak_gib"] == ""  # no memory numbers on CPU
        med, p20, p80 = float(r["median_s"]), float(r["p20_s"]), float(r["p80_s"])
        assert 0 < p20 <= med <= p80
        batch = int(r["global_batch"])
        assert math.isclose(float(r["images_per_s"]), batch / med, rel_tol=1e-3)
        assert math.isclose(float(r["sec_per_kimg"]), 1000 * med / batch, rel_tol=1e-3)
        data_batches = float(r["data_batches_per_iter"])  # real batches drawn: what a loader must deliver
        assert math.isclose(float(r["data_images_per_s"]), data_batches * batch / med, rel_tol=1e-3)
        assert int(r["nonfinite_steps"]) == 0
    by = {r["method"]: r for r in rows}
    # the presets' settings: DiffRatio one ratio step, DMD2 five fake-score steps, per generator update
    phases = {m: by[m]["phase_s"] for m in by}
    assert phases["diffratio"].startswith("ratio_step(x1)=") and "generator_step(x1)=" in phases["diffratio"]
    assert phases["dmd"].startswith("fake_step(x5)=") and "generator_step(x1)=" in phases["dmd"]
    # DiffRatio reads one real batch per ratio step; each DMD2 fake step reads one for its GAN head (and more)
    assert float(by["diffratio"]["data_batches_per_iter"]) == 1
    assert float(by["dmd"]["data_batches_per_iter"]) >= 5
    names = {m: [kv.split("=")[0] for kv in by[m]["params"].split(";")] for m in by}
    assert names["diffratio"][:2] == ["generator", "ratio"] and "ema" in names["diffratio"]
    assert names["dmd"][0] == "generator" and "ema" in names["dmd"] and len(names["dmd"]) >= 4  # + critic, teacher


def test_table_and_comparison_verdicts():
    def row(method, ips, peak):
        return {"method": method, "size": "s", "backend": "single", "world_size": "1", "batch_per_gpu": "32",
                "precision": "bf16", "kernels": "fused", "status": "ok", "is_claim": "true", "median_s": "1",
                "p20_s": "1", "p80_s": "1", "images_per_s": str(ips), "sec_per_kimg": "1", "peak_alloc_gib": str(peak),
                "state_gib": "generator=1"}

    assert "| s | single | 1 | 32 | 2.00x | 50% | meets both |" in S.markdown_table([row("diffratio", 200, 10),
                                                                                    row("dmd", 100, 20)])
    assert "1.20x | 50% | misses |" in S.comparison_table([row("diffratio", 120, 10), row("dmd", 100, 20)])
    assert "1.60x | 70% | misses |" in S.comparison_table([row("diffratio", 160, 14), row("dmd", 100, 20)])
    cpu = [dict(row("diffratio", 200, 10), is_claim="false"), row("dmd", 100, 20)]
    assert "not a claim" in S.comparison_table(cpu)


def test_activation_checkpointing_cases_are_rows_of_their_own(tmp_path):
    """--activation-checkpointing off,on: each case twice, the setting in the run's config and in the row; the
    table marks it and DiffRatio is compared with DMD2 at the same setting only."""
    out = tmp_path / "step.csv"
    assert S.main(["--quick", "--device", "cpu", "--activation-checkpointing", "off,on", "--out", str(out)]) == 0
    rows = S.read_rows(out)
    assert sorted((r["method"], r["activation_checkpointing"], r["status"]) for r in rows) == [
        ("diffratio", "false", "ok"), ("diffratio", "true", "ok"), ("dmd", "false", "ok"), ("dmd", "true", "ok")]
    case = S.Case("dmd", "tiny", "single", 2, device="cpu", activation_checkpointing=True)
    assert S.case_config(case).train.activation_checkpointing
    table = S.markdown_table(S.latest_rows(rows))
    assert table.count("| single +ckpt |") == 3 and table.count("| single |") == 3  # 2 rows + 1 comparison each


def test_state_formula_matches_what_the_single_backend_holds(tmp_path):
    """The per-network state column (dry-run formula) equals the bytes a single-backend Trainable holds:
    fp32 weights + gradients + Adam moments (torch's 0-d `step` tensors aside)."""
    from fastonestep.data.datasets import TensorDataset
    from fastonestep.engine.memory import optimizer_state_bytes
    from fastonestep.methods import make_method

    case = S.Case("diffratio", "tiny", "single", 2, warmup=0, iters=1, device="cpu")
    case.teacher = S.make_teacher(case, str(tmp_path))
    cfg = S.case_config(case, case.teacher)
    dataset = TensorDataset(torch.zeros(1, 4, 8, 8), torch.zeros(1, dtype=torch.long), 10)
    method = make_method(cfg, dataset, torch.device("cpu"))
    x, y = torch.randn(2, 4, 8, 8), torch.randint(0, 10, (2,))
    method.step(lambda: (x, y), 0, 0)
    inventory = {name: (role, n) for name, role, n in S.network_inventory(method)}
    assert set(inventory) == {"generator", "ratio", "ema"}
    for name, t in method.backend.trainables.items():
        params = list(t.network.parameters())
        param_bytes = sum(p.numel() * p.element_size() for p in params)
        held = 2 * param_bytes + optimizer_state_bytes(t.opt) - 4 * len(params)
        role, n = inventory[name]
        assert S.state_bytes_per_gpu(role, n, "fp32", 1, 0) == held
    role, n = inventory["ema"]
    assert S.state_bytes_per_gpu(role, n, "fp32", 1, 0) == sum(p.numel() * 4 for p in method.ema.net.parameters())


def test_refused_backend_becomes_a_skipped_row(tmp_path, monkeypatch):
    from fastonestep.methods import METHODS

    monkeypatch.setattr(METHODS["dmd"], "supports_distributed", False)
    out = tmp_path / "step.csv"
    rows = S.run([S.Case("dmd", "tiny", "ddp", 2, warmup=0, iters=1, device="cpu")], str(out), isolate=False,
                 log=lambda *_: None)
    assert rows[0]["status"] == "skipped" and "does not support" in rows[0]["note"]
    assert rows[0]["device"] and rows[0]["commit"] and rows[0]["is_claim"] == "false"


def test_no_case_runs_past_the_time_budget(tmp_path, monkeypatch):
    """--max-seconds: a case gets what is left of the budget as its timeout, and one that cannot get
    MIN_CASE_SECONDS is skipped (its teacher is not even built)."""
    timeouts = []
    monkeypatch.setattr(S, "make_teacher", lambda case, directory: str(tmp_path / "teacher"))
    monkeypatch.setattr(S, "run_isolated", lambda case, date, timeout, workdir: timeouts.append(timeout) or
                        {**S.base_row(case), "status": "error", "is_claim": "false", "note": "ran"})
    cases = [S.Case("diffratio", "tiny", "single", 2, warmup=0, iters=1, device="cpu") for _ in range(2)]
    rows = S.run(cases, None, case_timeout=300.0, max_seconds=S.MIN_CASE_SECONDS + 20, log=lambda *_: None)
    assert [r["note"] for r in rows] == ["ran", "ran"]
    assert all(S.MIN_CASE_SECONDS <= t <= S.MIN_CASE_SECONDS + 20 for t in timeouts), timeouts
    monkeypatch.setattr(S, "make_teacher", lambda *a: pytest.fail("a skipped case built its teacher"))
    rows = S.run(cases[:1], None, max_seconds=S.MIN_CASE_SECONDS - 1, log=lambda *_: None)
    assert rows[0]["status"] == "skipped" and "--max-seconds" in rows[0]["note"]


def test_an_interrupted_sweep_kills_the_running_case(tmp_path, monkeypatch):
    """Ctrl-C (or the SIGINT of a caller's `timeout`) while a case runs: the child, in its own session so that a
    timeout can kill its whole group, must not outlive the sweep."""
    import _thread
    import threading

    started = []
    real_popen = subprocess.Popen

    def popen(*args, **kwargs):
        proc = real_popen(*args, **kwargs)
        started.append(proc)
        threading.Timer(1.0, _thread.interrupt_main).start()
        return proc

    monkeypatch.setattr(S, "_child_command", lambda path, nproc: [sys.executable, "-c", "import time; time.sleep(60)"])
    monkeypatch.setattr(S.subprocess, "Popen", popen)
    case = S.Case("diffratio", "tiny", "single", 2, warmup=0, iters=1, device="cpu")
    with pytest.raises(KeyboardInterrupt):
        S.run_isolated(case, "today", 60.0, str(tmp_path))
    (proc,) = started
    assert proc.poll() is not None  # reaped: killed, not left running


@pytest.mark.skipif(not HAVE_DEEPSPEED, reason="deepspeed is not installed")
def test_child_process_runs_zero3_on_an_edm2_network(tmp_path):
    """A case in its own process (the default), on DeepSpeed ZeRO-3: EDM2's 0-d gain parameters must get
    through DeepSpeed's parameter broadcast."""
    out = tmp_path / "step.csv"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "fastonestep", "bench", "step", "--sizes", "tiny", "--methods",
                           "diffratio", "--backends", "zero3", "--device", "cpu", "--warmup", "0", "--iters", "1",
                           "--out", str(out)], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    with open(out, newline="") as f:
        (row,) = list(csv.DictReader(f))
    assert (row["backend"], row["zero_stage"], row["status"]) == ("zero3", "3", "ok"), row["note"]
    assert row["deepspeed"] != "none" and float(row["images_per_s"]) > 0


@pytest.mark.parametrize("argv, names", [
    (["--sizes", "huge"], "--sizes"),
    (["--backends", "zero4"], "--backends"),
    (["--methods", "gan"], "--methods"),
    (["--batch-per-gpu", "s=0"], "--batch-per-gpu"),
    (["--batch-per-gpu", "q=3"], "--batch-per-gpu"),
    (["--iters", "0"], "--iters"),
    (["--activation-checkpointing", "yes"], "--activation-checkpointing"),
    (["--bogus"], "--bogus"),
    (["--sizes", "s", "--device", "cpu"], "--sizes"),
])
def test_bad_options_give_one_error_line(argv, names, capsys, tmp_path):
    assert cli_main(["bench", "step", *argv, "--out", str(tmp_path / "x.csv")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fastonestep: error:") and names in err[0], err
    assert not (tmp_path / "x.csv").exists()
