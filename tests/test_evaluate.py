"""`esper evaluate`'s statistics: the paired bootstrap and the comparison with every baseline."""

from __future__ import annotations

import random
import statistics
from pathlib import Path

import pytest

from esper.config import GrowConfig
from esper.evaluate import _row, bootstrap_ci, q25, to_markdown
from esper.run import GrowResult


def _result(metric: float, reward: float) -> GrowResult:
    return GrowResult(Path("r"), "accuracy", 0.1, metric, 100, 120, 1000, 1200, reward_total=reward)


def test_bootstrap_ci_matches_an_independent_resampling() -> None:
    diffs = [0.3, -0.1, 0.5, 0.2, 0.0, 0.4, 0.1, 0.25, -0.05, 0.35]
    mean, lo, hi = bootstrap_ci(diffs, resamples=4000, seed=7)
    rng = random.Random(7)  # the same draws, computed here by hand
    means = sorted(sum(rng.choice(diffs) for _ in diffs) / len(diffs) for _ in range(4000))
    assert mean == pytest.approx(statistics.fmean(diffs))
    assert (lo, hi) == pytest.approx((means[100], means[3900]))
    assert lo < mean < hi


def test_constant_difference_has_a_zero_width_interval() -> None:
    assert bootstrap_ci([0.2] * 5) == pytest.approx((0.2, 0.2, 0.2))


def test_rows_compare_every_policy_with_each_baseline_run() -> None:
    none = [_result(0.5, r) for r in (1.0, 2.0, 3.0)]
    heuristic = [_result(0.6, r) for r in (1.5, 2.5, 3.0)]
    learned = [_result(0.7, r) for r in (2.0, 3.0, 4.0)]
    bases = {"none": none, "heuristic": heuristic}
    row = _row("learned.safetensors", learned, bases)
    assert set(row.reward_diffs) == {"none", "heuristic"}
    assert row.reward_diffs["none"] == pytest.approx((1.0, 1.0, 1.0))
    assert row.reward_diffs["heuristic"][0] == pytest.approx((0.5 + 0.5 + 1.0) / 3)
    assert set(_row("none", none, bases).reward_diffs) == {"heuristic"}  # not with itself
    assert row.reward_median == 3.0 and row.metric_q25 == pytest.approx(0.7)
    assert q25([1.0, 2.0, 3.0, 4.0, 5.0]) == 2.0
    table = to_markdown([_row("none", none, bases), row], GrowConfig(), [1000, 1001, 1002])
    assert "Δreward vs none (95% CI) | Δreward vs heuristic (95% CI) |" in table
    assert "| learned.safetensors |" in table and "+1.000 [+1.000, +1.000]" in table
    assert "level task reward" in table


def test_sample_adds_a_sampled_row_for_learned_policies_only() -> None:
    from esper.evaluate import variants

    assert variants(["none", "heuristic", "p.safetensors"], sample=False) == [
        ("none", "none", False),
        ("heuristic", "heuristic", False),
        ("p.safetensors", "p.safetensors", False),
    ]
    assert variants(["none", "learned"], sample=True) == [
        ("none", "none", False),
        ("learned", "learned", False),
        ("learned (sampled)", "learned", True),
    ]


def test_first_seed_below_the_held_out_range_is_refused(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from esper.cli import app

    r = CliRunner().invoke(
        app, ["evaluate", "none", "--seeds", "1", "--first-seed", "999", "--out", str(tmp_path)]
    )
    assert r.exit_code == 2 and "not held out" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "evaluation.md").exists()


def test_first_seed_chooses_the_seeds(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from esper.cli import app

    r = CliRunner().invoke(
        app,
        [
            "evaluate",
            "none",
            "--seeds",
            "2",
            "--first-seed",
            "1010",
            "--ticks",
            "1",
            "--out",
            str(tmp_path),
        ],
    )
    assert r.exit_code == 0, r.output
    assert "seeds 1010..1011 (2)" in (tmp_path / "evaluation.md").read_text()
