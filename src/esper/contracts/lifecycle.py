"""The seed lifecycle (paper §2.4): stages, legal transitions and who may make them.

Pure Python, no torch: the policy, the engine and the body all read the same table.

    DORMANT → GERMINATED → TRAINING → BLENDING → HOLDING → COMMITTED
    TRAINING / BLENDING / HOLDING (Tamiyo) → PRUNED; COMMITTED (the engine's lysis) → PRUNED
    PRUNED → EMBARGOED → RESETTING → DORMANT   (the engine's clock, one step per tick)

Custody (paper §9.1, §9.7): at commit a seed passes from Tamiyo to Emrakul. Tamiyo may never act
on a committed phage again; Emrakul acts on committed phages only, and never deletes: it may
SEDATE, WEAKEN and LIFT. Physical removal (LYSE) is the engine's (its LysisGovernor, after
probation), as are emergency prunes.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum, IntEnum


class Stage(IntEnum):
    DORMANT = 0
    GERMINATED = 1
    TRAINING = 2
    BLENDING = 3
    HOLDING = 4
    COMMITTED = 5
    PRUNED = 6
    EMBARGOED = 7
    RESETTING = 8


class Actor(Enum):
    TAMIYO = "tamiyo"  # growth policy
    EMRAKUL = "emrakul"  # decay policy
    TOLARIA = "tolaria"  # engine: clock and catastrophic triggers only


class Op(IntEnum):
    """Every lifecycle operation. The first six are the policy's `op` head (paper §6)."""

    WAIT = 0
    GERMINATE = 1
    SET_ALPHA_TARGET = 2
    ADVANCE = 3
    PRUNE = 4
    FOSSILIZE = 5
    # Emrakul (paper §9.7): soft gating of a phage (SEDATE to 0, WEAKEN by a factor, LIFT).
    SEDATE = 6
    LIFT = 7
    # Tolaria: physical lysis of a condemned phage (its LysisGovernor), emergency removal (§9.5).
    LYSE = 8
    EMERGENCY_PRUNE = 9
    WEAKEN = 10


TAMIYO_OPS: tuple[Op, ...] = (
    Op.WAIT,
    Op.GERMINATE,
    Op.SET_ALPHA_TARGET,
    Op.ADVANCE,
    Op.PRUNE,
    Op.FOSSILIZE,
)

_ANY = frozenset(Stage)
_LIVE_SEED = frozenset({Stage.TRAINING, Stage.BLENDING, Stage.HOLDING})

# (actor, op) -> stages in which that actor may perform it. Anything absent is forbidden.
AUTHORITY: dict[tuple[Actor, Op], frozenset[Stage]] = {
    (Actor.TAMIYO, Op.WAIT): _ANY,
    (Actor.TAMIYO, Op.GERMINATE): frozenset({Stage.DORMANT}),
    (Actor.TAMIYO, Op.ADVANCE): frozenset({Stage.GERMINATED, Stage.TRAINING, Stage.BLENDING}),
    (Actor.TAMIYO, Op.SET_ALPHA_TARGET): frozenset({Stage.BLENDING, Stage.HOLDING}),
    (Actor.TAMIYO, Op.PRUNE): _LIVE_SEED,
    (Actor.TAMIYO, Op.FOSSILIZE): frozenset({Stage.HOLDING}),
    (Actor.EMRAKUL, Op.WAIT): _ANY,
    (Actor.EMRAKUL, Op.SEDATE): frozenset({Stage.COMMITTED}),
    (Actor.EMRAKUL, Op.WEAKEN): frozenset({Stage.COMMITTED}),
    (Actor.EMRAKUL, Op.LIFT): frozenset({Stage.COMMITTED}),
    (Actor.TOLARIA, Op.WAIT): _ANY,
    (Actor.TOLARIA, Op.LYSE): frozenset({Stage.COMMITTED}),
    # The LysisGovernor's wake-up: a loss spike in probation lifts the sedation (§9.7).
    (Actor.TOLARIA, Op.LIFT): frozenset({Stage.COMMITTED}),
    (Actor.TOLARIA, Op.SET_ALPHA_TARGET): frozenset({Stage.BLENDING, Stage.HOLDING}),
    (Actor.TOLARIA, Op.EMERGENCY_PRUNE): _LIVE_SEED | {Stage.GERMINATED, Stage.COMMITTED},
}

# (stage, op) -> next stage, for ops that move the lifecycle. Ops absent here keep the stage.
TRANSITIONS: dict[tuple[Stage, Op], Stage] = {
    (Stage.DORMANT, Op.GERMINATE): Stage.GERMINATED,
    (Stage.GERMINATED, Op.ADVANCE): Stage.TRAINING,
    (Stage.TRAINING, Op.ADVANCE): Stage.BLENDING,
    (Stage.BLENDING, Op.ADVANCE): Stage.HOLDING,
    (Stage.HOLDING, Op.FOSSILIZE): Stage.COMMITTED,
    **{(s, Op.PRUNE): Stage.PRUNED for s in _LIVE_SEED},
    (Stage.COMMITTED, Op.LYSE): Stage.PRUNED,
    **{
        (s, Op.EMERGENCY_PRUNE): Stage.PRUNED
        for s in _LIVE_SEED | {Stage.GERMINATED, Stage.COMMITTED}
    },
}

# Stages the engine's clock moves on by itself, once per tick, after a configured number of ticks.
CLOCK_TRANSITIONS: dict[Stage, Stage] = {
    Stage.PRUNED: Stage.EMBARGOED,
    Stage.EMBARGOED: Stage.RESETTING,
    Stage.RESETTING: Stage.DORMANT,
}

SEED_STAGES = frozenset({Stage.GERMINATED, Stage.TRAINING, Stage.BLENDING, Stage.HOLDING})
"""Stages in which the slot holds a live (Tamiyo-managed) seed module."""


class LifecycleError(RuntimeError):
    """An operation that the lifecycle or the authority table forbids."""


class IllegalTransition(LifecycleError):
    def __init__(self, slot: str, stage: Stage, actor: Actor, op: Op, why: str = "") -> None:
        allowed = sorted(
            o.name for (a, o), stages in AUTHORITY.items() if a is actor and stage in stages
        )
        detail = f": {why}" if why else ""
        super().__init__(
            f"slot {slot!r}: {actor.value} may not {op.name} in stage {stage.name}{detail} "
            f"(allowed for {actor.value} in {stage.name}: {', '.join(allowed) or 'nothing'})"
        )
        self.slot, self.stage, self.actor, self.op = slot, stage, actor, op


class DoubleTick(LifecycleError):
    """The clock was advanced twice for the same tick (would shorten embargoes)."""


@dataclass(frozen=True)
class LifecycleConfig:
    """Durations of the automatic part of the lifecycle, in control ticks."""

    embargo_ticks: int = 3
    """Ticks a slot stays EMBARGOED after a prune before it may reset."""
    reset_ticks: int = 1
    """Ticks a slot stays RESETTING before it is DORMANT again."""
    prune_fade_ticks: int = 0
    """Ticks over which a pruned seed's α fades to 0 (0: removed at once)."""

    def __post_init__(self) -> None:
        for name in ("embargo_ticks", "reset_ticks", "prune_fade_ticks"):
            if getattr(self, name) < 0:
                raise ValueError(f"LifecycleConfig.{name} must be >= 0, got {getattr(self, name)}")


def check(slot: str, stage: Stage, actor: Actor, op: Op) -> Stage:
    """Return the stage after `actor` performs `op` in `stage`, or raise IllegalTransition."""
    allowed = AUTHORITY.get((actor, op))
    if allowed is None or stage not in allowed:
        raise IllegalTransition(slot, stage, actor, op)
    return TRANSITIONS.get((stage, op), stage)


def is_legal(stage: Stage, actor: Actor, op: Op) -> bool:
    return stage in AUTHORITY.get((actor, op), ())


@dataclass
class Lifecycle:
    """The state of one slot's lifecycle: its stage and the clock within that stage.

    `apply` validates and performs an actor's operation; `tick` is the engine's clock and must be
    called exactly once per control tick with a strictly increasing tick index.
    """

    slot: str
    config: LifecycleConfig
    stage: Stage = Stage.DORMANT
    ticks_in_stage: int = 0
    last_tick: int | None = None

    def apply(self, actor: Actor, op: Op) -> Stage:
        new = check(self.slot, self.stage, actor, op)
        if new is not self.stage:
            self.stage, self.ticks_in_stage = new, 0
        return new

    def check_tick(self, t: int) -> None:
        """Raise DoubleTick unless `t` is a new tick (callers check before moving anything)."""
        if self.last_tick is not None and t <= self.last_tick:
            raise DoubleTick(
                f"slot {self.slot!r}: tick {t} after tick {self.last_tick}; "
                "the lifecycle clock must advance exactly once per tick"
            )

    def tick(self, t: int, *, fade_done: bool = True) -> Stage:
        """Advance the clock for tick `t`; move PRUNED/EMBARGOED/RESETTING on when due.

        `fade_done` tells whether a pruned seed has finished fading (the slot owns the α).
        """
        self.check_tick(t)
        self.last_tick = t
        self.ticks_in_stage += 1
        due = {
            Stage.PRUNED: fade_done,
            Stage.EMBARGOED: self.ticks_in_stage >= self.config.embargo_ticks,
            Stage.RESETTING: self.ticks_in_stage >= self.config.reset_ticks,
        }.get(self.stage, False)
        if due:
            self.stage, self.ticks_in_stage = CLOCK_TRANSITIONS[self.stage], 0
            # A zero-length embargo or reset passes straight through in the same tick.
            if self.stage is Stage.EMBARGOED and self.config.embargo_ticks == 0:
                self.stage = Stage.RESETTING
            if self.stage is Stage.RESETTING and self.config.reset_ticks == 0:
                self.stage = Stage.DORMANT
        return self.stage
