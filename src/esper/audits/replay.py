"""Candidates of an audit and how a retrain replays them (paper §5.3).

A candidate is one germination of a recorded run together with what the run did to it: its
germinate action with every head and its seed spec, and its fate, every later op on that seed at
its tick. `ReplayPolicy` is the policy of a coalition retrain (`retrain.subset_value`): it plays
exactly the enabled candidates, as recorded.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from esper.contracts import Blueprint, FactoredAction, Observation, Op, SeedSpec
from esper.contracts.errors import ConfigError, EsperError
from esper.recorder import EventRecord, RunStore
from esper.tamiyo.masks import action_masks, illegal_reason
from esper.tamiyo.policies import Decision
from esper.tolaria.environment import EnvConfig, germination_spec

MAX_CANDIDATES = 3
"""2^3 subsets × R repeats retrains is the Phase 1 budget (paper §5.3)."""
FATE_KINDS = ("advance", "set_alpha_target", "fossilize", "prune", "governor_lobotomy")
"""The events after a germination that make up the seed's fate."""


# ---------------------------------------------------------------------------------------------
# Candidates, read from a recorded run
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Candidate:
    """One germination to audit: a player of the game, with what the source run did to it.

    Its key (slot, blueprint, tick) names it in tables and labels; `germination` and `fate` fix
    how it is replayed, so they are part of its identity (and of the retrain cache's key)."""

    slot: str
    blueprint: str
    """Blueprint name, e.g. "CONV_LIGHT"."""
    germinate_tick: int
    germination: str = ""
    """JSON {"action": every head, "spec": the seed's knobs} of the recorded germination ("":
    the defaults of the blueprint, as in runs recorded before heads were)."""
    fate: tuple[tuple[int, str], ...] = ()
    """(tick, JSON action heads) of each later op on this seed in the source run: ADVANCE,
    SET_ALPHA_TARGET, FOSSILIZE, PRUNE (a governor's removal replays as a PRUNE)."""
    event_id: int | None = field(default=None, compare=False)
    """The source run's germinate event, labelled with the result."""
    source: str | None = field(default=None, compare=False)
    """The source run directory."""

    @property
    def key(self) -> str:
        return f"{self.slot}:{self.blueprint}@{self.germinate_tick}"

    @classmethod
    def advancing(cls, slot: str, blueprint: str, tick: int, advances: int = 3) -> Candidate:
        """A hand-made candidate (no source run): germinated at `tick`, then ADVANCEd on each of
        the next `advances` ticks (each retried until legal): TRAINING, BLENDING, HOLDING."""
        advance = json.dumps({"op": "ADVANCE"})
        return cls(
            slot, blueprint, tick, fate=tuple((tick + 1 + i, advance) for i in range(advances))
        )

    @property
    def cache_key(self) -> str:
        """`key` plus a digest of how it is replayed."""
        body = json.dumps([self.germination, self.fate]).encode()
        return f"{self.key}#{hashlib.sha256(body).hexdigest()[:12]}"

    def germinate_action(
        self, slot_index: int, env: EnvConfig | None = None
    ) -> tuple[FactoredAction, SeedSpec]:
        """The recorded germination as an action on `slot_index`, and the seed an environment
        of config `env` germinates from it, which must be the recorded one."""
        recorded = json.loads(self.germination) if self.germination else {}
        action = (
            replace(FactoredAction.from_names(recorded["action"]), slot=slot_index)
            if "action" in recorded
            else FactoredAction(Op.GERMINATE, slot=slot_index, blueprint=Blueprint[self.blueprint])
        )
        spec = germination_spec(action, env or EnvConfig())  # what the engine germinates
        if "spec" in recorded and SeedSpec.from_dict(recorded["spec"]) != spec:
            raise AuditReplayError(f"candidate {self.key}: its recorded knobs cannot be replayed")
        return action, spec


def candidate_of(store: RunStore, event: EventRecord, source: str | None = None) -> Candidate:
    """The germinate `event` of a recorded run as a candidate: its heads, knobs and fate."""
    if event.slot is None:
        raise ValueError(f"germinate event {event.id} names no slot")
    payload = event.payload
    recorded = {k: payload[k] for k in ("action", "spec") if k in payload}
    germination = json.dumps(recorded, sort_keys=True) if recorded else ""
    fate = []
    for e in store.events(env=event.env, since_tick=event.tick):
        if e.id <= event.id or e.slot != event.slot:
            continue
        if e.kind == "germinate":
            break  # the slot's next seed
        if e.kind in FATE_KINDS and e.payload.get("seed_id") == payload.get("seed_id"):
            if e.kind == "governor_lobotomy":  # the source's governor removed it: a prune
                names = {"op": "PRUNE"}
            else:  # records before op events carried their heads name the op by the kind
                names = e.payload.get("action") or {"op": e.kind.upper()}
            fate.append((e.tick, json.dumps(names, sort_keys=True)))
    return Candidate(
        event.slot, payload["blueprint"], event.tick, germination, tuple(fate), event.id, source
    )


def candidates_from_run(run_dir: str | Path, limit: int = MAX_CANDIDATES) -> list[Candidate]:
    """The first `limit` (≤ 3) germinations of a recorded run, one per slot (a later
    re-germination of a slot could not coexist with the first in a retrain)."""
    if not 1 <= limit <= MAX_CANDIDATES:
        raise ConfigError(f"limit must be in 1..{MAX_CANDIDATES}, got {limit}")
    out: list[Candidate] = []
    with RunStore.open(Path(run_dir)) as store:
        for e in store.events("germinate"):
            if e.slot is None or any(c.slot == e.slot for c in out):
                continue
            out.append(candidate_of(store, e, str(run_dir)))
            if len(out) == limit:
                break
    return out


# ---------------------------------------------------------------------------------------------
# Replaying them in a retrain
# ---------------------------------------------------------------------------------------------


class AuditReplayError(EsperError, RuntimeError):
    """A retrain cannot replay its candidates (e.g. the governor removed an audited seed)."""


class ReplayPolicy:
    """The policy of a coalition retrain: at the tick a candidate germinated in the source run,
    the same GERMINATE (every head, every knob), chosen where the source's policy chose it, after
    that tick's training; then the candidate's recorded fate, each op at its recorded tick. An
    op not yet legal in the retrain (G2 not passed, ramp unfinished) is retried every tick until
    it is; a germination goes first when both are due. What never happened is `unreached`."""

    name = "replay"

    def __init__(
        self, enabled: Sequence[Candidate], slots: Sequence[str], env: EnvConfig | None = None
    ) -> None:
        missing = [c.key for c in enabled if c.slot not in slots]
        if missing:
            raise ConfigError(f"candidates {missing}: the host has no such slot ({list(slots)})")
        self.slots, self.env = list(slots), env
        self.germinations = sorted(enabled, key=lambda c: (c.germinate_tick, c.slot))
        self.late: list[str] = []
        fate = [(tick, c, self._action(c, names)) for c in enabled for tick, names in c.fate]
        self.pending = sorted(fate, key=lambda x: x[0])  # (recorded tick, candidate, action)
        self.live: dict[str, Candidate] = {}  # slot -> its candidate, between germinate and prune

    def _index(self, c: Candidate) -> int:
        return self.slots.index(c.slot)

    def _action(self, c: Candidate, names: str) -> FactoredAction:
        """A recorded op (heads by name; older records name the op only) on `c`'s slot."""
        recorded = {**FactoredAction().names(), **json.loads(names)}
        return replace(FactoredAction.from_names(recorded), slot=self._index(c))

    def act(self, obs: Observation) -> Decision:
        self._check_alive(obs)
        if self.germinations and self.germinations[0].germinate_tick <= obs.tick:
            c = self.germinations.pop(0)
            if c.germinate_tick < obs.tick:  # two recorded at one tick (hand-made candidates)
                self.late.append(f"{c.key}: germinated at tick {obs.tick}")
            action, _ = c.germinate_action(self._index(c), self.env)
            self.live[c.slot] = c
            return self._decide(obs, action, f"replay: germinate {c.key}")
        for i, (tick, c, action) in enumerate(self.pending):
            if tick > obs.tick:
                break
            if c.slot in self.live and illegal_reason(action, obs) is None:
                del self.pending[i]
                if action.op is Op.PRUNE:
                    del self.live[c.slot]
                return self._decide(obs, action, f"replay: {action.op.name} {c.key} (tick {tick})")
        return self._decide(obs, FactoredAction(), "replay: nothing due")

    def _check_alive(self, obs: Observation) -> None:
        """A candidate's seed that left its slot without a replayed PRUNE was removed by the
        governor: its v(S) would silently be another coalition's, so the job fails loudly."""
        for c in self.live.values():
            s = obs.slots[self._index(c)]
            if s.seed_id is None or s.stage.name in ("PRUNED", "EMBARGOED", "RESETTING"):
                raise AuditReplayError(
                    f"the governor removed audited seed {c.key} at tick {obs.tick} of the retrain"
                )

    def _decide(self, obs: Observation, action: FactoredAction, reason: str) -> Decision:
        slot = action.slot if action.op is not Op.WAIT else None
        return Decision(action, action_masks(obs, action.op, slot), reason=reason)

    @property
    def unreached(self) -> tuple[str, ...]:
        """What did not happen as recorded: fate ops that never ran (beyond the budget, or never
        legal), germinations that came late or not at all."""
        return (
            *self.late,
            *(
                f"{c.key}: germination recorded at tick {c.germinate_tick}"
                for c in self.germinations
            ),
            *(f"{c.key}: {a.op.name} recorded at tick {tick}" for tick, c, a in self.pending),
        )

    def state_dict(self) -> dict[str, Any]:
        return {}  # a retrain is never resumed: its run lives in a temporary directory

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass
