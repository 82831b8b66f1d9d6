"""The engine's half of decay (paper §9): ROI telemetry of every phage unit, Emrakul's actions
executed under the LysisGovernor, and physical lysis at the safe boundary.

In the one tick (`Episode`):

    launch    plan(): the units this tick's fused evaluation ablates (round-robin, at most
              `units_per_tick`; one replica each, in the same pass as the seeds' ablations)
    collect   after_evaluation(): each measured unit's contribution and loss rise go into its
              recent window; the governor checks the tick's validation loss (a spike over a
              unit's baseline wakes it: mask lifted by the engine, unit immune for M ticks)
    act       observe() → Emrakul's actions → execute(): SEDATE / WEAKEN / LIFT, each granted or
              refused by the governor (budget, immunity), the mask set only when granted
    boundary  safe_boundary(): after the economy priced the tick, condemned units are removed
              (sedated: lysis, the weights and their Adam moments sliced; weakened: the factor
              folded into the weights and the mask reset), then the governor's snapshot is
              taken — of the lysed model, so that a rollback never has to regrow a unit.

The check runs on the tick's evaluation loss, which the engine already reads back: no extra host
sync, on CPU or CUDA.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from esper.contracts import Actor, DecayAction, DecayObservation, Op, UnitROI, unit_key
from esper.kasmina import SeedSlot, Tissue, Widening, module_cost, tissue_of
from esper.kasmina.lysis import recording_slices
from esper.simic import EconomyConfig, unit_rent
from esper.tolaria.lysis import LysisConfig, LysisEvent, LysisGovernor


def model_mass(model: nn.Module, slots: Iterable[SeedSlot]) -> int:
    """The host's parameter mass for the sedation budget: every parameter but live seeds'."""
    live = {id(p) for s in slots if s.seed is not None for p in s.seed.parameters()}
    live |= {id(p) for s in slots if s.blend is not None for p in s.blend.parameters()}
    return sum(p.numel() for p in model.parameters() if id(p) not in live)


def _split(key: str) -> tuple[str, int]:
    name, _, unit = key.rpartition("#")
    return name, int(unit)


class Decay:
    """ROI tracker, LysisGovernor and lysis for one episode's model; see the module doc."""

    def __init__(
        self, model: nn.Module, slots: dict[str, SeedSlot], cfg: LysisConfig, econ: EconomyConfig
    ) -> None:
        self.model, self.slots, self.cfg, self.econ = model, slots, cfg, econ
        self.governor = LysisGovernor(cfg, max(1, model_mass(model, slots.values())))
        self.history: dict[str, list[tuple[float, float]]] = {}
        """Unit key -> its recent (contribution, loss rise) measurements, oldest first."""
        self.cursor = 0
        self.lysed_params = 0
        """Parameters removed by lysis so far."""
        self.lysed_flops = 0
        """FLOPs per sample removed by lysis so far (measured when the caller gives an input)."""

    # -- telemetry -----------------------------------------------------------------------------
    def tissue(self) -> dict[str, Tissue]:
        """The phages Emrakul may act on now: not host blocks while a widening is live (its
        wrappers hold their stream layers until it commits or is pruned)."""
        tissue = tissue_of(self.model)
        if any(isinstance(s.seed, Widening) for s in self.slots.values()):
            tissue = {n: t for n, t in tissue.items() if t.kind != "host"}
        return tissue

    def plan(self) -> list[tuple[str, int]]:
        """The units the next evaluation ablates: the next `units_per_tick` active units in
        (phage, unit) order, round-robin from where the last plan stopped."""
        units = [
            (name, u)
            for name, t in sorted(self.tissue().items())
            for u, value in enumerate(t.values())
            if value == 1.0
        ]
        k = min(self.cfg.units_per_tick, len(units))
        if not k:
            return []
        start = self.cursor % len(units)
        self.cursor = start + k
        return [units[(start + i) % len(units)] for i in range(k)]

    def after_evaluation(
        self, units: dict[tuple[str, int], tuple[float, float]], loss: float, tick: int
    ) -> list[LysisEvent]:
        """Record the measured units; the governor's check of the tick's loss (panics lifted)."""
        for (name, u), value in units.items():
            window = self.history.setdefault(unit_key(name, u), [])
            window.append(value)
            del window[: -self.cfg.roi_window]
        self.governor.host_params = max(1, model_mass(self.model, self.slots.values()))
        events = self.governor.check(loss, tick)
        tissue = tissue_of(self.model, read_by_seeds=True)  # lifts go wherever a mask is
        for e in events:
            if e.kind == "lysis_panic":
                name, u = _split(e.unit)
                tissue[name].set([u], 1.0, Actor.TOLARIA)
        return events

    def roi_record(self, units: dict[tuple[str, int], tuple[float, float]]) -> dict[str, Any]:
        """A tick's measurements for the recorder: per unit [contribution, loss rise], and per
        phage the parameters and rent of one of its units."""
        tissue, p_host = self.tissue(), self.governor.host_params
        phages = {}
        for name in sorted({n for n, _ in units} & set(tissue)):
            params = tissue[name].unit_params()
            phages[name] = {"unit_params": params, "rent": unit_rent(params, p_host, self.econ)}
        measured = {unit_key(n, u): list(v) for (n, u), v in units.items()}
        return {"units": measured, "phages": phages}

    def observe(self, tick: int, loss: float = float("nan")) -> DecayObservation:
        """Every unit's ROI, with the governor's budget, for Emrakul."""
        p_host = self.governor.host_params
        rows = []
        for name, t in sorted(self.tissue().items()):
            params = t.unit_params()
            rent = unit_rent(params, p_host, self.econ)
            for u, value in enumerate(t.values()):
                key = unit_key(name, u)
                seen = self.history.get(key, [])
                c = [v[0] for v in seen]
                state = self.governor.units.get(key)
                rows.append(
                    UnitROI(
                        phage=name,
                        unit=u,
                        scope=t.scope,
                        kind=t.kind,
                        params=params,
                        rent=rent,
                        contribution=statistics.fmean(c) if c else None,
                        loss_delta=statistics.fmean(v[1] for v in seen) if seen else None,
                        spread=statistics.pstdev(c) if len(c) > 1 else 0.0,
                        samples=len(c),
                        mask=value,
                        state="active" if state is None else state.state.value,
                        immune_until=self.governor.immune_until.get(key, -1),
                    )
                )
        g = self.governor
        return DecayObservation(tick, tuple(rows), g.budget, g.sedated_mass, loss)

    # -- Emrakul's acts -------------------------------------------------------------------
    def execute(
        self, actions: Iterable[DecayAction], tick: int, baseline_loss: float
    ) -> list[LysisEvent]:
        """Emrakul's actions, in order, each granted or refused by the governor."""
        events = []
        for a in actions:
            t = self.tissue().get(a.phage)
            if t is None or not 0 <= a.unit < t.units:
                why = "no such phage" if t is None else f"unit out of range 0..{t.units - 1}"
                events.append(LysisEvent("lysis_refused", a.key, {"reason": why, **a.names()}))
                continue
            if a.op is Op.LIFT:
                e = self.governor.lift(a.key)
                if e.kind == "lysis_lifted":
                    t.set([a.unit], 1.0, Actor.EMRAKUL)
            else:
                e = self.governor.sedate(a.key, t.unit_params(), baseline_loss, tick)
                if e.kind == "lysis_probation":
                    t.set([a.unit], a.value, Actor.EMRAKUL)
            events.append(LysisEvent(e.kind, e.unit, {**e.payload, **a.names()}))
        return events

    # -- the safe boundary ----------------------------------------------------------------
    def safe_boundary(
        self, optimizer: torch.optim.Optimizer, example: torch.Tensor | None = None
    ) -> list[LysisEvent]:
        """Remove what the governor condemned: lysis of sedated units (Adam moments sliced with
        the weights), folding of weakened ones. Host blocks wait while a widening is live (its
        wrappers hold their stream layers). The caller rebuilds its optimizer's groups. With an
        `example` input, the FLOPs that lysis removed are measured on it (`lysed_flops`)."""
        tissue, events = self.tissue(), self._forget_removed()
        by_phage: dict[str, list[int]] = {}
        for key in self.governor.condemned():
            name, u = _split(key)
            if name in tissue:
                by_phage.setdefault(name, []).append(u)
        before = module_cost(self.model, example).flops if by_phage and example is not None else 0
        for name, units in sorted(by_phage.items()):
            t, values = tissue[name], tissue[name].values()
            sedated = [u for u in units if values[u] == 0.0]
            weakened = [u for u in units if u not in sedated]
            if weakened:
                t.fold(weakened)
                events += [self._release(name, u, "decay_folded") for u in weakened]
            if sedated:
                with recording_slices() as slices:
                    removed = t.lyse(sedated)
                _slice_moments(optimizer, slices)
                self.lysed_params += removed
                events += [self._release(name, u, "lysed") for u in sedated]
                self._renumber(name, sedated)
        if by_phage and example is not None:
            self.lysed_flops += before - module_cost(self.model, example).flops
        return events

    def _forget_removed(self) -> list[LysisEvent]:
        """Units whose phage is gone (a committed seed the governor removed in an emergency) or
        no longer Emrakul's (a widening's channels that a seed born since reads: their masks
        are lifted) leave the governor, its budget and the history."""
        alive, g, events = tissue_of(self.model), self.governor, []
        held = tissue_of(self.model, read_by_seeds=True)
        for key in [k for k in g.units if _split(k)[0] not in alive]:
            name, u = _split(key)
            why = "its phage was removed"
            if name in held:
                held[name].set([u], 1.0, Actor.TOLARIA)
                why = "a seed reads its channels"
            events.append(LysisEvent("lysis_dropped", key, {"reason": why}))
            del g.units[key]
        self.history = {k: v for k, v in self.history.items() if _split(k)[0] in alive}
        return events

    def _release(self, name: str, unit: int, kind: str) -> LysisEvent:
        e = self.governor.lysed(unit_key(name, unit))
        return LysisEvent(kind, e.unit, e.payload)

    def _renumber(self, name: str, gone: list[int]) -> None:
        """Units after a lysed one move down: so do their keys in the history and governor."""
        g = self.governor

        def moved(key: str) -> str:
            phage, u = _split(key)
            if phage != name:
                return key
            return unit_key(phage, u - sum(x < u for x in gone))

        lost = {unit_key(name, u) for u in gone}
        self.history = {moved(k): v for k, v in self.history.items() if k not in lost}
        g.units = {moved(k): v for k, v in g.units.items()}
        g.immune_until = {moved(k): v for k, v in g.immune_until.items() if k not in lost}

    def metrics(self) -> dict[str, float]:
        """The tick's decay scalars for the recorder."""
        return {
            "lysed_params": self.lysed_params,
            "lysed_flops": self.lysed_flops,
            "sedated_params": self.governor.sedated_mass,
        }

    # -- state -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "governor": self.governor.state_dict(),
            "history": {k: [list(v) for v in w] for k, w in self.history.items()},
            "cursor": self.cursor,
            "lysed_params": self.lysed_params,
            "lysed_flops": self.lysed_flops,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.governor.load_state_dict(state["governor"])
        self.history = {k: [(c, d) for c, d in w] for k, w in state["history"].items()}
        self.cursor, self.lysed_params = state["cursor"], state["lysed_params"]
        self.lysed_flops = state["lysed_flops"]


def _slice_moments(optimizer: torch.optim.Optimizer, slices: list) -> None:
    """Each lysed parameter's optimizer state follows it: its moments are sliced the same way
    (the step count is kept)."""
    state = optimizer.state
    for new, old, index in slices:
        if old not in state:
            continue
        state[new] = {
            k: v[index].clone() if torch.is_tensor(v) and v.shape == old.shape else v
            for k, v in state.pop(old).items()
        }
