"""Does decay reclaim what an over-provisioned host does not need? And does a compacted grown
model run as fast as the same architecture written by hand?

    .venv/bin/python bench/decay.py [--part runs|speed|all] [--seeds 5] [--text-seeds 3]

Part `runs`, on held-out seeds (1000 on), every run a real recorded `esper grow` run:

- digits, a CNN of width 16 (over-provisioned: width 4 reaches the same accuracy), 40 ticks:
  the host alone; decay alone (Emrakul on the host's blocks, no growth); growth alone (the
  heuristic Tamiyo); growth + decay;
- text (the standard library's source), a transformer of d_model 64 with 8 heads of 8 dims
  (more than it needs), 2 layers, 24 ticks of 20 batches, 128 validation windows of 64 bytes,
  96 unit ablations a tick (of 528 units: heads and MLP channels):
  the host alone, decay alone, growth alone, growth + decay.

Columns: final metric (median, q25 or q75), final parameters and FLOPs per sample (median),
parameters lysed, sedations and panics (medians), wall time. The goal: parameters and FLOPs
reclaimed at ≤ 0.5 point of metric.

Part `speed`: one grown + decayed digits CNN (seed 1000), its training step (forward, backward,
Adam; batch 64) timed, interleaved, median of repeats, in three forms: as compacted (what the run
leaves), uncompacted (every unit mask engaged, as before compaction), and the same architecture
rebuilt by hand from plain modules (`plain_copy`: no slots, no phages, no masks). Goal:
compacted ≤ 1.05 × hand-written.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import tempfile
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table
from torch import nn

from esper.config import GrowConfig, HostConfig
from esper.contracts import Stage, Topology
from esper.evaluate import FIRST_HELD_OUT, q25
from esper.kasmina import HiddenUnits, Phage, SeedSlot, tissue_of
from esper.run import start_run
from esper.tolaria.environment import EnvConfig
from esper.tolaria.lysis import LysisConfig

ARMS = {  # label: (growth policy, decay policy)
    "host alone": ("none", "none"),
    "decay alone": ("none", "heuristic"),
    "growth alone": ("heuristic", "none"),
    "growth + decay": ("heuristic", "heuristic"),
}


def digits_config(seed: int, ticks: int) -> GrowConfig:
    host = HostConfig(kind="cnn", width=16, depth=3)
    return GrowConfig(task="digits", seed=seed, ticks=ticks, host=host, device="cpu")


def text_config(seed: int, ticks: int) -> GrowConfig:
    host = HostConfig(kind="transformer", width=64, depth=2, heads=8)
    return GrowConfig(
        task="text",
        seed=seed,
        ticks=ticks,
        host=host,
        device="cpu",
        env=EnvConfig(batches_per_tick=20, eval_samples=128),
        lysis=LysisConfig(units_per_tick=96),
    )


def run_one(cfg: GrowConfig, tmp: Path) -> dict[str, float]:
    t0 = time.perf_counter()
    run = start_run(cfg, run_dir=tmp / f"{cfg.policy}-{cfg.decay}-{cfg.seed}-{t0}")
    result = run.run()
    kinds = Counter(e.kind for e in run.store.events())
    run.store.close()
    return {
        "metric": result.final_metric,
        "params": result.params_end,
        "flops": result.flops_end,
        "lysed": result.params_removed,
        "sedations": kinds["lysis_probation"],
        "panics": kinds["lysis_panic"],
        "wall": time.perf_counter() - t0,
    }


def runs(task: str, seeds: list[int], ticks: int, console: Console) -> dict[str, list[dict]]:
    make = digits_config if task == "digits" else text_config
    out: dict[str, list[dict]] = {a: [] for a in ARMS}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in seeds:
            for label, (policy, decay) in ARMS.items():  # interleaved: drift hits all alike
                cfg = replace(make(seed, ticks), policy=policy, decay=decay)
                out[label].append(run_one(cfg, Path(tmp)))
            console.log(f"{task}: seed {seed} done")
    return out


def runs_table(task: str, results: dict[str, list[dict]], seeds: list[int], ticks: int) -> Table:
    higher = task == "digits"
    name = "accuracy" if higher else "bits/char"
    t = Table(title=f"{task}, {ticks} ticks, held-out seeds {seeds[0]}–{seeds[-1]}")
    cols = [
        "run",
        f"{name} median",
        "q25" if higher else "q75",
        "Δ vs host",
        "params",
        "FLOPs/sample",
        "lysed",
        "sedations",
        "panics",
        "wall s",
    ]
    for col in cols:
        t.add_column(col, justify="left" if col == "run" else "right")
    host = statistics.median(r["metric"] for r in results["host alone"])
    for label, rs in results.items():
        m = [r["metric"] for r in rs]
        spread = q25(m) if higher else -q25([-x for x in m])
        med = {k: statistics.median(r[k] for r in rs) for k in rs[0]}
        t.add_row(
            label,
            f"{med['metric']:.4f}",
            f"{spread:.4f}",
            f"{med['metric'] - host:+.4f}",
            f"{med['params']:,.0f}",
            f"{med['flops']:,.0f}",
            f"{med['lysed']:,.0f}",
            f"{med['sedations']:.0f}",
            f"{med['panics']:.0f}",
            f"{med['wall']:.1f}",
        )
    return t


# ---------------------------------------------------------------------------------------------
# Step time: compacted vs uncompacted vs written by hand
# ---------------------------------------------------------------------------------------------


class PlainSeed(nn.Module):
    """A committed seed written by hand: y = h + seed(h) on its own first `channels` channels
    (a seed born before the stream was widened acts on those; the rest pass through)."""

    def __init__(self, seed: nn.Module, channels: int, dim: int) -> None:
        super().__init__()
        self.seed, self.channels, self.dim = seed, channels, dim

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        extra = h.shape[self.dim] - self.channels
        if extra > 0:
            mine, rest = h.split([self.channels, extra], self.dim)
            return torch.cat([mine + self.seed(mine.contiguous()), rest], self.dim)
        return h + self.seed(h)


def _plain_units(m: HiddenUnits) -> nn.Module:
    if type(m) is not HiddenUnits:  # other blueprints keep their own forward
        return m
    return nn.Sequential(*m.body, m.act, m.out)


def plain_copy(model: nn.Module) -> nn.Module:
    """The same architecture and weights from plain modules: every committed slot becomes
    h + seed(h), every other slot an identity, every HiddenUnits a Sequential without mask."""
    plain = copy.deepcopy(model)
    replaced: list[str] = []
    for path, module in list(plain.named_modules()):
        if any(path.startswith(r + ".") for r in replaced):
            continue  # inside a module already rebuilt
        parent_path, _, child = path.rpartition(".")
        parent = plain.get_submodule(parent_path) if parent_path else plain
        if isinstance(module, SeedSlot):
            phage = module.phage
            if module.stage is Stage.COMMITTED and phage is not None and phage.blend is None:
                dim = 1 if module.topology is Topology.CNN else -1
                seed = PlainSeed(_plain_units(phage.module), module.channels, dim)
                parent._modules[child] = seed
            elif phage is None and module.seed is None:  # empty, or a compacted widening
                parent._modules[child] = nn.Identity()
            replaced.append(path)
        elif isinstance(module, HiddenUnits) and not isinstance(parent, Phage):
            parent._modules[child] = _plain_units(module)
            replaced.append(path)
    return plain


def uncompacted_copy(model: nn.Module) -> nn.Module:
    """The model with every phage's unit mask engaged (all ones): the forward before
    compaction."""
    copy_ = copy.deepcopy(model)
    for t in tissue_of(copy_).values():
        t.mask.active = True
    return copy_


def step_times(models: dict[str, nn.Module], x: torch.Tensor, y: torch.Tensor, repeats: int):  # type: ignore[no-untyped-def]
    opts = {k: torch.optim.Adam(m.parameters(), lr=1e-3) for k, m in models.items()}
    times: dict[str, list[float]] = {k: [] for k in models}
    for r in range(repeats + 3):
        for k, m in models.items():  # interleaved
            m.train()
            t0 = time.perf_counter()
            for _ in range(10):
                loss = F.cross_entropy(m(x), y)
                opts[k].zero_grad(set_to_none=True)
                loss.backward()
                opts[k].step()
            if r >= 3:  # warm-up
                times[k].append((time.perf_counter() - t0) / 10)
    return times


def speed(ticks: int, repeats: int, console: Console) -> tuple[Table, dict]:
    with tempfile.TemporaryDirectory() as tmp:
        cfg = replace(digits_config(FIRST_HELD_OUT, ticks), decay="heuristic")
        run = start_run(cfg, run_dir=Path(tmp) / "speed")
        result = run.run()
        run.store.close()
    model, task = run.env.model, run.env.task
    for t in tissue_of(model).values():  # units still in probation: settle them (lyse)
        sedated = [u for u in range(t.units) if float(t.mask.mask[u]) == 0.0]
        if sedated:
            t.lyse(sedated)
        t.fold(list(range(t.units)))
    x, y = task.train_x[:64], task.train_y[:64]
    plain = plain_copy(model)
    left = [
        f"{type(m).__name__} {getattr(m, 'stage', '')}"
        for m in plain.modules()
        if isinstance(m, SeedSlot | HiddenUnits)
    ]
    console.log(f"hand-written copy: slots/HiddenUnits left: {left or 'none'}")
    forms = {
        "hand-written": plain,
        "compacted": model,
        "uncompacted": uncompacted_copy(model),
    }
    model.eval()
    with torch.no_grad():
        for k, m in forms.items():
            m.eval()
            assert torch.allclose(m(x), model(x), atol=1e-5), k
    times = step_times(forms, x, y, repeats)
    med = {k: statistics.median(v) for k, v in times.items()}
    title = (
        f"training step, batch 64, the grown + decayed digits CNN ({result.params_end:,} params)"
    )
    t = Table(title=title)
    for col in ("form", "median ms", "× hand-written"):
        t.add_column(col, justify="left" if col == "form" else "right")
    for k, v in med.items():
        t.add_row(k, f"{v * 1e3:.3f}", f"{v / med['hand-written']:.3f}")
    console.log(f"{result.params_removed:,} params lysed in the timed model")
    return t, {k: v for k, v in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--part", choices=["runs", "speed", "all"], default="all")
    p.add_argument("--task", choices=["digits", "text", "both"], default="both")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--text-seeds", type=int, default=3)
    p.add_argument("--ticks", type=int, default=40)
    p.add_argument("--text-ticks", type=int, default=24)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--out", type=Path, default=None, help="write every figure as JSON")
    args = p.parse_args()
    torch.set_num_threads(1)
    console = Console(width=140)
    console.print(
        f"{platform.machine()}, {torch.get_num_threads()} thread(s), torch {torch.__version__}, "
        f"{time.strftime('%Y-%m-%d')}"
    )
    everything: dict = {}
    if args.part in ("runs", "all"):
        for task, n, ticks in (
            ("digits", args.seeds, args.ticks),
            ("text", args.text_seeds, args.text_ticks),
        ):
            if n < 1 or args.task not in (task, "both"):
                continue
            seeds = list(range(FIRST_HELD_OUT, FIRST_HELD_OUT + n))
            everything[task] = runs(task, seeds, ticks, console)
            console.print(runs_table(task, everything[task], seeds, ticks))
    if args.part in ("speed", "all"):
        table, times = speed(args.ticks, args.repeats, console)
        everything["speed"] = times
        console.print(table)
    if args.out:
        args.out.write_text(json.dumps(everything, indent=1))


if __name__ == "__main__":
    main()
