"""Growth policies that need no training: `heuristic`, `random` and `none`.

All three speak the eight-head factored action (paper §6) and build it from `action_masks`, the
same function the engine's validation and the learned policy use.
"""

from __future__ import annotations

import random as pyrandom
from dataclasses import dataclass, field
from typing import Any, Protocol

from esper.contracts import (
    TAMIYO_OPS,
    AlphaCurve,
    AlphaSpeed,
    AlphaTarget,
    Blueprint,
    FactoredAction,
    Observation,
    Op,
    SlotTelemetry,
    Stage,
    Style,
    Tempo,
)
from esper.tamiyo.masks import action_masks, slot_allows


@dataclass(frozen=True)
class Decision:
    """An action plus what the policy knew when it chose it (for the flight recorder)."""

    action: FactoredAction
    mask: dict[str, list[bool]]
    probs: dict[str, list[float]] = field(default_factory=dict)
    entropy: dict[str, float] = field(default_factory=dict)
    value: float | None = None
    reason: str = ""
    by: str | None = None
    """Who chose the action when the policy did not: "injected", a forensic replay's
    counterfactual (`esper.forensics`), which the flight record names instead of the policy."""


class Policy(Protocol):
    name: str

    def act(self, obs: Observation) -> Decision: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def _decide(obs: Observation, action: FactoredAction, reason: str) -> Decision:
    masks = action_masks(obs, action.op, action.slot if action.op is not Op.WAIT else None)
    return Decision(action, masks, reason=reason)


# ---------------------------------------------------------------------------------------------
# none: the baseline that never grows
# ---------------------------------------------------------------------------------------------


class NonePolicy:
    name = "none"

    def act(self, obs: Observation) -> Decision:
        return _decide(obs, FactoredAction(), "never grows")

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


# ---------------------------------------------------------------------------------------------
# random: uniform over legal actions, head by head (op → slot → blueprint → the rest)
# ---------------------------------------------------------------------------------------------


class RandomPolicy:
    name = "random"

    def __init__(self, seed: int = 0) -> None:
        self.rng = pyrandom.Random(seed)

    def act(self, obs: Observation) -> Decision:
        pick = self.rng.choice
        ops = [op for op, ok in zip(TAMIYO_OPS, action_masks(obs)["op"], strict=True) if ok]
        op = pick(ops)
        slots = [i for i, s in enumerate(obs.slots) if slot_allows(s, op)] or [0]
        slot = pick(slots)
        action = FactoredAction(
            op=op,
            slot=slot,
            blueprint=pick(obs.legal_blueprints[slot]),
            style=pick(list(Style)),
            tempo=pick(list(Tempo)),
            alpha_target=pick(list(AlphaTarget)),
            alpha_speed=pick(list(AlphaSpeed)),
            alpha_curve=pick(list(AlphaCurve)),
        )
        d = _decide(obs, action, "uniform over legal actions")
        probs = {h: [ok / max(1, sum(m)) for ok in m] for h, m in d.mask.items()}
        return Decision(action, d.mask, probs=probs, reason=d.reason)

    def state_dict(self) -> dict[str, Any]:
        version, internal, gauss = self.rng.getstate()
        return {"rng": [version, list(internal), gauss]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        version, internal, gauss = state["rng"]
        self.rng.setstate((version, tuple(internal), gauss))


# ---------------------------------------------------------------------------------------------
# heuristic: germinate on a plateau, advance when gates pass, keep what pays its rent
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HeuristicConfig:
    """The rule policy's knobs."""

    warmup_ticks: int = 3
    """Ticks the host trains alone before any growth (let it stabilise)."""
    plateau_patience: int = 1
    """Ticks without a `plateau_delta` improvement of the best metric that make a plateau."""
    plateau_delta: float = 0.01
    max_live_seeds: int = 3
    """Seeds between GERMINATED and HOLDING at once (3: one per slot of the reference hosts)."""
    max_training_ticks: int = 6
    """A seed still failing G2 after this many TRAINING ticks is pruned."""
    hold_ticks: int = 1
    """Ticks in HOLDING before judging a seed's contribution against its rent."""
    fossilize_margin: float = 0.0
    """Commit when contribution > rent + margin (reward units)."""
    avoid_pruned_ticks: int = 30
    """A blueprint pruned from a slot is not tried there again for this many ticks."""
    rotation: tuple[str, ...] = (
        "CONV_HEAVY",
        "CONV_LIGHT",
        "BOTTLENECK",
        "GATED_MLP",
        "ATTENTION",
        "MLP",
        "DEPTHWISE",
        "LORA_LARGE",
        "NORM",
    )
    """Blueprints tried in this order (those a slot's topology lacks are skipped)."""
    max_widenings: int = 1
    """Widen the host's residual stream (WIDEN, on the earliest slot that can: the widest reach)
    before trying the rotation, up to this many times per run (live or committed). 0: never.
    How wide is the environment's `env.widen_factor`."""

    def __post_init__(self) -> None:
        for name in (
            "warmup_ticks",
            "plateau_patience",
            "max_training_ticks",
            "hold_ticks",
            "avoid_pruned_ticks",
            "max_widenings",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"heuristic.{name} must be >= 0, got {getattr(self, name)}")
        if self.max_live_seeds < 1 or self.plateau_delta < 0:
            raise ValueError("heuristic.max_live_seeds must be >= 1 and plateau_delta >= 0")
        unknown = [b for b in self.rotation if b not in Blueprint.__members__]
        if not self.rotation or unknown:
            raise ValueError(
                f"heuristic.rotation must name blueprints, got {unknown or 'none'};"
                f" valid: {', '.join(Blueprint.__members__)}"
            )


_KEPT = (Stage.GERMINATED, Stage.TRAINING, Stage.BLENDING, Stage.HOLDING, Stage.COMMITTED)


class HeuristicPolicy:
    name = "heuristic"

    def __init__(self, cfg: HeuristicConfig | None = None) -> None:
        self.cfg = cfg or HeuristicConfig()
        self.next_blueprint = 0
        self.pruned: dict[str, int] = {}  # "slot/BLUEPRINT" -> tick it was pruned
        self.since_improvement = 0
        self.best: float | None = None

    def act(self, obs: Observation) -> Decision:
        self._track_plateau(obs)
        for i, slot in enumerate(obs.slots):  # manage what exists before growing more
            found = self._manage(obs, i, slot)
            if found is not None:
                return found
        return self._maybe_germinate(obs) or _decide(obs, FactoredAction(), "nothing to do")

    def _track_plateau(self, obs: Observation) -> None:
        m = obs.metric if obs.higher_is_better else -obs.metric
        if self.best is None or m > self.best + self.cfg.plateau_delta:
            self.best, self.since_improvement = m, 0
        else:
            self.since_improvement += 1

    def _manage(self, obs: Observation, i: int, s: SlotTelemetry) -> Decision | None:
        def act(op: Op, why: str) -> Decision:
            if op is Op.PRUNE and s.spec is not None:
                self.pruned[f"{s.name}/{s.spec.blueprint.name}"] = obs.tick
            return _decide(obs, FactoredAction(op=op, slot=i), f"{s.name}: {why}")

        if s.stage is Stage.GERMINATED:
            return act(Op.ADVANCE, "start training")
        if s.stage is Stage.TRAINING:
            if s.gate_passed:
                return act(Op.ADVANCE, "G2 passed: blend")
            if s.ticks_in_stage >= self.cfg.max_training_ticks:
                return act(Op.PRUNE, f"G2 still failing after {s.ticks_in_stage} ticks")
        if s.stage is Stage.BLENDING and slot_allows(s, Op.ADVANCE):
            return act(Op.ADVANCE, "ramp done: hold")
        if s.stage is Stage.HOLDING and s.ticks_in_stage >= self.cfg.hold_ticks:
            gain = s.contribution if s.contribution is not None else 0.0
            if gain > s.rent + self.cfg.fossilize_margin:
                return act(Op.FOSSILIZE, f"contribution {gain:.4f} > rent {s.rent:.4f}")
            return act(Op.PRUNE, f"contribution {gain:.4f} <= rent {s.rent:.4f}")
        return None

    def _maybe_germinate(self, obs: Observation) -> Decision | None:
        cfg = self.cfg
        live = sum(
            s.stage in (Stage.GERMINATED, Stage.TRAINING, Stage.BLENDING, Stage.HOLDING)
            for s in obs.slots
        )
        if (
            obs.growth_blocked is not None
            or obs.tick < cfg.warmup_ticks
            or live >= cfg.max_live_seeds
            or self.since_improvement < cfg.plateau_patience
        ):
            return None
        widen = self._widen(obs)
        if widen is not None:
            return widen
        for i, s in enumerate(obs.slots):
            if not slot_allows(s, Op.GERMINATE):
                continue
            bp = self._pick_blueprint(obs, i, s.name)
            if bp is not None:
                self.since_improvement = 0  # give the new seed time before judging again
                action = FactoredAction(op=Op.GERMINATE, slot=i, blueprint=bp)
                return _decide(obs, action, f"{s.name}: plateau, germinate {bp.name}")
        return None

    def _widen(self, obs: Observation) -> Decision | None:
        """WIDEN on the earliest slot that can, while fewer than `max_widenings` are live or
        committed (a pruned one is not retried there for `avoid_pruned_ticks`)."""
        done = sum(
            s.spec is not None and s.spec.blueprint is Blueprint.WIDEN and s.stage in _KEPT
            for s in obs.slots
        )
        if done >= self.cfg.max_widenings:
            return None
        for i, s in enumerate(obs.slots):
            pruned_at = self.pruned.get(f"{s.name}/WIDEN")
            recent = pruned_at is not None and obs.tick - pruned_at < self.cfg.avoid_pruned_ticks
            if slot_allows(s, Op.GERMINATE) and Blueprint.WIDEN in obs.legal_blueprints[i]:
                if recent:
                    continue
                self.since_improvement = 0
                action = FactoredAction(op=Op.GERMINATE, slot=i, blueprint=Blueprint.WIDEN)
                return _decide(obs, action, f"{s.name}: plateau, widen the stream")
        return None

    def _pick_blueprint(self, obs: Observation, i: int, slot: str) -> Blueprint | None:
        legal = obs.legal_blueprints[i]
        n = len(self.cfg.rotation)
        for k in range(n):
            bp = Blueprint[self.cfg.rotation[(self.next_blueprint + k) % n]]
            pruned_at = self.pruned.get(f"{slot}/{bp.name}")
            recent = pruned_at is not None and obs.tick - pruned_at < self.cfg.avoid_pruned_ticks
            if bp in legal and not recent:
                self.next_blueprint = (self.next_blueprint + k + 1) % n
                return bp
        return None

    def state_dict(self) -> dict[str, Any]:
        return {
            "next_blueprint": self.next_blueprint,
            "pruned": dict(self.pruned),
            "since_improvement": self.since_improvement,
            "best": self.best,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.next_blueprint = state["next_blueprint"]
        self.pruned = dict(state["pruned"])
        self.since_improvement = state["since_improvement"]
        self.best = state["best"]


POLICIES = ("heuristic", "random", "none")


def make_policy(name: str, seed: int = 0, heuristic: HeuristicConfig | None = None) -> Policy:
    if name == "heuristic":
        return HeuristicPolicy(heuristic)
    if name == "random":
        return RandomPolicy(seed)
    if name == "none":
        return NonePolicy()
    raise ValueError(f"unknown policy {name!r}; valid policies: {', '.join(POLICIES)}")
