"""The engine's half of zones (paper §9.6–9.7): each zone's view of the tick, the authority and
budget checks on its pair's actions, its books, and the window telemetry Narset reads.

In the one tick (`Episode`), when a zone layout is given:

    collect   measure(): the zone's gradient norm (the tick's last step) and the minibatch
              variance; refresh(): each zone's growth mask (growth budget used up, or rent over
              its ceiling), recorded when it changes; views(): each zone's `Observation` — its
              slots only, no WIDEN (a widening spans every zone), GERMINATE masked when blocked
    act       authorize(): a zone's action addresses its own slots only (local indices);
              decay_view() / vet_decay(): its Emrakul sees its phages and its share of the
              sedation budget, and what it asks outside them is refused, naming the zone
    after the economy priced the tick
              account(): per-zone books (rent, churn, germinations, transitions); at the end of
              every window, `ZoneTelemetry` per zone → the allocator (Narset) → new budgets

One economy and one ledger for the run: the zones' books split its per-slot rent and churn.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Protocol

import torch
from torch import nn

from esper.contracts import (
    Blueprint,
    DecayAction,
    DecayObservation,
    FactoredAction,
    Observation,
    Op,
    Stage,
)
from esper.contracts.zones import (
    POOL,
    ZoneBudgets,
    ZoneLayout,
    ZonesConfig,
    ZoneTelemetry,
    ZoneViolation,
    budgets_of,
)
from esper.tolaria.environment import BoundaryReading
from esper.tolaria.lysis import LysisEvent, LysisGovernor

_GROWN = (Stage.GERMINATED, Stage.TRAINING, Stage.BLENDING, Stage.HOLDING, Stage.COMMITTED)


class Allocator(Protocol):
    """Sets each zone's budgets from telemetry alone (`esper.narset.Narset`; passed in)."""

    def update(self, telemetry: Sequence[ZoneTelemetry]) -> Mapping[str, ZoneBudgets]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass(frozen=True)
class ZoneView:
    """One zone's observation of the tick and where its slots sit in the episode's."""

    zone: str
    observation: Observation
    index: tuple[int, ...]
    """The zone's slot i is the episode's slot index[i]."""


@dataclass
class Book:
    """One zone's account: lifetime totals and the current window's measurements."""

    rent: float = 0.0
    churn: float = 0.0
    germinations: int = 0
    transitions: int = 0
    window: dict[str, list[float]] = field(default_factory=dict)
    """The window so far, one value per tick: rent, churn, germinations, transitions, spikes,
    grad_norm, contribution, minibatch_variance, metric."""

    def add(self, key: str, value: float) -> None:
        self.window.setdefault(key, []).append(value)

    def summary(self) -> dict[str, float]:
        return {
            "rent_paid": self.rent,
            "churn_paid": self.churn,
            "germinations": self.germinations,
            "transitions": self.transitions,
        }


class Zones:
    """The zone layout of one episode, its budgets and books; see the module doc."""

    def __init__(
        self,
        layout: ZoneLayout,
        cfg: ZonesConfig,
        allocator: Allocator | None = None,
        *,
        higher_is_better: bool = True,
        depths: Mapping[str, float] | None = None,
    ) -> None:
        """`depths`: each slot's depth in the host (`GrowthEnv.depths`), which orders the
        zones' boundaries."""
        self.layout, self.cfg, self.allocator = layout, cfg, allocator
        self.higher_is_better = higher_is_better
        self.budgets = budgets_of(cfg.zone)
        self.blocked: dict[str, str | None] = dict.fromkeys(layout.names)
        self.books = {z: Book() for z in layout.names}
        self.acted: list[str] = []
        """Zones that executed an op in the last tick (a loss spike after it is theirs)."""
        self.prev_loss: float | None = None
        self._grad: dict[str, float] = {}
        self._variance = 0.0
        self.boundary, self.upstream = _boundaries(layout, depths or {})
        """Each zone's output boundary (its deepest slot's output), and the zone upstream of it
        (whose output boundary is its input), or None for the first."""
        self.boundary_slots = tuple(sorted(set(self.boundary.values())))
        self.reference: dict[str, tuple[list[float], list[float]]] = {}
        """Each zone's output statistics at its window's first tick (drift is measured from
        them)."""
        self._crossing: dict[str, dict[str, float]] = {}
        self.probe: dict[str, float] = {}
        """The window's last leave-one-zone-out contribution of each zone probed."""

    @property
    def names(self) -> tuple[str, ...]:
        return self.layout.names

    # -- collect: measurements, masks and views -----------------------------------------------
    def measure(self, model: nn.Module, minibatch_variance: float) -> None:
        """The tick's gradient norm over each zone's parameters (what the last step left in
        `.grad`), and the minibatch variance of the training loss."""
        sq: dict[str, list[torch.Tensor]] = {z: [] for z in self.names}
        for name, p in model.named_parameters():
            zone = self.param_owner(name)
            if zone != POOL and p.grad is not None:
                sq[zone].append(p.grad.detach().float().pow(2).sum())
        self._grad = {
            z: math.sqrt(float(torch.stack(v).sum())) if v else 0.0 for z, v in sq.items()
        }
        self._variance = minibatch_variance

    def param_owner(self, name: str) -> str:
        """The zone of a parameter: that of its longest module path a zone owns."""
        parts = name.split(".")
        for k in range(len(parts) - 1, 0, -1):
            zone = self.layout.owner(".".join(parts[:k]))
            if zone != POOL:
                return zone
        return POOL

    def cross(self, readings: Mapping[str, BoundaryReading]) -> list[tuple[str, dict[str, Any]]]:
        """The boundary contracts for this tick, from what crossed each zone's output boundary
        (`GrowthEnv.boundary_probe` on `self.boundary`'s slots): drift from the window's
        reference, the gradient norm reaching it and the gain through the zone; (kind, payload)
        of each breach (boundary_breach)."""
        out, cfg = [], self.cfg
        for z in self.names:
            r = readings[self.boundary[z]]
            ref = self.reference.setdefault(z, (r.mean, r.std))
            d = drift(ref, (r.mean, r.std))
            up = self.upstream[z]
            g_in = readings[self.boundary[up]].grad_norm if up is not None else r.grad_norm
            gain = g_in / r.grad_norm if r.grad_norm > 0 else (1.0 if g_in == 0 else math.inf)
            why = []
            if not d <= cfg.drift_limit:
                why.append(f"drift {d:.3f} > {cfg.drift_limit}")
            if not 1 / cfg.gain_limit <= gain <= cfg.gain_limit:
                why.append(
                    f"gradient gain {gain:.3g} outside [1/{cfg.gain_limit}, {cfg.gain_limit}]"
                )
            self._crossing[z] = {
                "drift": d,
                "boundary_grad": r.grad_norm,
                "gain": gain,
                "breach": float(bool(why)),
            }
            if why:
                payload = {"zone": z, "boundary": self.boundary[z], "reason": "; ".join(why)}
                out.append(("boundary_breach", {**payload, "drift": d, "gain": gain}))
        return out

    # -- leave-one-zone-out probes -------------------------------------------------------------
    def probe_due(self, t: int, kind: str) -> bool:
        """Is tick `t` a probe tick of this kind?"""
        probe = self.cfg.probe
        return probe.every > 0 and probe.kind == kind and (t + 1) % probe.every == 0

    def probe_groups(self, t: int) -> dict[str, tuple[str, ...]] | None:
        """On an ablate-probe tick, each zone's slots (ablated together in one replica of the
        tick's evaluation); None otherwise."""
        if not self.probe_due(t, "ablate"):
            return None
        return {z: self.layout.slots_of(z) for z in self.names}

    def probed(self, t: int, contributions: Mapping[str, float]) -> tuple[str, dict[str, Any]]:
        """Record a probe's contributions (metric units, positive: the zone helps)."""
        self.probe.update(contributions)
        payload = {"kind": self.cfg.probe.kind, "tick": t, "contribution": dict(contributions)}
        return "zone_probe", payload

    def refresh(self, rents: Mapping[str, float]) -> list[tuple[str, dict[str, Any]]]:
        """Each zone's growth mask for this tick, from its budgets; (kind, payload) of each
        change (zone_masked, zone_unmasked)."""
        out = []
        for z in self.names:
            b, book = self.budgets[z], self.books[z]
            used = int(sum(book.window.get("germinations", ())))
            rent = math.fsum(v for s, v in rents.items() if self.layout.owner(s) == z)
            why = None
            if used >= b.growth_budget:
                why = f"growth budget: {used} of {b.growth_budget} germinations this window"
            elif rent > b.rent_ceiling:
                why = f"rent {rent:.6f} per tick over the ceiling {b.rent_ceiling:.6f}"
            if why != self.blocked[z]:
                kind = "zone_masked" if why is not None else "zone_unmasked"
                out.append((kind, {"zone": z, "reason": why or ""}))
            self.blocked[z] = why
        return out

    def views(self, obs: Observation) -> dict[str, ZoneView]:
        """Each zone's observation: its slots, no WIDEN, GERMINATE masked when blocked."""
        out = {}
        for z in self.names:
            index = tuple(i for i, s in enumerate(obs.slots) if self.layout.owner(s.name) == z)
            view = replace(
                obs,
                slots=tuple(obs.slots[i] for i in index),
                legal_blueprints=tuple(
                    tuple(b for b in obs.legal_blueprints[i] if b is not Blueprint.WIDEN)
                    for i in index
                ),
                rent_paid=self.books[z].rent,
                growth_blocked=self.blocked[z],
            )
            out[z] = ZoneView(z, view, index)
        return out

    # -- act: authority ------------------------------------------------------------------------
    def authorize(self, view: ZoneView, action: FactoredAction) -> str | None:
        """Why the zone's pair may not take `action`, or None (WAIT is always allowed)."""
        if action.op is Op.WAIT:
            return None
        if not 0 <= action.slot < len(view.index):
            names = ", ".join(s.name for s in view.observation.slots)
            return f"zone {view.zone!r} has no slot {action.slot} (its slots: {names})"
        try:
            self.layout.check(view.zone, view.observation.slots[action.slot].name)
        except ZoneViolation as e:
            return str(e)
        return None

    def decay_view(
        self, zone: str, obs: DecayObservation, governor: LysisGovernor
    ) -> DecayObservation:
        """The zone's units, and its share of the sedation budget (what its units hold under
        sedation counts against it)."""
        mine = tuple(u for u in obs.units if self.layout.owner(u.phage) == zone)
        held = sum(u.params for k, u in governor.units.items() if self._unit_owner(k) == zone)
        budget = math.floor(self.budgets[zone].risk_share * obs.budget)
        return replace(obs, units=mine, budget=budget, sedated=held)

    def vet_decay(
        self, zone: str, actions: Iterable[DecayAction], view: DecayObservation
    ) -> tuple[list[DecayAction], list[LysisEvent]]:
        """The zone's Emrakul's actions that stay inside it and within its risk budget; the
        others refused (lysis_refused, naming the zone)."""
        params = {u.key: u.params for u in view.units}
        left, granted, refused = view.budget_left, [], []
        for a in actions:
            why = None
            try:
                self.layout.check(zone, a.phage)
            except ZoneViolation as e:
                why = str(e)
            if why is None and a.op is not Op.LIFT:
                need = params.get(a.key, 0)
                if need > left:
                    why = f"zone {zone!r} risk budget: {need} > {left} parameters left"
                left -= need if why is None else 0
            if why is None:
                granted.append(a)
            else:
                refused.append(
                    LysisEvent("lysis_refused", a.key, {"reason": why, "zone": zone, **a.names()})
                )
        return granted, refused

    def _unit_owner(self, key: str) -> str:
        return self.layout.owner(key.rpartition("#")[0])

    # -- after the economy: books, windows, the allocator -----------------------------------
    def account(
        self,
        t: int,
        obs: Observation,
        rents: Mapping[str, float],
        churn: Mapping[str, float],
        ops: Sequence[tuple[str, Op]],
        transitions: Sequence[str],
        metric: float,
        val_loss: float,
    ) -> list[tuple[str, dict[str, Any]]]:
        """Book tick `t` (`rents` and `churn` by slot, weighted; `ops` executed; `transitions`:
        slots whose stage changed); at a window's end, the allocator's update, as events."""
        owner = self.layout.owner
        spike = self.prev_loss is not None and not (
            val_loss <= self.prev_loss * (1 + self.cfg.spike_fraction)
        )
        acted = sorted({owner(s) for s, op in ops if op is not Op.WAIT} - {POOL})
        for z in self.names:
            book = self.books[z]
            rent = math.fsum(v for s, v in rents.items() if owner(s) == z)
            paid = math.fsum(v for s, v in churn.items() if owner(s) == z)
            grown = sum(op is Op.GERMINATE for s, op in ops if owner(s) == z)
            moved = sum(owner(s) == z for s, _ in ops) + sum(owner(s) == z for s in transitions)
            book.rent, book.churn = book.rent + rent, book.churn + paid
            book.germinations += grown
            book.transitions += moved
            contribution = math.fsum(
                s.contribution or 0.0 for s in obs.slots if owner(s.name) == z and s.stage in _GROWN
            )
            for key, value in (
                ("rent", rent),
                ("churn", paid),
                ("germinations", grown),
                ("transitions", moved),
                ("spikes", float(spike and z in self.acted)),
                ("grad_norm", self._grad.get(z, 0.0)),
                ("contribution", contribution),
                ("minibatch_variance", self._variance),
                ("metric", metric),
                *self._crossing.get(z, {}).items(),
            ):
                book.add(key, value)
        self.acted, self.prev_loss = acted, val_loss
        if (t + 1) % self.cfg.window:
            return []
        return [self._close_window(t)]

    def _close_window(self, t: int) -> tuple[str, dict[str, Any]]:
        telemetry = [self.telemetry(z) for z in self.names]
        if self.allocator is not None:
            self.budgets.update(self.allocator.update(telemetry))
        for book in self.books.values():
            book.window = {}
        self.reference, self.probe = {}, {}
        payload = {
            "by": "narset" if self.allocator is not None else "fixed",
            "zones": {
                tm.zone: {"budgets": self.budgets[tm.zone].to_dict(), "telemetry": asdict(tm)}
                for tm in telemetry
            },
        }
        return "narset_update", payload

    def telemetry(self, zone: str) -> ZoneTelemetry:
        """The zone's window so far, as Narset reads it."""
        w, b = self.books[zone].window, self.budgets[zone]
        n = len(w.get("rent", ()))
        mean = lambda key: statistics.fmean(w[key]) if w.get(key) else 0.0  # noqa: E731
        grads = sorted(w.get("grad_norm", ()))
        finite = [g for g in grads if math.isfinite(g)]
        rent_per_tick, contribution = mean("rent"), mean("contribution")
        probed = zone in self.probe
        worth = self.probe[zone] if probed else contribution
        default = {"boundary_grad": 0.0, "gain": 1.0}
        median = lambda key: statistics.median(w[key]) if w.get(key) else default[key]  # noqa: E731
        return ZoneTelemetry(
            zone=zone,
            ticks=n,
            loss_spikes=int(sum(w.get("spikes", ()))),
            nonfinite_grads=len(grads) - len(finite),
            grad_norm_p50=_percentile(finite, 0.5),
            grad_norm_p90=_percentile(finite, 0.9),
            val_slope=_slope(w.get("metric", []), self.higher_is_better),
            contribution=contribution,
            improvement_per_rent=worth / rent_per_tick if rent_per_tick > 0 else 0.0,
            rent=math.fsum(w.get("rent", ())),
            churn=math.fsum(w.get("churn", ())),
            rent_utilisation=rent_per_tick / b.rent_ceiling if b.rent_ceiling > 0 else 0.0,
            transitions=int(sum(w.get("transitions", ()))),
            germinations=int(sum(w.get("germinations", ()))),
            minibatch_variance=mean("minibatch_variance"),
            boundary_drift=max(w.get("drift", [0.0])),
            boundary_grad=median("boundary_grad"),
            boundary_gain=median("gain"),
            boundary_breaches=int(sum(w.get("breach", ()))),
            probed=int(probed),
            probe_contribution=self.probe.get(zone, 0.0),
        )

    def zone_of_event(self, slot: str | None, payload: Mapping[str, Any]) -> str | None:
        """The zone an event belongs to (its slot's, or its unit's phage's), or None."""
        if slot is not None:
            return self.layout.owner(slot)
        if isinstance(payload.get("phage"), str):
            return self.layout.owner(payload["phage"])
        unit = payload.get("unit")
        return self._unit_owner(unit) if isinstance(unit, str) else None

    def metrics(self) -> dict[str, float]:
        out = {}
        for z in self.names:
            w = self.books[z].window
            out[f"zone.{z}.rent"] = w["rent"][-1] if w.get("rent") else 0.0
            out[f"zone.{z}.price"] = self.budgets[z].price
            for key in ("drift", "gain"):
                if key in self._crossing.get(z, {}):
                    out[f"zone.{z}.{key}"] = self._crossing[z][key]
        return out

    def books_summary(self) -> dict[str, dict[str, float]]:
        return {z: self.books[z].summary() for z in self.names}

    # -- state ---------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "budgets": {z: b.to_dict() for z, b in self.budgets.items()},
            "blocked": dict(self.blocked),
            "books": {z: asdict(b) for z, b in self.books.items()},
            "acted": list(self.acted),
            "prev_loss": self.prev_loss,
            "reference": {z: [list(m), list(sd)] for z, (m, sd) in self.reference.items()},
            "probe": dict(self.probe),
            "allocator": self.allocator.state_dict() if self.allocator is not None else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.budgets = {
            z: ZoneBudgets(int(b["growth_budget"]), b["rent_ceiling"], b["risk_share"], b["price"])
            for z, b in state["budgets"].items()
        }
        self.blocked = dict(state["blocked"])
        self.books = {
            z: Book(
                b["rent"],
                b["churn"],
                b["germinations"],
                b["transitions"],
                {k: list(v) for k, v in b["window"].items()},
            )
            for z, b in state["books"].items()
        }
        self.acted, self.prev_loss = list(state["acted"]), state["prev_loss"]
        self.reference = {z: (list(m), list(sd)) for z, (m, sd) in state["reference"].items()}
        self.probe = dict(state["probe"])
        if self.allocator is not None and state["allocator"] is not None:
            self.allocator.load_state_dict(state["allocator"])


def _percentile(sorted_values: Sequence[float], q: float) -> float:
    """The q-quantile by linear interpolation (0 for no values)."""
    if not sorted_values:
        return 0.0
    pos = q * (len(sorted_values) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def _slope(values: Sequence[float], higher_is_better: bool) -> float:
    """Least-squares slope per tick, positive when the metric improves."""
    n = len(values)
    if n < 2:
        return 0.0
    xm, ym = (n - 1) / 2, statistics.fmean(values)
    num = math.fsum((i - xm) * (v - ym) for i, v in enumerate(values))
    den = math.fsum((i - xm) ** 2 for i in range(n))
    return num / den if higher_is_better else -num / den


def drift(
    reference: tuple[list[float], list[float]], now: tuple[list[float], list[float]]
) -> float:
    """How far a boundary's activations moved from a reference, standardised per channel:
    sqrt(mean_c[((μ_c − μ_ref,c) / σ_ref,c)² + log²(σ_c / σ_ref,c)]) over the channels both
    have (a widening adds channels; the host's own are compared). 0 = unchanged; a shift of
    one reference standard deviation in every channel gives 1."""
    eps = 1e-6
    terms = [
        ((m - mr) / (sr + eps)) ** 2 + math.log((s + eps) / (sr + eps)) ** 2
        for mr, sr, m, s in zip(*reference, *now, strict=False)
    ]
    return math.sqrt(math.fsum(terms) / len(terms)) if terms else 0.0


def _boundaries(
    layout: ZoneLayout, depths: Mapping[str, float]
) -> tuple[dict[str, str], dict[str, str | None]]:
    """Each zone's output boundary (its deepest slot) and its upstream zone (the zone whose
    boundary is the next shallower one), by slot depth (then name)."""
    key = lambda s: (depths.get(s, 0.0), s)  # noqa: E731
    out = {z: max(layout.slots_of(z), key=key) for z in layout.names}
    order = sorted(layout.names, key=lambda z: key(out[z]))
    upstream = {z: (order[i - 1] if i else None) for i, z in enumerate(order)}
    return out, upstream
