"""Decay policies. The protocol takes a `DecayObservation` and returns `DecayAction`s, so a learned
Emrakul can be trained later with the same PPO code as Tamiyo (a policy over units instead of
slots) and dropped in; the heuristic is the default when decay is on.

Heuristic rule, per tick: a unit is a candidate when it is active (mask 1, not in probation, not
immune), has been measured at least `min_samples` times, its contribution is below its rent with
confidence (mean + z · spread / √n < rent), and ablating it raised the validation loss by less
than `max_loss_rise` of the loss (a unit whose removal the loss feels would only wake the
governor's panic). The candidates with the worst ROI (contribution − rent; ties: the smaller loss
rise) are sedated, at most `max_per_tick`, while the sedation budget allows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

from esper.contracts import DecayAction, DecayObservation, Op, UnitROI
from esper.contracts.errors import ConfigError


class EmrakulPolicy(Protocol):
    name: str

    def act(self, obs: DecayObservation) -> list[DecayAction]: ...


@dataclass(frozen=True)
class EmrakulConfig:
    min_samples: int = 2
    """Measurements of a unit before it may be judged."""
    z: float = 1.0
    """Confidence: the contribution's mean + z standard errors must stay below the rent."""
    max_loss_rise: float = 0.02
    """Largest validation-loss rise on ablation, as a fraction of the loss, of a candidate."""
    max_per_tick: int = 2
    """Sedations per tick at most."""

    def __post_init__(self) -> None:
        if self.min_samples < 1 or self.max_per_tick < 0 or self.z < 0 or self.max_loss_rise < 0:
            raise ConfigError(
                "emrakul.min_samples must be >= 1; max_per_tick, z, max_loss_rise >= 0"
            )


class HeuristicEmrakul:
    """Sedate the worst-ROI units that cost more than they bring (module doc)."""

    name = "heuristic"

    def __init__(self, cfg: EmrakulConfig | None = None) -> None:
        self.cfg = cfg or EmrakulConfig()

    def candidate(self, u: UnitROI, obs: DecayObservation) -> bool:
        cfg = self.cfg
        if u.state != "active" or u.mask != 1.0 or u.immune_until > obs.tick:
            return False
        if u.contribution is None or u.samples < cfg.min_samples:
            return False
        upper = u.contribution + cfg.z * u.spread / math.sqrt(u.samples)
        rise = u.loss_delta if u.loss_delta is not None else math.inf
        limit = cfg.max_loss_rise * obs.loss if math.isfinite(obs.loss) else 0.0
        return upper < u.rent and rise < limit

    def act(self, obs: DecayObservation) -> list[DecayAction]:
        ranked = sorted(
            (u for u in obs.units if self.candidate(u, obs)),
            key=lambda u: (u.roi, u.loss_delta, u.phage, u.unit),
        )
        out, left = [], obs.budget_left
        for u in ranked:
            if len(out) >= self.cfg.max_per_tick:
                break
            if u.params <= left:
                out.append(DecayAction(Op.SEDATE, u.phage, u.unit))
                left -= u.params
        return out


DECAY_POLICIES = ("none", "heuristic")


def make_emrakul(name: str, cfg: EmrakulConfig | None = None) -> EmrakulPolicy | None:
    """The decay policy called `name`; None for "none" (the engine then runs no decay)."""
    if name == "none":
        return None
    if name == "heuristic":
        return HeuristicEmrakul(cfg)
    raise ConfigError(f"unknown decay policy {name!r}; valid: {', '.join(DECAY_POLICIES)}")
