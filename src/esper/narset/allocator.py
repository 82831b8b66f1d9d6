"""Narset: every W ticks, one projected dual-ascent step on each zone's price on cost, and the
zone's budgets for the next window derived from it (paper §9.7).

It reads `ZoneTelemetry` only — scalars the engine computed (health, productivity, waste,
uncertainty) — never the topology, the seed inventory or a slot's stage. Per zone z, with its
configured budgets B_z and price λ_z (a Lagrange multiplier of its rent ceiling)::

    u_z  = rent per tick / rent ceiling                  (utilisation; > 1 is overspend)
    p_z  = improvement per unit rent                      (productivity)
    r_z  = clip((p_z − p̄) / mean|p|, −1, 1)                (relative to the zones that paid rent
                                                            in the window; 0 for the others)
    λ_z ← clip(λ_z + η·(u_z − 1) − κ·r_z, 0, λ_max)        (overspend raises it; productivity
                                                            above the zones' mean lowers it,
                                                            below it raises it)

The productivity term is relative: the zones share one run's spend, so a zone whose growth pays
less than the others' is priced up and the room goes where growth pays (with one zone, or
when no zone spent, only utilisation moves prices). A zone that paid no rent in the window is
not judged on productivity (it grew nothing to judge: the rare leave-one-zone-out probes, fed in
as its productivity, are what guard a "false boring" zone).
    growth budget_z = floor(B_z.growth / (1 + λ_z))
    rent ceiling_z  = B_z.ceiling / (1 + λ_z)
    risk_z          = B_z.risk · (1 + λ_z) / (1 + c·(spikes_z + non-finite_z + breaches_z))
                      scaled down, all zones together, until Σ risk_z <= Σ B_z.risk (<= 1)

A pricier zone gets less room to grow and more room to shed (a larger share of the sedation
budget); a zone whose health is poor (loss spikes, non-finite gradients, breaches of its boundary
contracts) gets less risk. Productivity is the engine's: a zone's measured seed contributions, or,
in a window with a leave-one-zone-out probe, the probe's calibrated contribution. Pure Python.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

from esper.contracts.zones import NarsetConfig, ZoneBudgets, ZoneSpec, ZoneTelemetry


class Narset:
    """The allocator of one run; `update` once per window (module doc)."""

    name = "narset"

    def __init__(self, zones: Iterable[ZoneSpec], cfg: NarsetConfig | None = None) -> None:
        self.cfg = cfg or NarsetConfig()
        self.base = {z.name: z for z in zones}
        self.prices = dict.fromkeys(self.base, 0.0)

    def price(self, t: ZoneTelemetry, relative: float = 0.0) -> float:
        """λ after one dual step on telemetry `t`; `relative`: the zone's productivity relative
        to the zones' (`relative_productivity`), 0 when it paid no rent."""
        cfg, base = self.cfg, self.base[t.zone]
        u = t.rent_utilisation if base.rent_ceiling > 0 else 0.0
        lam = self.prices[t.zone] + cfg.step * (u - 1.0) - cfg.productivity_weight * relative
        return min(cfg.max_price, max(0.0, lam))

    def update(self, telemetry: Sequence[ZoneTelemetry]) -> dict[str, ZoneBudgets]:
        """New prices and each zone's budgets for the next window."""
        cfg, risk = self.cfg, {}
        relative = relative_productivity(telemetry)
        for t in telemetry:
            self.prices[t.zone] = self.price(t, relative.get(t.zone, 0.0))
            trouble = t.loss_spikes + t.nonfinite_grads + t.boundary_breaches
            b = self.base[t.zone]
            risk[t.zone] = (
                b.risk_share * (1 + self.prices[t.zone]) / (1 + cfg.spike_penalty * trouble)
            )
        cap = sum(self.base[z].risk_share for z in risk)
        scale = min(1.0, cap / sum(risk.values())) if sum(risk.values()) > 0 else 1.0
        out = {}
        for z, r in risk.items():
            b, lam = self.base[z], self.prices[z]
            out[z] = ZoneBudgets(
                growth_budget=math.floor(b.growth_budget / (1 + lam)),
                rent_ceiling=b.rent_ceiling / (1 + lam),
                risk_share=r * scale,
                price=lam,
            )
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"prices": dict(self.prices)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.prices = {k: float(v) for k, v in state["prices"].items()}


def relative_productivity(telemetry: Sequence[ZoneTelemetry]) -> dict[str, float]:
    """r_z = clip((p_z − p̄) / mean|p|, −1, 1) over the zones that paid rent in the window, p
    their improvement per unit rent: how much better (or worse) a zone's growth pays than the
    zones' average, scale-free (improvement per rent runs from ~0.1 to ~100 with the task and
    the rent weight, so no fixed squashing fits). Zones that paid no rent are absent."""
    spent = {t.zone: t.improvement_per_rent for t in telemetry if t.rent > 0}
    if not spent:
        return {}
    mean = math.fsum(spent.values()) / len(spent)
    scale = math.fsum(abs(v) for v in spent.values()) / len(spent)
    if scale == 0:
        return dict.fromkeys(spent, 0.0)
    return {z: min(1.0, max(-1.0, (v - mean) / scale)) for z, v in spent.items()}
