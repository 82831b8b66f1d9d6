"""α schedules: the gate that fades a seed in (or out), one value per control tick (paper §3.3).

A schedule ramps from `start` to `target` over `ticks` ticks along a curve f with f(0)=0, f(1)=1:

    α(k) = start + (target − start) · f(k / ticks),   k = 0 … ticks   (k clipped to [0, ticks])

`ticks == 0` is an instant jump. Retargeting mid-ramp starts a new ramp from the current α, so α is
continuous.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from esper.contracts import AlphaCurve

# Logistic steepness for the three sigmoid curves (gentle, standard, sharp).
_SIGMOID_STEEPNESS = {
    AlphaCurve.SIGMOID_GENTLE: 4.0,
    AlphaCurve.SIGMOID: 8.0,
    AlphaCurve.SIGMOID_SHARP: 16.0,
}


def _logistic(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def curve_value(curve: AlphaCurve, u: float) -> float:
    """f(u) for u in [0, 1]; every curve is exactly 0 at u=0 and 1 at u=1."""
    u = min(max(u, 0.0), 1.0)
    if curve is AlphaCurve.LINEAR:
        return u
    if curve is AlphaCurve.COSINE:
        return 0.5 * (1.0 - math.cos(math.pi * u))
    k = _SIGMOID_STEEPNESS[curve]
    # Logistic rescaled so its endpoints land exactly on 0 and 1.
    lo, hi = _logistic(-k / 2), _logistic(k / 2)
    if u == 0.0:
        return 0.0
    if u == 1.0:
        return 1.0
    return (_logistic(k * (u - 0.5)) - lo) / (hi - lo)


@dataclass(frozen=True)
class AlphaSchedule:
    """An α ramp. Immutable: `step()` and `retarget()` return new schedules."""

    start: float = 0.0
    target: float = 0.0
    ticks: int = 0
    curve: AlphaCurve = AlphaCurve.LINEAR
    elapsed: int = 0
    delay: int = 0
    """Ticks to hold at `start` before the ramp begins (the `warmup_ticks` knob)."""

    def __post_init__(self) -> None:
        if not (0.0 <= self.target <= 1.0 and 0.0 <= self.start <= 1.0):
            raise ValueError(f"α must lie in [0, 1]: start={self.start}, target={self.target}")
        if self.ticks < 0 or self.delay < 0 or self.elapsed < 0:
            raise ValueError("schedule ticks, delay and elapsed must be >= 0")

    @property
    def value(self) -> float:
        k = self.elapsed - self.delay  # ticks into the ramp; negative while delayed
        if k < 0:
            return self.start
        if k >= self.ticks:
            return self.target  # exact, not start + (target − start)·1
        return self.start + (self.target - self.start) * curve_value(self.curve, k / self.ticks)

    @property
    def done(self) -> bool:
        return self.elapsed >= self.delay + self.ticks

    @property
    def ticks_left(self) -> int:
        return max(0, self.delay + self.ticks - self.elapsed)

    def step(self) -> AlphaSchedule:
        return self if self.done else replace(self, elapsed=self.elapsed + 1)

    def retarget(self, target: float, ticks: int, curve: AlphaCurve) -> AlphaSchedule:
        """A new ramp from the current α to `target`: continuous at the moment of the change."""
        return AlphaSchedule(start=self.value, target=target, ticks=ticks, curve=curve)

    def to_dict(self) -> dict[str, object]:
        return {
            "start": self.start,
            "target": self.target,
            "ticks": self.ticks,
            "curve": self.curve.name,
            "elapsed": self.elapsed,
            "delay": self.delay,
        }

    @classmethod
    def from_dict(cls, d: dict[str, object]) -> AlphaSchedule:
        return cls(
            start=float(d["start"]),  # type: ignore[arg-type]
            target=float(d["target"]),  # type: ignore[arg-type]
            ticks=int(d["ticks"]),  # type: ignore[arg-type]
            curve=AlphaCurve[str(d["curve"])],
            elapsed=int(d["elapsed"]),  # type: ignore[arg-type]
            delay=int(d["delay"]),  # type: ignore[arg-type]
        )
