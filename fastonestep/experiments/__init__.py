"""Paper-style experiments. Each entry takes the output JSON path and keyword overrides
(steps, seed, quick, ...) and returns the result dict it wrote."""
from __future__ import annotations

from fastonestep.experiments import compare, score_difference


def run_score_difference(out: str, **kwargs) -> dict:
    return score_difference.run(out, **kwargs)


def run_compare(out: str, **kwargs) -> dict:
    return compare.run(out, **kwargs)


EXPERIMENTS = {"score-difference": run_score_difference, "compare": run_compare}
