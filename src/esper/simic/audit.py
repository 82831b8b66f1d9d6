"""Full-retrain Shapley audit (paper §5.3): did the seeds a run grew really help, under a protocol?

    protocol + candidates (≤ 3 germinations of a recorded run)
    → jobs: every subset S of the candidates × repeats r (seed = base_seed + r)
    → each job retrains the host from scratch for a fixed budget with only the seeds in S enabled,
      germinated at their recorded tick and advanced TRAINING → BLENDING → HOLDING as gates allow
    → v_r(S) = the final validation metric, cached on disk per (protocol hash, S, r)
      (jobs run on a local process pool or as Ray tasks: `backends.py`)
    → per repeat: exact Shapley, Banzhaf and pairwise interactions over the complete table
    → φ = mean over repeats, with a Student-t 95% CI; written as labels on the germinate events

Shapley here is exact over all 2^n subsets, never sampled: sampling a complete table only adds
noise. It is a label under this protocol (budget, metric, seeds), not ground truth.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import hashlib
import json
import statistics
import tempfile
import traceback
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from esper.config import GrowConfig, config_to_dict, override
from esper.contracts import Blueprint, FactoredAction, Op, Stage
from esper.contracts.files import atomic_write
from esper.contracts.lifecycle import IllegalTransition
from esper.recorder import RunStore
from esper.run import start_run
from esper.simic.backends import check_backend, open_executor
from esper.simic.shapley import banzhaf, exact_shapley, interaction_index, subsets

MAX_CANDIDATES = 3
"""2^3 subsets × R repeats retrains is the Phase 1 budget (paper §5.3)."""
METRICS = ("metric", "val_loss", "train_loss")
"""Scalars of the last tick's record an audit may use as v(S)."""


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
            raise ValueError(f"metric must be one of {', '.join(METRICS)}, got {self.metric!r}")
        if self.ticks < 1 or self.repeats < 1:
            raise ValueError(f"ticks and repeats must be >= 1, got {self.ticks}, {self.repeats}")

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
    """One germination to audit: a player of the game. Identity is (slot, blueprint, tick)."""

    slot: str
    blueprint: str
    """Blueprint name, e.g. "CONV_LIGHT"."""
    germinate_tick: int
    event_id: int | None = field(default=None, compare=False)
    """The source run's germinate event, labelled with the result."""
    source: str | None = field(default=None, compare=False)
    """The source run directory."""

    @property
    def key(self) -> str:
        return f"{self.slot}:{self.blueprint}@{self.germinate_tick}"


def candidates_from_run(run_dir: str | Path, limit: int = MAX_CANDIDATES) -> list[Candidate]:
    """The first `limit` (≤ 3) germinations of a recorded run, one per slot (a later
    re-germination of a slot could not coexist with the first in a retrain)."""
    if not 1 <= limit <= MAX_CANDIDATES:
        raise ValueError(f"limit must be in 1..{MAX_CANDIDATES}, got {limit}")
    out: list[Candidate] = []
    with RunStore.open(Path(run_dir)) as store:
        for e in store.events("germinate"):
            if e.slot is None or any(c.slot == e.slot for c in out):
                continue
            out.append(Candidate(e.slot, e.payload["blueprint"], e.tick, e.id, str(run_dir)))
            if len(out) == limit:
                break
    return out


# ---------------------------------------------------------------------------------------------
# One job: retrain with only the seeds in `subset` enabled
# ---------------------------------------------------------------------------------------------


class _Replay:
    """Run callback: germinate each enabled candidate at its tick, then ADVANCE it one stage per
    tick while the gates allow (G2 for TRAINING → BLENDING, a finished ramp for → HOLDING)."""

    def __init__(self, enabled: Sequence[Candidate]) -> None:
        self.enabled = enabled

    def __call__(self, t: int, env: Any) -> None:
        names = list(env.slots)
        for c in self.enabled:
            if c.slot not in env.slots:
                raise ValueError(f"candidate {c.key}: the host has no slot {c.slot!r}")
            slot, index = env.slots[c.slot], names.index(c.slot)
            if t == c.germinate_tick:
                env.execute(
                    FactoredAction(Op.GERMINATE, slot=index, blueprint=Blueprint[c.blueprint])
                )
            elif slot.stage in (Stage.GERMINATED, Stage.TRAINING, Stage.BLENDING):
                # Illegal while G2 has not passed or the ramp is not finished: retry next tick.
                with contextlib.suppress(IllegalTransition):
                    env.execute(FactoredAction(Op.ADVANCE, slot=index))


def subset_value(
    protocol: AuditProtocol, candidates: Sequence[Candidate], subset: frozenset, repeat: int
) -> float:
    """v_repeat(subset): the final validation metric of a from-scratch run of the fixed budget
    with policy "none" and only the seeds in `subset` enabled. Deterministic in (subset, repeat)."""
    enabled = [c for c in candidates if c in subset]
    late = [c.key for c in enabled if c.germinate_tick >= protocol.ticks]
    if late:
        raise ValueError(f"candidates {late} germinate after the {protocol.ticks}-tick budget")
    with tempfile.TemporaryDirectory(prefix="esper-audit-") as tmp:
        run = start_run(
            protocol.grow_config(repeat), run_dir=Path(tmp) / "run", callbacks=[_Replay(enabled)]
        )
        try:
            run.run()
            value = run.store.metrics()[-1][1][protocol.metric]
        finally:
            run.store.close()
    return float(value)


ValueFn = Callable[[AuditProtocol, Sequence[Candidate], frozenset, int], float]


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
    """A subset's cache and table key: its candidates' keys, sorted."""
    return tuple(sorted(c.key for c in subset))


def _attempt(
    fn: ValueFn,
    protocol: AuditProtocol,
    candidates: Sequence[Candidate],
    subset: frozenset,
    repeat: int,
) -> float:
    """One job; the error comes back as text so that it survives the process boundary."""
    try:
        return fn(protocol, candidates, subset, repeat)
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

    def _load(self, phash: str, subset: tuple[str, ...], repeat: int) -> float | None:
        path = self._path(phash, subset, repeat)
        if not path.is_file():
            return None
        job = json.loads(path.read_text())
        if job["protocol_hash"] != phash or tuple(job["subset"]) != subset:
            raise ValueError(f"{path}: cache entry does not match its key")
        return float(job["value"])

    def _store(
        self, protocol: AuditProtocol, subset: tuple[str, ...], repeat: int, value: float
    ) -> None:
        path = self._path(protocol.protocol_hash(), subset, repeat)
        job = {
            "protocol_hash": protocol.protocol_hash(),
            "subset": list(subset),
            "repeat": repeat,
            "value": value,
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
            raise ValueError(f"need 1..{MAX_CANDIDATES} distinct candidates, got {candidates}")
        phash = protocol.protocol_hash()
        values, retrains, cached, failures = self.values(
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
        result = _summarise(phash, candidates, values, retrains, cached, failures)
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
    ) -> tuple[dict[int, dict[tuple[str, ...], float]], int, int, tuple[JobFailure, ...]]:
        """v_r(S) for the `needed` subsets and every repeat r: from the cache, the missing ones
        retrained on `backend` and cached. Returns (repeat -> subset key -> value, retrains run,
        cache hits, failures). Writes no labels (`run` does, the cheaper estimators don't)."""
        check_backend(backend, ray_address)
        phash = protocol.protocol_hash()
        jobs = [(s, r) for r in range(protocol.repeats) for s in needed]
        values: dict[int, dict[tuple[str, ...], float]] = {r: {} for r in range(protocol.repeats)}
        pending = []
        for s, r in jobs:
            hit = self._load(phash, subset_key(s), r)
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
        return values, retrains, cached, failures

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
                    self._store(protocol, subset_key(s), r, fut.result())
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
