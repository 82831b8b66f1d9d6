"""Full-retrain Shapley audit (paper §5.3): did the seeds a run grew really help, under a protocol?

    protocol + candidates (≤ 3 germinations of a recorded run)
    → jobs: every subset S of the candidates × repeats r (seed = base_seed + r)
    → each job retrains the host from scratch for a fixed budget with only the seeds in S enabled,
      each replayed as in its source run (`ReplayPolicy`): germinated at its recorded tick, at the
      same point of the tick, with every recorded head, then its recorded fate (advance, α
      retarget, fossilize, prune) at the recorded ticks, each op retried until it is legal
    → v_r(S) = the final validation metric, cached on disk per (protocol hash, S, r)
      (jobs run on a local process pool or as Ray tasks: `backends.py`)
    → per repeat: exact Shapley, Banzhaf and pairwise interactions over the complete table
    → φ = mean over repeats, with a Student-t 95% CI; written as labels on the germinate events

Shapley here is exact over all 2^n subsets, never sampled: sampling a complete table only adds
noise. It is a label under this protocol (budget, metric, seeds), not ground truth.
"""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import json
import statistics
import tempfile
import traceback
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, NamedTuple

from esper.audits.backends import check_backend, open_executor
from esper.config import GrowConfig, config_to_dict, override
from esper.contracts import Blueprint, FactoredAction, Observation, Op, SeedSpec
from esper.contracts.errors import ConfigError, EsperError
from esper.contracts.files import atomic_write
from esper.recorder import EventRecord, RunStore
from esper.run import slot_layout, start_run
from esper.simic.shapley import banzhaf, exact_shapley, interaction_index, subsets
from esper.tamiyo.masks import action_masks, illegal_reason
from esper.tamiyo.policies import Decision

MAX_CANDIDATES = 3
"""2^3 subsets × R repeats retrains is the Phase 1 budget (paper §5.3)."""
METRICS = ("metric", "val_loss", "train_loss")
"""Scalars of the last tick's record an audit may use as v(S)."""
REPLAY_VERSION = "replay-v2"
"""How a retrain replays its candidates (part of the protocol hash, so a change of the rule never
reuses retrains cached under the old one): v2 germinates at the recorded point of the tick with
every recorded head and knob, and replays each seed's recorded fate."""
FATE_KINDS = ("advance", "set_alpha_target", "fossilize", "prune", "governor_lobotomy")
"""The events after a germination that make up the seed's fate."""


# ---------------------------------------------------------------------------------------------
# Protocol and candidates
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AuditProtocol:
    """Everything that fixes v(S): two audits with the same hash share cached retrains."""

    task: str = "digits"
    config: GrowConfig = field(default_factory=GrowConfig)
    """Host, env (batches per tick), lifecycle and device; its policy, ticks and seed are
    overridden by the fields below."""
    ticks: int = 10
    """Training budget of every retrain, in control ticks."""
    metric: str = "metric"
    """Recorded scalar of the last tick used as v(S): the task metric, val_loss or train_loss."""
    repeats: int = 1
    """R: retrains per subset, seeds base_seed .. base_seed + R − 1."""
    base_seed: int = 0

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise ConfigError(f"metric must be one of {', '.join(METRICS)}, got {self.metric!r}")
        if self.ticks < 1 or self.repeats < 1:
            raise ConfigError(f"ticks and repeats must be >= 1, got {self.ticks}, {self.repeats}")

    def canonical(self) -> dict[str, Any]:
        return {
            "task": self.task,
            "config": config_to_dict(self.config),
            "ticks": self.ticks,
            "metric": self.metric,
            "repeats": self.repeats,
            "base_seed": self.base_seed,
        }

    def protocol_hash(self) -> str:
        """sha256 of the canonical JSON. `repeats` is left out: extending R reuses the cache."""
        body = {k: v for k, v in self.canonical().items() if k != "repeats"}
        text = json.dumps(body, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()

    def grow_config(self, repeat: int) -> GrowConfig:
        return override(
            self.config,
            task=self.task,
            policy="none",
            ticks=self.ticks,
            seed=self.base_seed + repeat,
            checkpoint_every=self.ticks,
        )


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

    def germinate_action(self, slot_index: int) -> tuple[FactoredAction, SeedSpec]:
        recorded = json.loads(self.germination) if self.germination else {}
        action = (
            replace(FactoredAction.from_names(recorded["action"]), slot=slot_index)
            if "action" in recorded
            else FactoredAction(Op.GERMINATE, slot=slot_index, blueprint=Blueprint[self.blueprint])
        )
        spec = SeedSpec(action.blueprint, action.style)  # what the engine germinates from an action
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
# One job: retrain with only the seeds in `subset` enabled, replaying what the source did
# ---------------------------------------------------------------------------------------------


class AuditError(EsperError, ValueError):
    """An audit that cannot be done as asked (no audited seed, a failed retrain, a lost cache)."""


class AuditReplayError(EsperError, RuntimeError):
    """A retrain cannot replay its candidates (e.g. the governor removed an audited seed)."""


class ReplayPolicy:
    """The policy of a coalition retrain: at the tick a candidate germinated in the source run,
    the same GERMINATE (every head, every knob), chosen where the source's policy chose it, after
    that tick's training; then the candidate's recorded fate, each op at its recorded tick. An
    op not yet legal in the retrain (G2 not passed, ramp unfinished) is retried every tick until
    it is; a germination goes first when both are due. What never happened is `unreached`."""

    name = "replay"

    def __init__(self, enabled: Sequence[Candidate], slots: Sequence[str]) -> None:
        missing = [c.key for c in enabled if c.slot not in slots]
        if missing:
            raise ConfigError(f"candidates {missing}: the host has no such slot ({list(slots)})")
        self.slots = list(slots)
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
            action, _ = c.germinate_action(self._index(c))
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


@dataclass(frozen=True)
class JobValue:
    """One retrain's v(S), and what of the candidates' recorded fate it could not replay."""

    value: float
    unreached: tuple[str, ...] = ()


def subset_value(
    protocol: AuditProtocol, candidates: Sequence[Candidate], subset: frozenset, repeat: int
) -> JobValue:
    """v_repeat(subset): the final validation metric of a from-scratch run of the fixed budget
    where only the seeds in `subset` are germinated, each replayed as in its source run
    (`ReplayPolicy`). Deterministic in (subset, repeat); each seed's initial weights depend on
    its slot and tick only (`RunSeeds`), so enabling one never changes another's start."""
    enabled = [c for c in candidates if c in subset]
    late = [c.key for c in enabled if c.germinate_tick >= protocol.ticks]
    if late:
        raise ConfigError(f"candidates {late} germinate after the {protocol.ticks}-tick budget")
    cfg = protocol.grow_config(repeat)
    policy = ReplayPolicy(enabled, slot_layout(cfg))
    with tempfile.TemporaryDirectory(prefix="esper-audit-") as tmp:
        run = start_run(cfg, policy=policy, run_dir=Path(tmp) / "run")
        try:
            run.run()
            value = run.store.metrics()[-1][1][protocol.metric]
        finally:
            run.store.close()
    return JobValue(float(value), policy.unreached)


ValueFn = Callable[[AuditProtocol, Sequence[Candidate], frozenset, int], "float | JobValue"]
"""A job's value function (`subset_value`; tests pass a plain function returning a float)."""


def _job_value(x: float | JobValue) -> JobValue:
    return x if isinstance(x, JobValue) else JobValue(float(x))


# ---------------------------------------------------------------------------------------------
# Result
# ---------------------------------------------------------------------------------------------

T95 = (
    12.706,
    4.303,
    3.182,
    2.776,
    2.571,
    2.447,
    2.365,
    2.306,
    2.262,
    2.228,
    2.201,
    2.179,
    2.160,
    2.145,
    2.131,
    2.120,
    2.110,
    2.101,
    2.093,
    2.086,
    2.080,
    2.074,
    2.069,
    2.064,
    2.060,
    2.056,
    2.052,
    2.048,
    2.045,
    2.042,
)
"""Two-sided 95% Student-t quantiles for 1..30 degrees of freedom; beyond, the normal 1.960."""
CI_METHOD = "student-t 95% over repeats (R-1 dof); NaN when R = 1"


def ci95(samples: Sequence[float]) -> tuple[float, float]:
    """Mean ± t_{0.975, R−1} · s/√R."""
    r = len(samples)
    mean = statistics.fmean(samples)
    if r < 2:
        return float("nan"), float("nan")
    half = (T95[r - 2] if r - 1 <= len(T95) else 1.960) * statistics.stdev(samples) / r**0.5
    return mean - half, mean + half


@dataclass(frozen=True)
class JobFailure:
    subset: tuple[str, ...]
    repeat: int
    attempts: int
    error: str


@dataclass(frozen=True)
class AuditResult:
    protocol_hash: str
    candidates: tuple[str, ...]
    values: dict[int, dict[tuple[str, ...], float]]
    """repeat -> sorted candidate keys of S -> v(S)."""
    phi: dict[str, float]
    """Mean over complete repeats of each repeat's exact Shapley value."""
    phi_ci95: dict[str, tuple[float, float]]
    banzhaf: dict[str, float]
    interactions: dict[tuple[str, str], float]
    repeats_used: tuple[int, ...]
    """Repeats whose 2^n subsets all succeeded (the others give no φ)."""
    retrains: int
    """Jobs run by this call (failed attempts included)."""
    cached: int
    """Jobs answered from the audit directory."""
    failures: tuple[JobFailure, ...] = ()
    ci_method: str = CI_METHOD
    unreached: dict[str, tuple[str, ...]] = field(default_factory=dict)
    """"r=REPEAT S=KEYS" -> the recorded fate ops that retrain could not replay within its
    budget (the v(S) of a coalition whose seeds lived longer or shorter than in the source)."""

    def label(self, key: str) -> dict[str, Any]:
        lo, hi = self.phi_ci95[key]
        return {
            "phi": self.phi[key],
            "ci95": [lo, hi],
            "ci_method": self.ci_method,
            "banzhaf": self.banzhaf[key],
            "protocol_hash": self.protocol_hash,
            "repeats": len(self.repeats_used),
            "candidates": list(self.candidates),
            "interactions": {
                f"{a}|{b}": x for (a, b), x in self.interactions.items() if key in (a, b)
            },
        }


# ---------------------------------------------------------------------------------------------
# The audit
# ---------------------------------------------------------------------------------------------


def subset_key(subset: Iterable[Candidate]) -> tuple[str, ...]:
    """A subset's table key: its candidates' keys, sorted."""
    return tuple(sorted(c.key for c in subset))


def _cache_key(subset: Iterable[Candidate]) -> tuple[str, ...]:
    """A subset's cache key: its candidates' keys with how each is replayed, sorted."""
    return tuple(sorted(c.cache_key for c in subset))


class JobTable(NamedTuple):
    """What `Audit.values` returns."""

    values: dict[int, dict[tuple[str, ...], float]]
    """repeat -> subset key -> v(S)."""
    retrains: int
    cached: int
    failures: tuple[JobFailure, ...]
    unreached: dict[str, tuple[str, ...]]
    """As `AuditResult.unreached`."""


def _attempt(
    fn: ValueFn,
    protocol: AuditProtocol,
    candidates: Sequence[Candidate],
    subset: frozenset,
    repeat: int,
) -> JobValue:
    """One job; the error comes back as text so that it survives the process boundary."""
    try:
        return _job_value(fn(protocol, candidates, subset, repeat))
    except Exception as err:
        raise RuntimeError(f"{type(err).__name__}: {err}\n{traceback.format_exc()}") from None


Progress = Callable[[int, int], None]
"""progress(done, total): jobs settled (cached, succeeded, or failed for good) out of all."""


class Audit:
    """Runs audits whose retrains are cached as JSON files under `audit_dir`."""

    def __init__(self, audit_dir: str | Path, value_fn: ValueFn = subset_value) -> None:
        self.dir = Path(audit_dir)
        self.value_fn = value_fn

    # -- cache: one file per (protocol hash, subset, repeat) ------------------------------------
    def _path(self, phash: str, subset: tuple[str, ...], repeat: int) -> Path:
        text = json.dumps([phash, list(subset), repeat])
        return self.dir / "jobs" / f"{hashlib.sha256(text.encode()).hexdigest()[:32]}.json"

    def _load(self, phash: str, subset: frozenset, repeat: int) -> JobValue | None:
        key = _cache_key(subset)
        path = self._path(phash, key, repeat)
        if not path.is_file():
            return None
        job = json.loads(path.read_text())
        if job["protocol_hash"] != phash or tuple(job["subset"]) != key:
            raise ValueError(f"{path}: cache entry does not match its key")
        return JobValue(float(job["value"]), tuple(job.get("unreached", ())))

    def _store(
        self, protocol: AuditProtocol, subset: frozenset, repeat: int, job_value: JobValue
    ) -> None:
        key = _cache_key(subset)
        path = self._path(protocol.protocol_hash(), key, repeat)
        job = {
            "protocol_hash": protocol.protocol_hash(),
            "subset": list(key),
            "repeat": repeat,
            "value": job_value.value,
            "unreached": list(job_value.unreached),
            "protocol": protocol.canonical(),
        }
        text = json.dumps(job, sort_keys=True)
        atomic_write(path, lambda tmp: tmp.write_text(text))  # an interruption keeps whole entries

    # -- run ------------------------------------------------------------------------------------
    def run(
        self,
        protocol: AuditProtocol,
        candidates: Sequence[Candidate],
        backend: str = "local",
        workers: int | None = None,
        retries: int = 1,
        *,
        ray_address: str | None = None,
        ray_resources: Mapping[str, Any] | None = None,
        progress: Progress | None = None,
    ) -> AuditResult:
        """Every subset × repeat not in the cache runs on `backend` ("local": `workers`
        processes, default one per core; "ray": Ray tasks with `ray_resources` each, on the
        cluster at `ray_address` or a local instance of `workers` CPUs), each up to
        1 + `retries` times; `progress(done, total)` is called as each job settles."""
        candidates = list(candidates)
        if not 1 <= len(candidates) <= MAX_CANDIDATES or len(set(candidates)) != len(candidates):
            raise ConfigError(f"need 1..{MAX_CANDIDATES} distinct candidates, got {candidates}")
        phash = protocol.protocol_hash()
        table = self.values(
            protocol,
            candidates,
            subsets(candidates),
            backend,
            workers,
            retries,
            ray_address=ray_address,
            ray_resources=ray_resources,
            progress=progress,
        )
        result = _summarise(phash, candidates, *table[:4])
        result = replace(result, unreached=table.unreached)
        self._label_sources(candidates, result)
        return result

    def values(
        self,
        protocol: AuditProtocol,
        candidates: Sequence[Candidate],
        needed: Sequence[frozenset],
        backend: str = "local",
        workers: int | None = None,
        retries: int = 1,
        *,
        ray_address: str | None = None,
        ray_resources: Mapping[str, Any] | None = None,
        progress: Progress | None = None,
    ) -> JobTable:
        """v_r(S) for the `needed` subsets and every repeat r: from the cache, the missing ones
        retrained on `backend` and cached. Writes no labels (`run` does, the cheaper estimators
        don't)."""
        check_backend(backend, ray_address)
        phash = protocol.protocol_hash()
        jobs = [(s, r) for r in range(protocol.repeats) for s in needed]
        values: dict[int, dict[tuple[str, ...], JobValue]] = {
            r: {} for r in range(protocol.repeats)
        }
        pending = []
        for s, r in jobs:
            hit = self._load(phash, s, r)
            if hit is None:
                pending.append((s, r))
            else:
                values[r][subset_key(s)] = hit
        cached = done = len(jobs) - len(pending)
        if progress is not None:
            progress(done, len(jobs))

        def settled() -> None:
            nonlocal done
            done += 1
            if progress is not None:
                progress(done, len(jobs))

        retrains, failures = 0, ()
        if pending:
            with open_executor(
                backend,
                workers,
                len(pending),
                device=protocol.config.device,
                ray_address=ray_address,
                ray_resources=ray_resources,
            ) as (pool, in_flight):
                retrains, failures = self._execute(
                    protocol, list(candidates), pending, values, pool, in_flight, retries, settled
                )
        unreached = {
            f"r={r} S={'|'.join(key)}": jv.unreached
            for r, table in values.items()
            for key, jv in sorted(table.items())
            if jv.unreached
        }
        plain = {r: {key: jv.value for key, jv in table.items()} for r, table in values.items()}
        return JobTable(plain, retrains, cached, failures, unreached)

    def _execute(
        self,
        protocol: AuditProtocol,
        candidates: list[Candidate],
        pending: list[tuple[frozenset, int]],
        values: dict,
        pool: cf.Executor,
        in_flight: int,
        retries: int,
        settled: Callable[[], None],
    ) -> tuple[int, tuple[JobFailure, ...]]:
        """Run the pending jobs on `pool`, at most `in_flight` at once, each up to
        1 + `retries` times; store each success as it arrives. Backend-agnostic."""
        attempts: dict[tuple[frozenset, int], int] = {}
        failures: list[JobFailure] = []
        retrains = 0
        # Largest subsets first: they train the most seeds and take longest, and starting them
        # last leaves one worker busy alone at the end (longest-processing-time order).
        queue = deque(sorted(pending, key=lambda job: (-len(job[0]), job[1])))
        futures: dict[cf.Future, tuple[frozenset, int]] = {}

        def fill() -> None:
            while queue and len(futures) < in_flight:
                job = queue.popleft()
                attempts[job] = attempts.get(job, 0) + 1
                futures[pool.submit(_attempt, self.value_fn, protocol, candidates, *job)] = job

        fill()
        while futures:
            done, _ = cf.wait(list(futures), return_when=cf.FIRST_COMPLETED)
            for fut in done:
                (s, r), retrains = futures.pop(fut), retrains + 1
                err = fut.exception()
                if err is None:
                    values[r][subset_key(s)] = fut.result()
                    self._store(protocol, s, r, fut.result())
                    settled()
                elif attempts[(s, r)] <= retries:
                    queue.append((s, r))
                else:
                    failures.append(JobFailure(subset_key(s), r, attempts[(s, r)], str(err)))
                    settled()
            fill()
        return retrains, tuple(sorted(failures, key=lambda f: (f.repeat, f.subset)))

    def _label_sources(self, candidates: list[Candidate], result: AuditResult) -> None:
        """Attach the result to the germinate events the candidates came from."""
        if not result.repeats_used:
            return
        by_run: dict[str, list[Candidate]] = {}
        for c in candidates:
            if c.source is not None and c.event_id is not None:
                by_run.setdefault(c.source, []).append(c)
        for run_dir, cs in by_run.items():
            with RunStore.open(Path(run_dir)) as store:
                for c in cs:
                    store.attach_label(c.event_id, "shapley", result.label(c.key))


def _summarise(
    phash: str,
    candidates: list[Candidate],
    values: dict[int, dict],
    retrains: int,
    cached: int,
    failures: tuple[JobFailure, ...],
) -> AuditResult:
    """Per complete repeat: exact Shapley, Banzhaf, interactions; then means over repeats."""
    keys = [c.key for c in candidates]
    n_subsets = 2 ** len(keys)
    used = tuple(r for r, table in values.items() if len(table) == n_subsets)
    phis, betas, inters = [], [], []
    pairs = [(a, b) for i, a in enumerate(keys) for b in keys[i + 1 :]]
    for r in used:
        table = values[r]

        def v(s: frozenset, table: dict = table) -> float:
            return table[tuple(sorted(s))]

        phis.append(exact_shapley(keys, v))
        betas.append(banzhaf(keys, v))
        inters.append({p: interaction_index(keys, v, *p) for p in pairs})
    nan = float("nan")

    def mean(rows: list[dict], k: Any) -> float:
        return statistics.fmean(row[k] for row in rows) if rows else nan

    return AuditResult(
        protocol_hash=phash,
        candidates=tuple(keys),
        values=values,
        phi={k: mean(phis, k) for k in keys},
        phi_ci95={k: ci95([p[k] for p in phis]) if phis else (nan, nan) for k in keys},
        banzhaf={k: mean(betas, k) for k in keys},
        interactions={p: mean(inters, p) for p in pairs},
        repeats_used=used,
        retrains=retrains,
        cached=cached,
        failures=failures,
    )


def result_to_json(result: AuditResult) -> dict[str, Any]:
    """A JSON-able view (tuple keys joined with '|')."""
    out = asdict(result)
    out["values"] = {
        str(r): {"|".join(s): v for s, v in t.items()} for r, t in result.values.items()
    }
    out["interactions"] = {"|".join(p): x for p, x in result.interactions.items()}
    return out
