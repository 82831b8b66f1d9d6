"""The retrain audit: its cache, retries and failures on a fake value function, then one real
2-seed audit on digits checked against its own v table."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from _engine_helpers import cnn_driver
from esper.audits.replay import AuditReplayError, Candidate, ReplayPolicy, candidates_from_run
from esper.audits.retrain import Audit, AuditProtocol, ci95, subset_value
from esper.config import GrowConfig
from esper.contracts import Blueprint, FactoredAction, Op, Stage
from esper.recorder import RunStore
from esper.run import slot_layout, start_run
from esper.simic.shapley import exact_shapley
from esper.tamiyo.policies import HeuristicConfig
from esper.tolaria.environment import EnvConfig, GrowthEnv

A = Candidate("slots.b0", "CONV_LIGHT", 0)
B = Candidate("slots.b1", "CONV_SMALL", 1)
C = Candidate("slots.b2", "NORM", 1)
WORTH = {A.key: 1.0, B.key: 2.0, C.key: -0.5}


def fake_value(protocol: AuditProtocol, candidates, subset: frozenset, repeat: int) -> float:
    """Additive worth, a synergy of A and B, and a repeat-dependent offset (noise across seeds)."""
    v = sum(WORTH[c.key] for c in subset) + 3.0 * ({A, B} <= subset)
    return v + 0.1 * repeat * len(subset)


class Flaky:
    """Fails the first `fail_times` calls on the full set, then works."""

    def __init__(self, fail_times: int) -> None:
        self.fail_times, self.calls = fail_times, 0

    def __call__(self, protocol, candidates, subset, repeat) -> float:
        if len(subset) == len(candidates):
            self.calls += 1
            if self.calls <= self.fail_times:
                raise RuntimeError("out of memory (simulated)")
        return fake_value(protocol, candidates, subset, repeat)


def recorded_run(path: Path, candidates: list[Candidate]) -> list[Candidate]:
    """A run directory whose only events are these germinations (plus one repeat of a slot)."""
    store = RunStore.create(path, {"config": {}})
    for c in [*candidates, Candidate(candidates[0].slot, "NORM", 9)]:
        with store.tick(c.germinate_tick) as tx:
            tx.event("germinate", {"blueprint": c.blueprint, "seed_id": "s"}, slot=c.slot)
    store.close()
    return candidates_from_run(path)


# ---------------------------------------------------------------------------------------------
# Protocol, candidates, statistics
# ---------------------------------------------------------------------------------------------


def test_protocol_hash_is_canonical_and_ignores_repeats() -> None:
    p = AuditProtocol(ticks=4, repeats=1)
    assert p.protocol_hash() == AuditProtocol(ticks=4, repeats=5).protocol_hash()
    assert p.protocol_hash() != AuditProtocol(ticks=5).protocol_hash()
    assert p.protocol_hash() != AuditProtocol(ticks=4, base_seed=1).protocol_hash()
    cfg = p.grow_config(repeat=2)
    assert (cfg.policy, cfg.ticks, cfg.seed, cfg.task) == ("none", 4, 2, "digits")
    with pytest.raises(ValueError, match="metric"):
        AuditProtocol(metric="reward")


def test_candidates_come_from_germinate_events_one_per_slot(tmp_path: Path) -> None:
    got = recorded_run(tmp_path / "src", [A, B])
    assert got == [A, B]  # the re-germination of A's slot at tick 9 is left out
    assert all(c.event_id is not None and c.source == str(tmp_path / "src") for c in got)
    with pytest.raises(ValueError, match="limit"):
        candidates_from_run(tmp_path / "src", limit=4)


def test_ci95_is_student_t() -> None:
    lo, hi = ci95([1.0, 2.0, 3.0])  # mean 2, s = 1, t(2) = 4.303
    assert (lo, hi) == pytest.approx((2 - 4.303 / 3**0.5, 2 + 4.303 / 3**0.5))
    assert all(math.isnan(x) for x in ci95([1.0]))


# ---------------------------------------------------------------------------------------------
# The audit on a fake value function
# ---------------------------------------------------------------------------------------------


def test_audit_matches_exact_shapley_and_caches_every_job(tmp_path: Path) -> None:
    protocol = AuditProtocol(ticks=4, repeats=2)
    audit = Audit(tmp_path / "audit", value_fn=fake_value)
    first = audit.run(protocol, [A, B, C], workers=1)
    assert (first.retrains, first.cached, first.failures) == (16, 0, ())
    assert first.repeats_used == (0, 1)
    per_repeat = [
        exact_shapley([A, B, C], lambda s, r=r: fake_value(protocol, [], s, r)) for r in range(2)
    ]
    for c in (A, B, C):
        assert first.phi[c.key] == pytest.approx((per_repeat[0][c] + per_repeat[1][c]) / 2)
        lo, hi = first.phi_ci95[c.key]
        assert lo <= first.phi[c.key] <= hi
    assert first.phi[C.key] == pytest.approx(-0.5 + 0.1 * 0.5)
    assert first.interactions[(A.key, B.key)] == pytest.approx(3.0)
    assert first.interactions[(A.key, C.key)] == pytest.approx(0.0)
    assert first.banzhaf[A.key] == pytest.approx(1.0 + 1.5 + 0.05)

    again = audit.run(protocol, [A, B, C], workers=1)
    assert (again.retrains, again.cached) == (0, 16)
    assert again.phi == first.phi
    more = audit.run(AuditProtocol(ticks=4, repeats=3), [A, B, C], workers=1)
    assert (more.retrains, more.cached) == (8, 16)  # extending R reuses the first two repeats
    other = audit.run(AuditProtocol(ticks=5, repeats=1), [A, B], workers=1)
    assert (other.retrains, other.cached) == (4, 0)  # another protocol shares nothing


def test_a_failing_job_is_retried_then_reported(tmp_path: Path) -> None:
    protocol = AuditProtocol(ticks=4)
    recovered = Audit(tmp_path / "a", value_fn=Flaky(fail_times=1)).run(
        protocol, [A, B], workers=1, retries=1
    )
    assert recovered.failures == () and recovered.retrains == 5 and recovered.repeats_used == (0,)

    flaky = Flaky(fail_times=10)
    failed = Audit(tmp_path / "b", value_fn=flaky).run(protocol, [A, B], workers=1, retries=2)
    assert flaky.calls == 3
    (f,) = failed.failures
    assert (f.subset, f.repeat, f.attempts) == (tuple(sorted([A.key, B.key])), 0, 3)
    assert "out of memory" in f.error
    assert failed.repeats_used == () and math.isnan(failed.phi[A.key])
    # The three subsets that worked were cached; only the failed one reruns.
    healed = Audit(tmp_path / "b", value_fn=fake_value).run(protocol, [A, B], workers=1)
    assert (healed.retrains, healed.cached, healed.failures) == (1, 3, ())


def test_process_pool_backend(tmp_path: Path) -> None:
    result = Audit(tmp_path / "audit", value_fn=fake_value).run(
        AuditProtocol(ticks=4), [A, B], workers=2
    )
    assert (result.retrains, result.failures) == (4, ())
    assert result.phi[A.key] == pytest.approx(2.5) and result.phi[B.key] == pytest.approx(3.5)


def test_labels_land_on_the_source_germinate_events(tmp_path: Path) -> None:
    cands = recorded_run(tmp_path / "src", [A, B])
    result = Audit(tmp_path / "audit", value_fn=fake_value).run(AuditProtocol(), cands, workers=1)
    with RunStore.open(tmp_path / "src") as store:
        events = store.events("germinate")
    labels = {e.slot: e.labels["shapley"] for e in events if e.id in {c.event_id for c in cands}}
    assert len(labels) == 2 and sum("shapley" in e.labels for e in events) == 2
    assert labels[A.slot]["phi"] == pytest.approx(result.phi[A.key]) == pytest.approx(2.5)
    assert labels[A.slot]["protocol_hash"] == AuditProtocol().protocol_hash()
    assert labels[B.slot]["interactions"] == {f"{A.key}|{B.key}": pytest.approx(3.0)}


# ---------------------------------------------------------------------------------------------
# One real audit: 2 seeds on digits, R = 1, 6 ticks of 4 batches (enough for the seeds to blend)
# ---------------------------------------------------------------------------------------------


REAL_PROTOCOL = AuditProtocol(
    config=GrowConfig(device="cpu", env=EnvConfig(batches_per_tick=4)),
    ticks=6,
    metric="val_loss",
    repeats=1,
)
REAL_SEEDS = [
    Candidate.advancing("slots.b0", "CONV_LIGHT", 0),
    Candidate.advancing("slots.b1", "CONV_SMALL", 0),
]


def test_real_two_seed_audit_on_digits(tmp_path: Path) -> None:
    protocol, seeds = REAL_PROTOCOL, REAL_SEEDS
    result = Audit(tmp_path / "audit").run(protocol, seeds, workers=1)
    assert result.failures == () and result.retrains == 4
    table = result.values[0]
    assert all(math.isfinite(v) for v in table.values())
    full, empty = table[tuple(sorted(c.key for c in seeds))], table[()]
    assert sum(result.phi.values()) == pytest.approx(full - empty, abs=1e-9)
    assert len(set(table.values())) > 1  # the enabled seeds were really trained in
    # The retrain is deterministic in (subset, repeat): the cache holds what a rerun gives.
    assert subset_value(protocol, seeds, frozenset(seeds[:1]), 0).value == table[(seeds[0].key,)]


def test_replay_germinates_enabled_seeds_only_at_their_tick(tmp_path: Path) -> None:
    cfg = AuditProtocol(
        config=GrowConfig(device="cpu", env=EnvConfig(batches_per_tick=4)), ticks=6
    ).grow_config(0)
    run = start_run(cfg, policy=ReplayPolicy([A], slot_layout(cfg)), run_dir=tmp_path / "r")
    run.run()
    (germinate,) = run.store.events("germinate")
    run.store.close()
    assert (germinate.slot, germinate.tick) == (A.slot, A.germinate_tick)
    stages = {n: s.stage for n, s in run.env.slots.items()}
    assert stages[A.slot] is not Stage.DORMANT
    assert stages[B.slot] is Stage.DORMANT and stages[C.slot] is Stage.DORMANT


# ---------------------------------------------------------------------------------------------
# Replay fidelity: a retrain of a run's own seeds is that run
# ---------------------------------------------------------------------------------------------

SOURCE = GrowConfig(
    ticks=9,
    seed=3,
    device="cpu",
    env=EnvConfig(batches_per_tick=2),
    heuristic=HeuristicConfig(
        warmup_ticks=1, plateau_patience=0, hold_ticks=1, fossilize_margin=-10.0
    ),
)


def _source(tmp_path: Path, cfg: GrowConfig = SOURCE) -> tuple[Path, list[Candidate]]:
    run = start_run(cfg, run_dir=tmp_path / "source")
    run.run()
    run.store.close()
    return tmp_path / "source", candidates_from_run(tmp_path / "source")


def test_the_full_coalition_replays_the_source_run_exactly(tmp_path: Path) -> None:
    # Every germination of the source is a candidate (distinct slots): replaying all of them at
    # the recorded point of the tick, with their heads and their fate (advance, fossilize, ...)
    # and the same per-seed initial weights, is the source run itself, bit for bit.
    src, cands = _source(tmp_path)
    with RunStore.open(src) as store:
        germinations = store.events("germinate")
        fates = [e for e in store.events() if e.kind in ("advance", "fossilize", "prune")]
        final = store.metrics()[-1][1]["val_loss"]
    assert len(germinations) == len(cands) >= 2 and fates, "the source should grow seeds"
    assert any(c.fate for c in cands) and all(json.loads(c.germination)["action"] for c in cands)
    protocol = AuditProtocol(config=SOURCE, ticks=SOURCE.ticks, metric="val_loss", base_seed=3)
    job = subset_value(protocol, cands, frozenset(cands), 0)
    assert job.value == final and job.unreached == ()


def test_replay_keeps_every_head_of_the_recorded_germination(tmp_path: Path) -> None:
    src, cands = _source(tmp_path, replace(SOURCE, policy="random", ticks=6, seed=5))
    assert cands, "the random policy should have germinated"
    cfg = AuditProtocol(config=SOURCE, ticks=6, base_seed=5).grow_config(0)
    run = start_run(cfg, policy=ReplayPolicy(cands, slot_layout(cfg)), run_dir=tmp_path / "r")
    run.run()
    replayed = {e.slot: (e.tick, e.payload["action"]) for e in run.store.events("germinate")}
    run.store.close()
    with RunStore.open(src) as store:
        recorded = {e.slot: (e.tick, e.payload["action"]) for e in store.events("germinate")}
    assert all(replayed[c.slot] == recorded[c.slot] for c in cands)
    assert len({a["style"] + a["tempo"] + a["alpha_target"] for _, a in replayed.values()}) >= 1


def test_a_fate_beyond_the_budget_is_reported(tmp_path: Path) -> None:
    _, cands = _source(tmp_path)
    last = max(t for c in cands for t, _ in c.fate)
    short = AuditProtocol(config=SOURCE, ticks=last, base_seed=3)  # the last op is cut off
    result = Audit(tmp_path / "audit").run(short, cands, workers=1)
    assert result.failures == () and result.unreached
    notes = [n for ns in result.unreached.values() for n in ns]
    assert any(f"recorded at tick {last}" in n for n in notes)


class _PoisonAudited:
    def __init__(self, slot: str, tick: int) -> None:
        self.slot, self.tick = slot, tick

    def __call__(self, t: int, env: GrowthEnv) -> None:
        if t == self.tick:
            with torch.no_grad():
                next(env.slots[self.slot].seed.parameters()).fill_(float("nan"))


def test_a_governor_removing_an_audited_seed_fails_the_retrain_loudly(tmp_path: Path) -> None:
    cfg = AuditProtocol(config=SOURCE, ticks=6).grow_config(0)
    policy = ReplayPolicy([A], slot_layout(cfg))
    poison = _PoisonAudited(A.slot, A.germinate_tick + 2)
    run = start_run(cfg, policy=policy, run_dir=tmp_path / "r", callbacks=[poison])
    with pytest.raises(AuditReplayError, match="governor removed audited seed"):
        run.run()
    run.store.close()


def test_enabling_one_seed_leaves_anothers_initial_weights_alone() -> None:
    # Common random numbers: b0's seed germinated at tick 1 starts from the same weights whether
    # or not b1 was germinated before it.
    def b0_weights(germinate_b1_first: bool) -> list[torch.Tensor]:
        d = cnn_driver()
        first = FactoredAction(op=Op.GERMINATE, slot=1, blueprint=Blueprint.CONV_SMALL)
        d.tick(first if germinate_b1_first else None)
        d.tick(FactoredAction(op=Op.GERMINATE, slot=0, blueprint=Blueprint.CONV_LIGHT))
        return [p.detach().clone() for p in d.slot(0).seed.parameters()]

    alone, after = b0_weights(False), b0_weights(True)
    assert all(torch.equal(a, b) for a, b in zip(alone, after, strict=True))
