"""Wall time of one study of ≥ 20 runs on the local process pool with 1 and 2 workers, start-up
included: the pool is started once per study and reused by every run (`esper.study.run_study`).

    .venv/bin/python bench/study_scaling.py [--seeds 4] [--ticks 10] [--batches 0] [--repeats 2]

The study: digits, the default CNN host, `--ticks` ticks of `--batches` batches, held-out seeds
from 1000, five rows (host alone, Esper at default and high rent, parameter-matched host, grown
architecture from scratch): 5 × `--seeds` runs. Workers 1 runs in this process (no pool); 2 is a
spawn pool whose workers each import torch, timed from before the pool starts to after the last
run. "same" says whether every run's final metric equals the 1-worker study's. Median over
`--repeats`, the variants interleaved within each repeat.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from esper.study import load_study, run_study
from vector_env import machine

STUDY = """
title = "scaling"
seeds = {seeds}
first_seed = 1000
[base]
ticks = {ticks}
device = "cpu"
[base.env]
batches_per_tick = {batches}
[base.heuristic]
warmup_ticks = 1
plateau_patience = 0
hold_ticks = 1
[[rows]]
name = "host"
kind = "host"
[[rows]]
name = "Esper"
[[rows]]
name = "Esper (high rent)"
[rows.set]
"economy.w_rent" = 0.05
[[rows]]
name = "parameter-matched"
kind = "parameter-matched"
of = "Esper"
[[rows]]
name = "from scratch"
kind = "from-scratch"
of = "Esper"
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=4)
    p.add_argument("--ticks", type=int, default=10)
    p.add_argument("--batches", type=int, default=0)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "study.toml"
        path.write_text(STUDY.format(seeds=args.seeds, ticks=args.ticks, batches=args.batches))
        study = load_study(path)
        runs = len(study.rows) * study.seeds
        times: dict[int, list[float]] = {1: [], 2: []}
        metrics: dict[int, list] = {}
        for r in range(args.repeats):
            for workers in (1, 2):
                out = Path(tmp) / f"out-{workers}-{r}"
                t0 = time.perf_counter()
                res = run_study(study, out, workers=workers)
                times[workers].append(time.perf_counter() - t0)
                metrics[workers] = sorted(
                    (n, s, x.metric) for n, rs in res.runs.items() for s, x in rs.items()
                )
    table = Table(
        title=f"one study of {runs} runs, start-up included ({machine(torch.device('cpu'))})"
    )
    for col in ("workers", "median s", "runs", "speed-up vs 1", "same", "all (s)"):
        table.add_column(col)
    base = statistics.median(times[1])
    for w, ts in times.items():
        med = statistics.median(ts)
        table.add_row(
            str(w),
            f"{med:.1f}",
            str(runs),
            f"{base / med:.2f}×",
            str(metrics[w] == metrics[1]),
            " ".join(f"{t:.1f}" for t in ts),
        )
    Console().print(table)


if __name__ == "__main__":
    main()
