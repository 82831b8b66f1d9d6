"""The LysisGovernor (paper §9.7): the engine's two-stage protocol between Emrakul's sedation of a
unit and its physical removal. Emrakul never deletes; this does, and only what survived
probation.

    ACTIVE ──sedate (within budget, not immune)──▶ PROBATION (mask on, baseline loss captured)
    PROBATION ──N checks without a spike──▶ CONDEMNED ──next safe boundary──▶ lysed (gone)
    PROBATION ──loss > baseline·(1 + panic)──▶ CRITICAL: woken (mask lifted), immune for M ticks
    PROBATION ──Emrakul's LIFT──▶ ACTIVE

A global sedation budget caps the parameter mass under sedation (probation or condemned) at a
fraction of the host's. The check runs on each tick's evaluation loss (one value the engine
already reads back: no extra host sync). Pure bookkeeping: the caller applies and lifts masks and
performs the lysis; every transition is returned as an event for the recorder.

Driven by the tick through `esper.tolaria.decay.Decay`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any

from esper.contracts.errors import ConfigError


class UnitState(Enum):
    PROBATION = "probation"
    CONDEMNED = "condemned"


@dataclass(frozen=True)
class LysisConfig:
    probation_checks: int = 3
    """Checks a sedated unit must pass without a loss spike before it is condemned."""
    panic_fraction: float = 0.05
    """A probation check fails when loss > baseline × (1 + panic_fraction)."""
    immunity_ticks: int = 10
    """Ticks a woken (CRITICAL) unit may not be sedated again."""
    sedation_budget: float = 0.05
    """Largest fraction of the host's parameter mass under sedation at once."""
    units_per_tick: int = 32
    """Phage units ablated in each tick's fused evaluation (one replica each). With more units
    than this, they are measured round-robin in a fixed order (phage name, unit index), so each
    is measured every ceil(units / units_per_tick) ticks; sedated units are skipped."""
    roi_window: int = 5
    """Recent measurements of a unit's contribution kept for its mean and spread."""

    def __post_init__(self) -> None:
        if self.probation_checks < 1 or self.immunity_ticks < 0:
            raise ConfigError("lysis.probation_checks must be >= 1, immunity_ticks >= 0")
        if not self.panic_fraction > 0 or not 0 < self.sedation_budget <= 1:
            raise ConfigError("lysis.panic_fraction must be > 0, sedation_budget in (0, 1]")
        if self.units_per_tick < 0 or self.roi_window < 1:
            raise ConfigError("lysis.units_per_tick must be >= 0, roi_window >= 1")


@dataclass
class _Unit:
    params: int
    baseline: float
    state: UnitState = UnitState.PROBATION
    passed: int = 0


@dataclass(frozen=True)
class LysisEvent:
    kind: str
    """lysis_probation, lysis_refused, lysis_panic, lysis_condemned, lysis_lifted, lysed."""
    unit: str
    payload: dict[str, Any] = field(default_factory=dict)


class LysisGovernor:
    """Probation, condemnation, panic and immunity for sedated units; see the module doc."""

    def __init__(self, cfg: LysisConfig, host_params: int) -> None:
        if host_params < 1:
            raise ValueError(f"host_params must be >= 1, got {host_params}")
        self.cfg, self.host_params = cfg, host_params
        self.units: dict[str, _Unit] = {}
        self.immune_until: dict[str, int] = {}
        """Unit -> the first tick at which it may be sedated again (the immunity list)."""

    # -- Emrakul's requests ------------------------------------------------------------------
    @property
    def sedated_mass(self) -> int:
        return sum(u.params for u in self.units.values())

    @property
    def budget(self) -> int:
        return int(self.cfg.sedation_budget * self.host_params)

    def sedate(self, unit: str, params: int, baseline_loss: float, tick: int) -> LysisEvent:
        """Emrakul asks to sedate `unit` (`params` parameters). Granted (probation starts, with
        `baseline_loss` as its reference) or refused with the reason; the caller applies the
        mask only when granted."""
        why = None
        if unit in self.units:
            why = "already sedated"
        elif self.immune_until.get(unit, -1) > tick:
            why = f"immune until tick {self.immune_until[unit]} (woken by a loss spike)"
        elif self.sedated_mass + params > self.budget:
            why = (
                f"sedation budget: {self.sedated_mass} + {params} > {self.budget} parameters "
                f"({self.cfg.sedation_budget:.0%} of the host's {self.host_params})"
            )
        if why is not None:
            return LysisEvent("lysis_refused", unit, {"reason": why, "params": params})
        self.units[unit] = _Unit(params, baseline_loss)
        return LysisEvent("lysis_probation", unit, {"params": params, "baseline": baseline_loss})

    def lift(self, unit: str) -> LysisEvent:
        """Emrakul lifts a unit still in probation (a condemned one is the governor's)."""
        u = self.units.get(unit)
        if u is None or u.state is not UnitState.PROBATION:
            state = "not sedated" if u is None else u.state.value
            return LysisEvent("lysis_refused", unit, {"reason": f"cannot lift: {state}"})
        del self.units[unit]
        return LysisEvent("lysis_lifted", unit)

    # -- the engine's checks -----------------------------------------------------------------
    def check(self, loss: float, tick: int) -> list[LysisEvent]:
        """On a tick's evaluation loss: a spike wakes every unit in probation whose baseline it
        exceeds (the caller lifts their masks; they become immune); the others pass one check,
        and those with enough passes are condemned."""
        events = []
        for name, u in list(self.units.items()):
            if u.state is not UnitState.PROBATION:
                continue
            if not loss <= u.baseline * (1 + self.cfg.panic_fraction):  # NaN is a spike too
                del self.units[name]
                self.immune_until[name] = tick + 1 + self.cfg.immunity_ticks
                events.append(
                    LysisEvent(
                        "lysis_panic",
                        name,
                        {
                            "loss": loss,
                            "baseline": u.baseline,
                            "immune_until": self.immune_until[name],
                        },
                    )
                )
                continue
            u.passed += 1
            if u.passed >= self.cfg.probation_checks:
                u.state = UnitState.CONDEMNED
                events.append(LysisEvent("lysis_condemned", name, {"checks": u.passed}))
        return events

    def condemned(self) -> list[str]:
        """Units to remove physically at the next safe boundary."""
        return [n for n, u in self.units.items() if u.state is UnitState.CONDEMNED]

    def lysed(self, unit: str) -> LysisEvent:
        """The caller removed `unit`'s weights: its mass leaves the budget and the host."""
        u = self.units.pop(unit)
        if u.state is not UnitState.CONDEMNED:
            raise ValueError(f"{unit} is in {u.state.value}, not condemned: it cannot be lysed")
        self.host_params = max(1, self.host_params - u.params)
        return LysisEvent("lysed", unit, {"params": u.params})

    # -- snapshots (governor rollback, checkpoints) ------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        units = {n: {**asdict(u), "state": u.state.value} for n, u in self.units.items()}
        return {"host_params": self.host_params, "units": units, "immune": dict(self.immune_until)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.host_params = state["host_params"]
        self.units = {
            n: _Unit(u["params"], u["baseline"], UnitState(u["state"]), u["passed"])
            for n, u in state["units"].items()
        }
        self.immune_until = {n: int(t) for n, t in state["immune"].items()}
