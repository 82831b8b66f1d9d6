"""Does growth pay? A grown host against a host of the grown size trained from scratch.

    .venv/bin/python bench/growth_vs_size.py [--family cnn|mlp|both] [--seeds 5] [--ticks 40]

On held-out seeds (1000 on) and matched ticks, one table per host family (digits; the CNN, and the
MLP on digits as 64-dim vectors):

- the impaired host alone (policy `none`);
- the heuristic with residual seeds only (`heuristic.max_widenings = 0`);
- the heuristic with widening (the default), and the same growing as early as it can (warm-up 0,
  patience 0);
- plain hosts of larger widths trained from scratch: the same-size baseline is the one whose
  parameter count is nearest the grown model's (marked).

Columns: median and q25 final validation accuracy, median final parameters, median training
FLOPs summed over the run (3 × the forward FLOPs per sample of the model as it is at each tick ×
the samples trained that tick: forward + backward ≈ 3 forwards), median wall time. Every run is a
real recorded `esper grow` run in a temporary directory.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from esper.config import GrowConfig, HostConfig
from esper.evaluate import FIRST_HELD_OUT, q25
from esper.kasmina import module_cost
from esper.run import start_run
from esper.tamiyo.policies import HeuristicConfig
from esper.tolaria.environment import GrowthEnv

FAMILIES = {  # kind, impaired width, depth, widths from scratch
    "cnn": ("cnn", 2, 3, (3, 4)),
    "mlp": ("mlp", 4, 2, (6, 8)),
}


@dataclass
class FlopMeter:
    """An episode callback: at each tick's start, the training FLOPs that tick will cost."""

    total: float = 0.0
    seen: list[int] = field(default_factory=list)

    def __call__(self, t: int, env: GrowthEnv) -> None:
        forward = module_cost(env.model, env.val_x[:1]).flops
        batches = env.cfg.batches_per_tick or len(env.batches)
        self.total += 3 * forward * min(batches * env.cfg.batch_size, len(env.task.train_x))
        self.seen.append(forward)


def contenders(width: int, scratch: tuple[int, ...]) -> dict[str, dict]:
    early = HeuristicConfig(warmup_ticks=0, plateau_patience=0)
    rows = {
        f"host alone (width {width})": {"policy": "none"},
        "heuristic, residual seeds": {
            "policy": "heuristic",
            "heuristic": HeuristicConfig(max_widenings=0),
        },
        "heuristic, widening": {"policy": "heuristic"},
        "heuristic, widening, early": {"policy": "heuristic", "heuristic": early},
    }
    rows |= {f"width {w} from scratch": {"policy": "none", "width": w} for w in scratch}
    return rows


def run_one(cfg: GrowConfig, tmp: Path) -> dict[str, float]:
    meter = FlopMeter()
    t0 = time.perf_counter()
    run = start_run(
        cfg, run_dir=tmp / f"{cfg.policy}-{cfg.host.width}-{cfg.seed}-{t0}", callbacks=[meter]
    )
    result = run.run()
    run.store.close()
    return {
        "accuracy": result.final_metric,
        "params": result.params_end,
        "train_flops": meter.total,
        "wall": time.perf_counter() - t0,
        "committed": len(result.committed),
    }


def family(name: str, seeds: list[int], ticks: int, console: Console) -> dict[str, list[dict]]:
    kind, width, depth, scratch = FAMILIES[name]
    rows = contenders(width, scratch)
    out: dict[str, list[dict]] = {r: [] for r in rows}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in seeds:
            for label, spec in rows.items():  # interleaved: machine drift hits every row alike
                host = HostConfig(kind=kind, width=spec.get("width", width), depth=depth)
                cfg = GrowConfig(task="digits", seed=seed, ticks=ticks, host=host, device="cpu")
                cfg = replace(cfg, policy=spec["policy"])
                if "heuristic" in spec:
                    cfg = replace(cfg, heuristic=spec["heuristic"])
                out[label].append(run_one(cfg, Path(tmp)))
            console.log(f"{name}: seed {seed} done")
    return out


def table(name: str, results: dict[str, list[dict]], ticks: int, seeds: list[int]) -> Table:
    med = {k: {m: statistics.median(r[m] for r in v) for m in v[0]} for k, v in results.items()}
    grown = med["heuristic, widening"]["params"]
    scratch = [k for k in med if k.endswith("from scratch")]
    nearest = min(scratch, key=lambda k: abs(med[k]["params"] - grown))
    t = Table(title=f"{name} on digits, {ticks} ticks, held-out seeds {seeds[0]}–{seeds[-1]}")
    for col in ("run", "acc. median", "acc. q25", "params", "train GFLOPs", "wall s", "commits"):
        t.add_column(col, justify="left" if col == "run" else "right")
    for label, rs in results.items():
        acc = [r["accuracy"] for r in rs]
        mark = " (same size)" if label == nearest else ""
        t.add_row(
            label + mark,
            f"{statistics.median(acc):.4f}",
            f"{q25(acc):.4f}",
            f"{med[label]['params']:.0f}",
            f"{med[label]['train_flops'] / 1e9:.2f}",
            f"{med[label]['wall']:.1f}",
            f"{med[label]['committed']:.0f}",
        )
    return t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--family", choices=[*FAMILIES, "both"], default="both")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--ticks", type=int, default=40)
    p.add_argument("--out", type=Path, default=None, help="write every run's figures as JSON")
    args = p.parse_args()
    torch.set_num_threads(1)
    console = Console(width=120)
    seeds = list(range(FIRST_HELD_OUT, FIRST_HELD_OUT + args.seeds))
    names = list(FAMILIES) if args.family == "both" else [args.family]
    console.print(
        f"{platform.machine()}, {torch.get_num_threads()} thread(s), torch {torch.__version__}, "
        f"{time.strftime('%Y-%m-%d')}"
    )
    everything = {}
    for name in names:
        everything[name] = family(name, seeds, args.ticks, console)
        console.print(table(name, everything[name], args.ticks, seeds))
    if args.out:
        args.out.write_text(json.dumps(everything, indent=1))


if __name__ == "__main__":
    main()
