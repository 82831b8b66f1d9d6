"""`esper evaluate`: policies side by side on held-out seeds at matched ticks (paper §7 table).

Held-out seeds are 1000 and up: `esper train-policy` draws its episodes' seeds below 1000. One
evaluator, `run_held_out`, serves both `esper evaluate` and the periodic held-out evaluation of a
policy in training: every (policy, seed) pair is a full recorded growth run (`esper.run`) of the
same config but the policy, its seed mapped to host, data and policy as in any run
(`RunSeeds`). The table
gives median / q25 of the task metric and of the final reward, parameters added, FLOPs delta, the
blueprint distribution of committed seeds, rent and churn paid, and a paired bootstrap confidence
interval on the difference in final reward to each baseline that was run (`none`, `random`,
`heuristic`; same seeds, so the pairing removes host luck).
"""

from __future__ import annotations

import json
import random
import statistics
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from esper.config import GrowConfig
from esper.contracts.errors import ConfigError
from esper.run import GrowResult, start_run
from esper.tamiyo.policies import POLICIES, Policy

FIRST_HELD_OUT = 1000
"""Seeds from here on are held out: training draws its episodes' seeds below it."""
HELD_OUT_SEEDS = tuple(range(FIRST_HELD_OUT, FIRST_HELD_OUT + 10))
"""The default held-out seeds of `esper evaluate`."""
BASELINES = ("none", "random", "heuristic")
"""Policies every other row is compared with, when they were run."""


@dataclass(frozen=True)
class PolicyRow:
    policy: str
    seeds: int
    metric_median: float
    metric_q25: float
    reward_median: float
    reward_q25: float
    params_added_median: float
    flops_delta_median: float
    committed: dict[str, int]
    rent_median: float
    churn_median: float
    reward_diffs: dict[str, tuple[float, float, float]]
    """Per baseline run: mean paired difference in final reward (this − baseline) and its 95%
    bootstrap CI."""


def q25(xs: Sequence[float]) -> float:
    return statistics.quantiles(xs, n=4, method="inclusive")[0] if len(xs) > 1 else xs[0]


def bootstrap_ci(
    diffs: Sequence[float], *, resamples: int = 2000, seed: int = 0, level: float = 0.95
) -> tuple[float, float, float]:
    """(mean, low, high): percentile bootstrap of the mean of paired differences."""
    rng = random.Random(seed)
    n = len(diffs)
    means = sorted(statistics.fmean(rng.choices(diffs, k=n)) for _ in range(resamples))
    lo = means[int((1 - level) / 2 * resamples)]
    hi = means[min(resamples - 1, int((1 + level) / 2 * resamples))]
    return statistics.fmean(diffs), lo, hi


def _row(policy: str, results: list[GrowResult], bases: dict[str, list[GrowResult]]) -> PolicyRow:
    metric = [r.final_metric for r in results]
    reward = [r.reward_total for r in results]
    diffs = {
        name: bootstrap_ci(
            [a.reward_total - b.reward_total for a, b in zip(results, base, strict=True)]
        )
        for name, base in bases.items()
        if name != policy
    }
    return PolicyRow(
        policy=policy,
        seeds=len(results),
        metric_median=statistics.median(metric),
        metric_q25=q25(metric),
        reward_median=statistics.median(reward),
        reward_q25=q25(reward),
        params_added_median=statistics.median(r.params_end - r.params_start for r in results),
        flops_delta_median=statistics.median(r.flops_end - r.flops_start for r in results),
        committed=dict(Counter(b for r in results for b in r.committed)),
        rent_median=statistics.median(r.rent_paid for r in results),
        churn_median=statistics.median(r.churn_paid for r in results),
        reward_diffs=diffs,
    )


SAMPLED = " (sampled)"
"""Suffix of the row of a learned policy that samples its actions."""


def variants(policies: Sequence[str], sample: bool) -> list[tuple[str, str, bool]]:
    """(row label, policy, sample_actions) per row: each policy as given (learned ones take
    their most probable actions) and, with `sample`, each learned one sampling as well."""
    rows = [(p, p, False) for p in policies]
    if sample:
        rows += [(p + SAMPLED, p, True) for p in policies if p not in POLICIES]
    return rows


def held_out_seeds(n: int, first: int = FIRST_HELD_OUT) -> list[int]:
    """`n` held-out seeds from `first` (which must be held out: >= FIRST_HELD_OUT)."""
    if first < FIRST_HELD_OUT:
        raise ConfigError(
            f"seed {first} is drawn in training, so it is not held out: held-out seeds start "
            f"at {FIRST_HELD_OUT}"
        )
    if n < 1:
        raise ConfigError(f"need at least one held-out seed, got {n}")
    return list(range(first, first + n))


@dataclass(frozen=True)
class Contender:
    """One row of an evaluation: a label, the config its runs use (the seed is replaced), and
    optionally a policy object to run instead of `config.policy` (a policy still in training)."""

    label: str
    config: GrowConfig
    policy: Policy | None = None


def run_held_out(
    contenders: Sequence[Contender],
    seeds: Sequence[int],
    out: Path,
    progress: Callable[[str, int, GrowResult], None] | None = None,
) -> dict[str, list[GrowResult]]:
    """Every contender on every seed (each seed must be held out), interleaved so that drift in
    the machine hits every contender alike; runs recorded under `out/runs/LABEL-sSEED`."""
    if seeds:
        held_out_seeds(1, min(seeds))  # refuses a seed that training draws
    results: dict[str, list[GrowResult]] = {c.label: [] for c in contenders}
    for seed in seeds:
        for c in contenders:
            name = _run_name(c.label)
            run = start_run(
                replace(c.config, seed=seed),
                policy=c.policy,
                run_dir=out / "runs" / f"{name}-s{seed}",
            )
            try:
                r = run.run()
            finally:
                run.store.close()
            results[c.label].append(r)
            if progress is not None:
                progress(c.label, seed, r)
    return results


def _run_name(label: str) -> str:
    """A row label as a directory name: a policy file by its stem, "-sampled" for SAMPLED."""
    base = label.removesuffix(SAMPLED)
    name = Path(base).stem if base.endswith(".safetensors") else base
    return name + ("-sampled" if label.endswith(SAMPLED) else "")


def evaluate(
    policies: Sequence[str],
    seeds: Sequence[int],
    base: GrowConfig,
    out: Path,
    progress: Callable[[str, int, GrowResult], None] | None = None,
    sample: bool = False,
) -> list[PolicyRow]:
    """Run every policy on every seed; write `evaluation.json` and `evaluation.md` to `out`.
    `sample`: also run each learned policy sampling its actions (a row "NAME (sampled)")."""
    contenders = [
        Contender(label, replace(base, policy=policy, sample_actions=sampled))
        for label, policy, sampled in variants(policies, sample)
    ]
    results = run_held_out(contenders, seeds, out, progress)
    bases = {b: results[b] for b in BASELINES if b in results}
    rows = [_row(p, rs, bases) for p, rs in results.items()]
    out.mkdir(parents=True, exist_ok=True)
    (out / "evaluation.json").write_text(json.dumps([asdict(r) for r in rows], indent=2))
    (out / "evaluation.md").write_text(to_markdown(rows, base, seeds))
    return rows


def to_markdown(rows: Sequence[PolicyRow], cfg: GrowConfig, seeds: Sequence[int]) -> str:
    bases = [b for b in BASELINES if any(r.policy == b or b in r.reward_diffs for r in rows)]
    head = (
        f"{cfg.task}, host width {cfg.host.width}, {cfg.ticks} ticks, "
        f"{cfg.economy.task_reward} task reward, W_rent {cfg.economy.w_rent}, seeds "
        f"{seeds[0]}..{seeds[-1]} ({len(seeds)})\n\n"
        "| policy | metric median / q25 | reward median / q25 | params added | "
        "FLOPs delta | committed blueprints | rent | churn | "
        + "".join(f"Δreward vs {b} (95% CI) | " for b in bases)
        + "\n|"
        + "---|" * (8 + len(bases))
        + "\n"
    )
    lines = []
    for r in rows:
        diffs = "".join(
            "— | "
            if b not in r.reward_diffs
            else "{:+.3f} [{:+.3f}, {:+.3f}] | ".format(*r.reward_diffs[b])
            for b in bases
        )
        dist = ", ".join(f"{k}×{v}" for k, v in sorted(r.committed.items())) or "none"
        lines.append(
            f"| {Path(r.policy).name} | {r.metric_median:.4f} / {r.metric_q25:.4f} | "
            f"{r.reward_median:.3f} / {r.reward_q25:.3f} | "
            f"{r.params_added_median:.0f} | {r.flops_delta_median:.0f} | {dist} | "
            f"{r.rent_median:.3f} | {r.churn_median:.3f} | {diffs}"
        )
    return head + "\n".join(lines) + "\n"
