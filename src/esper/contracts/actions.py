"""The factored action of paper §6: eight heads, each a small enum.

`slot, blueprint, style, tempo, alpha_target, alpha_speed, alpha_curve, op`. Values that carry a
number (ticks, α) expose it as `.value`-independent properties so the enum index stays the head's
action index.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum, IntEnum

from esper.contracts.lifecycle import Op


class Topology(Enum):
    """The shape of the features at a slot."""

    CNN = "cnn"  # (B, C, H, W) feature maps
    SEQ = "seq"  # (B, T, C) token sequences, causal
    VEC = "vec"  # (B, C) vectors


class Blueprint(IntEnum):
    """The genome library (paper §6, 13 types) and WIDEN. GATED_MLP is our thirteenth: docs."""

    NOOP = 0
    NORM = 1
    CONV_SMALL = 2
    CONV_LIGHT = 3
    CONV_HEAVY = 4
    DEPTHWISE = 5
    BOTTLENECK = 6
    ATTENTION = 7
    LORA = 8
    LORA_LARGE = 9
    MLP_SMALL = 10
    MLP = 11
    GATED_MLP = 12
    WIDEN = 13
    """k new channels in the host's residual stream from the slot's block on (kasmina/stream.py)."""


class Style(IntEnum):
    """Germination style: the blend operator joining host h and seed s under α."""

    RESIDUAL = 0  # y = h + α·s
    VALVE = 1  # y = h ⊙ (1 + α·s)
    SIGMOID_RAMP = 2  # y = h + ramp(α)·s, ramp a normalised logistic
    GATE = 3  # y = h + α·g(h)·s, g a learned per-sample gate in (0, 1)


class Tempo(IntEnum):
    """Length of the first α ramp, on entering BLENDING."""

    FAST = 0
    STANDARD = 1
    SLOW = 2

    @property
    def ticks(self) -> int:
        return (3, 5, 8)[self]


class AlphaTarget(IntEnum):
    HALF = 0
    MOST = 1
    FULL = 2

    @property
    def alpha(self) -> float:
        return (0.5, 0.7, 1.0)[self]


class AlphaSpeed(IntEnum):
    """Length of a retarget ramp (SET_ALPHA_TARGET)."""

    INSTANT = 0
    FAST = 1
    MEDIUM = 2
    SLOW = 3

    @property
    def ticks(self) -> int:
        return (0, 3, 5, 8)[self]


class AlphaCurve(IntEnum):
    LINEAR = 0
    COSINE = 1
    SIGMOID_GENTLE = 2
    SIGMOID = 3
    SIGMOID_SHARP = 4


HEADS: tuple[str, ...] = (
    "slot",
    "blueprint",
    "style",
    "tempo",
    "alpha_target",
    "alpha_speed",
    "alpha_curve",
    "op",
)

# Which heads matter for which op; the rest are masked from the loss and the entropy bonus.
RELEVANT_HEADS: dict[Op, frozenset[str]] = {
    Op.WAIT: frozenset({"op"}),
    Op.GERMINATE: frozenset(
        {"op", "slot", "blueprint", "style", "tempo", "alpha_target", "alpha_curve"}
    ),
    Op.SET_ALPHA_TARGET: frozenset({"op", "slot", "alpha_target", "alpha_speed", "alpha_curve"}),
    Op.ADVANCE: frozenset({"op", "slot"}),
    Op.PRUNE: frozenset({"op", "slot"}),
    Op.FOSSILIZE: frozenset({"op", "slot"}),
}


@dataclass(frozen=True)
class FactoredAction:
    """One decision of the growth policy, one index per head."""

    op: Op = Op.WAIT
    slot: int = 0
    blueprint: Blueprint = Blueprint.NOOP
    style: Style = Style.RESIDUAL
    tempo: Tempo = Tempo.STANDARD
    alpha_target: AlphaTarget = AlphaTarget.FULL
    alpha_speed: AlphaSpeed = AlphaSpeed.MEDIUM
    alpha_curve: AlphaCurve = AlphaCurve.LINEAR

    def as_indices(self) -> dict[str, int]:
        return {head: int(getattr(self, head)) for head in HEADS}

    def names(self) -> dict[str, str]:
        """Every head by name (the slot as its index), as the flight recorder stores actions."""
        return {h: str(self.slot) if h == "slot" else getattr(self, h).name for h in HEADS}

    @classmethod
    def from_names(cls, names: dict[str, str]) -> FactoredAction:
        """The inverse of `names` (a recorded action, replayed)."""
        return cls(
            op=Op[names["op"]],
            slot=int(names["slot"]),
            blueprint=Blueprint[names["blueprint"]],
            style=Style[names["style"]],
            tempo=Tempo[names["tempo"]],
            alpha_target=AlphaTarget[names["alpha_target"]],
            alpha_speed=AlphaSpeed[names["alpha_speed"]],
            alpha_curve=AlphaCurve[names["alpha_curve"]],
        )
