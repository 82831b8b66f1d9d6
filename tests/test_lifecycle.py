"""The seed lifecycle (paper §2.4): the authority table against the design's rules, and random
operation sequences on the pure `Lifecycle` and on a real `SeedSlot` — every illegal operation
raises a clear `IllegalTransition` and changes nothing, every legal one lands where `TRANSITIONS`
says, slot contents always match the stage, and the clock keeps embargoes exactly as long as
configured (an earlier implementation advanced the embargo counter twice per epoch)."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import fixed_loss, grow, slot_input
from esper.contracts import (
    AUTHORITY,
    SEED_STAGES,
    TRANSITIONS,
    Actor,
    Blueprint,
    DoubleTick,
    IllegalTransition,
    Lifecycle,
    LifecycleConfig,
    Op,
    SeedSpec,
    Stage,
    Style,
    Topology,
    is_legal,
)
from esper.kasmina import SeedSlot

QUIET = {Stage.DORMANT, Stage.EMBARGOED, Stage.RESETTING}
CLOCK = {
    Stage.PRUNED: Stage.EMBARGOED,
    Stage.EMBARGOED: Stage.RESETTING,
    Stage.RESETTING: Stage.DORMANT,
}

# ---------------------------------------------------------------------------------------------
# The tables against the design's rules (DESIGN.md "Lifecycle"), stated independently
# ---------------------------------------------------------------------------------------------


def test_tamiyo_acts_only_up_to_commit() -> None:
    for stage in (Stage.COMMITTED, Stage.PRUNED, Stage.EMBARGOED, Stage.RESETTING):
        for op in Op:
            assert is_legal(stage, Actor.TAMIYO, op) == (op is Op.WAIT), (stage, op)
    assert is_legal(Stage.HOLDING, Actor.TAMIYO, Op.FOSSILIZE)
    for stage in (Stage.TRAINING, Stage.BLENDING, Stage.HOLDING):
        assert is_legal(stage, Actor.TAMIYO, Op.PRUNE)


def test_emrakul_only_gates_committed_phages_and_never_deletes() -> None:
    for stage in Stage:
        for op in Op:
            want = op is Op.WAIT or (
                stage is Stage.COMMITTED and op in (Op.SEDATE, Op.WEAKEN, Op.LIFT)
            )
            assert is_legal(stage, Actor.EMRAKUL, op) == want, (stage, op)
    for op in (Op.LYSE, Op.PRUNE, Op.EMERGENCY_PRUNE):
        assert not any(is_legal(s, Actor.EMRAKUL, op) for s in Stage)


def test_lysis_belongs_to_the_engine() -> None:
    assert [s for s in Stage if is_legal(s, Actor.TOLARIA, Op.LYSE)] == [Stage.COMMITTED]
    assert not any(is_legal(s, Actor.TAMIYO, Op.LYSE) for s in Stage)


def test_tolaria_never_grows() -> None:
    for stage in Stage:
        for op in (Op.GERMINATE, Op.ADVANCE, Op.FOSSILIZE, Op.PRUNE, Op.SEDATE, Op.WEAKEN):
            assert not is_legal(stage, Actor.TOLARIA, op)
    # The LysisGovernor's wake-up after a loss spike: the engine lifts, on committed tissue only.
    assert [s for s in Stage if is_legal(s, Actor.TOLARIA, Op.LIFT)] == [Stage.COMMITTED]
    assert is_legal(Stage.COMMITTED, Actor.TOLARIA, Op.EMERGENCY_PRUNE)
    assert not is_legal(Stage.DORMANT, Actor.TOLARIA, Op.EMERGENCY_PRUNE)


def test_transition_table_is_the_papers_graph() -> None:
    moves = {(s, TRANSITIONS[(s, o)]) for (s, o) in TRANSITIONS}
    assert moves == {
        (Stage.DORMANT, Stage.GERMINATED),
        (Stage.GERMINATED, Stage.TRAINING),
        (Stage.TRAINING, Stage.BLENDING),
        (Stage.BLENDING, Stage.HOLDING),
        (Stage.HOLDING, Stage.COMMITTED),
        *(
            (s, Stage.PRUNED)
            for s in (
                Stage.GERMINATED,
                Stage.TRAINING,
                Stage.BLENDING,
                Stage.HOLDING,
                Stage.COMMITTED,
            )
        ),
    }
    # Every move is authorised for someone; the quiet stages accept nothing but WAIT.
    for stage, op in TRANSITIONS:
        assert any(stage in stages for (a, o), stages in AUTHORITY.items() if o is op)
    for stage in (Stage.EMBARGOED, Stage.RESETTING):
        assert {o for (a, o), ss in AUTHORITY.items() if stage in ss} == {Op.WAIT}
    assert {Stage.GERMINATED, Stage.TRAINING, Stage.BLENDING, Stage.HOLDING} == SEED_STAGES


@pytest.mark.parametrize("actor", list(Actor))
def test_illegal_transition_message_names_everything(actor: Actor) -> None:
    lc = Lifecycle("slots.b1", LifecycleConfig())
    with pytest.raises(IllegalTransition) as e:
        lc.apply(actor, Op.FOSSILIZE)
    msg = str(e.value)
    assert "'slots.b1'" in msg and "DORMANT" in msg and actor.value in msg and "FOSSILIZE" in msg
    assert "allowed" in msg
    assert (e.value.slot, e.value.stage, e.value.actor, e.value.op) == (
        "slots.b1",
        Stage.DORMANT,
        actor,
        Op.FOSSILIZE,
    )


# ---------------------------------------------------------------------------------------------
# The clock: embargo and reset lengths, double ticks
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("embargo", [0, 1, 3, 5])
@pytest.mark.parametrize("reset", [0, 1, 2])
def test_embargo_and_reset_last_exactly_their_ticks(embargo: int, reset: int) -> None:
    lc = Lifecycle("s", LifecycleConfig(embargo_ticks=embargo, reset_ticks=reset))
    for op in (Op.GERMINATE, Op.ADVANCE):
        lc.apply(Actor.TAMIYO, op)
    lc.apply(Actor.TAMIYO, Op.PRUNE)
    seen = [lc.tick(t) for t in range(1, embargo + reset + 4)]
    assert seen.count(Stage.EMBARGOED) == embargo
    assert seen.count(Stage.RESETTING) == reset
    assert seen[embargo + reset] is Stage.DORMANT
    assert seen == [Stage.EMBARGOED] * embargo + [Stage.RESETTING] * reset + [Stage.DORMANT] * 3


def test_pruned_waits_for_the_fade() -> None:
    lc = Lifecycle("s", LifecycleConfig(embargo_ticks=1))
    lc.apply(Actor.TAMIYO, Op.GERMINATE), lc.apply(Actor.TAMIYO, Op.ADVANCE)
    lc.apply(Actor.TAMIYO, Op.PRUNE)
    assert lc.tick(0, fade_done=False) is Stage.PRUNED
    assert lc.tick(1, fade_done=False) is Stage.PRUNED
    assert lc.tick(2, fade_done=True) is Stage.EMBARGOED


def test_double_tick_raises_and_changes_nothing() -> None:
    lc = Lifecycle("s", LifecycleConfig(embargo_ticks=3))
    lc.apply(Actor.TAMIYO, Op.GERMINATE), lc.apply(Actor.TAMIYO, Op.ADVANCE)
    lc.apply(Actor.TAMIYO, Op.PRUNE)
    lc.tick(4)
    state = (lc.stage, lc.ticks_in_stage, lc.last_tick)
    for t in (4, 3):
        with pytest.raises(DoubleTick, match="tick"):
            lc.tick(t)
        assert (lc.stage, lc.ticks_in_stage, lc.last_tick) == state
    # An embargo counted twice per epoch would end after 2 epochs instead of 3.
    assert [lc.tick(t) for t in (5, 6, 7)] == [Stage.EMBARGOED, Stage.EMBARGOED, Stage.RESETTING]


def test_slot_double_tick_moves_neither_alpha_nor_clock() -> None:
    torch.manual_seed(0)
    slot = SeedSlot(4, Topology.CNN, "s")
    grow(
        slot,
        slot,
        slot_input(Topology.CNN, channels=4).requires_grad_(),
        SeedSpec(Blueprint.CONV_SMALL),
        Stage.BLENDING,
        tempo=5,
    )
    t = slot.lifecycle.last_tick + 1
    slot.tick(t)
    before = (slot.alpha, slot.schedule, slot.lifecycle.ticks_in_stage, float(slot.coef))
    with pytest.raises(DoubleTick):
        slot.tick(t)
    assert (slot.alpha, slot.schedule, slot.lifecycle.ticks_in_stage, float(slot.coef)) == before


def test_lifecycle_config_rejects_negative_durations() -> None:
    with pytest.raises(ValueError, match="embargo_ticks"):
        LifecycleConfig(embargo_ticks=-1)


# ---------------------------------------------------------------------------------------------
# Random sequences on the pure Lifecycle
# ---------------------------------------------------------------------------------------------


@dataclass
class RunLengths:
    """Lengths of completed runs of ticks that return EMBARGOED / RESETTING."""

    current: Stage | None = None
    length: int = 0
    done: list[tuple[Stage, int]] = field(default_factory=list)

    def saw(self, stage: Stage) -> None:
        if stage is self.current:
            self.length += 1
            return
        if self.current is not None:
            self.done.append((self.current, self.length))
        self.current, self.length = (
            (stage, 1) if stage in (Stage.EMBARGOED, Stage.RESETTING) else (None, 0)
        )

    def check(self, cfg: LifecycleConfig) -> None:
        want = {Stage.EMBARGOED: cfg.embargo_ticks, Stage.RESETTING: cfg.reset_ticks}
        for stage, n in self.done:
            assert n == want[stage], f"{stage.name} lasted {n} ticks, configured {want[stage]}"


def _check_illegal(e: IllegalTransition, name: str, stage: Stage, actor: Actor, op: Op) -> None:
    msg = str(e)
    assert repr(name) in msg and stage.name in msg and actor.value in msg and op.name in msg, msg


STEP = st.one_of(
    st.tuples(st.just("op"), st.sampled_from(list(Actor)), st.sampled_from(list(Op))),
    st.tuples(st.just("tick"), st.booleans()),
    st.tuples(st.just("double_tick"), st.integers(0, 2)),
)
CONFIGS = st.builds(LifecycleConfig, embargo_ticks=st.integers(0, 4), reset_ticks=st.integers(0, 3))


@settings(max_examples=300, deadline=None)
@given(cfg=CONFIGS, steps=st.lists(STEP, max_size=60))
def test_random_sequences_on_the_pure_lifecycle(cfg: LifecycleConfig, steps: list[tuple]) -> None:
    lc = Lifecycle("slots.x", cfg)
    runs, t = RunLengths(), 0
    for step in steps:
        before = (lc.stage, lc.ticks_in_stage, lc.last_tick)
        if step[0] == "op":
            _, actor, op = step
            if is_legal(lc.stage, actor, op):
                new = TRANSITIONS.get((lc.stage, op), lc.stage)
                assert lc.apply(actor, op) is new and lc.stage is new
                assert lc.ticks_in_stage == (before[1] if new is before[0] else 0)
            else:
                with pytest.raises(IllegalTransition) as e:
                    lc.apply(actor, op)
                _check_illegal(e.value, "slots.x", before[0], actor, op)
                assert (lc.stage, lc.ticks_in_stage, lc.last_tick) == before
        elif step[0] == "tick":
            stage = lc.tick(t, fade_done=step[1])
            if before[0] not in CLOCK:
                assert stage is before[0] and lc.ticks_in_stage == before[1] + 1
            else:  # moved along the clock chain, or stayed
                chain = [before[0]]
                while chain[-1] in CLOCK:
                    chain.append(CLOCK[chain[-1]])
                assert stage in chain
            runs.saw(stage)
            t += 1
        elif lc.last_tick is not None:
            with pytest.raises(DoubleTick):
                lc.tick(lc.last_tick - step[1])
            assert (lc.stage, lc.ticks_in_stage, lc.last_tick) == before
        assert isinstance(lc.stage, Stage)
    runs.check(cfg)


# ---------------------------------------------------------------------------------------------
# Random sequences on a real SeedSlot
# ---------------------------------------------------------------------------------------------

C = 4
SPECS = [
    SeedSpec(b, s)
    for b, s in [
        (Blueprint.CONV_SMALL, Style.RESIDUAL),
        (Blueprint.LORA, Style.VALVE),
        (Blueprint.MLP_SMALL, Style.GATE),
        (Blueprint.NOOP, Style.RESIDUAL),
        (Blueprint.ATTENTION, Style.SIGMOID_RAMP),
        (Blueprint.DEPTHWISE, Style.GATE),
    ]
]
METHODS = (
    "germinate",
    "advance",
    "set_alpha_target",
    "prune",
    "fossilize",
    "sedate",
    "lift",
    "lyse",
)
PRUNE_OP = {Actor.TAMIYO: Op.PRUNE, Actor.EMRAKUL: Op.PRUNE, Actor.TOLARIA: Op.EMERGENCY_PRUNE}


def _op_of(method: str, actor: Actor, arg: int = 0) -> Op:
    if method == "prune":
        return PRUNE_OP[actor]
    if method == "sedate":  # `_call` sedates to 0 (SEDATE) or weakens to 0.5 (WEAKEN)
        return Op.WEAKEN if arg % 2 else Op.SEDATE
    return Op[method.upper()]


def _snapshot(slot: SeedSlot) -> tuple:
    phage = slot.phage
    return (
        slot.stage,
        slot.lifecycle.ticks_in_stage,
        slot.lifecycle.last_tick,
        slot.schedule,
        slot.spec,
        slot.pending,
        id(slot.seed),
        id(slot.phage),
        slot._mode,
        float(slot.coef),
        None
        if phage is None
        else (
            float(phage.sedation),
            phage.module_sedated,
            phage.fade,
            tuple(phage.unit_mask_values()),
        ),
    )


def _train(slot: SeedSlot, h: torch.Tensor) -> None:
    slot.zero_grad(set_to_none=True)
    fixed_loss(slot(h)).backward()
    slot.observe_gradients(torch.tensor(1.0))


def _call(slot: SeedSlot, method: str, actor: Actor, arg: int, spec: SeedSpec) -> None:
    target = [0] if slot.phage is not None and slot.phage.units else "module"
    if method == "germinate":
        slot.germinate(spec, actor=actor, alpha_target=(0.5, 0.7, 1.0, 1.0)[arg], tempo_ticks=arg)
    elif method == "advance":
        slot.advance(actor=actor)
    elif method == "set_alpha_target":
        slot.set_alpha_target((0.0, 0.5, 0.7, 1.0)[arg], arg, actor=actor)
    elif method == "prune":
        slot.prune(actor=actor, fade_ticks=arg)
    elif method == "fossilize":
        slot.fossilize(actor=actor)
    elif method == "sedate":
        slot.sedate(target, (0.0, 0.5)[arg % 2], actor=actor)
    elif method == "lyse":
        slot.lyse(actor=actor, fade_ticks=arg)
    else:
        slot.lift(target, actor=actor)


def _natural_next(slot: SeedSlot) -> tuple[str, Actor] | None:
    """The op that moves a slot along the happy path (None: the clock should move it)."""
    stage, lc = slot.stage, slot.lifecycle
    if stage is Stage.DORMANT:
        return "germinate", Actor.TAMIYO
    if stage is Stage.GERMINATED:
        return "advance", Actor.TAMIYO
    if stage is Stage.TRAINING:
        return ("advance", Actor.TAMIYO) if lc.ticks_in_stage >= 1 else None
    if stage is Stage.BLENDING:
        return ("advance", Actor.TAMIYO) if slot.schedule.done else None
    if stage is Stage.HOLDING:
        return "fossilize", Actor.TAMIYO
    if stage is Stage.COMMITTED:
        return ("sedate", Actor.EMRAKUL) if lc.ticks_in_stage == 0 else ("lyse", Actor.TOLARIA)
    return None


def _check_contents(slot: SeedSlot) -> None:
    stage = slot.stage
    assert isinstance(stage, Stage)
    has_seed, has_phage = slot.seed is not None, slot.phage is not None
    if stage in QUIET:
        assert not has_seed and not has_phage and slot.blend is None and slot.spec is None
    elif stage in SEED_STAGES:
        assert has_seed and slot.blend is not None and not has_phage and slot.spec is not None
    elif stage is Stage.COMMITTED:
        assert has_phage and not has_seed and slot.blend is None
    else:  # PRUNED: fading out whatever it held, seed or lysed phage
        assert has_seed != has_phage
    assert 0.0 <= slot.alpha <= 1.0


def _check_forward(slot: SeedSlot, h: torch.Tensor) -> None:
    with torch.no_grad():
        y = slot(h)
    assert y.shape == h.shape and torch.isfinite(y).all()
    if slot.stage in QUIET or slot.stage is Stage.GERMINATED:
        assert y is h


# "auto" (the happy path's next move) is weighted up so that runs reach COMMITTED and the clock.
AUTO = st.tuples(st.just("auto"), st.integers(0, 3), st.sampled_from(SPECS))
SLOT_STEP = st.one_of(
    st.tuples(
        st.just("op"),
        st.sampled_from(list(Actor)),
        st.sampled_from(METHODS),
        st.integers(0, 3),
        st.sampled_from(SPECS),
    ),
    AUTO,
    AUTO,
    AUTO,
    AUTO,
    st.just(("tick",)),
    st.just(("tick",)),
    st.just(("train",)),
    st.tuples(st.just("double_tick"), st.integers(0, 2)),
)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    cfg=st.builds(
        LifecycleConfig,
        embargo_ticks=st.integers(0, 3),
        reset_ticks=st.integers(0, 2),
        prune_fade_ticks=st.integers(0, 2),
    ),
    steps=st.lists(SLOT_STEP, min_size=30, max_size=80),
)
def test_random_sequences_on_a_real_slot(cfg: LifecycleConfig, steps: list[tuple]) -> None:
    torch.manual_seed(0)
    slot = SeedSlot(C, Topology.CNN, "slots.r", lifecycle=cfg)
    h = slot_input(Topology.CNN, channels=C, batch=2).requires_grad_()
    runs = RunLengths()
    for step in steps:
        kind = step[0]
        if kind == "auto":
            nxt = _natural_next(slot)
            kind, step = (
                ("tick", step) if nxt is None else ("op", ("op", nxt[1], nxt[0], *step[1:]))
            )
        if kind == "op":
            _, actor, method, arg, spec = step
            op, stage = _op_of(method, actor, arg), slot.stage
            if op is Op.ADVANCE and stage is Stage.TRAINING:
                _train(slot, h)  # the engine evaluates G2 before the policy may advance
                slot.evaluate_gate()
            before = _snapshot(slot)
            try:
                _call(slot, method, actor, arg, spec)
            except IllegalTransition as e:
                _check_illegal(e, "slots.r", stage, actor, op)
                assert _snapshot(slot) == before
                if is_legal(stage, actor, op):  # only the slot's own preconditions may refuse
                    assert op is Op.ADVANCE
                    if stage is Stage.TRAINING:
                        assert "G2" in str(e) and not slot.last_gate.passed
                    else:
                        assert stage is Stage.BLENDING and "ramp" in str(e)
                        assert not slot.schedule.done
            else:
                assert is_legal(stage, actor, op), (stage, actor, op)
                assert slot.stage is TRANSITIONS.get((stage, op), stage)
        elif kind == "tick":
            t = 0 if slot.lifecycle.last_tick is None else slot.lifecycle.last_tick + 1
            runs.saw(slot.tick(t))
        elif kind == "train":
            _train(slot, h)
        elif slot.lifecycle.last_tick is not None:
            before = _snapshot(slot)
            with pytest.raises(DoubleTick):
                slot.tick(slot.lifecycle.last_tick - step[1])
            assert _snapshot(slot) == before
        _check_contents(slot)
        _check_forward(slot, h)
    runs.check(cfg)
