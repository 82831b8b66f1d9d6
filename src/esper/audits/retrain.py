"""Full-retrain Shapley audit (paper §5.3): did the seeds a run grew really help, under a protocol?

    protocol + candidates (≤ 3 germinations of a recorded run)
    → jobs: every subset S of the candidates × repeats r (seed = base_seed + r)
    (candidates and their replay: `replay.py`)
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
from esper.audits.replay import MAX_CANDIDATES, Candidate, ReplayPolicy
from esper.config import GrowConfig, config_to_dict, override
from esper.contracts.errors import ConfigError, EsperError
from esper.contracts.files import atomic_write
from esper.recorder import RunStore
from esper.run import slot_layout, start_run
from esper.simic.shapley import banzhaf, exact_shapley, interaction_index, subsets

METRICS = ("metric", "val_loss", "train_loss")
"""Scalars of the last tick's record an audit may use as v(S)."""
REPLAY_VERSION = "replay-v2"
"""How a retrain replays its candidates (part of the protocol hash, so a change of the rule never
reuses retrains cached under the old one): v2 germinates at the recorded point of the tick with
every recorded head and knob, and replays each seed's recorded fate."""


# ---------------------------------------------------------------------------------------------
# Protocol
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


# ---------------------------------------------------------------------------------------------
# One job: retrain with only the seeds in `subset` enabled, replaying what the source did
# ---------------------------------------------------------------------------------------------


class AuditError(EsperError, ValueError):
    """An audit that cannot be done as asked (no audited seed, a failed retrain, a lost cache)."""


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
    policy = ReplayPolicy(enabled, slot_layout(cfg), cfg.env)
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
