"""The comparison experiment: level schedules, bookkeeping, and the whole command at a tiny setting."""
import json
import math

import pytest

from fastonestep.cli import main
from fastonestep.experiments import compare


def test_student_levels_span_the_setup_range():
    toy = compare.SETUPS["toy"]
    assert compare.student_levels(toy, 1) == [toy.one_step_sigma]
    for k in (2, 3, 4):
        levels = compare.student_levels(toy, k)
        assert len(levels) == k
        assert levels[0] == pytest.approx(toy.levels_hi) and levels[-1] == pytest.approx(toy.levels_lo)
        assert all(a > b for a, b in zip(levels, levels[1:]))


def test_auxiliary_parameters_leave_out_generator_and_teacher():
    counts = {"generator": 100, "ratio": 30, "replaced_score_networks": 200, "teacher_frozen": 100, "gan_head": 5,
              "ratio_train_bytes": 480}
    assert compare.auxiliary_parameters(counts) == 35
    # trained (100 + 35) x 16 bytes, frozen teacher 100 x 4, EMA 100 x 4
    assert compare.training_state_mb(counts) * 2**20 == 135 * 16 + 400 + 400


def test_every_method_is_in_the_table():
    labels = [e.label for e in compare.entries(compare.SETUPS["mnist"])]
    for expected in ("DiffRatio-rKL", "DiffRatio-DiJS", "DMD", "DMD2 (GAN)", "DP-DMD K=2", "DP-DMD K=4",
                     "Backward 1-step", "Backward 3-step"):
        assert expected in labels
    nfe = {e.label: e.nfe for e in compare.entries(compare.SETUPS["mnist"])}
    assert nfe["DP-DMD K=3"] == 3 and nfe["Backward 2-step"] == 2 and nfe["DMD"] == 1


def test_unknown_setup_and_method_are_named(tmp_path):
    with pytest.raises(ValueError, match="cifar"):
        compare.run(str(tmp_path / "c.json"), setups=("cifar",))
    with pytest.raises(ValueError, match="nope"):
        compare.run(str(tmp_path / "c.json"), setups=("toy",), methods=["nope"], teachers={"toy": str(tmp_path)})


def test_compare_flags_are_refused_for_other_experiments(tmp_path, capsys):
    assert main(["experiment", "score-difference", "--out", str(tmp_path / "x.json"), "--setups", "toy"]) == 2
    assert "compare experiment only" in capsys.readouterr().err


def test_compare_runs_end_to_end_at_a_tiny_setting(tmp_path, cache_dir):
    out = tmp_path / "compare.json"
    assert main(["experiment", "compare", "--quick", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    rows = result["rows"]
    labels = {e.label for e in compare.entries(compare.SETUPS["toy"])}
    for setup in ("toy", "mnist"):
        assert {r["method"] for r in rows if r["setup"] == setup} == labels
    for r in rows:
        quality = r["energy_distance"] if r["setup"] == "toy" else r["mnist_fd"]
        assert math.isfinite(quality) and quality >= 0
        assert r["sec_per_iter"] > 0 and r["steps"] > 0
        if r["method"].startswith(("DiffRatio", "DMD", "DP-DMD")):
            assert r["aux_parameters"] > 0  # the ratio net / fake score network
        if r["method"].startswith("Backward"):
            assert r["aux_parameters"] == 0  # the teacher is the only other network, and it is frozen
    table = out.with_suffix(".md").read_text()
    assert all(label in table for label in labels)
    assert out.with_suffix(".png").stat().st_size > 0
    # in-process: each run's peak restarted before it where the system allows, else none to report
    assert all((r["peak_memory_mb"] > 0) if compare.restart_peak_rss() else (r["peak_memory_mb"] is None)
               for r in rows)
    # A re-run reuses the finished runs (here through the isolated `fastonestep train` process): same numbers.
    again = compare.run(str(out), quick=True, setups=("toy",), methods=["DMD"], isolate=True, log=lambda *_: None)
    (dmd,) = again["rows"]
    assert dmd["energy_distance"] == next(r["energy_distance"] for r in rows if r["method"] == "DMD"
                                          and r["setup"] == "toy")
    assert dmd["peak_memory_mb"] > 0


def _write_stats(run_dir, peaks):
    run_dir.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"step": i + 1, "sec_per_kimg": 1.0, "peak_memory_mb": p}) for i, p in enumerate(peaks)]
    (run_dir / "stats.jsonl").write_text("\n".join(lines) + "\n")


def test_a_runs_peak_memory_is_its_largest_logged_peak(tmp_path):
    # On a GPU every log line holds the peak of its own interval: the last line alone can miss the run's peak.
    _write_stats(tmp_path, [900.0, 500.0, 700.0])
    metrics = {"one_step": {"num_samples": 4, "energy_distance": 0.1}, "steps": 3, "parameters": {}}
    entry = compare.Entry("DMD", "dmd")
    row = compare._row(compare.SETUPS["toy"], entry, metrics, tmp_path, 8, own_peak=True)
    assert row["peak_memory_mb"] == 900.0
    assert compare._row(compare.SETUPS["toy"], entry, metrics, tmp_path, 8, own_peak=False)["peak_memory_mb"] is None


def _rss_peak_mb():
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def test_restarting_the_peak_rss_forgets_an_earlier_peak():
    if not compare.restart_peak_rss():
        pytest.skip("this system cannot restart a process's peak RSS (/proc/self/clear_refs)")
    block = bytearray(256 * 2**20)  # touched by the zero fill: resident
    high = _rss_peak_mb()
    del block
    assert compare.restart_peak_rss()
    assert _rss_peak_mb() < high - 128


def test_quick_in_process_runs_report_their_own_peak(tmp_path, cache_dir):
    if not compare.restart_peak_rss():
        pytest.skip("this system cannot restart a process's peak RSS (/proc/self/clear_refs)")
    result = compare.run(str(tmp_path / "c.json"), quick=True, setups=("toy",), methods=["DMD"], isolate=False,
                         log=lambda *_: None)
    (row,) = result["rows"]
    assert row["peak_memory_mb"] > 0
    assert f"| {compare._fmt(row['peak_memory_mb'])} |" in compare.markdown_table(result["rows"])
