"""Forensic replay and counterfactuals (paper §8.2): fork a recorded run at tick T, with or without
a different action at T, and say where two runs diverge.

    fork = the source's record of ticks 0..c copied, its checkpoint after tick c loaded (c < T;
           none: the fork starts from tick 0, as the source did)
         → ticks c+1 .. T-1 played again by the same `GrowthRun.step` and `Episode`, the policy
           called on each, its observation and choice checked against the source's record (so a
           stateful policy such as the heuristic is in its source state at T)
         → tick T: the policy is called, then overruled by the injected action, if any
         → the rest of the run under the same policy, as `esper grow` plays it

Without injection the fork's record is the source's, bit for bit (events, metrics, weights), as a
resumed run's is. The source is only read. A fork is an ordinary run directory (its manifest
names its source under `fork`): `esper show`, `esper diff`, `esper grow --resume` all take it.
"""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from typing import Any

from esper.config import config_from_dict
from esper.contracts import (
    HEADS,
    RELEVANT_HEADS,
    AlphaCurve,
    AlphaSpeed,
    AlphaTarget,
    Blueprint,
    FactoredAction,
    Observation,
    Op,
    Style,
    Tempo,
    obs_vector,
)
from esper.contracts.errors import EsperError
from esper.contracts.files import atomic_write
from esper.recorder import DECISION, CheckpointRecord, DecisionRecord, EventRecord, RunStore
from esper.recorder.records import to_json
from esper.run import GrowResult, GrowthRun, checkpoint_before, load_checkpoint, start_run
from esper.tamiyo.masks import action_masks, illegal_reason
from esper.tamiyo.policies import Decision, Policy

INJECTED = "injected"
"""The `policy` a fork's decision record names at its injected tick."""


class ReplayError(EsperError):
    """A replay that cannot be made: a tick out of range, a malformed or illegal injected action,
    or a replay that does not reproduce its source (the message names the tick)."""


# ---------------------------------------------------------------------------------------------
# Actions as text: `op=PRUNE,slot=b1`
# ---------------------------------------------------------------------------------------------

_HEAD_ENUMS: dict[str, type[IntEnum]] = {
    "op": Op,
    "blueprint": Blueprint,
    "style": Style,
    "tempo": Tempo,
    "alpha_target": AlphaTarget,
    "alpha_speed": AlphaSpeed,
    "alpha_curve": AlphaCurve,
}


def parse_action(text: str, slots: list[str]) -> dict[str, str]:
    """Heads named in `text` ("head=value,..."; a slot by name, last part of its name, or index;
    other values by enum name, any case) as `FactoredAction.names()` writes them."""
    heads: dict[str, str] = {}
    for part in text.split(","):
        head, sep, value = (p.strip() for p in part.partition("="))
        if not sep or not head or not value:
            raise ReplayError(
                f"--inject {text!r}: expected head=value[,head=value...], e.g. op=PRUNE,slot=b1"
            )
        if head not in HEADS:
            raise ReplayError(f"--inject: unknown head {head!r}; valid: {', '.join(HEADS)}")
        if head in heads:
            raise ReplayError(f"--inject: head {head!r} given twice")
        heads[head] = _slot_index(value, slots) if head == "slot" else _member(head, value)
    return heads


def _member(head: str, value: str) -> str:
    names = _HEAD_ENUMS[head].__members__
    if value.upper() not in names:
        raise ReplayError(f"--inject: {head}={value} is not one of {', '.join(names)}")
    return value.upper()


def _slot_index(value: str, slots: list[str]) -> str:
    short = [s.rsplit(".", 1)[-1] for s in slots]
    if value in slots:
        return str(slots.index(value))
    if short.count(value) == 1:
        return str(short.index(value))
    if value.isdigit() and int(value) < len(slots):
        return value
    raise ReplayError(f"--inject: no slot {value!r}; the run's slots: {', '.join(short)}")


def _inject_text(heads: Mapping[str, str], slots: list[str]) -> str:
    """Parsed heads back in `--inject` syntax (the slot by its short name)."""
    short = {h: slots[int(v)].rsplit(".", 1)[-1] if h == "slot" else v for h, v in heads.items()}
    return ",".join(f"{h}={v}" for h, v in short.items())


def format_action(heads: Mapping[str, str], slots: list[str]) -> str:
    """An action in `--inject` syntax: its op, its slot, and the other heads its op uses where
    they differ from the defaults."""
    op = Op[heads["op"]]
    default = FactoredAction().names()
    shown = [f"op={op.name}"]
    if op is not Op.WAIT:
        shown.append(f"slot={slots[int(heads['slot'])].rsplit('.', 1)[-1]}")
    shown += [
        f"{h}={heads[h]}"
        for h in HEADS
        if h not in ("op", "slot") and h in RELEVANT_HEADS[op] and heads[h] != default[h]
    ]
    return ",".join(shown)


def overrule(chosen: FactoredAction, inject: Mapping[str, str]) -> FactoredAction:
    """The injected heads over the policy's choice; the heads the resulting op does not use are
    reset to their defaults, as the policies leave them."""
    heads = {**chosen.names(), **inject}
    default = FactoredAction().names()
    used = RELEVANT_HEADS[Op[heads["op"]]]
    return FactoredAction.from_names({h: v if h in used else default[h] for h, v in heads.items()})


# ---------------------------------------------------------------------------------------------
# The source's policy in a fork: checked up to T, overruled at T
# ---------------------------------------------------------------------------------------------


class ForkedPolicy:
    """The source run's policy, checked against its record before `from_tick` and overruled by
    the injected heads at `from_tick`. It is called on every tick as in the source (at T too, so
    its state and random streams stay the source's), and its state is the policy's, so the
    fork's checkpoints resume as any run's."""

    def __init__(
        self,
        policy: Policy,
        record: Mapping[int, DecisionRecord],
        from_tick: int,
        inject: Mapping[str, str] | None,
        slots: list[str],
    ) -> None:
        self.policy, self.record, self.from_tick = policy, record, from_tick
        self.inject, self.slots = inject, slots
        self.name = policy.name

    def act(self, obs: Observation) -> Decision:
        t, decision = obs.tick, self.policy.act(obs)
        if t > self.from_tick:
            return decision
        source = self.record[t]
        if to_json(obs_vector(obs)) != to_json(source.obs_before):
            raise ReplayError(
                f"tick {t}: the replayed observation differs from the source's record, so the "
                "replay does not reproduce it (same Esper, libraries, device and threads?)"
            )
        chosen = decision.action.names()
        if t < self.from_tick and chosen != source.action:
            raise ReplayError(
                f"tick {t}: the {self.name} policy chose {format_action(chosen, self.slots)} on "
                f"replay, the source recorded {format_action(source.action, self.slots)}"
            )
        if t < self.from_tick or self.inject is None:
            return decision
        action = overrule(decision.action, self.inject)
        why = illegal_reason(action, obs)
        if why is not None:
            injected = format_action(action.names(), self.slots)
            raise ReplayError(f"the injected action {injected} is illegal at tick {t}: {why}")
        reason = f"injected; the {self.name} policy chose {format_action(chosen, self.slots)}"
        masks = action_masks(obs, action.op, None if action.op is Op.WAIT else action.slot)
        return Decision(
            action,
            masks,
            probs=decision.probs,
            entropy=decision.entropy,
            value=decision.value,
            reason=f"{reason} ({decision.reason})" if decision.reason else reason,
            by=INJECTED,
        )

    def state_dict(self) -> dict[str, Any]:
        return self.policy.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.policy.load_state_dict(state)


# ---------------------------------------------------------------------------------------------
# Forking a run
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Source:
    """What a fork reads of its source, read once (the source's store is then closed)."""

    path: Path
    manifest: dict[str, Any]
    events: list[EventRecord]
    metrics: dict[int, dict[str, float]]
    checkpoints: list[CheckpointRecord]
    start: CheckpointRecord | None
    """The last checkpoint before the fork's tick (None: replay from tick 0)."""
    event_log_hash: str

    @property
    def decisions(self) -> dict[int, DecisionRecord]:
        return {
            e.tick: DecisionRecord.from_event(e)
            for e in self.events
            if e.kind == DECISION and e.env == 0
        }


def _read_source(source: Path, from_tick: int) -> _Source:
    with RunStore.open(source) as store:
        last = store.last_complete_tick()
        if last is None:
            raise ReplayError(f"run {source} recorded no complete tick: nothing to replay")
        if not 0 <= from_tick <= last:
            raise ReplayError(
                f"--from {from_tick} is out of range: run {source} recorded ticks 0..{last}"
            )
        return _Source(
            path=source,
            manifest=store.manifest(),
            events=store.events(),
            metrics=dict(store.metrics()),
            checkpoints=store.checkpoints(),
            start=checkpoint_before(store, from_tick),
            event_log_hash=store.event_log_hash(),
        )


def default_fork_dir(source: Path, from_tick: int) -> Path:
    """`SOURCE-replay-tT` beside the source (`-1`, `-2`, ... when taken)."""
    base = source.parent / f"{source.name}-replay-t{from_tick}"
    path, i = base, 1
    while path.exists():
        path, i = Path(f"{base}-{i}"), i + 1
    return path


def fork_run(
    source: str | Path, from_tick: int, inject: str | None = None, out: str | Path | None = None
) -> GrowthRun:
    """A new run at `out` forked from `source` at tick `from_tick`, ready to play (`play_fork`):
    its record up to the source's checkpoint before T copied and that checkpoint loaded. Bad
    input (a tick out of range, a malformed `inject`, an existing `out`) creates nothing."""
    source = Path(source)
    src = _read_source(source, from_tick)
    cfg = config_from_dict(src.manifest["config"])
    if cfg.task == "custom":
        raise ReplayError(
            f"{source} grew a user's module (esper.grow), which cannot be rebuilt from its config"
        )
    if cfg.zones.enabled:
        raise ReplayError(
            f"{source} ran with zones (a policy per zone): replay does not fork those yet"
        )
    record = src.decisions
    if from_tick not in record:
        raise ReplayError(f"run {source} recorded no decision at tick {from_tick} (env 0)")
    slots = [s["name"] for s in record[from_tick].slot_states]
    heads = parse_action(inject, slots) if inject is not None else None
    out = Path(out) if out is not None else default_fork_dir(source, from_tick)
    if out.exists():
        raise ReplayError(f"{out} already exists: give the fork a new --out")
    if out.resolve().is_relative_to(source.resolve()):
        raise ReplayError(f"{out} is inside the source run {source}, which a replay only reads")
    start = src.start.tick if src.start is not None else -1
    fork = {
        "source": str(source.resolve()),
        "source_event_log_hash": src.event_log_hash,
        "from_tick": from_tick,
        "checkpoint_tick": start,
        "inject": None if heads is None else _inject_text(heads, slots),
    }
    run = start_run(cfg, run_dir=out, provenance={"fork": fork})
    try:
        _copy_record(src, run, start)
        if src.start is not None:
            run.load(*load_checkpoint(source, src.start, run.env.device))
    except BaseException:
        _discard(run)
        raise
    run.policy = ForkedPolicy(run.policy, record, from_tick, heads, slots)
    run.checkpoint_also.add(from_tick)  # a fork resumed later never replays its injection
    return run


def _copy_record(src: _Source, run: GrowthRun, upto: int) -> None:
    """The source's ticks 0..`upto` into the fork, one transaction per tick as they were
    written: events in order (labels are not copied: they judge the source's future), metrics,
    and the checkpoints with their files, each checked against its recorded hash."""
    for t in range(upto + 1):
        with run.store.tick(t) as tx:
            tx.metrics(src.metrics.get(t, {}))
            for e in (e for e in src.events if e.tick == t):
                tx.event(e.kind, e.payload, slot=e.slot, env=e.env)
            for ck in (c for c in src.checkpoints if c.tick == t):
                body = (src.path / ck.path).read_bytes()
                if hashlib.sha256(body).hexdigest() != ck.sha256:
                    raise ReplayError(f"{src.path / ck.path} does not match its recorded hash")
                atomic_write(run.run_dir / ck.path, lambda tmp, b=body: tmp.write_bytes(b))
                tx.checkpoint(ck.path, ck.sha256)


def _discard(run: GrowthRun) -> None:
    run.store.close()
    shutil.rmtree(run.run_dir, ignore_errors=True)


def play_fork(
    run: GrowthRun, progress: Callable[[int, dict[str, float]], None] | None = None
) -> GrowResult:
    """Play a fork (`fork_run`) to its end. A fork that fails before its injected tick is
    complete (a replay that does not reproduce its source, an illegal injected action, an
    interrupt) is removed; after it, it is an ordinary run that `esper grow --resume` continues."""
    assert isinstance(run.policy, ForkedPolicy), "play_fork plays what fork_run made"
    try:
        return run.run(progress)
    except BaseException:
        if run.episode.t <= run.policy.from_tick:
            _discard(run)
        raise


def replay(
    source: str | Path,
    from_tick: int,
    inject: str | None = None,
    out: str | Path | None = None,
    progress: Callable[[int, dict[str, float]], None] | None = None,
) -> GrowResult:
    """Fork `source` at tick `from_tick` (with the action `inject` there, e.g. "op=PRUNE,slot=b1")
    and play the fork to the end; its result (`result.run_dir` is the fork)."""
    run = fork_run(source, from_tick, inject, out)
    try:
        return play_fork(run, progress)
    finally:
        run.store.close()


# ---------------------------------------------------------------------------------------------
# Where two runs diverge
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TickDiff:
    """One tick of two runs side by side (a value is None where that run has no such tick)."""

    tick: int
    decisions: tuple[str | None, str | None]
    """Each run's action in `--inject` syntax, `*` marking an injected one."""
    slots: list[tuple[str, str, str]]
    """(slot, state in A, state in B) of each slot whose stage or blueprint differs at decision
    time (a state is "STAGE BLUEPRINT")."""
    metric: tuple[float | None, float | None]
    params: tuple[int | None, int | None]
    """Host plus seed parameters after the tick."""
    same_events: bool
    """The tick's events, decisions included, are equal (kind, slot, payload)."""


@dataclass(frozen=True)
class RunDiff:
    """Where run B departs from run A: first differing decision, events and metrics, and the
    topology and metric of both, tick by tick."""

    a: Path
    b: Path
    config: dict[str, tuple[Any, Any]]
    """Dotted config key -> (A's value, B's) for each key that differs."""
    forks: list[tuple[str, dict[str, Any]]]
    """("A" or "B", its manifest's `fork`) for each run that is a fork."""
    first_decision: int | None
    first_event: int | None
    first_metric: int | None
    ticks: list[TickDiff]

    @property
    def first_divergence(self) -> int | None:
        found = [
            t for t in (self.first_decision, self.first_event, self.first_metric) if t is not None
        ]
        return min(found) if found else None


@dataclass(frozen=True)
class _Record:
    manifest: dict[str, Any]
    decisions: dict[int, DecisionRecord]
    events: dict[int, list[tuple[str, str | None, str]]]
    metrics: dict[int, dict[str, float]]
    slots: list[str]


def _read_record(path: Path) -> _Record:
    with RunStore.open(path) as store:
        manifest, metrics, events = store.manifest(), dict(store.metrics()), store.events(env=0)
    decisions = {e.tick: DecisionRecord.from_event(e) for e in events if e.kind == DECISION}
    by_tick: dict[int, list[tuple[str, str | None, str]]] = {}
    for e in events:
        by_tick.setdefault(e.tick, []).append((e.kind, e.slot, to_json(e.payload)))
    first = decisions[min(decisions)] if decisions else None
    slots = [s["name"] for s in first.slot_states] if first else []
    return _Record(manifest, decisions, by_tick, metrics, slots)


def _flat(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, Mapping) else {f"{prefix}{k}": v})
    return out


def _decision_text(rec: _Record, t: int) -> str | None:
    d = rec.decisions.get(t)
    if d is None:
        return None
    return format_action(d.action, rec.slots) + (" *" if d.policy == INJECTED else "")


def _slot_text(rec: _Record, t: int) -> dict[str, str]:
    d = rec.decisions.get(t)
    states = d.slot_states if d is not None else []
    return {
        s["name"].rsplit(".", 1)[-1]: f"{s['stage']} {s['blueprint'] or ''}".strip() for s in states
    }


def _tick_diff(a: _Record, b: _Record, t: int) -> TickDiff:
    sa, sb = _slot_text(a, t), _slot_text(b, t)
    slots = [(n, sa.get(n, "—"), sb.get(n, "—")) for n in {**sa, **sb} if sa.get(n) != sb.get(n)]
    ma, mb = a.metrics.get(t), b.metrics.get(t)

    def params(m: dict[str, float] | None) -> int | None:
        return None if m is None else int(m["host_params"] + m["seed_params"])

    return TickDiff(
        tick=t,
        decisions=(_decision_text(a, t), _decision_text(b, t)),
        slots=slots,
        metric=(ma["metric"] if ma else None, mb["metric"] if mb else None),
        params=(params(ma), params(mb)),
        same_events=a.events.get(t) == b.events.get(t),
    )


def diff_runs(a: str | Path, b: str | Path) -> RunDiff:
    """Compare two recorded runs tick by tick (env 0): decisions, events, metrics, slots."""
    a, b = Path(a), Path(b)
    ra, rb = _read_record(a), _read_record(b)
    ca, cb = _flat(ra.manifest["config"]), _flat(rb.manifest["config"])
    config = {k: (ca.get(k), cb.get(k)) for k in sorted({*ca, *cb}) if ca.get(k) != cb.get(k)}
    forks = [(n, r.manifest["fork"]) for n, r in (("A", ra), ("B", rb)) if "fork" in r.manifest]
    ticks = sorted({*ra.events, *rb.events, *ra.metrics, *rb.metrics})
    rows = [_tick_diff(ra, rb, t) for t in ticks]

    def first(differs: Callable[[int], bool]) -> int | None:
        return next((t for t in ticks if differs(t)), None)

    return RunDiff(
        a=a,
        b=b,
        config=config,
        forks=forks,
        first_decision=first(
            lambda t: (
                (ra.decisions.get(t) and ra.decisions[t].action)
                != (rb.decisions.get(t) and rb.decisions[t].action)
            )
        ),
        first_event=first(lambda t: ra.events.get(t) != rb.events.get(t)),
        first_metric=first(lambda t: to_json(ra.metrics.get(t)) != to_json(rb.metrics.get(t))),
        ticks=rows,
    )
