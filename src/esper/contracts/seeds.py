"""What a seed is made of (blueprint, style, §9.7 knobs) and what a slot reports about itself."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from esper.contracts.actions import AlphaCurve, Blueprint, Style, Topology
from esper.contracts.lifecycle import Stage

# Paper §9.7 knob options; the policy picks among these, the library accepts any positive value.
HEAD_COUNTS = (1, 2, 4, 8)
CHANNEL_WIDTHS = (0.25, 0.5, 1.0, 2.0)
LR_MULTIPLIERS = (0.1, 0.5, 1.0, 2.0)
WARMUP_TICKS = (0, 1, 3, 5)


@dataclass(frozen=True)
class SeedSpec:
    """Everything needed to rebuild a seed module from scratch (besides its weights)."""

    blueprint: Blueprint
    style: Style = Style.RESIDUAL
    head_count: int = 2
    """Attention heads (ATTENTION on sequences)."""
    channel_width: float = 1.0
    """Multiplier on the seed's hidden width relative to the slot's channels."""
    lr_multiplier: float = 1.0
    """The seed's learning rate relative to the host's (its optimizer parameter group)."""
    warmup_ticks: int = 0
    """Ticks in BLENDING before α starts to ramp."""

    def __post_init__(self) -> None:
        if self.head_count < 1:
            raise ValueError(f"head_count must be >= 1, got {self.head_count}")
        if self.channel_width <= 0:
            raise ValueError(f"channel_width must be > 0, got {self.channel_width}")
        if self.lr_multiplier <= 0:
            raise ValueError(f"lr_multiplier must be > 0, got {self.lr_multiplier}")
        if self.warmup_ticks < 0:
            raise ValueError(f"warmup_ticks must be >= 0, got {self.warmup_ticks}")

    def to_dict(self) -> dict[str, object]:
        return {
            "blueprint": self.blueprint.name,
            "style": self.style.name,
            "head_count": self.head_count,
            "channel_width": self.channel_width,
            "lr_multiplier": self.lr_multiplier,
            "warmup_ticks": self.warmup_ticks,
        }

    @classmethod
    def from_dict(cls, d: dict[str, object]) -> SeedSpec:
        return cls(
            blueprint=Blueprint[str(d["blueprint"])],
            style=Style[str(d["style"])],
            head_count=int(d["head_count"]),  # type: ignore[arg-type]
            channel_width=float(d["channel_width"]),  # type: ignore[arg-type]
            lr_multiplier=float(d["lr_multiplier"]),  # type: ignore[arg-type]
            warmup_ticks=int(d["warmup_ticks"]),  # type: ignore[arg-type]
        )


@dataclass(frozen=True)
class SlotTelemetry:
    """One slot's state as the policy sees it (paper §3, §6). Plain numbers, no tensors."""

    name: str
    stage: Stage
    ticks_in_stage: int
    alpha: float
    alpha_target: float
    alpha_curve: AlphaCurve
    alpha_ticks_left: int
    seed_grad_norm: float
    host_grad_norm: float
    grad_ratio: float
    param_count: int
    spec: SeedSpec | None
    contribution: float | None = None
    """The seed's α=0 ablation contribution to the validation metric (positive: it helps);
    filled by the engine."""
    contribution_tick: int | None = None
    gate_passed: bool | None = None
    """The last G2 verdict (None: not evaluated since the seed entered TRAINING)."""
    rent: float = 0.0
    """Rent this slot paid last tick, in reward units (filled by the engine)."""
    seed_id: str | None = None
    topology: Topology = Topology.CNN
    """The shape of the features at the slot."""
    channels: int = 0
    """Feature channels at the slot (the host's width there)."""
    depth: float = 0.0
    """Where the slot sits in the host: the fraction of the host's parameters that run before
    it in a forward pass, in [0, 1] (filled by the engine, `kasmina.slot_depths`)."""
    extra: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Observation:
    """What a growth policy sees of one environment at one tick (global part + slots)."""

    tick: int
    max_ticks: int
    metric: float
    """Validation metric now (accuracy, or bits per char for text)."""
    higher_is_better: bool
    val_loss: float
    train_loss: float
    history: tuple[float, ...]
    """Validation metric at each past tick, oldest first (this tick last)."""
    host_params: int
    seed_params: int
    rent_paid: float
    """Rent paid so far in this run (reward units)."""
    slots: tuple[SlotTelemetry, ...]
    legal_blueprints: tuple[tuple[Blueprint, ...], ...]
    """Blueprints each slot's topology supports, in slot order."""
    growth_blocked: str | None = None
    """Why GERMINATE is masked on every slot (a zone over its growth budget or rent ceiling,
    `esper.tolaria.zones`), or None."""


def slot_state(s: SlotTelemetry) -> dict[str, Any]:
    """One slot as a decision record stores it (`slot_states`)."""
    return {
        "name": s.name,
        "stage": s.stage.name,
        "alpha": s.alpha,
        "blueprint": s.spec.blueprint.name if s.spec else None,
        "ticks_in_stage": s.ticks_in_stage,
        "contribution": s.contribution,
        "rent": s.rent,
        # Gradient health and where the slot sits: what a critic of credit reads (simic.critic).
        "seed_grad_norm": s.seed_grad_norm,
        "host_grad_norm": s.host_grad_norm,
        "grad_ratio": s.grad_ratio,
        "param_count": s.param_count,
        "topology": s.topology.value,
        "channels": s.channels,
        "depth": s.depth,
    }


def obs_vector(obs: Observation) -> list[float]:
    """A flat numeric view of the observation (the learned policy defines its own features)."""
    v = [
        obs.tick / obs.max_ticks,
        obs.metric,
        obs.val_loss,
        obs.train_loss,
        float(obs.host_params),
        float(obs.seed_params),
        obs.rent_paid,
    ]
    for s in obs.slots:
        v += [float(s.stage), s.alpha, float(s.ticks_in_stage), s.contribution or 0.0, s.rent]
    return v
