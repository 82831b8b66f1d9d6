"""What a report shows, read from a run's flight record through `RunStore`: per-tick series, the
morphology (each slot's stage and α at every decision), the decisions with their reasons or
probabilities, audit labels, governor and decay events. Plain data, no plotting: `esper show`
prints from it, `figures.py` draws it.

A baseline (the plain host, trained alone) is optional. It is the matched host `esper grow`
records in RUN/baseline (`esper.baselines`), or another run given instead (`esper report RUN
--baseline HOST_RUN`, e.g. `esper grow --policy none` with the same seed and ticks). Without one,
the report leaves the baseline out.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from esper.baselines import BASELINE_DIR
from esper.contracts import RELEVANT_HEADS, FactoredAction, Op
from esper.contracts.errors import EsperError
from esper.recorder import RunStore
from esper.recorder.records import DECISION, DecisionRecord, EventRecord

OP_EVENTS = ("germinate", "advance", "set_alpha_target", "prune", "fossilize")
GOVERNOR_EVENTS = (
    "governor_nan",
    "governor_divergence",
    "governor_explosion",
    "governor_rollback",
    "governor_lobotomy",
)
DECAY_EVENTS = (
    "unit_roi",
    "lysis_probation",
    "lysis_refused",
    "lysis_lifted",
    "lysis_dropped",
    "lysis_panic",
    "lysis_condemned",
    "lysed",
    "decay_folded",
)
"""Emrakul's half (docs/events.md, "Decay"): every one names a unit `phage#index`."""


class ReportError(EsperError):
    """A run that cannot be reported (no complete tick yet); the message says which."""


# ------------------------------------------------------------------------------------------------
# Series
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Series:
    """Per-tick scalars: `values[name][i]` at `ticks[i]`, NaN where a tick lacks that name."""

    ticks: tuple[int, ...]
    values: dict[str, tuple[float, ...]]

    def get(self, name: str) -> tuple[float, ...] | None:
        return self.values.get(name)

    @classmethod
    def from_rows(cls, rows: list[tuple[int, dict[str, float]]]) -> Series:
        names = sorted({name for _, m in rows for name in m})
        return cls(
            ticks=tuple(t for t, _ in rows),
            values={n: tuple(m.get(n, math.nan) for _, m in rows) for n in names},
        )


@dataclass(frozen=True)
class Baseline:
    """The plain host's series, drawn beside a grown run's."""

    label: str
    series: Series


# ------------------------------------------------------------------------------------------------
# One run
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunView:
    """One run as a report reads it: environment 0 (all that a recorded `esper grow` writes)."""

    name: str
    path: Path
    manifest: dict[str, Any]
    series: Series
    """The run's own metrics (a recorded baseline's are in `baseline`)."""
    events: tuple[EventRecord, ...]
    """Every event but decisions, in id order, labels joined."""
    decisions: tuple[DecisionRecord, ...]
    baseline: Baseline | None
    label_counts: dict[str, int]
    """Label name -> how many events carry it (decisions included)."""

    @property
    def config(self) -> dict[str, Any]:
        return self.manifest.get("config") or {}

    @property
    def metric_label(self) -> str:
        """The task metric's name ("accuracy", "bits_per_char"), from the manifest's task line."""
        found = re.search(r", (\w+) \((?:higher|lower) is better\)", self.manifest.get("task", ""))
        return found.group(1) if found else "task metric"

    def of(self, *kinds: str) -> list[EventRecord]:
        return [e for e in self.events if e.kind in kinds]

    def slot_names(self) -> list[str]:
        """Slots in their order (from the decisions' slot states)."""
        return [s["name"] for s in self.decisions[0].slot_states] if self.decisions else []

    def seed_accounts(self) -> dict[str, dict[str, float]]:
        """seed_id -> rent_paid, churn_paid, ticks_alive; empty for a run not yet finished."""
        found = self.of("seed_accounts")
        return found[-1].payload if found else {}

    def seeds(self) -> dict[str, tuple[str, str]]:
        """seed_id -> (slot, blueprint) of every germination."""
        return {
            e.payload["seed_id"]: (e.slot or "", e.payload.get("blueprint", ""))
            for e in self.of("germinate")
        }


def load_run(run_dir: Path, baseline: Baseline | None = None) -> RunView:
    """Read `run_dir` (a `RecorderError` names what is wrong with it); `baseline`, when given,
    is drawn beside it instead of one the run recorded itself."""
    with RunStore.open(Path(run_dir)) as store:
        manifest, rows, everything = store.manifest(), store.metrics(), store.events(env=0)
    events = [e for e in everything if e.kind != DECISION]
    decisions = [DecisionRecord.from_event(e) for e in everything if e.kind == DECISION]
    label_counts: dict[str, int] = {}
    for e in everything:
        for name in e.labels:
            label_counts[name] = label_counts.get(name, 0) + 1
    matched = Path(run_dir) / BASELINE_DIR
    if baseline is None and (matched / "run.sqlite").is_file():
        baseline = Baseline("host alone (RUN/baseline)", load_run(matched).series)
    return RunView(
        name=Path(run_dir).name,
        path=Path(run_dir),
        manifest=manifest,
        series=Series.from_rows(rows),
        events=tuple(events),
        decisions=tuple(decisions),
        baseline=baseline,
        label_counts=label_counts,
    )


def load_baseline(run_dir: Path) -> Baseline:
    """Another run (the plain host) as the baseline of a report."""
    view = load_run(run_dir)
    return Baseline(f"host alone ({view.name})", view.series)


# ------------------------------------------------------------------------------------------------
# Morphology: each slot's stage and α at each decision
# ------------------------------------------------------------------------------------------------


def slot_timeline(view: RunView) -> dict[str, list[tuple[int, str, float, str | None]]]:
    """slot -> [(tick, stage, α, blueprint)] at each decision (the state the policy saw)."""
    lanes: dict[str, list[tuple[int, str, float, str | None]]] = {}
    for d in view.decisions:
        for s in d.slot_states:
            row = (d.tick, s["stage"], float(s.get("alpha") or 0.0), s.get("blueprint"))
            lanes.setdefault(s["name"], []).append(row)
    return lanes


def slot_rents(view: RunView) -> dict[str, tuple[list[int], list[float]]]:
    """slot -> (ticks, rent charged to it in each): the rent (weighted, reward units) of tick t
    is in the slot states of decision t + 1, so the last tick's is not recorded per slot."""
    rents: dict[str, tuple[list[int], list[float]]] = {}
    for d in view.decisions:
        if d.tick == 0:
            continue
        for s in d.slot_states:
            ticks, values = rents.setdefault(s["name"], ([], []))
            ticks.append(d.tick - 1)
            values.append(float(s.get("rent") or 0.0))
    return rents


def phage_of(event: EventRecord) -> str:
    """The phage a decay event acted on: a host block's path or a committed seed's slot."""
    if "phage" in event.payload:
        return str(event.payload["phage"])
    return str(event.payload.get("unit", "?")).split("#")[0]


def roi_phages(event: EventRecord) -> list[str]:
    """The phages a `unit_roi` event measured."""
    units = event.payload.get("units") or {}
    return sorted({str(u).split("#")[0] for u in units} | set(event.payload.get("phages") or {}))


# ------------------------------------------------------------------------------------------------
# Decisions
# ------------------------------------------------------------------------------------------------


class DecisionRow(NamedTuple):
    tick: int
    policy: str
    op: str
    slot: str
    """The slot acted on ("" for WAIT)."""
    detail: str
    """The other relevant heads (a germination's blueprint, style, tempo, ...)."""
    reason: str
    """The heuristic's words, or why the action was rejected; "" when not recorded (WAIT)."""
    prob: float | None
    """Probability of the whole action: the product over the op's relevant heads."""
    entropy: float | None
    """Sum of the relevant heads' entropies (nats)."""
    value: float | None
    reward: float | None
    rejected: bool


def decision_rows(view: RunView) -> list[DecisionRow]:
    """One row per decision, joined to the op or rejection event of its tick (and of its zone,
    with zones: a zone's decision names its policy `policy@zone`)."""
    said: dict[tuple[int, str | None], tuple[str, bool]] = {}
    for e in view.events:
        key = (e.tick, e.payload.get("zone"))
        if e.kind in OP_EVENTS and "reason" in e.payload:
            said[key] = (str(e.payload["reason"]), False)
        elif e.kind == "rejected_action":
            said[key] = (f"rejected: {e.payload.get('reason', '')}", True)
    return [
        _row(d, *said.get((d.tick, d.policy.partition("@")[2] or None), ("", False)))
        for d in view.decisions
    ]


def _row(d: DecisionRecord, reason: str, rejected: bool) -> DecisionRow:
    action = FactoredAction.from_names(d.action)
    relevant = RELEVANT_HEADS[action.op]
    index = action.as_indices()
    slot = ""
    if action.op is not Op.WAIT and action.slot < len(d.slot_states):
        slot = d.slot_states[action.slot]["name"]
    shown = [
        h
        for h in ("blueprint", "style", "tempo", "alpha_target", "alpha_speed", "alpha_curve")
        if h in relevant
    ]
    detail = " ".join(d.action[h] for h in shown)
    prob = entropy = None
    if d.probs:
        prob = math.prod(d.probs[h][index[h]] for h in relevant if h in d.probs)
    if d.entropy:
        entropy = sum(d.entropy[h] for h in relevant if h in d.entropy)
    return DecisionRow(
        d.tick,
        d.policy,
        action.op.name,
        slot,
        detail,
        reason,
        prob,
        entropy,
        d.value,
        d.reward,
        rejected,
    )


# ------------------------------------------------------------------------------------------------
# Audit labels
# ------------------------------------------------------------------------------------------------


class AuditRow(NamedTuple):
    """One audited seed's Shapley label (`esper audit`), on its germinate event."""

    tick: int
    slot: str
    seed_id: str
    blueprint: str
    phi: float
    ci95: tuple[float, float]
    """NaN, NaN with one repeat."""
    banzhaf: float
    repeats: int
    protocol_hash: str


def audit_rows(view: RunView) -> list[AuditRow]:
    rows = []
    for e in view.of("germinate"):
        label = e.labels.get("shapley")
        if not isinstance(label, dict):
            continue
        lo, hi = (_number(x) for x in label.get("ci95", (math.nan, math.nan)))
        rows.append(
            AuditRow(
                tick=e.tick,
                slot=e.slot or "",
                seed_id=str(e.payload.get("seed_id", "")),
                blueprint=str(e.payload.get("blueprint", "")),
                phi=_number(label.get("phi")),
                ci95=(lo, hi),
                banzhaf=_number(label.get("banzhaf")),
                repeats=int(label.get("repeats", 0)),
                protocol_hash=str(label.get("protocol_hash", "")),
            )
        )
    return rows


def _number(x: Any) -> float:
    return math.nan if x is None else float(x)
