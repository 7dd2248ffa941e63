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
    assert all(r["peak_memory_mb"] is None for r in rows)  # in-process on a CPU: no per-run peak to report
    # A re-run reuses the finished runs (here through the isolated `fastonestep train` process): same numbers.
    again = compare.run(str(out), quick=True, setups=("toy",), methods=["DMD"], isolate=True, log=lambda *_: None)
    (dmd,) = again["rows"]
    assert dmd["energy_distance"] == next(r["energy_distance"] for r in rows if r["method"] == "DMD"
                                          and r["setup"] == "toy")
    assert dmd["peak_memory_mb"] > 0
