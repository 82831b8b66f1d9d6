"""Signal to noise of Phase 1's reward: can an episode's return rank two good growth schedules,
and how much does the paired host-alone baseline (`train-policy --baseline paired`) help?

    .venv/bin/python bench/signal_noise.py [--episodes 12] [--workers 2] [--json FILE]

Episodes are drawn exactly as `esper train-policy` draws them (`train_policy.episode_specs` of
the default `TrainPolicyConfig`: digits, the CNN at widths 2/3/4, seeds below 1000, 40 one-epoch
ticks, the default economy). Each episode is run three times, as real recorded runs: under
schedule A (the heuristic Tamiyo, defaults), schedule B (the heuristic with a later trigger:
`plateau_patience = 3`) and H (no growth: the host-alone twin). R is an episode's return
(Σ R_total).

    signal          |mean over episodes of R_A − R_B|        (what PPO must detect)
    noise, raw      std over episodes of R_A                  (the return PPO sees today)
    noise, paired   std over episodes of R_A − R_H            (the return with the paired baseline)
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


def config(spec: GrowConfig, schedule: str) -> GrowConfig:
    spec = replace(spec, device="cpu")
    if schedule == "H":
        return replace(spec, policy="none")
    if schedule == "B":
        return replace(spec, heuristic=replace(spec.heuristic, plateau_patience=3))
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
        "n_raw": (2 * raw / signal) ** 2 if signal else float("inf"),
        "n_paired": (2 * after / signal) ** 2 if signal else float("inf"),
        "wall_A": statistics.median(by[(e, "A")]["wall"] for e in episodes),
        "wall_H": statistics.median(by[(e, "H")]["wall"] for e in episodes),
    }


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
    t.add_row("wall per episode (median s)", f"A {s['wall_A']:.1f}", f"+ twin {s['wall_H']:.1f}")
    return t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--episodes", type=int, default=12)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--json", type=Path, help="also write every run's row here")
    args = ap.parse_args()
    console = Console(width=160)
    specs = list(islice(episode_specs(TrainPolicyConfig()), args.episodes))
    jobs = [(i, spec, s) for i, spec in enumerate(specs) for s in SCHEDULES]
    t0 = time.perf_counter()
    rows = run_pool(
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
