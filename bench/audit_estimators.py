"""Cheaper credit estimators and a learned critic against exact full-retrain Shapley φ, on N
recorded digits runs (paper §5.3–5.4).

    .venv/bin/python bench/audit_estimators.py [--runs 12] [--ticks 12] [--budget 10]
        [--repeats 2] [--workers 2] [--samples 2] [--lag 3] [--out runs/audit_estimators]

1. Grow N digits runs (seeds 0..N−1, `--ticks` ticks), cycling over `--policies` (default
   heuristic, random; the heuristic with warm-up 1 tick and plateau patience 0 so that seeds
   germinate early in a short run); each is a real `esper grow` run with its flight recorder.
   A run already complete under --out is reused.
2. Audit each (`esper audit`'s protocol: the run's config, `--budget` ticks, `--metric`,
   R = `--repeats`, local backend, `--workers` processes) over its first ≤ 3 germinations that
   leave at least one tick of training inside the budget. The φ labels land on the runs.
3. Every estimator on every recorded audit (`esper audit RUN... --compare`): retrains each needs
   alone, tick-equivalent cost, Spearman ρ with exact φ pooled over every seed of every run, MAE.
   Leave-one-out and permutation values come from the exact audit's cache; the short rollout
   (⌈budget/3⌉ ticks, > last germination, R = 1) retrains.
4. The critic (`esper train-critic`): ridge on the recorded telemetry `--lag` ticks after each
   germination; its held-out ρ with exact φ, leave one run out (no run in train and test).

Writes `audit_estimators.json` and `audit_estimators.md` (and `critic.safetensors`) under --out.
Retrain cost: N · (2^n · R + 2^n) retrains of ≤ budget ticks (n ≤ 3): ~12 · 24 for the defaults.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

import vector_env
from esper.audits.estimators import HEADERS, compare_audits, format_rows, to_markdown
from esper.audits.replay import candidates_from_run
from esper.audits.retrain import Audit, AuditProtocol
from esper.config import GrowConfig, HostConfig, config_from_dict, override
from esper.recorder import RecorderError, RunStore
from esper.run import start_run
from esper.simic.critic import critic_dataset, fit_critic, held_out
from esper.tolaria.environment import EnvConfig


def machine() -> str:
    return f"{vector_env.machine(torch.device('cpu'))}; {time.strftime('%Y-%m-%d %H:%M UTC')}"


def grow(args: argparse.Namespace, seed: int, run_dir: Path, policy: str) -> Path:
    """The run of this seed, grown unless a complete one is already there."""
    cfg = override(
        GrowConfig(
            device="cpu",
            ticks=args.ticks,
            seed=seed,
            policy=policy,
            checkpoint_every=args.ticks,
            host=HostConfig(width=args.width),
            env=EnvConfig(batches_per_tick=args.batches_per_tick),
        ),
        **{"heuristic.warmup_ticks": 1, "heuristic.plateau_patience": 0},
    )
    try:
        with RunStore.open(run_dir) as store:
            if store.last_complete_tick() == cfg.ticks - 1:
                return run_dir
    except RecorderError:
        pass
    if run_dir.exists():
        raise SystemExit(f"{run_dir} holds an incomplete run: remove it and rerun")
    run = start_run(cfg, run_dir=run_dir)
    try:
        run.run()
    finally:
        run.store.close()
    return run_dir


def audit(args: argparse.Namespace, run_dir: Path) -> tuple[int, int, int]:
    """Exact audit of the run's first ≤ 3 germinations inside the budget: (seeds, retrained,
    cached)."""
    with RunStore.open(run_dir) as store:
        cfg = config_from_dict(store.manifest()["config"])
    candidates = [c for c in candidates_from_run(run_dir) if c.germinate_tick < args.budget - 1]
    if not candidates:
        return 0, 0, 0
    protocol = AuditProtocol(
        task=cfg.task,
        config=cfg,
        ticks=args.budget,
        metric=args.metric,
        repeats=args.repeats,
        base_seed=cfg.seed,
    )
    result = Audit(run_dir / "audit").run(protocol, candidates, workers=args.workers)
    if result.failures:
        raise SystemExit(
            f"{run_dir}: {len(result.failures)} retrains failed: "
            f"{result.failures[0].error.splitlines()[0]}"
        )
    return len(candidates), result.retrains, result.cached


def run_arguments(p: argparse.ArgumentParser, runs: int) -> None:
    """The recorded runs and their audits (shared with bench/critic.py)."""
    p.add_argument("--runs", type=int, default=runs, help="recorded runs (seeds 0..N-1)")
    p.add_argument("--ticks", type=int, default=12, help="ticks of each recorded run")
    p.add_argument("--budget", type=int, default=10, help="ticks of each audit retrain")
    p.add_argument("--repeats", type=int, default=2, help="R of the exact audit")
    p.add_argument("--metric", default="metric", help="metric, val_loss or train_loss")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--lag", type=int, default=3, help="critic: ticks after germination")
    p.add_argument(
        "--policies",
        nargs="+",
        default=["heuristic", "random"],
        help="policies of the recorded runs, cycled over seeds (random varies the "
        "blueprints, slots and ticks the heuristic always picks alike)",
    )
    p.add_argument("--batches-per-tick", type=int, default=0, help="0: one epoch")
    p.add_argument("--threads", type=int, default=1, help="torch threads of this process")


def start(args: argparse.Namespace) -> Console:
    """Torch threads as asked; a console that has printed the machine and the command."""
    torch.set_num_threads(args.threads)
    console = Console(width=150)
    console.print(
        f"[bold]{machine()}[/]\n$ {' '.join(sys.argv)}\nload average before: {os.getloadavg()}"
    )
    return console


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    run_arguments(p, runs=12)
    p.add_argument("--samples", type=int, default=2, help="permutation estimator orders")
    p.add_argument("--width", type=int, default=2, help="host width")
    p.add_argument("--out", type=Path, default=Path("runs/audit_estimators"))
    args = p.parse_args()
    console = start(args)
    t_all = time.perf_counter()
    runs, seeds_audited, retrained, cached = [], 0, 0, 0
    t0 = time.perf_counter()
    for seed in range(args.runs):
        policy = args.policies[seed % len(args.policies)]
        run_dir = grow(args, seed, args.out / "runs" / f"digits-{policy}-s{seed}", policy)
        n, ran, hit = audit(args, run_dir)
        console.print(
            f"seed {seed}: {n} seeds audited, {ran} retrained, {hit} cached "
            f"({time.perf_counter() - t0:.0f} s so far)"
        )
        if n:
            runs.append(run_dir)
            seeds_audited, retrained, cached = seeds_audited + n, retrained + ran, cached + hit
    t_audit = time.perf_counter() - t0
    if not runs:
        raise SystemExit("no run germinated a seed inside the budget: nothing to compare")

    t0 = time.perf_counter()
    comparison = compare_audits(runs, samples=args.samples, workers=args.workers)
    t_compare = time.perf_counter() - t0
    title = (
        f"credit estimators vs exact φ ({args.metric}), {len(runs)} digits runs, "
        f"{seeds_audited} seeds, budget {args.budget} ticks, exact R={args.repeats}"
    )
    table = Table(*HEADERS, title=title)
    for row in format_rows(comparison):
        table.add_row(*row)
    console.print(table)

    rows = critic_dataset(runs, lag=args.lag)
    score = held_out(rows, lag=args.lag) if len({r.run for r in rows}) >= 2 else None
    critic = fit_critic(rows, lag=args.lag)
    if score is not None:
        critic.meta["held_out"] = {"spearman": score.spearman, "mae": score.mae, "n": score.n}
    critic_path = critic.save(args.out / "critic.safetensors")
    ctable = Table(
        "critic",
        "rows",
        "runs",
        "L2 (all rows)",
        "held-out Spearman ρ",
        "held-out MAE",
        "n",
        title=f"critic of exact φ: ridge on telemetry {args.lag} "
        "ticks after germination, leave one run out",
    )
    fmt = lambda x, f: "—" if x is None or math.isnan(x) else format(x, f)  # noqa: E731
    ctable.add_row(
        "ridge",
        str(len(rows)),
        str(len({r.run for r in rows})),
        f"{critic.l2:g}",
        fmt(score and score.spearman, "+.3f"),
        fmt(score and score.mae, ".4f"),
        str(score.n if score else 0),
    )
    console.print(ctable)
    wall = time.perf_counter() - t_all
    console.print(
        f"grow + exact audits {t_audit:.0f} s ({retrained} retrained, {cached} "
        f"cached); estimators {t_compare:.0f} s; whole benchmark {wall:.0f} s; "
        f"load average after: {os.getloadavg()}"
    )

    args.out.mkdir(parents=True, exist_ok=True)
    result = {
        "machine": machine(),
        "command": sys.argv,
        "args": {k: str(v) for k, v in vars(args).items()},
        "compare": [dict(zip(HEADERS, r, strict=True)) for r in format_rows(comparison)],
        "compare_raw": [r.__dict__ for r in comparison.rows],
        "runs": list(comparison.runs),
        "critic": {
            "path": str(critic_path),
            "rows": len(rows),
            "l2": critic.l2,
            "held_out": critic.meta.get("held_out"),
        },
        "wall_s": {"grow_and_audit": t_audit, "estimators": t_compare, "total": wall},
    }
    (args.out / "audit_estimators.json").write_text(json.dumps(result, indent=1, default=str))
    md = to_markdown(comparison, title) + (
        f"\ncritic (ridge, lag {args.lag}): held-out Spearman ρ "
        f"{fmt(score and score.spearman, '+.3f')}, MAE {fmt(score and score.mae, '.4f')}, "
        f"n {score.n if score else 0} (leave one run out)\n\n{machine()}\n"
    )
    (args.out / "audit_estimators.md").write_text(md)
    console.print(f"written to {args.out}/audit_estimators.json and .md")


if __name__ == "__main__":
    main()
