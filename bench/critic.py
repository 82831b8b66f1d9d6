"""The φ critic (paper §5.4) on more audited runs, under the replay audit protocol, with and
without the gradient-health telemetry.

    .venv/bin/python bench/critic.py [--runs 36] [--widths 2 3] [--ticks 14] [--budget 14]
        [--repeats 2] [--workers 2] [--lag 3] [--out runs/critic]

1. Grow N digits runs (seeds 0..N−1), cycling over `--policies` (the heuristic, the shipped
   learned policy, random) and then `--widths` (the same
   `esper grow` runs as bench/audit_estimators.py, each with its flight recorder; a complete run
   under --out is reused, and so is a finished audit: the audit cache answers it).
2. Audit each exactly over its first ≤ 3 germinations that leave a tick of training inside the
   budget (`esper audit`'s protocol; φ labels land on the germinate events).
3. Fit the ridge critic on the recorded telemetry `--lag` ticks after each germination and score
   it on runs it never saw (leave one run out, pooled Spearman ρ and MAE against exact φ), for
   feature sets that add one group at a time: the features of the first critic, + gradient
   health, + place and size, + the metric's recent gain. `critic.safetensors` is the full set.

Writes `critic.json` and `critic.md` under --out.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path

from rich.table import Table

from audit_estimators import audit, grow, machine, run_arguments, start
from esper.run import SHIPPED_POLICY
from esper.simic.critic import (
    BLUEPRINT_PREFIX,
    FIRST_SLOT_FEATURES,
    GLOBAL_FEATURES,
    GRADIENT_FEATURES,
    PLACE_FEATURES,
    TOPOLOGY_PREFIX,
    TREND_FEATURES,
    CriticRow,
    critic_dataset,
    fit_critic,
    held_out,
    spearman,
)

GROUPS = {
    "first critic's features": (*GLOBAL_FEATURES, *FIRST_SLOT_FEATURES),
    "+ gradient health": GRADIENT_FEATURES,
    "+ depth, width, seed size": PLACE_FEATURES,
    "+ metric gain over lag": TREND_FEATURES,
}


def keep(rows: list[CriticRow], names: set[str]) -> list[CriticRow]:
    """The rows with only the named features (and every blueprint/topology one-hot)."""

    def pick(f: dict[str, float]) -> dict[str, float]:
        return {
            k: v
            for k, v in f.items()
            if k in names or k.startswith((BLUEPRINT_PREFIX, TOPOLOGY_PREFIX))
        }

    return [dataclasses.replace(r, features=pick(r.features)) for r in rows]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    run_arguments(p, runs=36)
    # Runs and audits of one length, so that a seed germinated late still has ticks to blend;
    # the shipped learned policy varies the blueprints and timing the heuristic repeats.
    p.set_defaults(ticks=14, budget=14, policies=["heuristic", str(SHIPPED_POLICY), "random"])
    p.add_argument("--widths", type=int, nargs="+", default=[2, 3], help="host widths, cycled")
    p.add_argument("--out", type=Path, default=Path("runs/critic"))
    args = p.parse_args()
    console = start(args)
    t0 = time.perf_counter()
    runs, audited = [], 0
    for seed in range(args.runs):
        policy = args.policies[seed % len(args.policies)]
        width = args.widths[(seed // len(args.policies)) % len(args.widths)]
        args.width = width  # grow() reads the host width from args
        name = Path(policy).stem  # a policy file is named by its stem
        run_dir = args.out / "runs" / f"digits-w{width}-{name}-s{seed}"
        n, ran, hit = audit(args, grow(args, seed, run_dir, policy))
        console.print(
            f"seed {seed} (w{width}, {policy}): {n} audited, {ran} retrained, {hit} cached "
            f"({time.perf_counter() - t0:.0f} s so far)"
        )
        if n:
            runs.append(run_dir)
            audited += n
    t_audit = time.perf_counter() - t0
    rows = critic_dataset(runs, lag=args.lag)
    if len({r.run for r in rows}) < 3:
        raise SystemExit("fewer than 3 audited runs: nothing to hold out")

    table = Table(
        "features", "n features", "held-out Spearman ρ", "ρ where φ ≠ 0", "held-out MAE",
        "rows", "runs",
        title=f"critic of exact φ: ridge on telemetry {args.lag} ticks after germination, "
        "leave one run out",
    )  # fmt: skip
    names: set[str] = set()
    scores = {}
    for label, group in GROUPS.items():
        names |= set(group)
        subset = keep(rows, names)
        score = held_out(subset, lag=args.lag)
        n_features = len({k for r in subset for k in r.features})
        # Seeds that never blended inside the budget earn exactly 0; ranking the rest is the
        # harder half of the question.
        live = [i for i, r in enumerate(subset) if r.phi != 0]
        rho_live = spearman([score.predictions[i] for i in live], [subset[i].phi for i in live])
        scores[label] = {
            "spearman": score.spearman,
            "spearman_nonzero": rho_live,
            "n_nonzero": len(live),
            "mae": score.mae,
            "n": score.n,
        }
        table.add_row(
            label,
            str(n_features),
            f"{score.spearman:+.3f}",
            f"{rho_live:+.3f} (n {len(live)})",
            f"{score.mae:.4f}",
            str(score.n),
            str(len(runs)),
        )
    console.print(table)
    critic = fit_critic(rows, lag=args.lag)
    critic.meta["held_out"] = scores[list(GROUPS)[-1]]  # the full feature set
    path = critic.save(args.out / "critic.safetensors")
    phis = [r.phi for r in rows]
    zeros = sum(1 for x in phis if x == 0)
    summary = (
        f"{len(rows)} labelled seeds from {len(runs)} runs ({audited} audited); φ from "
        f"{min(phis):+.4f} to {max(phis):+.4f}, mean |φ| "
        f"{sum(map(abs, phis)) / len(phis):.4f}, {zeros} exactly 0; grow + audits "
        f"{t_audit:.0f} s; load average after {os.getloadavg()}"
    )
    console.print(summary)
    args.out.mkdir(parents=True, exist_ok=True)
    result = {
        "machine": machine(),
        "command": sys.argv,
        "args": {k: str(v) for k, v in vars(args).items()},
        "runs": [str(r) for r in runs],
        "scores": scores,
        "critic": {"path": str(path), "l2": critic.l2, "features": list(critic.features)},
        "summary": summary,
        "wall_s": t_audit,
    }
    (args.out / "critic.json").write_text(json.dumps(result, indent=1, default=str))
    md = "| features | held-out Spearman ρ | ρ where φ ≠ 0 | held-out MAE | n |\n"
    md += "|---|---:|---:|---:|---:|\n" + "".join(
        f"| {k} | {v['spearman']:+.3f} | {v['spearman_nonzero']:+.3f} | {v['mae']:.4f} | "
        f"{v['n']} |\n"
        for k, v in scores.items()
        if not math.isnan(v["spearman"])
    )
    (args.out / "critic.md").write_text(f"{md}\n{summary}\n\n{machine()}\n")
    console.print(f"written to {args.out}/critic.json and .md")


if __name__ == "__main__":
    main()
