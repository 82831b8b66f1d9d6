"""Simic's economy against hand computations: rent, churn, reward, ledger, resume."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from esper.contracts import Op, Stage
from esper.simic import (
    HIGH_RENT,
    LOW_RENT,
    NO_CHURN,
    ChurnBreakdown,
    ChurnMeter,
    Economy,
    EconomyConfig,
    Ledger,
    RewardBreakdown,
    SlotEconomics,
    level_reward,
    reward,
    slot_rent,
    task_reward,
    tick_rent,
)

CFG = EconomyConfig()
P_HOST = 10_000  # base rent = 0.0039 · 10000 = 39 parameters

# ---------------------------------------------------------------------------------------------
# Rent
# ---------------------------------------------------------------------------------------------


def test_rent_matches_hand_computation() -> None:
    # base = 39; α·P_seed = 0.5·500 = 250; (39 + 250) / 10000 = 0.0289
    expected = math.log(1 + 0.0289)
    assert expected == pytest.approx(0.0284902704)
    assert slot_rent(0.5, 500, P_HOST, CFG) == pytest.approx(expected, rel=1e-12)


def test_rent_at_alpha_zero_is_base_rent_only() -> None:
    # (39 + 0) / 10000 = 0.0039, whatever the seed's size
    assert slot_rent(0.0, 500, P_HOST, CFG) == pytest.approx(math.log(1.0039), rel=1e-12)
    assert slot_rent(0.0, 10**9, P_HOST, CFG) == pytest.approx(0.0038924147, rel=1e-7)


def test_rent_cap_engages() -> None:
    # (39 + 30000) / 10000 = 3.0039 → log(4.0039) ≈ 1.387 > max_rent = 1.0
    assert math.log(4.0039) == pytest.approx(1.3872688861)
    assert slot_rent(1.0, 30_000, P_HOST, CFG) == 1.0
    # A low cap bites on an ordinary seed: log(1.0289) ≈ 0.0285 > 0.02.
    assert slot_rent(0.5, 500, P_HOST, EconomyConfig(max_rent=0.02)) == 0.02
    # Just under the cap (e − 1 ≈ 1.718 of the host, minus the base) it does not.
    p_seed = (math.e - 1) * P_HOST - 39 - 100
    assert slot_rent(1.0, p_seed, P_HOST, CFG) < 1.0


def test_rent_uncapped_with_infinite_max() -> None:
    cfg = EconomyConfig(max_rent=math.inf)
    assert slot_rent(1.0, 30_000, P_HOST, cfg) == pytest.approx(math.log(4.0039), rel=1e-12)


def _slot(stage: Stage, alpha: float = 0.0, p_seed: int = 500, name: str = "s") -> SlotEconomics:
    return SlotEconomics(name=name, stage=stage, alpha=alpha, p_seed=p_seed, seed_id="seed-1")


def test_training_pays_only_base_rent() -> None:
    # TRAINING runs at α = 0 in the blend: log(1 + 39/10000), even if a stale α is reported.
    for alpha in (0.0, 0.3):
        rents = tick_rent([_slot(Stage.TRAINING, alpha)], P_HOST, CFG)
        assert rents["s"] == pytest.approx(math.log(1.0039), rel=1e-12)
    rents = tick_rent([_slot(Stage.GERMINATED, 0.0)], P_HOST, CFG)
    assert rents["s"] == pytest.approx(0.0038924147, rel=1e-7)


def test_committed_pays_at_alpha_one() -> None:
    # (39 + 1·500) / 10000 = 0.0539 → log(1.0539) ≈ 0.0524976, whatever α the slot reports
    for alpha in (0.0, 0.4, 1.0):
        rents = tick_rent([_slot(Stage.COMMITTED, alpha)], P_HOST, CFG)
        assert rents["s"] == pytest.approx(math.log(1.0539), rel=1e-12)
        assert rents["s"] == pytest.approx(0.0524975690, rel=1e-7)


def test_blending_and_holding_pay_at_their_alpha() -> None:
    for stage in (Stage.BLENDING, Stage.HOLDING):
        rents = tick_rent([_slot(stage, 0.5)], P_HOST, CFG)
        assert rents["s"] == pytest.approx(math.log(1.0289), rel=1e-12)


def test_pruned_pays_while_fading_only() -> None:
    # α = 0.2: (39 + 100) / 10000 = 0.0139
    fading = tick_rent([_slot(Stage.PRUNED, 0.2)], P_HOST, CFG)
    assert fading["s"] == pytest.approx(math.log(1.0139), rel=1e-12)
    assert tick_rent([_slot(Stage.PRUNED, 0.0)], P_HOST, CFG)["s"] == 0.0


@pytest.mark.parametrize("stage", [Stage.DORMANT, Stage.EMBARGOED, Stage.RESETTING])
def test_empty_stages_pay_nothing(stage: Stage) -> None:
    assert tick_rent([_slot(stage, 0.0)], P_HOST, CFG) == {"s": 0.0}


def test_tick_rent_reports_every_slot() -> None:
    slots = [
        _slot(Stage.BLENDING, 0.5, name="a"),
        _slot(Stage.DORMANT, name="b"),
        _slot(Stage.TRAINING, name="c"),
    ]
    rents = tick_rent(slots, P_HOST, CFG)
    assert rents == pytest.approx({"a": math.log(1.0289), "b": 0.0, "c": math.log(1.0039)})


@pytest.mark.parametrize("p_host", [0, -1, 0.0])
def test_p_host_must_be_positive(p_host: float) -> None:
    with pytest.raises(ValueError, match="p_host"):
        slot_rent(0.5, 500, p_host, CFG)
    with pytest.raises(ValueError, match="p_host"):
        tick_rent([], p_host, CFG)


def test_bad_alpha_and_p_seed_rejected() -> None:
    with pytest.raises(ValueError, match="alpha"):
        slot_rent(1.5, 500, P_HOST, CFG)
    with pytest.raises(ValueError, match="p_seed"):
        slot_rent(0.5, -1, P_HOST, CFG)
    with pytest.raises(ValueError, match="alpha"):
        SlotEconomics("s", Stage.BLENDING, -0.1, 500)


def test_default_weight_prices_a_tenth_of_the_host_at_a_tenth_of_a_point() -> None:
    # 10% of the host at α = 1: 0.01 · log(1 + 0.0039 + 0.1) ≈ 0.000988 per tick.
    rent = reward(None, 0.0, {"s": slot_rent(1.0, 1000, P_HOST, CFG)}, _no_churn(), CFG).rent
    assert rent == pytest.approx(0.01 * math.log(1.1039), rel=1e-12)
    assert rent == pytest.approx(0.00098849364, rel=1e-7)
    # Doubling the host: 0.01 · log(2.0039) ≈ 0.00695.
    assert CFG.w_rent * slot_rent(1.0, P_HOST, P_HOST, CFG) == pytest.approx(0.00695095282)


# ---------------------------------------------------------------------------------------------
# Churn
# ---------------------------------------------------------------------------------------------


def _no_churn() -> ChurnBreakdown:
    return ChurnBreakdown(0, 0, 0, 0.0)


# (tick, ops, alphas after the ops, expected (edits, reversals, flips)), churn_window = 5.
SCRIPT: list[tuple[int, list[tuple[str, Op]], dict[str, float], tuple[int, int, int]]] = [
    (0, [("a", Op.GERMINATE)], {"a": 0.0}, (1, 0, 0)),
    (1, [("a", Op.ADVANCE), ("b", Op.WAIT)], {"a": 0.0}, (0, 0, 0)),
    (2, [("a", Op.ADVANCE)], {"a": 0.25}, (0, 0, 0)),  # α rises: first direction, no reversal
    (3, [("a", Op.SET_ALPHA_TARGET)], {"a": 0.5}, (0, 0, 0)),  # still rising
    (4, [], {"a": 0.3}, (0, 1, 0)),  # falls: reversal
    (5, [], {"a": 0.3 + 1e-12}, (0, 0, 0)),  # below tolerance: no movement
    (6, [], {"a": 0.6}, (0, 1, 0)),  # rises again: reversal
    # a: last edit at 0, 7 − 0 = 7 > 5, no flip; b: first edit. The prune resets a's history.
    (7, [("a", Op.PRUNE), ("b", Op.GERMINATE)], {"a": 0.6, "b": 0.0}, (2, 0, 0)),
    (8, [], {"a": 0.3, "b": 0.0}, (0, 0, 0)),  # a fades out after the prune: not a reversal
    (9, [("b", Op.PRUNE)], {"a": 0.0, "b": 0.0}, (1, 0, 1)),  # b: germinated at 7, 9 − 7 = 2
    (10, [], {}, (0, 0, 0)),  # both emptied
    (11, [("a", Op.GERMINATE)], {"a": 0.0}, (1, 0, 1)),  # a: pruned at 7, 11 − 7 = 4
    (13, [("a", Op.EMERGENCY_PRUNE)], {"a": 0.0}, (1, 0, 1)),  # 13 − 11 = 2
]


def test_churn_scripted_sequence() -> None:
    meter = ChurnMeter(CFG)
    for tick, ops, alphas, (e, r, f) in SCRIPT:
        got = meter.observe(tick, ops, alphas)
        assert (got.edits, got.reversals, got.flips) == (e, r, f), f"tick {tick}"
        assert got.total == e + r + f  # default weights 1, 1, 1
        assert sum(got.by_slot.values()) == pytest.approx(got.total)


def test_churn_weights_and_attribution() -> None:
    cfg = EconomyConfig(w_edit=2.0, w_reversal=3.0, w_flip=5.0)
    meter = ChurnMeter(cfg)
    meter.observe(0, [("a", Op.GERMINATE)], {"a": 0.0, "b": 0.2})
    meter.observe(1, [], {"a": 0.0, "b": 0.4})
    got = meter.observe(2, [("a", Op.PRUNE), ("c", Op.GERMINATE)], {"a": 0.0, "b": 0.1})
    # E = 2 (a, c), F = 1 (a: 2 − 0 ≤ 5), R = 1 (b: up then down): 2·2 + 3·1 + 5·1 = 12
    assert (got.edits, got.reversals, got.flips) == (2, 1, 1)
    assert got.total == 12.0
    assert got.by_slot == {"a": 2.0 + 5.0, "b": 3.0, "c": 2.0}


@pytest.mark.parametrize(
    ("gap", "is_flip"), [(1, True), (4, True), (5, True), (6, False), (10, False)]
)
def test_flip_window_is_inclusive(gap: int, is_flip: bool) -> None:
    # An edit exactly churn_window (5) ticks after the last one is a flip; one tick later is not.
    meter = ChurnMeter(CFG)
    meter.observe(0, [("a", Op.GERMINATE)], {})
    for t in range(1, gap):
        meter.observe(t, [], {})
    assert meter.observe(gap, [("a", Op.PRUNE)], {}).flips == int(is_flip)


def test_flip_window_one() -> None:
    meter = ChurnMeter(EconomyConfig(churn_window=1))
    meter.observe(0, [("a", Op.GERMINATE)], {})
    assert meter.observe(1, [("a", Op.PRUNE)], {}).flips == 1
    assert meter.observe(3, [("a", Op.GERMINATE)], {}).flips == 0


def test_two_edits_on_one_slot_in_one_tick_make_a_flip() -> None:
    got = ChurnMeter(CFG).observe(0, [("a", Op.GERMINATE), ("a", Op.PRUNE)], {})
    assert (got.edits, got.flips, got.total) == (2, 1, 3.0)


def test_which_ops_are_edits() -> None:
    structural = [Op.GERMINATE, Op.PRUNE, Op.FOSSILIZE, Op.LYSE, Op.EMERGENCY_PRUNE]
    other = [Op.WAIT, Op.ADVANCE, Op.SET_ALPHA_TARGET, Op.SEDATE, Op.LIFT]
    # One op per slot, so no flips.
    got = ChurnMeter(CFG).observe(0, [(f"s{i}", op) for i, op in enumerate(structural)], {})
    assert (got.edits, got.flips) == (5, 0)
    got = ChurnMeter(CFG).observe(0, [(f"s{i}", op) for i, op in enumerate(other)], {})
    assert (got.edits, got.total) == (0, 0.0)


def test_leaving_the_alpha_map_resets_direction() -> None:
    def run(gap: bool) -> int:
        meter = ChurnMeter(CFG)
        meter.observe(0, [], {"c": 0.2})
        meter.observe(1, [], {"c": 0.4})  # rising
        meter.observe(2, [], {} if gap else {"c": 0.4})
        meter.observe(3, [], {"c": 0.2})
        return meter.observe(4, [], {"c": 0.1}).reversals

    assert run(gap=False) == 0  # 0.4 → 0.2 at tick 3 was the reversal; 0.2 → 0.1 continues
    meter = ChurnMeter(CFG)
    meter.observe(0, [], {"c": 0.2})
    meter.observe(1, [], {"c": 0.4})
    meter.observe(2, [], {})  # dormant: history gone
    assert meter.observe(3, [], {"c": 0.2}).reversals == 0  # no previous α
    assert meter.observe(4, [], {"c": 0.1}).reversals == 0  # falling is its first direction


def test_ticks_must_increase() -> None:
    meter = ChurnMeter(CFG)
    meter.observe(3, [], {})
    with pytest.raises(ValueError, match="tick"):
        meter.observe(3, [], {})


def test_churn_state_rejects_unknown_keys() -> None:
    state = ChurnMeter(CFG).state_dict() | {"extra": 1}
    with pytest.raises(ValueError, match="extra"):
        ChurnMeter(CFG).load_state_dict(state)


# ---------------------------------------------------------------------------------------------
# Reward
# ---------------------------------------------------------------------------------------------


def test_task_reward_sign_for_accuracy() -> None:
    assert task_reward(0.80, 0.81, higher_is_better=True, scale=1.0) == pytest.approx(0.01)
    assert task_reward(0.81, 0.80, higher_is_better=True, scale=1.0) == pytest.approx(-0.01)


def test_task_reward_sign_for_loss() -> None:
    # A loss falling from 2.0 to 1.5 is an improvement: +0.5 · scale.
    assert task_reward(2.0, 1.5, higher_is_better=False, scale=1.0) == pytest.approx(0.5)
    assert task_reward(2.0, 1.5, higher_is_better=False, scale=0.1) == pytest.approx(0.05)
    assert task_reward(1.5, 2.0, higher_is_better=False, scale=1.0) == pytest.approx(-0.5)
    cfg = EconomyConfig(higher_is_better=False, task_reward="delta")
    assert reward(2.0, 1.5, {}, _no_churn(), cfg).task == pytest.approx(0.5)


def test_level_reward_is_the_metric_per_tick() -> None:
    # The default: the metric itself, whatever the previous one was; a loss counts negatively.
    assert CFG.task_reward == "level"
    assert reward(None, 0.83, {}, _no_churn(), CFG).task == pytest.approx(0.83)
    assert reward(0.95, 0.83, {}, _no_churn(), CFG).task == pytest.approx(0.83)
    lossy = EconomyConfig(higher_is_better=False, task_scale=0.5)
    assert reward(2.0, 1.5, {}, _no_churn(), lossy).task == pytest.approx(-0.75)
    assert level_reward(0.5, True, 2.0) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="finite"):
        level_reward(math.inf, True, 1.0)


def test_level_return_is_area_under_the_curve_minus_costs() -> None:
    # Σ_t R_total over a run = Σ_t metric_t − W_rent·Σ C_rent − W_churn·Σ C_churn, which a
    # delta reward would telescope to (last − first metric) instead.
    metrics, rent = [0.2, 0.5, 0.7, 0.75], {"a": 0.3}
    level = sum(
        reward(p, m, rent, _no_churn(), CFG).total
        for p, m in zip([None, *metrics[:-1]], metrics, strict=True)
    )
    delta_cfg = EconomyConfig(task_reward="delta")
    delta = sum(
        reward(p, m, rent, _no_churn(), delta_cfg).total
        for p, m in zip([None, *metrics[:-1]], metrics, strict=True)
    )
    assert level == pytest.approx(2.15 - 4 * 0.01 * 0.3)
    assert delta == pytest.approx(0.55 - 4 * 0.01 * 0.3)


def test_unknown_task_reward_is_rejected() -> None:
    with pytest.raises(ValueError, match="task_reward"):
        EconomyConfig(task_reward="auc")


def test_task_reward_rejects_nan() -> None:
    with pytest.raises(ValueError, match="finite"):
        task_reward(0.5, math.nan, True, 1.0)


def test_reward_matches_hand_computation() -> None:
    # Rent: a BLENDING at α 0.5 (log 1.0289) + b TRAINING (log 1.0039) + c DORMANT (0).
    slots = [
        SlotEconomics("a", Stage.BLENDING, 0.5, 500, "s1"),
        SlotEconomics("b", Stage.TRAINING, 0.0, 2000, "s2"),
        SlotEconomics("c", Stage.DORMANT, 0.0, 0, None),
    ]
    rents = tick_rent(slots, P_HOST, CFG)
    churn = ChurnBreakdown(edits=2, reversals=0, flips=1, total=3.0)
    got = reward(0.80, 0.83, rents, churn, CFG)
    c_rent = math.log(1.0289) + math.log(1.0039)  # ≈ 0.0323827
    assert got.task == pytest.approx(0.83)
    assert got.rent == pytest.approx(0.01 * c_rent, rel=1e-12)
    assert got.rent == pytest.approx(0.00032382686, rel=1e-7)
    assert got.churn == pytest.approx(0.01 * 3)
    assert got.total == pytest.approx(0.83 - 0.00032382686 - 0.03, rel=1e-7)
    delta = reward(0.80, 0.83, rents, churn, EconomyConfig(task_reward="delta"))
    assert delta.task == pytest.approx(0.03)
    assert delta.total == pytest.approx(0.03 - 0.00032382686 - 0.03, rel=1e-7)


def test_first_tick_has_no_delta_task_reward() -> None:
    got = reward(None, 0.9, {"a": 0.1}, _no_churn(), EconomyConfig(task_reward="delta"))
    assert got == RewardBreakdown(task=0.0, rent=0.01 * 0.1, churn=0.0, total=-0.01 * 0.1)


def test_no_churn_preset_ignores_churn() -> None:
    churn = ChurnBreakdown(edits=4, reversals=2, flips=1, total=7.0)
    assert reward(0.5, 0.5, {}, churn, NO_CHURN).churn == 0.0
    assert reward(0.5, 0.5, {}, churn, CFG).churn == pytest.approx(0.07)


def test_presets_differ_from_default_in_one_field() -> None:
    def diff(cfg: EconomyConfig) -> set[str]:
        a, b = dataclasses.asdict(cfg), dataclasses.asdict(CFG)
        return {k for k in a if a[k] != b[k]}

    assert diff(LOW_RENT) == {"w_rent"} and diff(HIGH_RENT) == {"w_rent"}
    assert LOW_RENT.w_rent < CFG.w_rent < HIGH_RENT.w_rent
    assert diff(NO_CHURN) == {"w_churn"} and NO_CHURN.w_churn == 0.0


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("base_rent_fraction", -0.001),
        ("max_rent", 0.0),
        ("w_rent", -0.1),
        ("w_churn", -1.0),
        ("w_edit", -1.0),
        ("w_reversal", -0.5),
        ("w_flip", -2.0),
        ("w_rent", math.nan),
        ("churn_window", 0),
        ("churn_window", -3),
        ("churn_window", 2.5),
        ("reversal_tolerance", -1e-9),
        ("task_scale", 0.0),
        ("task_scale", math.inf),
    ],
)
def test_invalid_config_names_the_field(name: str, value: float) -> None:
    with pytest.raises(ValueError, match=name):
        EconomyConfig(**{name: value})


# ---------------------------------------------------------------------------------------------
# Ledger
# ---------------------------------------------------------------------------------------------

L0039, L0289 = math.log(1.0039), math.log(1.0289)


def _scripted_economy() -> tuple[Economy, list[RewardBreakdown]]:
    econ = Economy(CFG)
    a, b = "a", "b"
    ticks = [
        ([SlotEconomics(a, Stage.GERMINATED, 0.0, 500, "s1"),
          SlotEconomics(b, Stage.DORMANT, 0.0, 0, None)], [(a, Op.GERMINATE)], 0.50),
        ([SlotEconomics(a, Stage.TRAINING, 0.0, 500, "s1"),
          SlotEconomics(b, Stage.DORMANT, 0.0, 0, None)], [(a, Op.ADVANCE)], 0.52),
        ([SlotEconomics(a, Stage.BLENDING, 0.5, 500, "s1"),
          SlotEconomics(b, Stage.GERMINATED, 0.0, 2000, "s2")],
         [(a, Op.ADVANCE), (b, Op.GERMINATE)], 0.53),
        ([SlotEconomics(a, Stage.BLENDING, 0.5, 500, "s1"),
          SlotEconomics(b, Stage.PRUNED, 0.0, 2000, "s2")], [(b, Op.PRUNE)], 0.51),
    ]  # fmt: skip
    out, prev = [], None
    for t, (slots, ops, metric) in enumerate(ticks):
        out.append(econ.step(t, slots, ops, P_HOST, prev, metric))
        prev = metric
    return econ, out


def test_ledger_per_seed_matches_hand_computation() -> None:
    econ, _ = _scripted_economy()
    seeds = econ.ledger.per_seed()
    # s1: base rent at ticks 0, 1 (GERMINATED, TRAINING), α 0.5 at ticks 2, 3; one edit.
    s1 = seeds["s1"]
    assert s1.rent_paid == pytest.approx(0.01 * (2 * L0039 + 2 * L0289), rel=1e-12)
    assert s1.churn_paid == pytest.approx(0.01 * 1)
    assert s1.ticks_alive == 4
    # s2: base rent at tick 2; pruned at α 0 at tick 3 (no rent); edit + (edit + flip) = 3.
    s2 = seeds["s2"]
    assert s2.rent_paid == pytest.approx(0.01 * L0039, rel=1e-12)
    assert (s2.churn_paid, s2.ticks_alive) == (pytest.approx(0.03), 1)
    totals = econ.ledger.totals()
    assert totals.ticks == 4
    assert totals.task == pytest.approx(0.50 + 0.52 + 0.53 + 0.51)  # level: Σ metric
    assert totals.churn == pytest.approx(0.04)


def test_ledger_sums_equal_sum_of_ticks() -> None:
    econ, per_tick = _scripted_economy()
    totals, seeds = econ.ledger.totals(), econ.ledger.per_seed().values()
    assert totals.rent == pytest.approx(math.fsum(r.rent for r in per_tick))
    assert totals.churn == pytest.approx(math.fsum(r.churn for r in per_tick))
    assert totals.task == pytest.approx(math.fsum(r.task for r in per_tick))
    assert totals.total == pytest.approx(math.fsum(r.total for r in per_tick))
    assert totals.rent == pytest.approx(math.fsum(s.rent_paid for s in seeds))
    assert totals.churn == pytest.approx(math.fsum(s.churn_paid for s in seeds))


def test_ledger_state_round_trip() -> None:
    econ, _ = _scripted_economy()
    state = json.loads(json.dumps(econ.ledger.state_dict()))
    restored = Ledger(CFG)
    restored.load_state_dict(state)
    assert restored.per_seed() == econ.ledger.per_seed()
    assert restored.totals() == econ.ledger.totals()
    with pytest.raises(ValueError, match="tick"):
        restored.record(3, [], {}, _no_churn(), RewardBreakdown(0, 0, 0, 0))


# ---------------------------------------------------------------------------------------------
# Resume: a run saved and restored midway continues identically
# ---------------------------------------------------------------------------------------------

SLOTS = ("a", "b", "c")
ALPHAS = st.one_of(st.sampled_from([0.0, 0.25, 0.5, 1.0]), st.floats(0.0, 1.0))
OPS = st.lists(st.tuples(st.sampled_from(SLOTS), st.sampled_from(list(Op))), max_size=4)
CHURN_TICK = st.tuples(
    st.integers(1, 4), OPS, st.dictionaries(st.sampled_from(SLOTS), ALPHAS, max_size=3)
)


def _ticks(gaps: list[int]) -> list[int]:
    return [sum(gaps[: i + 1]) for i in range(len(gaps))]


@settings(max_examples=200, deadline=None)
@given(st.lists(CHURN_TICK, min_size=1, max_size=30), st.data())
def test_churn_meter_resume_is_identical(script: list, data: st.DataObject) -> None:
    ticks = _ticks([gap for gap, _, _ in script])
    split = data.draw(st.integers(0, len(script)))
    straight, resumed = ChurnMeter(CFG), ChurnMeter(CFG)

    def run(meter: ChurnMeter, part: range) -> list[ChurnBreakdown]:
        return [meter.observe(ticks[i], script[i][1], script[i][2]) for i in part]

    a_out = run(straight, range(len(script)))
    b_out = run(resumed, range(split))
    restored = ChurnMeter(CFG)
    restored.load_state_dict(json.loads(json.dumps(resumed.state_dict())))
    b_out += run(restored, range(split, len(script)))
    assert a_out == b_out
    assert restored.state_dict() == straight.state_dict()


STAGES = st.sampled_from(list(Stage))
SLOT_STATE = st.tuples(STAGES, ALPHAS, st.integers(0, 50_000), st.sampled_from(["x", "y", "z"]))
ECON_TICK = st.tuples(
    st.integers(1, 3),
    st.lists(SLOT_STATE, min_size=3, max_size=3),
    OPS,
    st.floats(0.0, 1.0),
)


def _econ_args(slot_states: list) -> list[SlotEconomics]:
    return [
        SlotEconomics(name, stage, alpha, p_seed, f"{seed}-{name}")
        for name, (stage, alpha, p_seed, seed) in zip(SLOTS, slot_states, strict=True)
    ]


@settings(max_examples=100, deadline=None)
@given(st.lists(ECON_TICK, min_size=1, max_size=25), st.data())
def test_economy_resume_and_ledger_sums(script: list, data: st.DataObject) -> None:
    ticks = _ticks([gap for gap, _, _, _ in script])
    split = data.draw(st.integers(0, len(script)))
    straight, resumed = Economy(HIGH_RENT), Economy(HIGH_RENT)

    def run(econ: Economy, part: range) -> list[RewardBreakdown]:
        out = []
        for i in part:
            prev = script[i - 1][3] if i else None
            _, slots, ops, metric = script[i]
            out.append(econ.step(ticks[i], _econ_args(slots), ops, P_HOST, prev, metric))
        return out

    a_out = run(straight, range(len(script)))
    b_out = run(resumed, range(split))
    restored = Economy(HIGH_RENT)
    restored.load_state_dict(json.loads(json.dumps(resumed.state_dict())))
    b_out += run(restored, range(split, len(script)))
    assert a_out == b_out
    assert restored.state_dict() == straight.state_dict()
    # Every slot carries a seed_id, so the per-seed accounts add up to the run's totals.
    totals, seeds = straight.ledger.totals(), straight.ledger.per_seed().values()
    assert totals.ticks == len(script)
    assert totals.rent == pytest.approx(math.fsum(r.rent for r in a_out), abs=1e-12)
    assert totals.churn == pytest.approx(math.fsum(r.churn for r in a_out), abs=1e-12)
    assert totals.rent == pytest.approx(math.fsum(s.rent_paid for s in seeds), abs=1e-12)
    assert totals.churn == pytest.approx(math.fsum(s.churn_paid for s in seeds), abs=1e-12)
