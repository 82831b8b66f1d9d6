"""Slot overhead: training-step time of the CNN host with its SeedSlots in each lifecycle stage.

    .venv/bin/python bench/slot_overhead.py [--device cpu|cuda] [--repeats N] [--steps N]

One step = zero_grad → forward → cross-entropy → backward → plain SGD step (lr 1e-3), on one
batch made before timing; gradient telemetry (`observe_gradients`) is not in the step. Every
variant starts from the same host weights (deep copies). Baseline: the slot-free host, each slot
replaced by nn.Identity; seeds grow in every slot (b0, b1, b2) unless `--seeds-in b0`. After
warm-up, R repeats of S steps per variant, interleaved at the step (each round one step of
every variant, in a fresh random order) so drift and other processes' load hit all alike; each
step is timed with perf_counter (after torch.cuda.synchronize on cuda). Per variant and repeat:
the median step time. Reported: the median of those over repeats, their min–max, and the median
over repeats of the ratio to the slot-free host in the same repeat. Results: bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import platform
import random
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table
from torch import nn

from esper.contracts import Blueprint, SeedSpec, Stage, Topology
from esper.kasmina import CNNHost, SeedSlot, host_grad_rms

# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Args:
    device: str = field(default="cpu", metadata={"help": "cpu or cuda", "choices": ("cpu", "cuda")})
    repeats: int = field(default=7, metadata={"help": "timed repeats (R)"})
    steps: int = field(
        default=30, metadata={"help": "timed steps per variant and repeat (S), digits shape"}
    )
    cifar_steps: int = field(
        default=3,
        metadata={
            "help": "timed steps per repeat on the CIFAR shape (a step there is ~50x "
            "longer on CPU, so S=30 would take ~20 min)"
        },
    )
    warmup: int = field(default=3, metadata={"help": "untimed steps per variant before timing"})
    seeds_in: str = field(
        default="all",
        metadata={"help": "grow the seed in every slot or in b0 only", "choices": ("all", "b0")},
    )
    shapes: str = field(default="digits,cifar", metadata={"help": "comma-separated shapes"})
    only: str = field(
        default="",
        metadata={
            "help": "time only the variants whose name contains one of these comma-"
            "separated words (e.g. dormant, LORA), besides slot-free"
        },
    )


def parse_args() -> Args:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for f in fields(Args):
        choices = {"choices": f.metadata["choices"]} if "choices" in f.metadata else {}
        parser.add_argument(
            "--" + f.name.replace("_", "-"),
            type=type(f.default),
            default=f.default,
            help=f.metadata["help"],
            **choices,
        )
    return Args(**vars(parser.parse_args()))


@dataclass(frozen=True)
class Shape:
    name: str
    host: dict[str, int]
    """CNNHost keyword arguments."""
    batch: tuple[int, ...]
    """(B, C, H, W)."""


SHAPES = {
    "digits": Shape("digits", {"width": 8, "depth": 3}, (128, 1, 8, 8)),
    "cifar": Shape(
        "cifar", {"width": 32, "depth": 3, "in_channels": 3, "image_size": 32}, (128, 3, 32, 32)
    ),
}
BLUEPRINTS = (Blueprint.CONV_LIGHT, Blueprint.ATTENTION, Blueprint.LORA)
STAGES = (Stage.TRAINING, Stage.BLENDING, Stage.COMMITTED)
LR = 1e-3
BASELINE = "slot-free"

# ---------------------------------------------------------------------------------------------
# Variants: the same host weights, slots removed, dormant, or grown to a stage
# ---------------------------------------------------------------------------------------------


def slot_free(host: CNNHost) -> nn.Module:
    model = copy.deepcopy(host)
    for name in model.slots:
        model.slots[name] = nn.Identity()
    return model


def backward_and_observe(model: nn.Module, slots: list, x: torch.Tensor, y: torch.Tensor) -> None:
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    rms = host_grad_rms(model)
    for s in slots:
        s.observe_gradients(rms)


def grown(
    host: CNNHost,
    blueprint: Blueprint,
    stage: Stage,
    seeds_in: str,
    x: torch.Tensor,
    y: torch.Tensor,
) -> nn.Module:
    """A copy of `host` with a fresh `blueprint` seed driven to `stage` in the chosen slots."""
    model = copy.deepcopy(host)
    slots = list(model.slots.values()) if seeds_in == "all" else [model.slots["b0"]]
    for s in slots:
        s.germinate(SeedSpec(blueprint))
        s.advance()  # → TRAINING
    if stage is not Stage.TRAINING:
        # G2 wants ≥ 1 tick in TRAINING, then gradients and an activation probe from that tick.
        backward_and_observe(model, slots, x, y)
        for s in slots:
            s.tick(1)
        backward_and_observe(model, slots, x, y)
        t = 1
        for s in slots:
            report = s.evaluate_gate()
            if not report.passed:
                raise RuntimeError(f"{s.name} {blueprint.name}: {report}")
            s.advance()  # → BLENDING
        while stage is Stage.COMMITTED and not all(s.schedule.done for s in slots):
            t += 1
            for s in slots:
                s.tick(t)
        for s in slots:
            if stage is Stage.COMMITTED:
                s.advance()  # → HOLDING
                s.fossilize()  # → COMMITTED
            else:  # BLENDING, mid-ramp; the forward cost does not depend on α
                s.tick(t + 1)
        assert all(s.stage is stage for s in slots), [s.stage for s in slots]
    model.zero_grad(set_to_none=True)
    return model


def variants(shape: Shape, args: Args, x: torch.Tensor, y: torch.Tensor) -> dict[str, nn.Module]:
    torch.manual_seed(0)
    host = CNNHost(**shape.host).to(args.device)
    models = {BASELINE: slot_free(host), "dormant": copy.deepcopy(host)}
    with torch.no_grad():  # same weights: dormant slots must be exact identities
        assert torch.equal(models[BASELINE](x), models["dormant"](x))
    for bp in BLUEPRINTS:
        for stage in STAGES:
            models[f"{bp.name} {stage.name}"] = grown(host, bp, stage, args.seeds_in, x, y)
    words = [w.lower() for w in args.only.split(",") if w]
    keep = [n for n in models if n == BASELINE or not words or any(w in n.lower() for w in words)]
    return {n: models[n] for n in keep}


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------


def make_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    opt = torch.optim.SGD(model.parameters(), lr=LR)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    return step


def timed(step: Callable[[], None], sync: Callable[[], None]) -> float:
    t0 = time.perf_counter()
    step()
    sync()
    return time.perf_counter() - t0


def measure(
    models: dict[str, nn.Module], x: torch.Tensor, y: torch.Tensor, args: Args, steps: int
) -> dict[str, list[float]]:
    """Seconds per step for every variant, one entry per repeat: the median of its `steps` step
    times in that repeat, which ignores the few steps hit by another process. Interleaved at the
    step: a repeat is `steps` rounds of one step of each variant, so drift and neighbours' load
    hit all variants alike; the order is shuffled every round, since a fixed cyclic order gives
    each variant the same predecessor (dormant would always follow its twin, slot-free, and reuse
    its freed buffers and warm caches). Python's GC is paused, as in timeit."""
    sync = torch.cuda.synchronize if x.device.type == "cuda" else (lambda: None)
    step_of = {name: make_step(m, x, y) for name, m in models.items()}
    for step in step_of.values():
        for _ in range(args.warmup):
            step()
    names, times = list(models), {name: [] for name in models}
    order, rng = list(names), random.Random(0)
    for _ in range(args.repeats):
        per_step = {name: [] for name in names}
        gc.collect()
        gc.disable()
        try:
            sync()
            for _ in range(steps):
                rng.shuffle(order)
                for name in order:
                    per_step[name].append(timed(step_of[name], sync))
        finally:
            gc.enable()
        for name in names:
            times[name].append(statistics.median(per_step[name]))
    return times


def call_cost(module: nn.Module, h: torch.Tensor, calls: int = 10_000) -> float:
    """Seconds per `module(h)` call, averaged over `calls` calls."""
    t0 = time.perf_counter()
    for _ in range(calls):
        module(h)
    return (time.perf_counter() - t0) / calls


def dormant_overhead(device: str, rounds: int = 9) -> tuple[float, float]:
    """Seconds per call of a DORMANT SeedSlot and of nn.Identity, forward only: the best of
    `rounds` alternating measurements (the floor, as timeit advises). A dormant slot returns its
    input object, so backward sees no extra node: this is its whole cost."""
    h = torch.randn(2, 8, 4, 4, device=device, requires_grad=True)
    slot, identity = SeedSlot(8, Topology.CNN).to(device), nn.Identity()
    pairs = [(call_cost(slot, h), call_cost(identity, h)) for _ in range(rounds)]
    return min(p[0] for p in pairs), min(p[1] for p in pairs)


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine(args: Args) -> list[str]:
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else "?"
    dev = args.device
    if dev == "cuda":
        dev += f" ({torch.cuda.get_device_name()})"
    return [
        f"date      {datetime.now(UTC):%Y-%m-%d %H:%M:%S} UTC",
        f"command   {shlex.join(sys.orig_argv)}",
        f"cpu       {cpu_model()}, {os.cpu_count()} cores ({usable} usable)",
        f"torch     {torch.__version__}, num_threads={torch.get_num_threads()} (default)",
        f"python    {platform.python_version()}, device {dev}",
        f"loadavg   {' '.join(f'{v:.2f}' for v in os.getloadavg())} (1/5/15 min, at start)",
    ]


def rows(times: dict[str, list[float]]) -> list[tuple[str, float, float, float, list[float]]]:
    """(variant, median ms, min ms, max ms, per-repeat ratios to the slot-free block)."""
    base = times[BASELINE]
    out = []
    for name, ts in times.items():
        ms = [t * 1e3 for t in ts]
        ratios = [t / b for t, b in zip(ts, base, strict=True)]
        out.append((name, statistics.median(ms), min(ms), max(ms), ratios))
    return out


def table(results: dict[str, dict[str, list[float]]], args: Args) -> Table:
    t = Table(
        title=f"Training-step time, seeds in {args.seeds_in} slot(s), {args.repeats} "
        "repeats (ratio: median of per-repeat ratios, min–max)"
    )
    for col in ("shape", "variant", "median ms/step", "spread min–max ms", "ratio vs slot-free"):
        t.add_column(col, justify="left" if col in ("shape", "variant") else "right")
    for shape_name, times in results.items():
        shape = SHAPES[shape_name]
        label = f"{shape.name} {'×'.join(map(str, shape.batch))} w{shape.host['width']}"
        for i, (name, med, lo, hi, ratios) in enumerate(rows(times)):
            ratio = f"{statistics.median(ratios):.3f} ({min(ratios):.3f}–{max(ratios):.3f})"
            t.add_row(label if i == 0 else "", name, f"{med:.2f}", f"{lo:.2f}–{hi:.2f}", ratio)
        t.add_section()
    return t


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------


def main() -> None:
    args = parse_args()
    console = Console(width=max(120, Console().width))
    console.print("\n".join(machine(args)))
    results, loads = {}, []
    for name in args.shapes.split(","):
        shape = SHAPES[name]
        g = torch.Generator().manual_seed(0)
        x = torch.randn(shape.batch, generator=g).to(args.device)
        y = torch.randint(0, 10, (shape.batch[0],), generator=g).to(args.device)
        steps = args.steps if name == "digits" else args.cifar_steps
        t0 = time.perf_counter()
        results[name] = measure(variants(shape, args, x, y), x, y, args, steps)
        loads.append(os.getloadavg()[0])
        console.print(
            f"{name}: S={steps} steps × R={args.repeats} repeats per variant, "
            f"{time.perf_counter() - t0:.0f} s, 1-min loadavg after it {loads[-1]:.2f}"
        )
    console.print(table(results, args))
    slot_s, identity_s = dormant_overhead(args.device)
    console.print(
        f"call cost, forward: dormant SeedSlot {slot_s * 1e6:.2f} µs, nn.Identity "
        f"{identity_s * 1e6:.2f} µs"
    )
    for name, times in results.items():
        if "dormant" not in times:
            continue
        ratios = next(r for v, *_, r in rows(times) if v == "dormant")
        dormant = statistics.median(ratios)
        verdict = "met" if dormant <= 1.01 else "NOT met"
        extra = SHAPES[name].host["depth"] * (slot_s - identity_s)
        expected = 1 + extra / statistics.median(times[BASELINE])
        console.print(
            f"{name}: dormant / slot-free = {dormant:.3f} (goal ≤ 1.01: {verdict}); "
            f"expected from call cost {expected:.4f} ({extra * 1e6:.1f} µs/step)"
        )
    if max(loads) > (os.cpu_count() or 1) + 1:  # this run itself adds ~num_threads
        console.print(
            "[bold yellow]warning:[/] the load exceeded cores + 1: other processes shared the "
            "CPU, read the ratios as noisy"
        )


if __name__ == "__main__":
    main()
