"""The engine's own overhead: time per tick of `esper grow --policy none` against a minimal
hand-written PyTorch loop that trains the same host on the same batches and evaluates it.

    .venv/bin/python bench/engine_overhead.py [--repeats 7] [--ticks 4] [--device cpu]

Both sides: one epoch of Adam steps on digits (CNN host, width 2) and one validation pass per
tick. The engine adds the governor's snapshot and checks, the fused evaluation, observation,
the policy call, the economy, and one SQLite transaction per tick (plus a checkpoint every 5).
Variants are interleaved; the table gives the median over repeats and the ratio.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

from esper.config import GrowConfig
from esper.run import start_run
from esper.tolaria.data import Batches


def hand_loop(model: torch.nn.Module, task, batches: Batches, ticks: int) -> float:
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    t0 = time.perf_counter()
    for _ in range(ticks):
        model.train()
        for xb, yb in batches.take(len(batches)):
            loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            float((model(task.val_x).argmax(-1) == task.val_y).float().mean())
    return (time.perf_counter() - t0) / ticks


def engine(run, start: int, ticks: int) -> float:
    t0 = time.perf_counter()
    for t in range(start, start + ticks):
        run.step(t)
    return (time.perf_counter() - t0) / ticks


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--ticks", type=int, default=4)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    cfg = GrowConfig(policy="none", ticks=10_000, device=args.device)
    with tempfile.TemporaryDirectory() as tmp:
        run = start_run(cfg, run_dir=Path(tmp) / "run")
        model = copy.deepcopy(run.env.model)
        batches = Batches(
            run.task.train_x, run.task.train_y, cfg.env.batch_size, generator_seed=cfg.seed
        )
        hand_loop(model, run.task, batches, 1)  # warm-up both
        engine(run, 0, 1)
        times: dict[str, list[float]] = {"hand-written loop": [], "esper engine (none)": []}
        tick = 1
        for _ in range(args.repeats):
            times["hand-written loop"].append(hand_loop(model, run.task, batches, args.ticks))
            times["esper engine (none)"].append(engine(run, tick, args.ticks))
            tick += args.ticks
    base = statistics.median(times["hand-written loop"])
    table = Table(
        title=f"time per tick, digits CNN width 2, {len(batches)} batches/tick, "
        f"median of {args.repeats}×{args.ticks} ticks"
    )
    for col in ("variant", "median ms/tick", "min–max ms", "ratio vs hand loop"):
        table.add_column(col)
    for name, ts in times.items():
        med = statistics.median(ts)
        table.add_row(
            name,
            f"{1e3 * med:.1f}",
            f"{1e3 * min(ts):.1f}–{1e3 * max(ts):.1f}",
            f"{med / base:.3f}",
        )
    Console().print(table)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}")


if __name__ == "__main__":
    main()
