"""Zones (paper §9.6) and Narset's vocabulary (§9.7): who owns which part of the host, what each
zone may spend, and the telemetry the slow allocator reads.

A zone is a named part of the host — slots and phages, by block range or by explicit lists —
with its own Tamiyo–Emrakul pair acting only inside it and its own budgets:

    growth budget   germinations per window (new structure)
    rent ceiling    rent per tick (reward units, W_rent included) above which it cannot germinate
    risk share      its share of the LysisGovernor's global sedation budget (shares sum <= 1)

Names no zone claims form the shared pool: no pair acts there (a widening's channel groups
`stream.w<i>` are always pooled: they span every block).

Narset's input, `ZoneTelemetry`, is scalars computed by the engine: health, productivity, waste
and uncertainty. It has no topology, seed inventory or slot stages, by construction (tested).
Pure Python, no torch.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from esper.contracts.errors import ConfigError
from esper.contracts.lifecycle import LifecycleError

# ---------------------------------------------------------------------------------------------
# Config: the zone file (`esper grow --zones FILE`) and the `[zones]` table of a grow config
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ZoneSpec:
    """One zone: what it owns and its starting budgets."""

    name: str
    blocks: tuple[int, ...] = ()
    """[first, last] block index, inclusive (the host stream's index: a CNN's residual block,
    a transformer's attention or MLP sublayer, 2·layer and 2·layer + 1): its slots and its host
    phages (`blocks.<i>`, `layers.<i>`). Empty: only the explicit lists."""
    slots: tuple[str, ...] = ()
    """Slot names it owns besides the range (a committed seed's phage follows its slot)."""
    phages: tuple[str, ...] = ()
    """Host phage names it owns besides the range."""
    growth_budget: int = 1
    """Germinations per window."""
    rent_ceiling: float = 1.0
    """Rent per tick (reward units) above which the zone cannot germinate."""
    risk_share: float = 0.5
    """Share of the global sedation budget (`lysis.sedation_budget`) its Emrakul may use."""

    def __post_init__(self) -> None:
        if not self.name or self.name == POOL:
            raise ConfigError(f"a zone needs a name other than {POOL!r}, got {self.name!r}")
        if self.blocks and (len(self.blocks) != 2 or not 0 <= self.blocks[0] <= self.blocks[1]):
            raise ConfigError(f"zone {self.name!r}: blocks must be [first, last], first <= last")
        if not self.blocks and not self.slots and not self.phages:
            raise ConfigError(f"zone {self.name!r} owns nothing: give blocks, slots or phages")
        if self.growth_budget < 0 or not self.rent_ceiling >= 0:
            raise ConfigError(f"zone {self.name!r}: growth_budget and rent_ceiling must be >= 0")
        if not 0 <= self.risk_share <= 1:
            raise ConfigError(f"zone {self.name!r}: risk_share must lie in [0, 1]")


@dataclass(frozen=True)
class NarsetConfig:
    """The allocator's knobs (`esper.narset`): a projected dual ascent on each zone's price."""

    enabled: bool = True
    """False: the zones keep their configured budgets (fixed budgets)."""
    step: float = 0.5
    """η: price change per unit of rent over-utilisation (rent / ceiling − 1)."""
    productivity_weight: float = 0.5
    """κ: price change per unit of relative productivity (improvement per unit rent against the
    zones' mean, in [−1, 1]: a zone more productive than the others gets cheaper)."""
    max_price: float = 10.0
    """λ is kept in [0, max_price]."""
    spike_penalty: float = 0.5
    """Risk share divisor per loss spike or non-finite gradient in the window: 1 / (1 + c·n)."""

    def __post_init__(self) -> None:
        if self.step < 0 or self.productivity_weight < 0 or self.spike_penalty < 0:
            raise ConfigError("narset.step, productivity_weight and spike_penalty must be >= 0")
        if not self.max_price > 0:
            raise ConfigError("narset.max_price must be > 0")


PROBE_KINDS = ("ablate", "freeze")


@dataclass(frozen=True)
class ProbeConfig:
    """Leave-one-zone-out probes (§9.7: against "false boring" zones): every `every` ticks,
    each zone's true contribution, recorded and fed to Narset as its productivity.

        ablate  the tick's evaluation gains one replica per zone with all of that zone's grown
                structure (blended seeds, committed phages) at α=0: contribution = the metric
                it loses (fused into the evaluation: no state is touched)
        freeze  from the tick's end state, train `steps` batches with every parameter outside
                the zone frozen: contribution = the metric that gains; then the whole state
                (weights, optimizer, data order, RNG) is restored exactly
    """

    every: int = 0
    """Ticks between probes (0: no probes)."""
    kind: str = "ablate"
    steps: int = 4
    """freeze: training batches in the probe window."""

    def __post_init__(self) -> None:
        if self.every < 0 or self.steps < 1:
            raise ConfigError("zones.probe.every must be >= 0 and steps >= 1")
        if self.kind not in PROBE_KINDS:
            raise ConfigError(
                f"zones.probe.kind must be one of {', '.join(PROBE_KINDS)}, got {self.kind!r}"
            )


@dataclass(frozen=True)
class ZonesConfig:
    """A zone layout (none: one global pair, the default) and its allocator."""

    zone: tuple[ZoneSpec, ...] = ()
    """The zones; empty turns zones off."""
    window: int = 5
    """W: ticks per budget window (growth budgets reset, Narset updates)."""
    spike_fraction: float = 0.05
    """A tick's validation loss above the previous tick's by this fraction is a loss spike."""
    drift_limit: float = 4.0
    """Boundary contract: a zone's output activations drifting further than this from the
    window's reference (standardised per channel, see `esper.tolaria.zones.drift`) breach it.
    Healthy training of the deep CNN drifts up to ~2.5 in its first window, < 1 later."""
    gain_limit: float = 25.0
    """Boundary contract: the gradient's gain through a zone (its input boundary's gradient norm
    over its output boundary's) outside [1/limit, limit], or not finite, breaches it. The deep
    CNN's late zone (blocks 4–7) reaches gains of ~15 in healthy training."""
    boundary_samples: int = 64
    """Validation samples the boundary contracts are measured on, each tick."""
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    narset: NarsetConfig = field(default_factory=NarsetConfig)

    def __post_init__(self) -> None:
        names = [z.name for z in self.zone]
        if len(set(names)) != len(names):
            raise ConfigError(f"zone names must be unique, got {names}")
        if self.window < 1 or not self.spike_fraction > 0:
            raise ConfigError("zones.window must be >= 1 and spike_fraction > 0")
        if not self.drift_limit > 0 or not self.gain_limit > 1 or self.boundary_samples < 1:
            raise ConfigError(
                "zones.drift_limit must be > 0, gain_limit > 1 and boundary_samples >= 1"
            )
        if sum(z.risk_share for z in self.zone) > 1 + 1e-12:
            raise ConfigError(
                "the zones' risk shares sum above the global sedation budget: "
                + " + ".join(f"{z.name} {z.risk_share}" for z in self.zone)
                + " > 1"
            )

    @property
    def enabled(self) -> bool:
        return bool(self.zone)


# ---------------------------------------------------------------------------------------------
# Layout: which zone owns a slot or phage
# ---------------------------------------------------------------------------------------------

POOL = "shared"
"""The pool: every name no zone claims. No pair acts there."""
_HOST_PHAGE = re.compile(r"^(?:blocks|layers)\.(\d+)$")


class ZoneViolation(LifecycleError):
    """A zone's pair acted on something another zone (or the pool) owns."""

    def __init__(self, zone: str, name: str, owner: str) -> None:
        super().__init__(
            f"zone {zone!r} may not act on {name!r}: it belongs to "
            + ("the shared pool" if owner == POOL else f"zone {owner!r}")
        )
        self.zone, self.name, self.owner = zone, name, owner


@dataclass(frozen=True)
class ZoneLayout:
    """The partition of one host: `owner(name)` for a slot, a host phage or a committed seed's
    phage (named after its slot)."""

    zones: tuple[ZoneSpec, ...]
    slot_blocks: Mapping[str, int]
    """Slot name -> block index (the host stream's `slot_blocks`; empty for a user's model)."""

    def __post_init__(self) -> None:
        claimed: dict[str, str] = {}
        for z in self.zones:
            for name in (*self.slots_of(z.name), *z.phages):
                if claimed.setdefault(name, z.name) != z.name:
                    raise ConfigError(f"{name!r} is in zones {claimed[name]!r} and {z.name!r}")

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(z.name for z in self.zones)

    def spec(self, zone: str) -> ZoneSpec:
        return next(z for z in self.zones if z.name == zone)

    def slots_of(self, zone: str) -> tuple[str, ...]:
        """The zone's slots, in the host's slot order."""
        z = self.spec(zone)
        lo, hi = z.blocks if z.blocks else (1, 0)
        ranged = [s for s, b in self.slot_blocks.items() if lo <= b <= hi]
        return tuple(sorted({*ranged, *z.slots}))

    def owner(self, name: str) -> str:
        """The zone owning a slot or phage, or `POOL`."""
        match = _HOST_PHAGE.match(name)
        block = int(match.group(1)) if match else self.slot_blocks.get(name)
        for z in self.zones:
            if name in z.slots or name in z.phages:
                return z.name
            if block is not None and z.blocks and z.blocks[0] <= block <= z.blocks[1]:
                return z.name
        return POOL

    def check(self, zone: str, name: str) -> None:
        """Raise `ZoneViolation` unless `zone` owns `name` (the zones' authority check)."""
        owner = self.owner(name)
        if owner != zone:
            raise ZoneViolation(zone, name, owner)


def layout_of(
    cfg: ZonesConfig, slot_blocks: Mapping[str, int], slots: Iterable[str] = ()
) -> ZoneLayout:
    """The layout of `cfg` on a host whose slots sit after `slot_blocks` (`slots`: every slot
    name, when the host has no stream). ConfigError when a name is claimed twice, a zone names
    a slot the host lacks, or a zone owns no slot."""
    layout = ZoneLayout(cfg.zone, dict(slot_blocks))
    known = set(slots) | set(slot_blocks)
    for z in cfg.zone:
        missing = sorted(set(z.slots) - known)
        if missing:
            raise ConfigError(
                f"zone {z.name!r} names slots {missing} the host does not have "
                f"(its slots: {', '.join(sorted(known))})"
            )
        if not layout.slots_of(z.name):
            raise ConfigError(f"zone {z.name!r} owns no slot of the host")
    return layout


# ---------------------------------------------------------------------------------------------
# Narset's input and output
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ZoneTelemetry:
    """One zone over one window, as the engine measured it: scalars only (paper §9.7's four
    categories). No topology, seed inventory or slot stages: Narset allocates blind."""

    zone: str
    ticks: int
    """Ticks in the window."""
    # health
    loss_spikes: int
    """Ticks whose validation loss rose by more than `spike_fraction` after the zone acted."""
    nonfinite_grads: int
    """Ticks whose gradient norm over the zone's parameters was not finite."""
    grad_norm_p50: float
    grad_norm_p90: float
    """Percentiles over the window's ticks of the zone's gradient norm (last step of a tick)."""
    # productivity
    val_slope: float
    """Least-squares slope of the validation metric over the window, per tick (positive:
    better, whichever way the metric points)."""
    contribution: float
    """Mean over the window of the summed measured contributions (metric units) of what the
    zone grew."""
    improvement_per_rent: float
    """contribution (or, when probed, the probe's) / rent per tick (0 when it paid no rent)."""
    # waste
    rent: float
    """Rent paid in the window (reward units)."""
    churn: float
    """Churn paid in the window (reward units)."""
    rent_utilisation: float
    """Mean rent per tick / the zone's rent ceiling."""
    transitions: int
    """Lifecycle transitions and executed ops in the zone during the window."""
    germinations: int
    # uncertainty
    minibatch_variance: float
    """Mean over the window of the training loss's variance across a tick's minibatches."""
    # boundary contracts (health at the zone's interfaces)
    boundary_drift: float = 0.0
    """Largest drift over the window of the zone's output activations from the window's
    reference (standardised; 0 = unchanged)."""
    boundary_grad: float = 0.0
    """Median over the window of the gradient norm reaching the zone's output boundary."""
    boundary_gain: float = 1.0
    """Median over the window of the gradient's gain through the zone (1 for the first zone:
    nothing upstream is measured)."""
    boundary_breaches: int = 0
    """Ticks whose drift or gain broke the boundary contract (`drift_limit`, `gain_limit`)."""
    # leave-one-zone-out probe
    probed: int = 0
    """1 when a probe measured the zone in this window (then `improvement_per_rent` uses it)."""
    probe_contribution: float = 0.0
    """The window's last probe: the zone's measured contribution (metric units, signed as
    better), 0 when not probed."""


TELEMETRY_KINDS = (int, float, str)
"""The only value types `ZoneTelemetry` may hold (no tuples or mappings to smuggle a topology)."""


@dataclass(frozen=True)
class ZoneBudgets:
    """What Narset (or the fixed config) allows a zone for the next window."""

    growth_budget: int
    rent_ceiling: float
    risk_share: float
    price: float = 0.0
    """λ, the zone's price on cost (Lagrange multiplier of its rent ceiling)."""

    def to_dict(self) -> dict[str, float]:
        return {
            "growth_budget": self.growth_budget,
            "rent_ceiling": self.rent_ceiling,
            "risk_share": self.risk_share,
            "price": self.price,
        }


def budgets_of(zones: Iterable[ZoneSpec]) -> dict[str, ZoneBudgets]:
    """The configured (starting) budgets of each zone, price 0."""
    return {z.name: ZoneBudgets(z.growth_budget, z.rent_ceiling, z.risk_share) for z in zones}
