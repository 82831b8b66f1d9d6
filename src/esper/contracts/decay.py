"""Emrakul's vocabulary (paper §9.7): what the decay policy sees and what it may ask for.

Emrakul acts on the units of phages (a committed seed, or a host block marked as a phage): HEAD
scope for attention heads, CHANNEL_SLICE scope for hidden channels, finer than Tamiyo's slot-level
module (asymmetric granularity). It may SEDATE (mask a unit to 0), WEAKEN (mask it to a factor in
(0, 1)) and LIFT; it never deletes (physical lysis is the engine's LysisGovernor's).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from esper.contracts.lifecycle import Op

DECAY_OPS = (Op.SEDATE, Op.WEAKEN, Op.LIFT)


class Scope(Enum):
    HEAD = "head"
    CHANNEL_SLICE = "channel_slice"


@dataclass(frozen=True)
class DecayAction:
    """SEDATE(scope, id), WEAKEN(scope, id, factor) or LIFT(scope, id) of unit `unit` of phage
    `phage` (the scope is the phage's: heads or channel slices)."""

    op: Op
    phage: str
    unit: int
    factor: float = 0.0
    """The mask value WEAKEN sets, in (0, 1); SEDATE is 0 and LIFT 1."""

    def __post_init__(self) -> None:
        if self.op not in DECAY_OPS:
            names = ", ".join(o.name for o in DECAY_OPS)
            raise ValueError(f"Emrakul's ops are {names}; got {self.op.name}")
        if self.op is Op.WEAKEN and not 0.0 < self.factor < 1.0:
            raise ValueError(f"WEAKEN needs a factor in (0, 1), got {self.factor}")

    @property
    def value(self) -> float:
        """The mask value this action sets."""
        return {Op.SEDATE: 0.0, Op.WEAKEN: self.factor, Op.LIFT: 1.0}[self.op]

    @property
    def key(self) -> str:
        return unit_key(self.phage, self.unit)

    def names(self) -> dict[str, object]:
        return {"op": self.op.name, "phage": self.phage, "unit": self.unit, "factor": self.factor}


def unit_key(phage: str, unit: int) -> str:
    """How a unit is named in events, the governor and the ROI tracker: `phage#unit`."""
    return f"{phage}#{unit}"


@dataclass(frozen=True)
class UnitROI:
    """One phage unit as Emrakul sees it (paper §9.2's ROI, per unit)."""

    phage: str
    unit: int
    scope: Scope
    kind: str
    """"host" (a host block) or "seed" (a committed seed)."""
    params: int
    """Parameters the unit's lysis would remove."""
    rent: float
    """Its rent per tick, in the economy's units (W_rent · log(1 + params / P_host))."""
    contribution: float | None
    """Mean metric change when the unit is ablated (positive: it helps), over recent ticks;
    None until measured."""
    loss_delta: float | None
    """Mean validation-loss rise when ablated (a finer signal than the metric; tie-breaker)."""
    spread: float
    """Standard deviation of the contribution over the recent measurements (confidence)."""
    samples: int
    """Measurements behind the mean."""
    mask: float
    """Current mask value (1 active, 0 sedated, in between weakened)."""
    state: str
    """active, probation or condemned."""
    immune_until: int
    """First tick at which it may be sedated again (−1: never woken)."""

    @property
    def key(self) -> str:
        return unit_key(self.phage, self.unit)

    @property
    def roi(self) -> float | None:
        return None if self.contribution is None else self.contribution - self.rent


@dataclass(frozen=True)
class DecayObservation:
    """What Emrakul acts on in one tick."""

    tick: int
    units: tuple[UnitROI, ...]
    budget: int
    """Parameters that may be under sedation at once (the LysisGovernor's)."""
    sedated: int
    """Parameters under sedation now (probation or condemned)."""
    loss: float = float("nan")
    """The tick's validation loss (the baseline a sedation would be checked against)."""

    @property
    def budget_left(self) -> int:
        return self.budget - self.sedated
