"""Does Narset put growth where it pays? Zones on the deep CNN (digits), one global pair vs zones
with fixed equal budgets vs zones under Narset.

    .venv/bin/python bench/zones.py [--seeds 5] [--ticks 40] [--workers 2] [--json FILE]

The host: the width-2 residual CNN of 8 blocks (`examples/deep_cnn.toml`), a slot per block, with
a bottleneck in the early zone: its blocks' residual branches are 1 channel wide (`host.narrow`)
while the late zone's are 8 wide, so growth in the early zone adds what the host lacks and growth
in the late zone adds little. Two zones: early (blocks 0–3) and late (4–7). Every arm is a real
recorded run on held-out seeds (1000 on), `--ticks` ticks, the heuristic Tamiyo in each zone
(growth-hungry: it germinates at every plateau), windows of 5 ticks:

    host        no growth (the baseline every gain is measured against, paired by seed)
    global      one heuristic pair over all 8 slots (no zones)
    fixed       two zones, each 1 germination per window and the same rent ceiling, fixed
    narset      the same zones and starting budgets, Narset moving them every window, fed a
                leave-one-zone-out ablation probe of each zone every window
    early only  calibration: only the early zone may grow (late budget 0)
    late only   calibration: only the late zone may grow

The calibration arms name the productive zone (the one whose growth alone gains more, by
median). Columns: final accuracy (median and mean), its gain over the host (paired, median),
rent paid (median), gain per unit rent (median of the paired ratios), germinations per zone
(mean) and the share of growth in the productive zone (germinations there over all, median of
runs that grew). Goal (issue 16): Narset's runs put most growth in the productive zone and reach
the best gain per unit rent.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from esper.config import GrowConfig, HostConfig
from esper.contracts.zones import NarsetConfig, ProbeConfig, ZonesConfig, ZoneSpec
from esper.evaluate import FIRST_HELD_OUT
from esper.run import start_run
from esper.tamiyo.policies import HeuristicConfig
from esper.tolaria.environment import EnvConfig
from pool import run_pool
from vector_env import machine

ARMS = ("host", "global", "fixed", "narset", "early only", "late only")
WINDOW = 5
CEILING = 0.006
"""Rent per tick a zone may carry before it cannot germinate: about two conv seeds."""


def _zones(arm: str) -> ZonesConfig:
    early = 0 if arm == "late only" else 1
    late = 0 if arm == "early only" else 1
    return ZonesConfig(
        zone=(
            ZoneSpec("early", blocks=(0, 3), growth_budget=early, rent_ceiling=CEILING),
            ZoneSpec("late", blocks=(4, 7), growth_budget=late, rent_ceiling=CEILING),
        ),
        window=WINDOW,
        probe=ProbeConfig(every=WINDOW if arm == "narset" else 0, kind="ablate"),
        narset=NarsetConfig(enabled=arm == "narset", step=0.5, productivity_weight=1.0),
    )


def config(arm: str, seed: int, ticks: int) -> GrowConfig:
    return GrowConfig(
        task="digits",
        policy="none" if arm == "host" else "heuristic",
        ticks=ticks,
        seed=seed,
        device="cpu",
        host=HostConfig(kind="cnn", width=2, depth=8, hidden=8, narrow=(0, 3)),
        env=EnvConfig(),
        heuristic=HeuristicConfig(warmup_ticks=2, plateau_patience=0, hold_ticks=1),
        zones=_zones(arm) if arm not in ("host", "global") else ZonesConfig(),
    )


def run_one(arm: str, seed: int, ticks: int) -> dict[str, object]:
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        run = start_run(config(arm, seed, ticks), run_dir=Path(tmp) / "run")
        result = run.run()
        zones = run.episode.zones
        where = [zones.layout.owner(s) if zones else _zone_of(s) for s in _grown(run)]
        run.store.close()
    return {
        "arm": arm,
        "seed": seed,
        "final": result.final_metric,
        "rent": result.rent_paid,
        "early": where.count("early"),
        "late": where.count("late"),
        "params": result.params_end,
        "wall": result.wall_time,
    }


def _describe(r: dict) -> str:
    return (
        f"{r['arm']:<10} seed {r['seed']}: acc {r['final']:.4f}, rent {r['rent']:.4f}, "
        f"grown early {r['early']} late {r['late']}"
    )


def _grown(run: object) -> list[str]:
    """The slot of every germination in the run's record."""
    return [e.slot for e in run.store.events() if e.kind == "germinate"]  # type: ignore[attr-defined]


def _zone_of(slot: str) -> str:
    return "early" if int(slot.removeprefix("slots.b")) < 4 else "late"


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def summarise(rows: list[dict], seeds: list[int]) -> tuple[dict[str, dict], str]:
    by = {(r["arm"], r["seed"]): r for r in rows}
    host = {s: by[("host", s)]["final"] for s in seeds}
    gain_of = {a: median([by[(a, s)]["final"] - host[s] for s in seeds]) for a in ARMS}
    productive = "early" if gain_of["early only"] >= gain_of["late only"] else "late"
    out = {}
    for arm in ARMS:
        runs = [by[(arm, s)] for s in seeds]
        gains = [r["final"] - host[r["seed"]] for r in runs]
        per_rent = [g / r["rent"] for g, r in zip(gains, runs, strict=True) if r["rent"] > 0]
        shares = [r[productive] / (r["early"] + r["late"]) for r in runs if r["early"] + r["late"]]
        out[arm] = {
            "final_median": median([r["final"] for r in runs]),
            "final_mean": statistics.fmean(r["final"] for r in runs),
            "gain_median": median(gains),
            "rent_median": median([r["rent"] for r in runs]),
            "gain_per_rent": median(per_rent),
            "early_mean": statistics.fmean(r["early"] for r in runs),
            "late_mean": statistics.fmean(r["late"] for r in runs),
            "share_productive": median(shares),
            "wall_median": median([r["wall"] for r in runs]),
        }
    return out, productive


def table(summary: dict[str, dict], productive: str, seeds: list[int], ticks: int) -> Table:
    t = Table(
        title=f"Zones on the deep CNN (digits), seeds {seeds[0]}–{seeds[-1]}, {ticks} ticks; "
        f"productive zone: {productive}"
    )
    for col in (
        "arm",
        "final acc (median)",
        "mean",
        "gain vs host",
        "rent paid",
        "gain / rent",
        "germ. early",
        "germ. late",
        f"share in {productive}",
        "wall s",
    ):
        t.add_column(col, justify="left" if col == "arm" else "right")
    for arm, s in summary.items():
        t.add_row(
            arm,
            f"{s['final_median']:.4f}",
            f"{s['final_mean']:.4f}",
            f"{s['gain_median']:+.4f}",
            f"{s['rent_median']:.4f}",
            f"{s['gain_per_rent']:.3f}",
            f"{s['early_mean']:.1f}",
            f"{s['late_mean']:.1f}",
            f"{s['share_productive']:.2f}",
            f"{s['wall_median']:.1f}",
        )
    return t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--ticks", type=int, default=40)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--arms", default=",".join(ARMS), help="comma-separated subset")
    ap.add_argument("--json", type=Path, help="also write every run's row here")
    args = ap.parse_args()
    console = Console(width=200)
    seeds = list(range(FIRST_HELD_OUT, FIRST_HELD_OUT + args.seeds))
    arms = [a.strip() for a in args.arms.split(",")]
    jobs = [(a, s, args.ticks) for s in seeds for a in arms]
    t0 = time.perf_counter()
    rows = run_pool(run_one, jobs, args.workers, console, _describe)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    console.print(f"{machine(torch.device('cpu'))}; {time.perf_counter() - t0:.0f} s in all")
    if set(ARMS) <= set(arms):
        summary, productive = summarise(rows, seeds)
        console.print(table(summary, productive, seeds, args.ticks))


if __name__ == "__main__":
    main()
