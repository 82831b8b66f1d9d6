"""Simic's economy (paper §5.1): rent for occupied slots, churn for volatility, the shaped reward.

Pure Python, no torch. All numbers live in one frozen `EconomyConfig`.

Rent, per occupied slot and tick (paper §5.1, parameter units, log-scaled)::

    C_rent = min(log(1 + (BaseSlotRent + α·P_seed) / P_host), max_rent)
    BaseSlotRent = base_rent_fraction · P_host

α is the rent-bearing α: 0 in GERMINATED and TRAINING (the host path is unchanged), the slot's α in
BLENDING, HOLDING and PRUNED (while fading, α > 0), and 1 in COMMITTED (a phage has no α and runs
at effective α = 1). DORMANT, EMBARGOED, RESETTING and a fully faded PRUNED slot pay nothing.
Rent grows with α so that a seed cannot hold its gate low to dodge the bill.

Churn, per tick t (paper §5.1 names its three parts; the counts are ours)::

    E(t) = structural edits at t: ops in {GERMINATE, PRUNE, FOSSILIZE, LYSE, EMERGENCY_PRUNE}
    R(t) = α reversals at t: slots whose sign(α_t − α_{t−1}) (|Δα| ≥ tolerance) differs from
           that slot's last non-zero sign
    F(t) = flips at t: structural edits on a slot that had one ≤ churn_window ticks earlier
    C_churn(t) = w_edit·E(t) + w_reversal·R(t) + w_flip·F(t)

A slot's α history starts afresh when it leaves the α map (dormant or emptied) and when it is
edited: the edit is already charged, so the fade after a prune is not charged again as a reversal.

Reward, per tick (paper §5.1 leaves R_task open; two documented variants)::

    level (default):  R_task = task_scale · metric            (higher_is_better, e.g. accuracy)
                             = −task_scale · metric           (lower is better, e.g. loss)
    delta:            R_task = task_scale · (metric − prev_metric)   (sign as above; 0 at tick 0)
    R_total = R_task − W_rent·Σ_slots C_rent − W_churn·C_churn

Why `level` is the default: rent is charged every tick a seed lives, so the task term must be in
the same units — metric per tick. With `level`, an episode's return is the area under the metric
curve (anytime performance) minus the rent and churn paid, and a seed pays for itself exactly
when it lifts the metric by more than its rent on the ticks it lives. With `delta` the task term
telescopes to (final − first metric), counted once, while rent is summed over every tick: on
digits (40 one-epoch ticks, width-2 host, 4 seeds) the heuristic's seeds raised final accuracy by
0.003–0.14 while paying 0.25 (W_rent 0.01) to 1.3 (W_rent 0.05) of rent, so under `delta` no
growth paid and PPO correctly learned never to grow (bench/RESULTS.md).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from esper.contracts import Op, Stage

# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EconomyConfig:
    """Every number of the economy. Variants (paper §7) are instances: see the presets below."""

    base_rent_fraction: float = 0.0039
    """BaseSlotRent / P_host: the fixed cost of an occupied slot, about a small residual block
    under the reference host (paper §5.1)."""
    max_rent: float = 1.0
    """Cap on one slot's C_rent (paper §5.1), before W_rent. 1.0 engages only once
    (base + α·P_seed) > (e − 1)·P_host ≈ 1.72·P_host, so it bounds pathological seeds without
    flattening the price of ordinary ones."""
    w_rent: float = 0.01
    """W_rent, in metric units per tick (with the `level` task reward). A seed of 10% of the host
    at α = 1 costs 0.01·log(1.1039) ≈ 0.001 per tick: it must lift accuracy by 0.1 points on
    every tick it lives; one that doubles the host costs 0.01·log(2.0039) ≈ 0.007, 0.7 points."""
    w_churn: float = 0.01
    """W_churn. One structural edit costs 0.01: one accuracy point for one tick, ten ticks of a
    10% seed's rent; a germinate then a prune inside the window costs 0.01 + 0.02 = 0.03, so
    cycling a seed to dodge rent does not pay."""
    w_edit: float = 1.0
    """Churn units per structural edit."""
    w_reversal: float = 1.0
    """Churn units per α reversal: an α oscillation costs as much as an edit."""
    w_flip: float = 1.0
    """Churn units per flip, on top of the edit itself: a rapid add/remove costs double."""
    churn_window: int = 5
    """Ticks within which a second structural edit on a slot is a flip (inclusive: an edit
    exactly churn_window ticks after the last one is a flip). 5 covers a prune, the default
    embargo (3) and reset (1) and an immediate re-germination; it also charges a seed rushed
    from germination to FOSSILIZE within 5 ticks."""
    reversal_tolerance: float = 1e-9
    """|Δα| below this is no movement: it neither counts nor sets a direction."""
    task_reward: str = "level"
    """"level": R_task = ±task_scale·metric every tick; "delta": ±task_scale·(metric − previous
    metric). See the module docstring for why level is the default."""
    task_scale: float = 1.0
    """R_task per unit of metric: with `level`, 0.8 accuracy gives 0.8 per tick; with `delta`, a
    Δaccuracy of 0.01 gives 0.01."""
    higher_is_better: bool = True
    """True for accuracy-like metrics, False for losses (a falling loss is a positive reward)."""

    def __post_init__(self) -> None:
        for name in ("base_rent_fraction", "reversal_tolerance", *_WEIGHTS):
            _check_number(name, getattr(self, name), lower=0.0, strict=False)
        _check_number("max_rent", self.max_rent, lower=0.0, strict=True, allow_inf=True)
        _check_number("task_scale", self.task_scale, lower=0.0, strict=True)
        if self.task_reward not in TASK_REWARDS:
            raise ValueError(
                f"EconomyConfig.task_reward must be one of {', '.join(TASK_REWARDS)}, "
                f"got {self.task_reward!r}"
            )
        if not isinstance(self.churn_window, int) or self.churn_window < 1:
            raise ValueError(
                f"EconomyConfig.churn_window must be an int >= 1, got {self.churn_window!r}"
            )


TASK_REWARDS = ("level", "delta")
_WEIGHTS = ("w_rent", "w_churn", "w_edit", "w_reversal", "w_flip")


def _check_number(
    name: str, value: float, lower: float, strict: bool, allow_inf: bool = False
) -> None:
    ok = isinstance(value, int | float) and not math.isnan(value)
    ok = ok and (allow_inf or math.isfinite(value))
    ok = ok and (value > lower if strict else value >= lower)
    if not ok:
        bound = f"> {lower}" if strict else f">= {lower}"
        raise ValueError(f"EconomyConfig.{name} must be a finite number {bound}, got {value!r}")


# Ablations of paper §7 as small diffs from the defaults: rent ×1/5 and ×5, churn off.
LOW_RENT = EconomyConfig(w_rent=0.002)
HIGH_RENT = EconomyConfig(w_rent=0.05)
NO_CHURN = EconomyConfig(w_churn=0.0)

# ---------------------------------------------------------------------------------------------
# Rent
# ---------------------------------------------------------------------------------------------

# Stages whose rent-bearing α is fixed by the lifecycle, whatever the slot reports.
_FIXED_RENT_ALPHA = {Stage.GERMINATED: 0.0, Stage.TRAINING: 0.0, Stage.COMMITTED: 1.0}
_BLENDED_STAGES = frozenset({Stage.BLENDING, Stage.HOLDING})


@dataclass(frozen=True)
class SlotEconomics:
    """What the economy needs to know about one slot this tick (its state after the tick's ops)."""

    name: str
    stage: Stage
    alpha: float
    p_seed: int
    """The seed's parameter count (0 when the slot is empty)."""
    seed_id: str | None = None
    """Stable for the seed's whole life; the ledger's account key."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"slot {self.name!r}: alpha must lie in [0, 1], got {self.alpha}")
        if self.p_seed < 0:
            raise ValueError(f"slot {self.name!r}: p_seed must be >= 0, got {self.p_seed}")


def rent_alpha(stage: Stage, alpha: float) -> float | None:
    """The α a slot pays rent at, or None if the slot pays no rent (module docstring)."""
    if stage in _FIXED_RENT_ALPHA:
        return _FIXED_RENT_ALPHA[stage]
    if stage in _BLENDED_STAGES or (stage is Stage.PRUNED and alpha > 0.0):
        return alpha
    return None


def slot_rent(alpha: float, p_seed: float, p_host: float, cfg: EconomyConfig) -> float:
    """C_rent of one occupied slot (paper §5.1), capped at cfg.max_rent."""
    if not p_host > 0:
        raise ValueError(f"p_host must be > 0, got {p_host}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    if p_seed < 0:
        raise ValueError(f"p_seed must be >= 0, got {p_seed}")
    base = cfg.base_rent_fraction * p_host
    return min(math.log1p((base + alpha * p_seed) / p_host), cfg.max_rent)


def unit_rent(p_unit: float, p_host: float, cfg: EconomyConfig) -> float:
    """What one phage unit's parameters cost per tick, in reward units (W_rent included): the
    marginal rent log(1 + P_unit / P_host) with no slot base (a unit holds no slot). Emrakul
    compares it with the unit's ablation contribution (paper §9.2's ROI)."""
    if not p_host > 0 or p_unit < 0:
        raise ValueError(f"need p_host > 0 and p_unit >= 0, got {p_host}, {p_unit}")
    return cfg.w_rent * min(math.log1p(p_unit / p_host), cfg.max_rent)


def tick_rent(
    slots: Iterable[SlotEconomics], p_host: float, cfg: EconomyConfig
) -> dict[str, float]:
    """C_rent of every slot this tick, by slot name (0.0 for slots that pay none)."""
    if not p_host > 0:
        raise ValueError(f"p_host must be > 0, got {p_host}")
    rents = {}
    for s in slots:
        a = rent_alpha(s.stage, s.alpha)
        rents[s.name] = 0.0 if a is None else slot_rent(a, s.p_seed, p_host, cfg)
    return rents


# ---------------------------------------------------------------------------------------------
# Churn
# ---------------------------------------------------------------------------------------------

STRUCTURAL_OPS = frozenset({Op.GERMINATE, Op.PRUNE, Op.FOSSILIZE, Op.LYSE, Op.EMERGENCY_PRUNE})
"""Ops that add, remove or rewrap structure; WAIT, ADVANCE, SET_ALPHA_TARGET, SEDATE, LIFT don't."""


@dataclass(frozen=True)
class ChurnBreakdown:
    """One tick's churn: the counts E, R, F, C_churn, and C_churn split by slot (for the ledger)."""

    edits: int
    reversals: int
    flips: int
    total: float
    by_slot: dict[str, float] = field(default_factory=dict)


class ChurnMeter:
    """Counts churn tick by tick; holds each slot's α history and last structural edit."""

    def __init__(self, cfg: EconomyConfig) -> None:
        self.cfg = cfg
        self._last_tick: int | None = None
        self._prev_alpha: dict[str, float] = {}
        self._last_sign: dict[str, int] = {}
        self._last_edit: dict[str, int] = {}

    def observe(
        self, tick: int, ops: Sequence[tuple[str, Op]], alphas: Mapping[str, float]
    ) -> ChurnBreakdown:
        """Charge tick `tick`: its ops, and every tracked slot's α after them."""
        _check_tick("ChurnMeter", tick, self._last_tick)
        for slot, op in ops:
            if not isinstance(op, Op):
                raise TypeError(f"slot {slot!r}: expected an Op, got {op!r}")
        for slot, a in alphas.items():
            if not 0.0 <= a <= 1.0:
                raise ValueError(f"slot {slot!r}: alpha must lie in [0, 1], got {a}")
        by_slot: dict[str, float] = {}
        edits, flips, edited = self._count_edits(tick, ops, by_slot)
        reversals = self._count_reversals(alphas, edited, by_slot)
        self._forget_old_edits(tick)
        self._last_tick = tick
        c = self.cfg
        total = c.w_edit * edits + c.w_reversal * reversals + c.w_flip * flips
        return ChurnBreakdown(edits, reversals, flips, total, by_slot)

    def _count_edits(
        self, tick: int, ops: Sequence[tuple[str, Op]], by_slot: dict[str, float]
    ) -> tuple[int, int, set[str]]:
        edits, flips, edited = 0, 0, set()
        for slot, op in ops:
            if op not in STRUCTURAL_OPS:
                continue
            edits += 1
            _add(by_slot, slot, self.cfg.w_edit)
            last = self._last_edit.get(slot)
            if last is not None and tick - last <= self.cfg.churn_window:
                flips += 1
                _add(by_slot, slot, self.cfg.w_flip)
            self._last_edit[slot] = tick
            edited.add(slot)
        return edits, flips, edited

    def _count_reversals(
        self, alphas: Mapping[str, float], edited: set[str], by_slot: dict[str, float]
    ) -> int:
        for slot in [s for s in self._prev_alpha if s not in alphas]:
            del self._prev_alpha[slot]  # dormant or emptied: its history ends
            self._last_sign.pop(slot, None)
        reversals = 0
        for slot, a in alphas.items():
            prev = self._prev_alpha.get(slot)
            self._prev_alpha[slot] = a
            if slot in edited:
                self._last_sign.pop(slot, None)
                continue
            if prev is None or abs(a - prev) < self.cfg.reversal_tolerance:
                continue
            sign = 1 if a > prev else -1
            if self._last_sign.get(slot, sign) != sign:
                reversals += 1
                _add(by_slot, slot, self.cfg.w_reversal)
            self._last_sign[slot] = sign
        return reversals

    def _forget_old_edits(self, tick: int) -> None:
        # Ticks only increase, so an edit outside the window can never make a flip again.
        for slot in [s for s, t in self._last_edit.items() if tick - t >= self.cfg.churn_window]:
            del self._last_edit[slot]

    def state_dict(self) -> dict[str, Any]:
        return {
            "last_tick": self._last_tick,
            "prev_alpha": dict(self._prev_alpha),
            "last_sign": dict(self._last_sign),
            "last_edit": dict(self._last_edit),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        _check_keys("ChurnMeter", state, {"last_tick", "prev_alpha", "last_sign", "last_edit"})
        last = state["last_tick"]
        self._last_tick = None if last is None else int(last)
        self._prev_alpha = {str(k): float(v) for k, v in state["prev_alpha"].items()}
        self._last_sign = {str(k): int(v) for k, v in state["last_sign"].items()}
        self._last_edit = {str(k): int(v) for k, v in state["last_edit"].items()}


def _add(acc: dict[str, float], key: str, amount: float) -> None:
    acc[key] = acc.get(key, 0.0) + amount


# ---------------------------------------------------------------------------------------------
# Reward
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RewardBreakdown:
    """One tick's reward: total = task − rent − churn, with rent and churn already weighted."""

    task: float
    rent: float
    """W_rent · Σ_slots C_rent."""
    churn: float
    """W_churn · C_churn."""
    total: float


def task_reward(prev_metric: float, metric: float, higher_is_better: bool, scale: float) -> float:
    """The `delta` R_task: scale × the metric's improvement, positive whenever it got better."""
    if not (math.isfinite(prev_metric) and math.isfinite(metric)):
        raise ValueError(f"metrics must be finite, got prev={prev_metric}, now={metric}")
    delta = metric - prev_metric if higher_is_better else prev_metric - metric
    return scale * delta


def level_reward(metric: float, higher_is_better: bool, scale: float) -> float:
    """The `level` R_task: scale × the metric, negated when lower is better (a loss)."""
    if not math.isfinite(metric):
        raise ValueError(f"metric must be finite, got {metric}")
    return scale * (metric if higher_is_better else -metric)


def reward(
    prev_metric: float | None,
    metric: float,
    rents: Mapping[str, float],
    churn: ChurnBreakdown,
    cfg: EconomyConfig,
) -> RewardBreakdown:
    """R_total = R_task − W_rent·C_rent − W_churn·C_churn (paper §5.1).

    `prev_metric` is None on the first tick, which (under `delta`) has no improvement to reward.
    """
    task = 0.0
    if cfg.task_reward == "level":
        task = level_reward(metric, cfg.higher_is_better, cfg.task_scale)
    elif prev_metric is not None:
        task = task_reward(prev_metric, metric, cfg.higher_is_better, cfg.task_scale)
    rent = cfg.w_rent * math.fsum(rents.values())  # fsum: independent of slot order
    churn_cost = cfg.w_churn * churn.total
    return RewardBreakdown(task, rent, churn_cost, task - rent - churn_cost)


# ---------------------------------------------------------------------------------------------
# Ledger
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SeedAccount:
    """What one seed has cost the reward over its life (weighted, like RewardBreakdown)."""

    rent_paid: float = 0.0
    churn_paid: float = 0.0
    ticks_alive: int = 0
    """Ticks in which the seed's slot paid rent."""


@dataclass(frozen=True)
class RunTotals:
    """Sums of RewardBreakdown over the recorded ticks."""

    ticks: int = 0
    task: float = 0.0
    rent: float = 0.0
    churn: float = 0.0
    total: float = 0.0


class Ledger:
    """Accumulates rent and churn per seed (by seed_id) and the run's reward totals.

    A slot's rent and churn go to the seed it holds that tick, so Σ per_seed equals the totals
    whenever every slot that pays or churns carries a seed_id.
    """

    def __init__(self, cfg: EconomyConfig) -> None:
        self.cfg = cfg
        self._last_tick: int | None = None
        self._seeds: dict[str, SeedAccount] = {}
        self._totals = RunTotals()

    def record(
        self,
        tick: int,
        slots: Iterable[SlotEconomics],
        rents: Mapping[str, float],
        churn: ChurnBreakdown,
        reward: RewardBreakdown,
    ) -> None:
        _check_tick("Ledger", tick, self._last_tick)
        self._last_tick = tick
        for s in slots:
            if s.seed_id is None:
                continue
            acc = self._seeds.get(s.seed_id, SeedAccount())
            self._seeds[s.seed_id] = SeedAccount(
                rent_paid=acc.rent_paid + self.cfg.w_rent * rents.get(s.name, 0.0),
                churn_paid=acc.churn_paid + self.cfg.w_churn * churn.by_slot.get(s.name, 0.0),
                ticks_alive=acc.ticks_alive + int(rent_alpha(s.stage, s.alpha) is not None),
            )
        t = self._totals
        self._totals = RunTotals(
            t.ticks + 1,
            t.task + reward.task,
            t.rent + reward.rent,
            t.churn + reward.churn,
            t.total + reward.total,
        )

    def per_seed(self) -> dict[str, SeedAccount]:
        return dict(self._seeds)

    def totals(self) -> RunTotals:
        return self._totals

    def state_dict(self) -> dict[str, Any]:
        return {
            "last_tick": self._last_tick,
            "seeds": {k: _asdict(v) for k, v in self._seeds.items()},
            "totals": _asdict(self._totals),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        _check_keys("Ledger", state, {"last_tick", "seeds", "totals"})
        last = state["last_tick"]
        self._last_tick = None if last is None else int(last)
        self._seeds = {str(k): SeedAccount(**v) for k, v in state["seeds"].items()}
        self._totals = RunTotals(**state["totals"])


def _asdict(obj: SeedAccount | RunTotals) -> dict[str, float | int]:
    return {f.name: getattr(obj, f.name) for f in fields(obj)}


# ---------------------------------------------------------------------------------------------
# One tick, top to bottom
# ---------------------------------------------------------------------------------------------


class Economy:
    """Rent → churn → reward → ledger, once per tick: the order the engine calls them in."""

    def __init__(self, cfg: EconomyConfig | None = None) -> None:
        self.cfg = cfg or EconomyConfig()
        self.churn = ChurnMeter(self.cfg)
        self.ledger = Ledger(self.cfg)
        self.last_rents: dict[str, float] = {}
        """Each slot's weighted rent (W_rent·C_rent) at the last step: what policies observe."""
        self.last_churn: dict[str, float] = {}
        """Each slot's weighted churn (W_churn·C_churn) at the last step (zones' books; not
        state: read in the tick that set it)."""

    def step(
        self,
        tick: int,
        slots: Iterable[SlotEconomics],
        ops: Sequence[tuple[str, Op]],
        p_host: float,
        prev_metric: float | None,
        metric: float,
    ) -> RewardBreakdown:
        """`slots` as they stand after `ops`; DORMANT slots end their α history."""
        slots = tuple(slots)
        rents = tick_rent(slots, p_host, self.cfg)
        alphas = {s.name: s.alpha for s in slots if s.stage is not Stage.DORMANT}
        churn = self.churn.observe(tick, ops, alphas)
        r = reward(prev_metric, metric, rents, churn, self.cfg)
        self.ledger.record(tick, slots, rents, churn, r)
        self.last_rents = {k: self.cfg.w_rent * v for k, v in rents.items()}
        self.last_churn = {k: self.cfg.w_churn * v for k, v in churn.by_slot.items()}
        return r

    def state_dict(self) -> dict[str, Any]:
        return {
            "churn": self.churn.state_dict(),
            "ledger": self.ledger.state_dict(),
            "last_rents": dict(self.last_rents),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        _check_keys("Economy", state, {"churn", "ledger", "last_rents"})
        self.churn.load_state_dict(state["churn"])
        self.ledger.load_state_dict(state["ledger"])
        self.last_rents = dict(state["last_rents"])


# ---------------------------------------------------------------------------------------------
# Checks
# ---------------------------------------------------------------------------------------------


def _check_tick(owner: str, tick: int, last: int | None) -> None:
    if last is not None and tick <= last:
        raise ValueError(f"{owner}: tick {tick} after tick {last}; ticks must strictly increase")


def _check_keys(owner: str, state: Mapping[str, Any], expected: set[str]) -> None:
    if set(state) != expected:
        raise ValueError(f"{owner} state: expected keys {sorted(expected)}, got {sorted(state)}")
