"""Growth runs on digits: policies `none`, `random`, `heuristic` at matched ticks, several seeds.

    .venv/bin/python bench/growth_runs.py [--seeds 5] [--ticks 40] [--width 2]

Prints median and lower quartile (q25) of the final validation accuracy, parameters added, rent
paid and wall time per policy. Every run is a real `esper grow` run (flight recorder included) in
a temporary directory.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from esper.config import GrowConfig, HostConfig
from esper.run import start_run

POLICIES = ("none", "random", "heuristic")


def q25(xs: list[float]) -> float:
    return statistics.quantiles(xs, n=4, method="inclusive")[0] if len(xs) > 1 else xs[0]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--ticks", type=int, default=40)
    p.add_argument("--width", type=int, default=2)
    p.add_argument("--task", default="digits")
    args = p.parse_args()
    console = Console()
    rows: dict[str, list[dict[str, float]]] = {pol: [] for pol in POLICIES}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(args.seeds):
            for pol in POLICIES:  # interleaved, so machine drift hits every policy alike
                cfg = GrowConfig(
                    task=args.task,
                    policy=pol,
                    seed=seed,
                    ticks=args.ticks,
                    host=HostConfig(width=args.width),
                )
                t0 = time.perf_counter()
                r = start_run(cfg, run_dir=Path(tmp) / f"{pol}-{seed}").run()
                rows[pol].append(
                    {
                        "metric": r.final_metric,
                        "added": r.params_end - r.params_start,
                        "rent": r.rent_paid,
                        "wall": time.perf_counter() - t0,
                        "committed": len(r.committed),
                    }
                )
                console.print(
                    f"seed {seed} {pol:9s} metric {r.final_metric:.4f} "
                    f"added {r.params_end - r.params_start} committed {r.committed} "
                    f"pruned {r.pruned}"
                )
    table = Table(
        title=f"{args.task}, host width {args.width}, {args.ticks} ticks, seeds 0..{args.seeds - 1}"
    )
    for col in (
        "policy",
        "accuracy median",
        "accuracy q25",
        "params added (median)",
        "seeds committed (total)",
        "rent paid (median)",
        "wall s (median)",
    ):
        table.add_column(col)
    for pol, rs in rows.items():
        acc = [r["metric"] for r in rs]
        table.add_row(
            pol,
            f"{statistics.median(acc):.4f}",
            f"{q25(acc):.4f}",
            f"{statistics.median(r['added'] for r in rs):.0f}",
            f"{sum(r['committed'] for r in rs):.0f}",
            f"{statistics.median(r['rent'] for r in rs):.4f}",
            f"{statistics.median(r['wall'] for r in rs):.1f}",
        )
    console.print(table)
    console.print(
        f"machine: {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} torch threads, torch {torch.__version__}"
    )


if __name__ == "__main__":
    main()
