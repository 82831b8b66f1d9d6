"""Cheaper credit estimators against a known game: their credit, their cost in retrains, their
use of the audit cache; Spearman's ρ by hand; `esper audit RUN RUN --compare`."""

from __future__ import annotations

import functools
import math
import statistics
from pathlib import Path

import pytest
from typer.testing import CliRunner

from _credit_helpers import bumpy_value, fake_value, synthetic_run
from esper.audits.estimators import (
    ABLATION,
    EXACT,
    LOO,
    SHORT,
    ablation_estimate,
    compare_audits,
    exact_estimate,
    last_contribution,
    leave_one_out_estimate,
    permutation_estimate,
    permutation_name,
    permutation_subsets,
    recorded_audit,
    short_protocol,
    short_rollout_estimate,
    to_markdown,
)
from esper.audits.retrain import Audit, AuditError, AuditProtocol
from esper.cli import app
from esper.recorder import RunStore
from esper.simic.critic import average_ranks, spearman

PROTOCOL = AuditProtocol(ticks=10, repeats=2)
# fake_value at 10 ticks: worth b0 1, b1 2, b2 −0.5, synergy b0·b1 3, +0.1·r per seed in repeat r.
PHI = {"slots.b0": 1 + 1.5 + 0.05, "slots.b1": 2 + 1.5 + 0.05, "slots.b2": -0.5 + 0.05}


def by_slot(credit: dict[str, float]) -> dict[str, float]:
    return {key.split(":")[0]: x for key, x in credit.items()}


# ---------------------------------------------------------------------------------------------
# Rank statistics
# ---------------------------------------------------------------------------------------------


def test_spearman_with_ties_against_a_hand_computation() -> None:
    assert average_ranks([3.0, 1.0, 3.0, 3.0, 2.0]) == [4.0, 1.0, 4.0, 4.0, 2.0]
    # x ranks 1, 2.5, 2.5, 4; y ranks 1, 3, 2, 4; centred: (−1.5, 0, 0, 1.5), (−1.5, .5, −.5, 1.5)
    # ρ = 4.5 / sqrt(4.5 · 5)
    assert spearman([1, 2, 2, 3], [10, 30, 20, 40]) == pytest.approx(4.5 / math.sqrt(22.5))
    # Without ties ρ = 1 − 6 Σd² / (n (n² − 1)): d = (0, 1, −1, 0, 0) gives 1 − 12/120.
    assert spearman([1, 2, 3, 4, 5], [1, 3, 2, 4, 5]) == pytest.approx(0.9)
    assert spearman([1, 2, 3], [30, 20, 10]) == pytest.approx(-1.0)
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3])) and math.isnan(spearman([1], [2]))


# ---------------------------------------------------------------------------------------------
# Each estimator on the known game
# ---------------------------------------------------------------------------------------------


def test_retrain_estimators_credit_and_cost(tmp_path: Path) -> None:
    cands = synthetic_run(tmp_path / "src")
    audit = Audit(tmp_path / "audit", value_fn=fake_value)

    exact = exact_estimate(audit, PROTOCOL, cands, workers=1)
    assert by_slot(exact.credit) == pytest.approx(PHI)
    assert (exact.retrains, exact.tick_cost, exact.ran) == (16, 16.0, 16)

    loo = leave_one_out_estimate(audit, PROTOCOL, cands, workers=1)
    assert by_slot(loo.credit) == pytest.approx(
        {"slots.b0": 1 + 3 + 0.05, "slots.b1": 2 + 3 + 0.05, "slots.b2": -0.5 + 0.05}
    )
    assert (loo.retrains, loo.ran) == (4 * 2, 0)  # (n + 1)·R, all from the exact audit's cache
    fresh = leave_one_out_estimate(
        Audit(tmp_path / "fresh", fake_value), PROTOCOL, cands, workers=1
    )
    assert (fresh.retrains, fresh.ran) == (8, 8)  # alone it retrains exactly what it costs

    # Short rollout: ⌈10/3⌉ = 4 ticks (> last germination at 1), R = 1: the game scaled by 0.4.
    assert short_protocol(PROTOCOL, cands).ticks == 4
    assert short_protocol(PROTOCOL, cands).repeats == 1
    short = short_rollout_estimate(audit, PROTOCOL, cands, workers=1)
    assert by_slot(short.credit) == pytest.approx(
        {"slots.b0": 1.0, "slots.b1": 1.4, "slots.b2": -0.2}
    )
    assert (short.retrains, short.tick_cost, short.ran) == (8, pytest.approx(3.2), 8)
    assert short_rollout_estimate(audit, PROTOCOL, cands).ran == 0  # cached under its own hash

    # Nothing but the exact audit labels the source run.
    with RunStore.open(tmp_path / "src") as store:
        assert not any(e.labels for e in store.events("germinate"))


def broken(protocol, candidates, subset, repeat) -> float:
    raise RuntimeError("out of memory (simulated)")


def test_a_failed_retrain_is_an_error_not_a_credit(tmp_path: Path) -> None:
    cands = synthetic_run(tmp_path / "src")
    with pytest.raises(AuditError, match="out of memory"):
        leave_one_out_estimate(
            Audit(tmp_path / "a", value_fn=broken), PROTOCOL, cands, workers=1, retries=0
        )


def test_short_protocol_keeps_every_germination_inside_the_budget(tmp_path: Path) -> None:
    cands = synthetic_run(tmp_path / "src")
    late = [*cands[:2], type(cands[2])("slots.b2", "NORM", 6)]
    assert short_protocol(PROTOCOL, late).ticks == 7  # > the germination at 6
    assert short_protocol(AuditProtocol(ticks=6), late).ticks == 6  # never past the budget
    with pytest.raises(ValueError, match="fraction"):
        short_protocol(PROTOCOL, cands, fraction=0)


def test_permutation_estimator_cost_and_convergence(tmp_path: Path) -> None:
    cands = synthetic_run(tmp_path / "src")
    audit = Audit(tmp_path / "audit", value_fn=fake_value)
    one_pair = permutation_estimate(audit, PROTOCOL, cands, samples=2, seed=0, workers=1)
    # One order and its reverse touch ∅, C, two singletons and two pairs: 6 of the 8 subsets.
    assert len(permutation_subsets(cands, 2, 0)) == 6
    assert (one_pair.retrains, one_pair.ran, one_pair.name) == (12, 12, permutation_name(2))
    assert sum(one_pair.credit.values()) == pytest.approx(sum(PHI.values()))  # efficient

    # On this game (pairwise terms only) an antithetic pair is already exact; a bonus for pairs
    # has the same Shapley values but needs many orders.
    assert by_slot(one_pair.credit) == pytest.approx(PHI)
    bumpy = Audit(tmp_path / "bumpy", value_fn=bumpy_value)
    assert by_slot(exact_estimate(bumpy, PROTOCOL, cands, workers=1).credit) == pytest.approx(PHI)

    def error(samples: int) -> float:  # mean over seeds of the worst candidate's error
        return statistics.fmean(
            max(
                abs(x - PHI[s])
                for s, x in by_slot(
                    permutation_estimate(
                        bumpy, PROTOCOL, cands, samples=samples, seed=seed, workers=1
                    ).credit
                ).items()
            )
            for seed in range(20)
        )

    errors = [error(m) for m in (2, 20, 2000)]
    assert errors[0] > errors[1] > errors[2] and errors[2] < 0.1
    many = permutation_estimate(bumpy, PROTOCOL, cands, samples=200, seed=0, workers=1)
    assert many.retrains == 16  # every subset touched: the cost of exact


def test_ablation_reads_the_last_recorded_contribution(tmp_path: Path) -> None:
    a, b, c = synthetic_run(tmp_path / "src")
    # A was pruned at 4 and its slot germinated again at 5: the later 0.9 is not A's.
    assert (last_contribution(a), last_contribution(b), last_contribution(c)) == (0.3, 0.2, None)
    est = ablation_estimate([a, b, c])
    assert by_slot(est.credit) == {"slots.b0": 0.3, "slots.b1": 0.2, "slots.b2": 0.0}
    assert (est.name, est.retrains, est.tick_cost, est.comparable) == (ABLATION, 0, 0.0, True)
    loss = ablation_estimate([a, b, c], metric="val_loss")  # helps = lower loss: sign flips
    assert by_slot(loss.credit)["slots.b0"] == -0.3 and not loss.comparable
    a2, *_ = synthetic_run(tmp_path / "bpc", sense="lower")
    assert by_slot(ablation_estimate([a2]).credit) == {"slots.b0": -0.3}


# ---------------------------------------------------------------------------------------------
# Recorded audits and the comparison, in Python and on the command line
# ---------------------------------------------------------------------------------------------


def audited_runs(tmp_path: Path, n: int = 2) -> list[Path]:
    runs = []
    for i in range(n):
        run = tmp_path / f"run{i}"
        Audit(run / "audit", value_fn=fake_value).run(PROTOCOL, synthetic_run(run), workers=1)
        runs.append(run)
    return runs


def test_compare_recorded_audits(tmp_path: Path) -> None:
    runs = audited_runs(tmp_path)
    rec = recorded_audit(runs[0])
    assert rec.protocol == PROTOCOL and by_slot(rec.phi) == pytest.approx(PHI)
    comparison = compare_audits(runs, value_fn=fake_value, workers=1)
    rows = {r.estimator: r for r in comparison.rows}
    assert list(rows) == [EXACT, ABLATION, LOO, permutation_name(2), SHORT]
    assert (rows[EXACT].spearman, rows[EXACT].mae, rows[EXACT].n) == (1.0, 0.0, 6)
    assert (rows[EXACT].retrains, rows[LOO].retrains, rows[ABLATION].retrains) == (32, 16, 0)
    assert rows[LOO].spearman == pytest.approx(1.0) and rows[LOO].mae == pytest.approx(1.0)
    assert rows[SHORT].tick_cost == pytest.approx(6.4)
    assert rows[SHORT].mae == pytest.approx((1.55 + 2.15 + 0.25) / 3)
    # Ablation ranks b0 > b1 > b2, exact φ b1 > b0 > b2: ρ = 0.5 (pooled, ties across runs).
    assert rows[ABLATION].spearman == pytest.approx(0.5)
    assert "| leave-one-out | 16 |" in to_markdown(comparison)
    with RunStore.open(runs[0]) as store:  # the labels are still the exact audit's
        labels = [e.labels["shapley"]["phi"] for e in store.events("germinate") if e.labels]
    assert labels == pytest.approx(list(PHI.values()))


def test_compare_on_the_command_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    runs = audited_runs(tmp_path)
    monkeypatch.setattr(
        "esper.cli.compare_audits", functools.partial(compare_audits, value_fn=fake_value)
    )
    runner = CliRunner()
    r = runner.invoke(
        app, ["audit", *map(str, runs), "--compare", "--workers", "1"], env={"COLUMNS": "250"}
    )
    assert r.exit_code == 0, r.output
    assert "leave-one-out" in r.output and "Spearman" in r.output and "over 2 audited" in r.output
    bare = runner.invoke(app, ["audit", *map(str, runs)], env={"COLUMNS": "250"})
    assert bare.exit_code == 2 and "--compare" in bare.output
    synthetic_run(tmp_path / "unaudited")
    none = runner.invoke(app, ["audit", str(tmp_path / "unaudited"), "--compare"])
    assert none.exit_code == 2 and "no audited seed" in none.output
    assert "Traceback" not in none.output
