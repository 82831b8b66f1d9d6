"""Cheaper estimators of a seed's audit credit, their cost in retrains, and how well they track
exact Shapley φ over recorded audits (paper §5.3–5.4, `esper audit RUN [RUN...] --compare`).

    estimator          credit of candidate i                          cost (retrains, alone)
    exact              exact Shapley per repeat, mean over R          2^n · R
    α=0 ablation       the seed's last recorded ablation contribution 0: read from the source
                       in the source run (metric with it − at α=0)    run's flight recorder
    leave-one-out      v(C) − v(C∖i) per repeat, mean over R          (n + 1) · R
    permutation (m)    Monte Carlo Shapley over m orders drawn with   distinct subsets the orders
                       antithetic (reversed) pairs, same orders for   touch · R
                       every repeat, mean over R
    short rollout      exact Shapley under the same protocol cut to   2^n retrains of T' ticks:
                       T' = max(⌈T/3⌉, last germination + 1) ticks,   2^n · T'/T tick-equivalent
                       R = 1

Costs are what an estimator would need on its own; the values themselves come from the audit's
cache when it holds them (a recorded exact audit holds every subset the leave-one-out and
permutation estimators need), and what is missing is retrained and cached. Credits are in the
units of the protocol's v(S) (differences of its metric), except the ablation under a loss metric:
its contribution is in task-metric units, so only its ranks compare (`comparable` False).
No estimator writes labels: the "shapley" label of the source run stays the exact audit's.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from esper.audits.replay import Candidate, candidate_of
from esper.audits.retrain import (
    Audit,
    AuditError,
    AuditProtocol,
    ValueFn,
    subset_key,
    subset_value,
)
from esper.config import config_from_dict
from esper.recorder import RunStore
from esper.simic.critic import mean_abs_error, spearman
from esper.simic.shapley import CountingValue, exact_shapley, permutation_shapley, subsets

EXACT = "exact"
ABLATION = "α=0 ablation"
LOO = "leave-one-out"
SHORT = "short rollout (T/3, R=1)"
SHORT_FRACTION = 1 / 3
DEFAULT_SAMPLES = 2
"""Permutation samples: one antithetic pair (exact for two candidates)."""


def permutation_name(samples: int) -> str:
    return f"permutation (m={samples}, antithetic)"


@dataclass(frozen=True)
class Estimate:
    """One estimator's credit for each candidate (by key) and what it costs alone."""

    name: str
    credit: dict[str, float]
    retrains: int
    """Distinct (subset, repeat) retrains it needs, cached or not."""
    tick_cost: float
    """Retrains weighted by their ticks relative to the protocol's budget."""
    ran: int = 0
    """Retrains this call actually ran (the rest came from the audit cache)."""
    comparable: bool = True
    """Credit in v(S) units, so that an absolute error against φ means something."""


def _check(candidates: Sequence[Candidate]) -> list[Candidate]:
    candidates = list(candidates)
    if not candidates or len(set(candidates)) != len(candidates):
        raise ValueError(f"need distinct candidates, got {candidates}")
    return candidates


def job_values(
    audit: Audit,
    protocol: AuditProtocol,
    candidates: Sequence[Candidate],
    needed: Sequence[frozenset],
    workers: int | None = None,
    retries: int = 1,
    *,
    backend: str = "local",
    ray_address: str | None = None,
) -> tuple[dict[int, dict[tuple[str, ...], float]], int]:
    """v_r(S) for the `needed` subsets and every repeat r < protocol.repeats: read from the
    audit's cache, the missing ones retrained on `backend` (as `Audit.run` does) and cached.
    Returns (repeat -> key -> value, retrains run). Raises when a retrain fails after its
    retries. Writes no labels."""
    values, ran, _, failures, _ = audit.values(
        protocol, candidates, needed, backend, workers, retries, ray_address=ray_address
    )
    if failures:
        f = failures[0]
        raise AuditError(
            f"{len(failures)} retrain(s) failed, e.g. subset {list(f.subset)} "
            f"repeat {f.repeat}: {f.error.splitlines()[0]}"
        )
    return values, ran


def _per_repeat(
    values: dict[int, dict[tuple[str, ...], float]],
    credit: Callable[[Callable[[frozenset], float]], dict[Candidate, float]],
    candidates: Sequence[Candidate],
) -> dict[str, float]:
    """Mean over repeats of credit(v_r)."""
    totals = {c.key: 0.0 for c in candidates}
    for table in values.values():
        got = credit(lambda s, table=table: table[subset_key(s)])
        for c in candidates:
            totals[c.key] += got[c]
    return {k: x / len(values) for k, x in totals.items()}


# ---------------------------------------------------------------------------------------------
# The estimators
# ---------------------------------------------------------------------------------------------


def exact_estimate(
    audit: Audit,
    protocol: AuditProtocol,
    candidates: Sequence[Candidate],
    *,
    workers: int | None = None,
    retries: int = 1,
    **backend: Any,
) -> Estimate:
    """Exact Shapley from the audit's jobs (as `Audit.run`, without labelling anything)."""
    cs = _check(candidates)
    needed = subsets(cs)
    values, ran = job_values(audit, protocol, cs, needed, workers, retries, **backend)
    credit = _per_repeat(values, lambda v: exact_shapley(cs, v), cs)
    cost = len(needed) * protocol.repeats
    return Estimate(EXACT, credit, cost, float(cost), ran)


def leave_one_out_estimate(
    audit: Audit,
    protocol: AuditProtocol,
    candidates: Sequence[Candidate],
    *,
    workers: int | None = None,
    retries: int = 1,
    **backend: Any,
) -> Estimate:
    """v(C) − v(C∖i) per repeat, mean over repeats: n + 1 subsets per repeat."""
    cs = _check(candidates)
    full = frozenset(cs)
    needed = [full, *(full - {c} for c in cs)]
    values, ran = job_values(audit, protocol, cs, needed, workers, retries, **backend)
    credit = _per_repeat(values, lambda v: {c: v(full) - v(full - {c}) for c in cs}, cs)
    cost = len(needed) * protocol.repeats
    return Estimate(LOO, credit, cost, float(cost), ran)


def permutation_subsets(
    candidates: Sequence[Candidate], samples: int, seed: int
) -> list[frozenset]:
    """The subsets `permutation_shapley(candidates, ·, samples, seed)` evaluates."""
    probe = CountingValue(lambda s: 0.0)
    permutation_shapley(candidates, probe, samples, seed)
    return list(probe.cache)


def permutation_estimate(
    audit: Audit,
    protocol: AuditProtocol,
    candidates: Sequence[Candidate],
    samples: int = DEFAULT_SAMPLES,
    seed: int = 0,
    *,
    workers: int | None = None,
    retries: int = 1,
    **backend: Any,
) -> Estimate:
    """Monte Carlo Shapley over `samples` orders with antithetic pairs (the same orders for every
    repeat), mean over repeats; costs the distinct subsets the orders touch × R."""
    cs = _check(candidates)
    needed = permutation_subsets(cs, samples, seed)
    values, ran = job_values(audit, protocol, cs, needed, workers, retries, **backend)
    credit = _per_repeat(values, lambda v: permutation_shapley(cs, v, samples, seed), cs)
    cost = len(needed) * protocol.repeats
    return Estimate(permutation_name(samples), credit, cost, float(cost), ran)


def short_protocol(
    protocol: AuditProtocol, candidates: Sequence[Candidate], fraction: float = SHORT_FRACTION
) -> AuditProtocol:
    """The same protocol cut to max(⌈fraction · T⌉, last germination + 1) ticks (at most T),
    with one repeat."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    last = max(c.germinate_tick for c in candidates)
    ticks = min(protocol.ticks, max(math.ceil(fraction * protocol.ticks), last + 1))
    return replace(protocol, ticks=ticks, repeats=1)


def short_rollout_estimate(
    audit: Audit,
    protocol: AuditProtocol,
    candidates: Sequence[Candidate],
    fraction: float = SHORT_FRACTION,
    *,
    workers: int | None = None,
    retries: int = 1,
    **backend: Any,
) -> Estimate:
    """Exact Shapley under `short_protocol`: a proxy that is cheap in ticks and repeats."""
    cs = _check(candidates)
    short = short_protocol(protocol, cs, fraction)
    needed = subsets(cs)
    values, ran = job_values(audit, short, cs, needed, workers, retries, **backend)
    credit = _per_repeat(values, lambda v: exact_shapley(cs, v), cs)
    return Estimate(SHORT, credit, len(needed), len(needed) * short.ticks / protocol.ticks, ran)


def _higher_is_better(manifest: dict[str, Any]) -> bool:
    """From the recorded task description ("…, accuracy (higher is better)")."""
    return "(lower is better)" not in str(manifest.get("task", ""))


def last_contribution(candidate: Candidate) -> float | None:
    """The seed's last α=0 ablation contribution in its source run (positive: it helped), read
    from the decision records between its germination and the slot's next one; None when it
    never blended (a TRAINING seed does not change the output, so it has no contribution)."""
    if candidate.source is None:
        raise AuditError(f"candidate {candidate.key} has no source run")
    with RunStore.open(Path(candidate.source)) as store:
        germs = [e for e in store.events("germinate") if e.slot == candidate.slot]
        mine = [e for e in germs if e.id == candidate.event_id] or [
            e for e in germs if e.tick == candidate.germinate_tick
        ]
        if not mine:
            raise AuditError(f"{candidate.source}: no germination of {candidate.key}")
        env = mine[0].env
        end = min(
            (e.tick for e in germs if e.env == env and e.tick > candidate.germinate_tick),
            default=math.inf,
        )
        last = None
        for d in store.decisions(env):
            if candidate.germinate_tick <= d.tick < end:
                for s in d.slot_states:
                    if s["name"] == candidate.slot and s.get("contribution") is not None:
                        last = float(s["contribution"])
    return last


def ablation_estimate(candidates: Sequence[Candidate], metric: str = "metric") -> Estimate:
    """Each seed's last recorded α=0 ablation contribution, as a v(S) difference: the raw change
    of the task metric for metric "metric"; for a loss metric the sign is flipped (positive
    contribution = lower loss) but the units are the task metric's, so `comparable` is False.
    A seed that never blended gets 0."""
    cs = _check(candidates)
    credit = {}
    for c in cs:
        x = last_contribution(c) or 0.0  # checks that c has a source run
        with RunStore.open(Path(str(c.source))) as store:
            higher = _higher_is_better(store.manifest())
        if metric == "metric":
            credit[c.key] = x if higher else -x
        else:
            credit[c.key] = -x
    return Estimate(ABLATION, credit, 0, 0.0, 0, comparable=metric == "metric")


def estimate_all(
    audit: Audit,
    protocol: AuditProtocol,
    candidates: Sequence[Candidate],
    *,
    samples: int = DEFAULT_SAMPLES,
    seed: int = 0,
    fraction: float = SHORT_FRACTION,
    workers: int | None = None,
    retries: int = 1,
    exact: Estimate | None = None,
    **backend: Any,
) -> dict[str, Estimate]:
    """Every estimator on one candidate set; `exact` given (a recorded audit's φ) is used as is.
    `backend`: backend= and ray_address=, as for `Audit.run`."""
    kw = {"workers": workers, "retries": retries, **backend}
    out = [
        exact or exact_estimate(audit, protocol, candidates, **kw),
        ablation_estimate(candidates, protocol.metric),
        leave_one_out_estimate(audit, protocol, candidates, **kw),
        permutation_estimate(audit, protocol, candidates, samples, seed, **kw),
        short_rollout_estimate(audit, protocol, candidates, fraction, **kw),
    ]
    return {e.name: e for e in out}


# ---------------------------------------------------------------------------------------------
# Recorded audits and the comparison
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RecordedAudit:
    """An exact audit recorded in a run: its protocol, candidates and φ."""

    run_dir: Path
    protocol: AuditProtocol
    candidates: tuple[Candidate, ...]
    phi: dict[str, float]

    @property
    def exact(self) -> Estimate:
        cost = 2 ** len(self.candidates) * self.protocol.repeats
        return Estimate(EXACT, dict(self.phi), cost, float(cost))


def _protocol_from_cache(audit_dir: Path, phash: str, repeats: int) -> AuditProtocol:
    for path in sorted((audit_dir / "jobs").glob("*.json")):
        job = json.loads(path.read_text())
        if job.get("protocol_hash") != phash:
            continue
        c = job["protocol"]
        protocol = AuditProtocol(
            task=c["task"],
            config=config_from_dict(c["config"]),
            ticks=c["ticks"],
            metric=c["metric"],
            repeats=repeats,
            base_seed=c["base_seed"],
        )
        if protocol.protocol_hash() != phash:
            raise AuditError(
                f"{path}: its protocol no longer hashes to {phash[:12]} "
                "(recorded by another Esper version?)"
            )
        return protocol
    raise AuditError(
        f"{audit_dir}: no cached retrain of protocol {phash[:12]}; the audit cache was removed"
    )


def recorded_audit(run_dir: str | Path, audit_dir: str | Path | None = None) -> RecordedAudit:
    """The exact audit labelled on `run_dir`'s germinate events; its protocol is read back from
    the audit cache (`run_dir/audit` by default, where `esper audit` keeps it)."""
    run_dir = Path(run_dir)
    audit_dir = Path(audit_dir) if audit_dir is not None else run_dir / "audit"
    with RunStore.open(run_dir) as store:
        labelled = [e for e in store.events("germinate") if "shapley" in e.labels]
    if not labelled:
        raise AuditError(f"run {run_dir} has no audited seed: run `esper audit {run_dir}` first")
    last = labelled[-1].labels["shapley"]  # the latest audit's candidate set
    keys = tuple(last["candidates"])
    cands: dict[str, Candidate] = {}
    phi: dict[str, float] = {}
    for e in labelled:
        lab = e.labels["shapley"]
        if tuple(lab["candidates"]) != keys or lab["protocol_hash"] != last["protocol_hash"]:
            continue
        with RunStore.open(run_dir) as store:
            c = candidate_of(store, e, str(run_dir))
        cands[c.key], phi[c.key] = c, float(lab["phi"])
    if set(cands) != set(keys):
        raise AuditError(f"run {run_dir}: the labels of its last audit are incomplete")
    protocol = _protocol_from_cache(audit_dir, last["protocol_hash"], int(last["repeats"]))
    return RecordedAudit(run_dir, protocol, tuple(cands[k] for k in keys), phi)


@dataclass(frozen=True)
class CompareRow:
    estimator: str
    retrains: int
    """Summed over the runs."""
    tick_cost: float
    spearman: float
    """Pooled over every candidate of every run, against exact φ."""
    mae: float
    """Mean absolute error against exact φ (NaN when the units differ)."""
    n: int


@dataclass(frozen=True)
class Comparison:
    rows: tuple[CompareRow, ...]
    runs: tuple[dict[str, Any], ...]
    """Per run: run_dir, protocol_hash, ticks, repeats, candidates, and each estimator's credit,
    retrains, tick_cost and ran."""


def compare_estimates(
    per_run: Sequence[tuple[RecordedAudit, dict[str, Estimate]]],
) -> tuple[CompareRow, ...]:
    names = list(dict.fromkeys(n for _, ests in per_run for n in ests))
    rows = []
    for name in names:
        est, ref, retrains, ticks, comparable = [], [], 0, 0.0, True
        for rec, ests in per_run:
            e = ests.get(name)
            if e is None:
                continue
            retrains, ticks, comparable = (
                retrains + e.retrains,
                ticks + e.tick_cost,
                comparable and e.comparable,
            )
            for k in rec.phi:
                est.append(e.credit[k])
                ref.append(rec.phi[k])
        mae = mean_abs_error(est, ref) if comparable else math.nan
        rows.append(CompareRow(name, retrains, ticks, spearman(est, ref), mae, len(est)))
    return tuple(rows)


def compare_audits(
    run_dirs: Sequence[str | Path],
    *,
    samples: int = DEFAULT_SAMPLES,
    seed: int = 0,
    fraction: float = SHORT_FRACTION,
    workers: int | None = None,
    retries: int = 1,
    value_fn: ValueFn = subset_value,
    progress: Callable[[Path], None] | None = None,
    **backend: Any,
) -> Comparison:
    """Every estimator on every run's recorded audit, against its exact φ. `backend`:
    backend= and ray_address=, as for `Audit.run`."""
    if not run_dirs:
        raise AuditError("no runs to compare")
    per_run = []
    for run_dir in run_dirs:
        rec = recorded_audit(run_dir)
        if progress is not None:
            progress(rec.run_dir)
        audit = Audit(rec.run_dir / "audit", value_fn=value_fn)
        per_run.append(
            (
                rec,
                estimate_all(
                    audit,
                    rec.protocol,
                    rec.candidates,
                    samples=samples,
                    seed=seed,
                    fraction=fraction,
                    workers=workers,
                    retries=retries,
                    exact=rec.exact,
                    **backend,
                ),
            )
        )
    runs = tuple(
        {
            "run_dir": str(rec.run_dir),
            "protocol_hash": rec.protocol.protocol_hash(),
            "ticks": rec.protocol.ticks,
            "repeats": rec.protocol.repeats,
            "metric": rec.protocol.metric,
            "candidates": [c.key for c in rec.candidates],
            "estimates": {
                n: {
                    "credit": e.credit,
                    "retrains": e.retrains,
                    "tick_cost": e.tick_cost,
                    "ran": e.ran,
                }
                for n, e in ests.items()
            },
        }
        for rec, ests in per_run
    )
    return Comparison(compare_estimates(per_run), runs)


HEADERS = (
    "estimator",
    "retrains",
    "tick-equivalent",
    "Spearman ρ vs exact φ",
    "MAE vs exact φ",
    "n",
)


def format_rows(comparison: Comparison) -> list[tuple[str, ...]]:
    """The comparison as text cells under `HEADERS` (for rich tables and markdown)."""

    def num(x: float, fmt: str) -> str:
        return "—" if math.isnan(x) else format(x, fmt)

    return [
        (
            r.estimator,
            str(r.retrains),
            f"{r.tick_cost:.1f}",
            num(r.spearman, "+.3f"),
            num(r.mae, ".4f"),
            str(r.n),
        )
        for r in comparison.rows
    ]


def to_markdown(comparison: Comparison, title: str = "") -> str:
    lines = [f"**{title}**", ""] if title else []
    lines += ["| " + " | ".join(HEADERS) + " |", "|" + "---|" * len(HEADERS)]
    lines += ["| " + " | ".join(row) + " |" for row in format_rows(comparison)]
    return "\n".join(lines) + "\n"
