"""Phase 1 training throughput: seconds per PPO update and environment ticks per second, with and
without the paired host-alone baseline (which steps a twin beside every episode).

    .venv/bin/python bench/train_throughput.py [--device cpu|cuda] [--envs 16] [--updates 4]

A short `train_policy` run per setting (no warm start, no held-out evaluation): K environments of
the digits CNN (widths 2/3/4), 8-tick episodes of 4 batches per tick, 8 ticks per rollout. The
first update includes start-up (building the episodes, CUDA context), so the rate is taken over
the later ones: median seconds between consecutive updates. `bench/gpu_check.sh` runs it on CUDA.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from itertools import pairwise
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from esper.config import GrowConfig
from esper.tamiyo.imitation import ImitationConfig
from esper.tolaria.environment import EnvConfig
from esper.train_policy import TrainPolicyConfig, train_policy
from vector_env import machine


def measure(device: str, envs: int, updates: int, baseline: str, backend: str) -> dict[str, float]:
    """Seconds per update (median over updates 2..N) and the first update's seconds."""
    with tempfile.TemporaryDirectory() as tmp:
        cfg = TrainPolicyConfig(
            episode=GrowConfig(ticks=8, device=device, env=EnvConfig(batches_per_tick=4)),
            num_envs=envs,
            num_steps=8,
            updates=updates,
            eval_every=0,
            backend=backend,
            baseline=baseline,
            out=str(Path(tmp) / "policy"),
            imitation=ImitationConfig(teacher=None),
        )
        stamps: list[float] = []
        t0 = time.perf_counter()
        train_policy(cfg, log=lambda _u, _info: stamps.append(time.perf_counter() - t0))
    gaps = [b - a for a, b in pairwise(stamps)]
    per_update = statistics.median(gaps) if gaps else stamps[0]
    return {"first": stamps[0], "per_update": per_update, "ticks": envs * cfg.num_steps}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--envs", type=int, default=16)
    ap.add_argument("--updates", type=int, default=4)
    ap.add_argument("--backend", default="inprocess")
    args = ap.parse_args()
    console = Console(width=120)
    table = Table(title=f"train-policy throughput on {args.device}, K = {args.envs}")
    for col in ("baseline", "s per update", "env ticks per s", "first update s"):
        table.add_column(col, justify="left" if col == "baseline" else "right")
    rows = {}
    for baseline in ("none", "paired"):
        r = measure(args.device, args.envs, args.updates, baseline, args.backend)
        rows[baseline] = r
        rate = r["ticks"] / r["per_update"]
        console.print(f"{baseline}: {r['per_update']:.2f} s per update, {rate:.1f} ticks/s")
        table.add_row(baseline, f"{r['per_update']:.2f}", f"{rate:.1f}", f"{r['first']:.1f}")
    console.print(machine(torch.device(args.device)))
    console.print(table)
    ratio = rows["paired"]["per_update"] / rows["none"]["per_update"]
    console.print(f"paired / none time per update: {ratio:.2f}×")


if __name__ == "__main__":
    main()
