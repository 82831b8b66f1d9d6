"""Environment ticks per second of a VectorEnv of K episodes against the same K episodes played one
after another (`Episode.observe` / `Episode.act`, as a run plays them): same configs, same
random policies, same ticks. Both sides run the one tick, governor included.

    .venv/bin/python bench/vector_env.py [--device cpu|cuda] [--ks 1 4 8 16] [--ticks 6]
                                         [--repeats 3] [--threads 1] [--workers 2]
                                         [--backends inprocess processes ray]
                                         [--overlap both]

Host: digits CNN (depth 3) of width 2, `batches_per_tick` 4 of 64 samples, full validation set
with its α=0 ablations every tick; episodes longer than the timed ticks, so no reset is timed.
Only ticks are timed (train + evaluate + observe, the policy, act), after one untimed warm-up
tick per environment on both sides; building the hosts and starting the workers is not timed
and is reported apart ("start s"). Backends:

- `inprocess`  the K environments one after another in this process
- `processes`  `--workers` worker processes (one torch thread each), K/workers envs each (CPU only)
- `ray`        `--workers` Ray actors, likewise (CPU only; not run unless named): "start s" then
               includes starting the local Ray instance the VectorEnv starts and shuts down

On CUDA the in-process backend runs twice per K, as `inprocess overlap` (every environment's
train tick and evaluation launched on its own stream, one read-back for all) and `inprocess
serial` (`VectorEnv(overlap=False)`: each environment read back before the next is launched);
`--overlap on|off` keeps one of them. `--ks` defaults to 1 16 64 there, 1 4 8 16 on CPU, where
`--overlap` changes nothing. torch's pool has 32 streams per device and the GPU runs at most
CUDA_DEVICE_MAX_CONNECTIONS (default 8) of them truly side by side; the value in effect is
printed with the machine.

The sequential baseline and the in-process backend run under torch.set_num_threads(--threads);
`--threads 0` keeps torch's default (one per core), which is no faster on an idle machine and
many times slower on a busy one (OpenMP barriers wait on preempted threads; see RESULTS.md).
"same" says whether the vector's rewards equal the sequential runs' bit for bit (if not, the
largest difference). Median over `--repeats`, variants interleaved within each repeat.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from contextlib import contextmanager
from dataclasses import replace

import torch
from rich.console import Console
from rich.table import Table

from esper.config import GrowConfig, HostConfig
from esper.run import build_episode, load_policy
from esper.tolaria.environment import EnvConfig
from esper.tolaria.vector import VectorEnv

ENV_CFG = EnvConfig(batches_per_tick=4)
SPEC_SEED = 0


def specs_of(k: int, ticks: int, device: torch.device) -> list[GrowConfig]:
    """K `esper grow --policy random` configs: digits CNN width 2, depth 3, seeds SPEC_SEED..,
    `ticks` long."""
    base = GrowConfig(
        policy="random", ticks=ticks, device=str(device), env=ENV_CFG, host=HostConfig(width=2)
    )
    return [replace(base, seed=SPEC_SEED + i) for i in range(k)]


def sync(device: torch.device) -> None:
    """Wait for the device's queued work, so that a timer read afterwards includes it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextmanager
def threads(n: int | None):
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# ---------------------------------------------------------------------------------------------
# The baseline: one environment at a time, its N ticks, as GrowthRun.step orders them
# ---------------------------------------------------------------------------------------------


def sequential(
    specs: list[GrowConfig], ticks: int, device: torch.device
) -> tuple[float, list[list[float]]]:
    """Seconds spent in ticks, and each episode's rewards."""
    elapsed, rewards = 0.0, []
    for spec in specs:
        episode = build_episode(spec)
        policy, mine = load_policy(spec), []
        t0 = 0.0
        for t in range(ticks + 1):
            if t == 1:  # the first tick warms up (lazy kernels, allocator): untimed
                t0 = time.perf_counter()
            decision = policy.act(episode.observe())
            mine.append(episode.act(decision.action, decision.reason).reward.total)
        sync(device)
        elapsed += time.perf_counter() - t0
        rewards.append(mine)
    return elapsed, rewards


# ---------------------------------------------------------------------------------------------
# The vector: one policy call (a list comprehension over K random policies) per tick
# ---------------------------------------------------------------------------------------------


def vector(
    specs: list[GrowConfig],
    ticks: int,
    device: torch.device,
    backend: str,
    workers: int,
    overlap: bool = True,
) -> tuple[float, float, list[list[float]]]:
    """Seconds to start, seconds spent in ticks, and each episode's rewards."""
    t0 = time.perf_counter()
    venv = VectorEnv(
        build_episode,
        len(specs),
        specs,
        device=device,
        backend=backend,
        workers=workers,
        overlap=overlap,
    )
    sync(device)
    policies = [load_policy(s) for s in specs]
    rewards = []
    try:
        t1 = 0.0
        for t in range(ticks + 1):
            if t == 1:  # the first tick warms up, as in `sequential`: untimed
                t1 = time.perf_counter()
            obs = venv.observe()
            decisions = [p.act(o) for p, o in zip(policies, obs, strict=True)]
            result = venv.act([d.action for d in decisions], [d.reason for d in decisions])
            rewards.append(result.rewards.tolist())
        sync(device)
        t2 = time.perf_counter()
    finally:
        venv.close()
    return t1 - t0, t2 - t1, [list(r) for r in zip(*rewards, strict=True)]


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------


def machine(device: torch.device) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if "model name" in line)
    except (OSError, StopIteration):
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    gpu = ""
    if device.type == "cuda":
        connections = os.environ.get("CUDA_DEVICE_MAX_CONNECTIONS", "unset (8)")
        gpu = (
            f", {torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda}, "
            f"CUDA_DEVICE_MAX_CONNECTIONS {connections})"
        )
    return (
        f"{cpu}, {cores} cores usable{gpu}; torch {torch.__version__}, "
        f"{torch.get_num_threads()} default threads; Python {platform.python_version()}"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--ks", type=int, nargs="+", default=None, help="default: 1 4 8 16 on CPU, 1 16 64 on CUDA"
    )
    p.add_argument("--ticks", type=int, default=6, help="timed ticks per environment")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="0: torch's default")
    p.add_argument("--backends", nargs="+", default=["inprocess", "processes"])
    p.add_argument(
        "--overlap",
        choices=["both", "on", "off"],
        default="both",
        help="CUDA, in-process: time overlapped environments, serial ones, or both",
    )
    p.add_argument(
        "--progress",
        action="store_true",
        help="print each run as it ends (the table comes at the end)",
    )
    args = p.parse_args()
    device = torch.device(args.device)
    if args.ks is None:
        args.ks = [1, 16, 64] if device.type == "cuda" else [1, 4, 8, 16]
    variants = variants_of(args.backends, args.overlap, device)
    backends = list(variants)
    console = Console(width=150)
    console.print(
        f"[bold]{machine(device)}[/]\n$ {' '.join(sys.argv)}\n"
        f"load average before: {os.getloadavg()}"
    )
    runs: dict[tuple[int, str], list[tuple[float, float, list]]] = {}
    t_all = time.perf_counter()
    with threads(args.threads or None):  # warm-up
        sequential(specs_of(1, 4, device), 2, device)
    for repeat in range(args.repeats):
        for k in args.ks:
            specs = specs_of(k, args.ticks + 2, device)  # no episode ends while timed
            with threads(args.threads or None):
                secs, rewards = sequential(specs, args.ticks, device)
                runs.setdefault((k, "seq"), []).append((0.0, secs, rewards))
                reference = rewards
                if args.progress:
                    console.print(
                        f"repeat {repeat + 1} K={k} seq: {k * args.ticks / secs:.1f} ticks/s"
                    )
                for b, (backend, overlap) in variants.items():
                    start, secs, rewards = vector(
                        specs, args.ticks, device, backend, args.workers, overlap
                    )
                    runs.setdefault((k, b), []).append((start, secs, rewards))
                    if args.progress:
                        console.print(
                            f"repeat {repeat + 1} K={k} {b}: "
                            f"{k * args.ticks / secs:.1f} ticks/s, start {start:.1f} s, "
                            f"same as seq: {rewards == reference}"
                        )
    console.print(table(runs, args, backends))
    console.print(
        f"load average after: {os.getloadavg()}; whole benchmark "
        f"{time.perf_counter() - t_all:.0f} s"
    )


def variants_of(
    backends: list[str], overlap: str, device: torch.device
) -> dict[str, tuple[str, bool]]:
    """Row label -> (backend, overlap). Processes only on CPU; on CUDA the in-process backend
    with overlap on and/or off; on CPU overlap does nothing and the labels are the backends."""
    out: dict[str, tuple[str, bool]] = {}
    for b in backends:
        if device.type != "cpu" and b in ("processes", "ray"):
            continue  # CPU-only backends
        if device.type == "cuda" and b == "inprocess":
            if overlap in ("both", "on"):
                out["inprocess overlap"] = (b, True)
            if overlap in ("both", "off"):
                out["inprocess serial"] = (b, False)
        else:
            out[b] = (b, True)
    return out


def table(runs: dict, args: argparse.Namespace, backends: list[str]) -> Table:
    def rate(k: int, name: str) -> float:
        return statistics.median(k * args.ticks / secs for _, secs, _ in runs[(k, name)])

    t = Table(
        title=f"environment ticks/s, digits CNN width 2, {ENV_CFG.batches_per_tick} "
        f"batches/tick, {args.ticks} ticks per env, {args.threads or 'default'} "
        f"torch threads in-process, median of {args.repeats}"
    )
    for col in (
        "K",
        "backend",
        "start s",
        "vector ticks/s",
        "seq ticks/s",
        "speed-up",
        "min–max ticks/s",
        "same",
    ):
        t.add_column(col, justify="right")
    for k in args.ks:
        seq = rate(k, "seq")
        reference = runs[(k, "seq")][0][2]
        for b in backends:
            v = rate(k, b)
            rates = [k * args.ticks / secs for _, secs, _ in runs[(k, b)]]
            start = statistics.median(s for s, _, _ in runs[(k, b)])
            same = all(r == reference for _, _, r in runs[(k, b)])
            if not same:
                gap = max(
                    abs(x - y)
                    for _, _, r in runs[(k, b)]
                    for env_r, env_ref in zip(r, reference, strict=True)
                    for x, y in zip(env_r, env_ref, strict=True)
                )
            t.add_row(
                str(k),
                b,
                f"{start:.1f}",
                f"{v:.1f}",
                f"{seq:.1f}",
                f"{v / seq:.2f}×",
                f"{min(rates):.1f}–{max(rates):.1f}",
                "yes" if same else f"no, max |Δ| {gap:.1e}",
            )
    return t


if __name__ == "__main__":
    main()
