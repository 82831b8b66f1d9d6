"""The untrained policies: random and heuristic only ever choose legal actions, none only waits,
the heuristic keeps its warmup and its memory of pruned blueprints."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from _engine_helpers import small_config
from esper.contracts import (
    TAMIYO_OPS,
    AlphaCurve,
    Blueprint,
    FactoredAction,
    Observation,
    Op,
    SeedSpec,
    SlotTelemetry,
    Stage,
)
from esper.run import start_run
from esper.tamiyo.masks import illegal_reason
from esper.tamiyo.policies import (
    POLICIES,
    Decision,
    HeuristicConfig,
    HeuristicPolicy,
    NonePolicy,
    RandomPolicy,
    make_policy,
)

# ---------------------------------------------------------------------------------------------
# Observations, built by hand or drawn by hypothesis
# ---------------------------------------------------------------------------------------------


def tele(name: str, stage: Stage = Stage.DORMANT, **kw: object) -> SlotTelemetry:
    base = dict(
        name=name,
        stage=stage,
        ticks_in_stage=0,
        alpha=0.0,
        alpha_target=1.0,
        alpha_curve=AlphaCurve.LINEAR,
        alpha_ticks_left=0,
        seed_grad_norm=0.0,
        host_grad_norm=0.0,
        grad_ratio=0.0,
        param_count=0,
        spec=None,
    )
    return SlotTelemetry(**{**base, **kw})


def observe(
    tick: int,
    slots: list[SlotTelemetry],
    metric: float = 0.5,
    legal: tuple[Blueprint, ...] = tuple(Blueprint),
) -> Observation:
    return Observation(
        tick=tick,
        max_ticks=100,
        metric=metric,
        higher_is_better=True,
        val_loss=1.0,
        train_loss=1.0,
        history=(metric,),
        host_params=1000,
        seed_params=0,
        rent_paid=0.0,
        slots=tuple(slots),
        legal_blueprints=tuple(legal for _ in slots),
    )


@st.composite
def slot_telemetry(draw: st.DrawFn, name: str) -> SlotTelemetry:
    stage = draw(st.sampled_from(Stage))
    spec = None if stage is Stage.DORMANT else SeedSpec(draw(st.sampled_from(Blueprint)))
    return tele(
        name,
        stage,
        ticks_in_stage=draw(st.integers(0, 12)),
        alpha=draw(st.floats(0.0, 1.0)),
        alpha_ticks_left=draw(st.integers(0, 3)),
        gate_passed=draw(st.sampled_from([None, False, True])),
        spec=spec,
        contribution=draw(st.one_of(st.none(), st.floats(-0.2, 0.2))),
        rent=draw(st.floats(0.0, 0.05)),
    )


@st.composite
def observations(draw: st.DrawFn) -> Observation:
    n = draw(st.integers(1, 4))
    slots = tuple(draw(slot_telemetry(f"s{i}")) for i in range(n))
    legal = tuple(
        tuple(draw(st.lists(st.sampled_from(Blueprint), min_size=1, unique=True))) for _ in range(n)
    )
    return Observation(
        tick=draw(st.integers(0, 40)),
        max_ticks=40,
        metric=draw(st.floats(0.0, 1.0)),
        higher_is_better=draw(st.booleans()),
        val_loss=1.0,
        train_loss=1.0,
        history=(),
        host_params=1000,
        seed_params=0,
        rent_paid=0.0,
        slots=slots,
        legal_blueprints=legal,
    )


def _assert_consistent(d: Decision, obs: Observation) -> None:
    """The action is legal, and the recorded masks allow what was chosen."""
    assert illegal_reason(d.action, obs) is None, d.action
    assert d.mask["op"][TAMIYO_OPS.index(d.action.op)]
    if d.action.op is not Op.WAIT:
        assert d.mask["slot"][d.action.slot]
    if d.action.op is Op.GERMINATE:
        assert d.mask["blueprint"][d.action.blueprint]


# ---------------------------------------------------------------------------------------------
# Legal actions only
# ---------------------------------------------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(obs=observations(), seed=st.integers(0, 2**16))
def test_random_policy_never_picks_an_illegal_action(obs: Observation, seed: int) -> None:
    d = RandomPolicy(seed).act(obs)
    _assert_consistent(d, obs)
    for head, probs in d.probs.items():  # uniform over the legal choices of each head
        assert sum(probs) == pytest.approx(1.0), head
        assert all((p > 0) == ok for p, ok in zip(probs, d.mask[head], strict=True))


@settings(max_examples=150, deadline=None)
@given(obs=observations(), warmup=st.integers(0, 10))
def test_heuristic_acts_legally_and_waits_out_its_warmup(obs: Observation, warmup: int) -> None:
    policy = HeuristicPolicy(HeuristicConfig(warmup_ticks=warmup, plateau_patience=0))
    d = policy.act(obs)
    _assert_consistent(d, obs)
    if obs.tick < warmup:
        assert d.action.op is not Op.GERMINATE


@settings(max_examples=100, deadline=None)
@given(obs=observations())
def test_none_policy_always_waits(obs: Observation) -> None:
    d = NonePolicy().act(obs)
    assert d.action == FactoredAction() and d.action.op is Op.WAIT
    _assert_consistent(d, obs)


def test_random_policy_in_a_real_run_is_always_legal(tmp_path: Path) -> None:
    run = start_run(small_config(14, policy="random", seed=3), run_dir=tmp_path / "r")
    act, ops = run.policy.act, []

    def checked(obs: Observation) -> Decision:
        d = act(obs)
        _assert_consistent(d, obs)
        ops.append(d.action.op)
        return d

    run.policy.act = checked
    run.run()
    assert len(ops) == 14 and Op.GERMINATE in ops and len(set(ops)) >= 3
    events = run.store.events()
    assert not [e for e in events if e.kind == "rejected_action"]
    assert [d.action["op"] for d in run.store.decisions()] == [op.name for op in ops]


def test_none_policy_run_never_grows(tmp_path: Path) -> None:
    run = start_run(small_config(4, policy="none"), run_dir=tmp_path / "r")
    result = run.run()
    assert {d.action["op"] for d in run.store.decisions()} == {"WAIT"}
    assert not result.germinated and result.params_end == result.params_start
    assert all(s.stage is Stage.DORMANT for s in run.env.slots.values())
    assert result.rent_paid == 0.0 and result.churn_paid == 0.0


# ---------------------------------------------------------------------------------------------
# Heuristic: warmup, pruned-blueprint memory, resumable state
# ---------------------------------------------------------------------------------------------


def test_heuristic_first_germinates_exactly_when_warmup_ends(tmp_path: Path) -> None:
    cfg = small_config(7, heuristic=HeuristicConfig(warmup_ticks=5, plateau_patience=0))
    run = start_run(cfg, run_dir=tmp_path / "r")
    run.run()
    assert [e.tick for e in run.store.events("germinate")] == [5]


def test_heuristic_avoids_a_recently_pruned_blueprint_on_that_slot() -> None:
    cfg = HeuristicConfig(
        warmup_ticks=0,
        plateau_patience=0,
        hold_ticks=1,
        avoid_pruned_ticks=10,
        rotation=("CONV_LIGHT", "MLP"),
        max_widenings=0,  # the rotation's memory only (widening: test_heuristic_widens_first)
    )
    policy = HeuristicPolicy(cfg)
    held = tele(
        "s0",
        Stage.HOLDING,
        ticks_in_stage=1,
        spec=SeedSpec(Blueprint.CONV_LIGHT),
        contribution=0.001,
        rent=0.01,
        alpha=1.0,
    )
    d = policy.act(observe(5, [held, tele("s1", Stage.EMBARGOED)]))
    assert (d.action.op, d.action.slot) == (Op.PRUNE, 0)  # it does not pay its rent

    def germinate(tick: int, slots: list[SlotTelemetry]) -> FactoredAction:
        a = policy.act(observe(tick, slots)).action
        assert a.op is Op.GERMINATE
        return a

    dormant = [tele("s0"), tele("s1", Stage.EMBARGOED)]
    for tick in (6, 10, 14):  # the rotation would offer CONV_LIGHT again, on s0
        a = germinate(tick, dormant)
        assert (a.slot, a.blueprint) == (0, Blueprint.MLP)
    # Another slot may still try it, and after avoid_pruned_ticks s0 may too.
    policy.next_blueprint = 0
    a = germinate(14, [tele("s0", Stage.EMBARGOED), tele("s1")])
    assert (a.slot, a.blueprint) == (1, Blueprint.CONV_LIGHT)
    policy.next_blueprint = 0
    a = germinate(15, dormant)
    assert (a.slot, a.blueprint) == (0, Blueprint.CONV_LIGHT)

    only_pruned = HeuristicPolicy(replace(cfg, rotation=("CONV_LIGHT",)))
    only_pruned.pruned["s0/CONV_LIGHT"] = 5
    assert only_pruned.act(observe(6, dormant)).action.op is Op.WAIT


def test_heuristic_waits_for_a_plateau_and_for_room() -> None:
    policy = HeuristicPolicy(
        HeuristicConfig(warmup_ticks=0, plateau_patience=2, plateau_delta=0.01, max_live_seeds=1)
    )
    slots = [tele("s0"), tele("s1")]
    ops = [
        policy.act(observe(t, slots, metric=m)).action.op
        for t, m in enumerate([0.1, 0.2, 0.3, 0.305, 0.31])
    ]
    assert ops == [Op.WAIT, Op.WAIT, Op.WAIT, Op.WAIT, Op.GERMINATE]
    busy = [
        tele("s0", Stage.BLENDING, alpha_ticks_left=2, spec=SeedSpec(Blueprint.MLP)),
        tele("s1"),
    ]
    for t in range(5, 9):  # max_live_seeds = 1: no second seed while one blends
        assert policy.act(observe(t, busy, metric=0.31)).action.op is Op.WAIT


@pytest.mark.parametrize("name", ["random", "heuristic"])
def test_policy_state_round_trips_through_json(name: str) -> None:
    slots = [tele("s0"), tele("s1")]
    obs = [observe(t, slots, metric=0.5) for t in range(12)]
    a = make_policy(name, seed=7, heuristic=HeuristicConfig(warmup_ticks=0, plateau_patience=0))
    b = make_policy(name, seed=99, heuristic=HeuristicConfig(warmup_ticks=0, plateau_patience=0))
    for o in obs[:6]:
        a.act(o)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    assert [a.act(o).action for o in obs[6:]] == [b.act(o).action for o in obs[6:]]


def test_make_policy_rejects_unknown_names() -> None:
    with pytest.raises(ValueError, match="bogus") as err:
        make_policy("bogus")
    for valid in POLICIES:
        assert valid in str(err.value)
    assert set(POLICIES) == {"heuristic", "random", "none"}
    assert make_policy("none").name == "none"


def test_heuristic_widens_first_then_follows_its_rotation() -> None:
    cfg = HeuristicConfig(warmup_ticks=0, plateau_patience=0, rotation=("MLP",), max_widenings=1)
    policy = HeuristicPolicy(cfg)
    dormant = [tele("s0"), tele("s1")]
    a = policy.act(observe(0, dormant)).action
    assert (a.op, a.slot, a.blueprint) == (Op.GERMINATE, 0, Blueprint.WIDEN)  # the widest reach
    widened = tele("s0", Stage.COMMITTED, spec=SeedSpec(Blueprint.WIDEN))
    a = policy.act(observe(1, [widened, tele("s1")])).action
    assert (a.op, a.slot, a.blueprint) == (Op.GERMINATE, 1, Blueprint.MLP)  # one is enough
    # where WIDEN is not legal (a user's module, or a widening already live) it is not tried
    fresh = HeuristicPolicy(cfg)
    no_widen = tuple(b for b in Blueprint if b is not Blueprint.WIDEN)
    a = fresh.act(observe(0, dormant, legal=no_widen)).action
    assert a.blueprint is Blueprint.MLP
    never = HeuristicPolicy(replace(cfg, max_widenings=0))
    assert never.act(observe(0, dormant)).action.blueprint is Blueprint.MLP
