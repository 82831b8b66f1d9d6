"""Signal to noise of Phase 1's reward: can an episode's return rank two good growth schedules,
and how much does the paired host-alone baseline (`train-policy --baseline paired`) help?

    .venv/bin/python bench/signal_noise.py [--episodes 12] [--workers 2] [--json FILE]

Episodes are drawn exactly as `esper train-policy` draws them (`train_policy.episode_specs` of
the default `TrainPolicyConfig`: digits, the CNN at widths 2/3/4, seeds below 1000, 40 one-epoch
ticks, the default economy). Each episode is run three times, as real recorded runs: under
schedule A (the heuristic Tamiyo, defaults), schedule B (the heuristic with the same plateau
triggers and another blueprint order: CONV_LIGHT, BOTTLENECK, CONV_HEAVY, ...) and H (no growth:
the host-alone twin). R is an episode's return
(Σ R_total).

    signal          |mean over episodes of R_A − R_B|        (what PPO must detect)
    noise, raw      std over episodes of R_A                  (the return PPO sees today)
    noise, paired   std over episodes of R_A − R_H            (the return with the paired baseline)
    within width    the same, pooled within each host width   (what a critic reading the host's
                                                               size, as ours does, removes anyway)
    SNR             signal / noise;  episodes to rank A vs B at 2σ ≈ (2·noise / signal)²

The paired baseline leaves the signal unchanged (H cancels in (R_A − R_H) − (R_B − R_H)) and
removes from the noise what seed and width decide. Its cost: the H run's wall time, beside A's.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from dataclasses import replace
from itertools import islice
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from esper.config import GrowConfig
from esper.run import start_run
from esper.train_policy import TrainPolicyConfig, episode_specs
from pool import run_pool
from vector_env import machine

SCHEDULES = ("A", "B", "H")
ROTATION_B = ("CONV_LIGHT", "BOTTLENECK", "CONV_HEAVY", "DEPTHWISE", "GATED_MLP", "MLP")


def config(spec: GrowConfig, schedule: str) -> GrowConfig:
    spec = replace(spec, device="cpu")
    if schedule == "H":
        return replace(spec, policy="none")
    if schedule == "B":  # the same triggers, the blueprints in another order
        return replace(spec, heuristic=replace(spec.heuristic, rotation=ROTATION_B))
    return replace(spec, policy="heuristic")


def run_one(index: int, spec: GrowConfig, schedule: str) -> dict[str, object]:
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        run = start_run(config(spec, schedule), run_dir=Path(tmp) / "run")
        result = run.run()
        run.store.close()
    return {
        "episode": index,
        "schedule": schedule,
        "seed": spec.seed,
        "width": spec.host.width,
        "return": result.reward_total,
        "final": result.final_metric,
        "wall": result.wall_time,
    }


def summarise(rows: list[dict]) -> dict[str, float]:
    by = {(r["episode"], r["schedule"]): r for r in rows}
    episodes = sorted({r["episode"] for r in rows})
    ret = {s: [by[(e, s)]["return"] for e in episodes] for s in SCHEDULES}
    diff = [a - b for a, b in zip(ret["A"], ret["B"], strict=True)]
    paired = [a - h for a, h in zip(ret["A"], ret["H"], strict=True)]
    paired_b = [b - h for b, h in zip(ret["B"], ret["H"], strict=True)]
    signal = abs(statistics.fmean(diff))
    raw, after = statistics.stdev(ret["A"]), statistics.stdev(paired)
    width = [by[(e, "A")]["width"] for e in episodes]
    within, raw_within = _pooled_sd(paired, width), _pooled_sd(ret["A"], width)
    return {
        "episodes": len(episodes),
        "mean_A": statistics.fmean(ret["A"]),
        "mean_B": statistics.fmean(ret["B"]),
        "mean_H": statistics.fmean(ret["H"]),
        "signal": signal,
        "signal_sd": statistics.stdev(diff),
        "noise_raw": raw,
        "noise_raw_B": statistics.stdev(ret["B"]),
        "noise_paired": after,
        "noise_paired_B": statistics.stdev(paired_b),
        "snr_raw": signal / raw,
        "snr_paired": signal / after,
        "gain": raw / after,
        "noise_within": within,
        "noise_raw_within": raw_within,
        "snr_raw_within": signal / raw_within,
        "snr_within": signal / within,
        "same_seed_sd": statistics.stdev(diff),
        "n_raw": (2 * raw / signal) ** 2 if signal else float("inf"),
        "n_paired": (2 * after / signal) ** 2 if signal else float("inf"),
        "wall_A": statistics.median(by[(e, "A")]["wall"] for e in episodes),
        "wall_H": statistics.median(by[(e, "H")]["wall"] for e in episodes),
    }


def _pooled_sd(values: list[float], groups: list[int]) -> float:
    """The standard deviation left within groups (pooled over groups of two or more): what a
    critic that reads the group (here the host's width, which the observation shows) removes."""
    by: dict[int, list[float]] = {}
    for v, g in zip(values, groups, strict=True):
        by.setdefault(g, []).append(v)
    parts = [(len(v) - 1, statistics.variance(v)) for v in by.values() if len(v) > 1]
    dof = sum(n for n, _ in parts)
    return (sum(n * var for n, var in parts) / dof) ** 0.5 if dof else float("nan")


def table(s: dict[str, float]) -> Table:
    t = Table(
        title=f"Signal to noise over {s['episodes']} training episodes (digits, widths 2/3/4)"
    )
    t.add_column("quantity")
    t.add_column("raw return", justify="right")
    t.add_column("paired (− host-alone twin)", justify="right")
    t.add_row(
        "mean return A / B / H", f"{s['mean_A']:.3f} / {s['mean_B']:.3f}", f"H {s['mean_H']:.3f}"
    )
    t.add_row("signal |mean(R_A − R_B)|", f"{s['signal']:.3f}", f"{s['signal']:.3f} (same)")
    t.add_row(
        "noise: std of R_A (R_B)",
        f"{s['noise_raw']:.3f} ({s['noise_raw_B']:.3f})",
        f"{s['noise_paired']:.3f} ({s['noise_paired_B']:.3f})",
    )
    t.add_row("SNR", f"{s['snr_raw']:.3f}", f"{s['snr_paired']:.3f}")
    t.add_row("episodes to rank A vs B at 2σ", f"{s['n_raw']:.0f}", f"{s['n_paired']:.0f}")
    t.add_row("noise reduction", "", f"{s['gain']:.1f}×")
    t.add_row(
        "noise within host width (SNR)",
        f"{s['noise_raw_within']:.3f} ({s['snr_raw_within']:.3f})",
        f"{s['noise_within']:.3f} ({s['snr_within']:.3f})",
    )
    t.add_row("std of R_A − R_B on the same seed", f"{s['same_seed_sd']:.3f}", "")
    t.add_row("wall per episode (median s)", f"A {s['wall_A']:.1f}", f"+ twin {s['wall_H']:.1f}")
    return t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--episodes", type=int, default=12)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--json", type=Path, help="also write every run's row here")
    ap.add_argument(
        "--reuse",
        type=Path,
        help="a --json file of an earlier run: its rows of the schedules not in --rerun are kept",
    )
    ap.add_argument("--rerun", default="", help="with --reuse: the schedules to run again")
    args = ap.parse_args()
    console = Console(width=160)
    specs = list(islice(episode_specs(TrainPolicyConfig()), args.episodes))
    kept = []
    if args.reuse:
        rerun = set(args.rerun.split(","))
        kept = [r for r in json.loads(args.reuse.read_text()) if r["schedule"] not in rerun]
    done = {(r["episode"], r["schedule"]) for r in kept}
    jobs = [(i, sp, s) for i, sp in enumerate(specs) for s in SCHEDULES if (i, s) not in done]
    t0 = time.perf_counter()
    rows = kept + run_pool(
        run_one,
        jobs,
        args.workers,
        console,
        lambda r: (
            f"episode {r['episode']} (seed {r['seed']}, width {r['width']}) "
            f"{r['schedule']}: return {r['return']:.3f}, acc {r['final']:.4f}"
        ),
    )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    console.print(f"{machine(torch.device('cpu'))}; {time.perf_counter() - t0:.0f} s in all")
    console.print(table(summarise(rows)))


if __name__ == "__main__":
    main()
