"""The governor (paper §9.5): catastrophic-failure detection and rollback.

After each tick's training it checks for non-finite loss or parameters, a seed whose output went
non-finite, a loss that diverged from its rolling baseline, or one that exploded past an absolute
ceiling. On a trigger the engine rolls
back to the last known-good snapshot — model, optimizer moments (an earlier implementation kept
stale momentum across rollbacks), data order, RNG state — force-prunes the offending seed and
goes on.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any

from esper.contracts.errors import EsperError
from esper.kasmina import SeedSlot
from esper.tolaria.environment import TrainStats


@dataclass(frozen=True)
class GovernorConfig:
    """Thresholds of the safety governor."""

    divergence_factor: float = 3.0
    """Loss above this multiple of the rolling median (after `warmup_ticks`) is divergence."""
    divergence_floor: float = 0.5
    """The rolling median is taken as at least this: near zero (a well-fit cross-entropy) a
    3× rise is noise, not divergence (a CNN of width 16 on digits trains to 0.05 and a tick at
    0.17 made the governor roll back and give up)."""
    explosion_loss: float = 1e3
    """Loss above this absolute value is an explosion."""
    window: int = 5
    """Ticks in the rolling loss baseline."""
    warmup_ticks: int = 3
    """Ticks before divergence is judged (early losses fall fast)."""
    max_rollbacks: int = 3
    """Consecutive rollbacks for one tick before the run is abandoned."""

    def __post_init__(self) -> None:
        if (
            self.divergence_factor <= 1
            or self.divergence_floor < 0
            or self.explosion_loss <= 0
            or self.window < 1
            or self.warmup_ticks < 0
            or self.max_rollbacks < 0
        ):
            raise ValueError(
                "governor: divergence_factor must be > 1, divergence_floor >= 0, "
                "explosion_loss > 0, window >= 1, warmup_ticks and max_rollbacks >= 0"
            )


class GovernorError(EsperError, RuntimeError):
    """Training kept failing after rollbacks: the run cannot go on."""


@dataclass(frozen=True)
class Verdict:
    kind: str
    """'nan', 'divergence' or 'explosion'."""
    detail: str
    offender: str | None
    """The slot whose seed is blamed (None: the host itself)."""


def _culprit(train: TrainStats) -> str | None:
    """The slot to blame for a non-finite tick, judged by what broke first. A seed that turned a
    finite input into a non-finite output did (its output is screened, so nothing else saw it).
    Otherwise, only while the host is still finite, a slot with non-finite weights. Once the host
    is non-finite its weights say nothing: after one NaN loss Adam writes NaN into every
    parameter that got a gradient, seeds that did nothing wrong included."""
    if train.faults:
        return train.faults[0]
    if train.host_finite and train.nonfinite_slots:
        return train.nonfinite_slots[0]
    return None


def _youngest_seed(slots: dict[str, SeedSlot]) -> str | None:
    """The most recently germinated live seed (the usual suspect when the host blows up)."""
    live = [
        (int(s.seed_id[4:]), n)
        for n, s in slots.items()
        if s.seed_id and (s.seed is not None or s.phage is not None)
    ]
    return max(live)[1] if live else None


class Governor:
    """Watches the training loss; keeps the last known-good snapshot for rollback."""

    def __init__(self, cfg: GovernorConfig) -> None:
        self.cfg = cfg
        self.losses: deque[float] = deque(maxlen=cfg.window)
        self.snapshot: tuple[int, Any] | None = None
        self.rollbacks = 0
        self.ticks_seen = 0

    def check(self, train: TrainStats, slots: dict[str, SeedSlot]) -> Verdict | None:
        loss = train.loss
        if not train.finite:
            if train.faults:
                where = f"output of the seed in {', '.join(train.faults)}"
            elif not train.host_finite or train.nonfinite_slots:
                where = "parameters"
            else:
                where = "loss"
            return Verdict(
                "nan",
                f"non-finite {where} (loss {loss})",
                _culprit(train) or _youngest_seed(slots),
            )
        if loss > self.cfg.explosion_loss:
            return Verdict(
                "explosion", f"loss {loss:.4g} > {self.cfg.explosion_loss:g}", _youngest_seed(slots)
            )
        if self.ticks_seen >= self.cfg.warmup_ticks and self.losses:
            base = max(sorted(self.losses)[len(self.losses) // 2], self.cfg.divergence_floor)
            if loss > self.cfg.divergence_factor * base:
                return Verdict(
                    "divergence",
                    f"loss {loss:.4g} > {self.cfg.divergence_factor:g} × rolling median {base:.4g}",
                    _youngest_seed(slots),
                )
        return None

    def accept(self, loss: float) -> None:
        """A healthy tick: extend the baseline."""
        self.losses.append(loss)
        self.ticks_seen += 1
        self.rollbacks = 0

    def keep(self, tick: int, state: Any) -> None:
        """Remember `state` (taken at the end of `tick`) as the last known good."""
        self.snapshot = (tick, state)

    def rollback(self) -> tuple[int, Any]:
        if self.snapshot is None:
            raise GovernorError("training failed before any known-good snapshot existed")
        self.rollbacks += 1
        if self.rollbacks > self.cfg.max_rollbacks:
            raise GovernorError(
                f"training failed {self.rollbacks - 1} times in a row after rollback; giving up"
            )
        return self.snapshot

    def state_dict(self) -> dict[str, Any]:
        return {"losses": list(self.losses), "ticks_seen": self.ticks_seen}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.losses = deque(state["losses"], maxlen=self.cfg.window)
        self.ticks_seen = state["ticks_seen"]
