"""What the flight recorder stores: event, decision and checkpoint records, and their JSON form."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

DECISION = "decision"
"""Event kind of a Tamiyo decision; its payload is a `DecisionRecord` less `env` and `tick`."""


# ------------------------------------------------------------------------------------------------
# Canonical JSON
# ------------------------------------------------------------------------------------------------
# NaN and ±inf are written as the bare tokens NaN / Infinity / -Infinity (allow_nan=True) rather
# than as strings: a diverging loss or observation is exactly what the recorder must keep, and the
# tokens read back to the same floats, so round trips stay exact. The cost: SQLite's json1 reads
# them only from 3.42 on (as JSON5); older SQLite rejects those rows in json_extract.


def to_json(value: Any) -> str:
    """Canonical JSON: sorted keys, no spaces, so equal content gives equal text and hashes."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=True, default=_plain)


def from_json(text: str) -> Any:
    """The inverse of `to_json` for JSON-native values (tuples come back as lists)."""
    return json.loads(text)


def _plain(value: Any) -> Any:
    # numpy and torch scalars and arrays, which the engine hands over as often as plain floats.
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON-serialisable")


# ------------------------------------------------------------------------------------------------
# Records
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EventRecord:
    """One immutable event, with the labels joined to it later (empty when none)."""

    id: int
    tick: int
    env: int
    kind: str
    slot: str | None
    payload: dict[str, Any]
    labels: dict[str, float | dict[str, Any]]


@dataclass(frozen=True)
class CheckpointRecord:
    """A checkpoint file written at `tick`; the file itself belongs to the engine."""

    tick: int
    path: str
    sha256: str


@dataclass(frozen=True, kw_only=True)
class DecisionRecord:
    """One Tamiyo decision for one environment (paper §8.1, the planned fields included).

    Advantage, Shapley φ and long-horizon outcomes are not fields: they are labels joined later
    by the decision's event id (`RunStore.attach_label`).
    """

    env: int
    tick: int
    policy: str
    """Name of the policy that decided (e.g. "heuristic", "ppo")."""
    action: dict[str, str]
    """Head -> chosen value name, for all eight heads."""
    slot_states: list[dict[str, Any]]
    """Each slot's state at decision time (stage, α, blueprint, ...), in slot order."""
    obs_before: list[float] | None
    """The observation the policy saw."""
    obs_after: list[float] | None
    """The observation after the action took effect (diagnoses "obs off by one")."""
    mask: dict[str, list[bool]]
    """Head -> legal values, as applied when sampling."""
    probs: dict[str, list[float]]
    """Head -> full probability vector after masking."""
    entropy: dict[str, float]
    """Head -> entropy of that head's distribution (nats)."""
    value: float | None
    """The critic's V(s); None for policies without one."""
    reward: float | None
    """The tick's reward for this environment; None when not yet known."""
    spec_versions: dict[str, str]
    """Identifiers of the obs spec, reward spec, blueprint library and host manifest."""

    def to_payload(self) -> dict[str, Any]:
        """Every field but `env` and `tick`, which the events table holds as columns."""
        payload = asdict(self)
        del payload["env"], payload["tick"]
        return payload

    @classmethod
    def from_event(cls, event: EventRecord) -> DecisionRecord:
        """The decision stored in a "decision" event."""
        return cls(env=event.env, tick=event.tick, **event.payload)
