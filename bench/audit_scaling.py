"""Wall time of one full-retrain Shapley audit (3 seeds × R = 2: 16 retrains) on each execution
backend: the local process pool with 1 and 2 workers, and Ray with 2 workers.

    .venv/bin/python bench/audit_scaling.py [--ticks 10] [--batches 8] [--repeats 3]
                                            [--variants local:1 local:2 ray:2] [--threads 1]

The audit: digits, the default CNN host (width 2, depth 3), `--batches` batches of 64 per tick,
`--ticks` ticks per retrain, metric val_loss, seeds 0 and 1; candidates CONV_LIGHT on slots.b0 at
tick 0, LORA on slots.b1 at tick 1, CONV_SMALL on slots.b2 at tick 2 (real retrains through
`subset_value`). Every measured audit starts from a fresh, empty cache directory, so each one
retrains all 16 jobs; the time is the whole `Audit.run`, starting workers included (a spawn pool
imports torch in each worker; Ray also starts its local instance and shuts it down: variant
`ray-warm:N` starts the instance before the clock, as a running cluster would be).

`local:1` runs the jobs in this process under torch.set_num_threads(--threads); pool and Ray
workers use one thread per job. "same φ" says whether the variant's v tables (hence φ) equal
`local:1`'s bit for bit. Median over `--repeats`, variants interleaved within each repeat.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch
from rich.console import Console
from rich.table import Table

from esper.audits.replay import Candidate
from esper.audits.retrain import Audit, AuditProtocol, AuditResult, subset_value
from esper.config import GrowConfig
from esper.tolaria.environment import EnvConfig
from esper.tolaria.remote import start_local_ray
from vector_env import machine

CANDIDATES = [
    Candidate.advancing("slots.b0", "CONV_LIGHT", 0),
    Candidate.advancing("slots.b1", "LORA", 1),
    Candidate.advancing("slots.b2", "CONV_SMALL", 2),
]


def protocol(args: argparse.Namespace) -> AuditProtocol:
    cfg = GrowConfig(device="cpu", env=EnvConfig(batches_per_tick=args.batches))
    return AuditProtocol(task="digits", config=cfg, ticks=args.ticks, metric="val_loss", repeats=2)


def parse_variant(text: str) -> tuple[str, int]:
    backend, _, workers = text.partition(":")
    if backend not in ("local", "ray", "ray-warm") or not workers.isdigit():
        raise argparse.ArgumentTypeError(
            f"variant must be local:N, ray:N or ray-warm:N, got {text!r}"
        )
    return backend, int(workers)


def audit_once(p: AuditProtocol, backend: str, workers: int) -> tuple[float, AuditResult]:
    """Seconds of one audit from an empty cache, and its result."""
    warm = backend == "ray-warm"
    if warm:
        start_local_ray(workers)
    try:
        with tempfile.TemporaryDirectory(prefix="esper-bench-audit-") as tmp:
            t0 = time.perf_counter()
            result = Audit(tmp).run(
                p, CANDIDATES, backend="ray" if warm else backend, workers=workers
            )
            secs = time.perf_counter() - t0
    finally:
        if warm:
            import ray

            ray.shutdown()
    if result.failures or result.retrains != 16:
        raise RuntimeError(
            f"{backend}:{workers}: {result.retrains} retrains, failures {result.failures}"
        )
    return secs, result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ticks", type=int, default=10, help="training budget of each retrain")
    p.add_argument("--batches", type=int, default=8, help="batches of 64 per tick")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument(
        "--variants",
        type=parse_variant,
        nargs="+",
        default=[("local", 1), ("local", 2), ("ray", 2)],
    )
    p.add_argument("--threads", type=int, default=1, help="torch threads of local:1; 0: default")
    args = p.parse_args()
    if ("local", 1) not in args.variants:
        args.variants.insert(0, ("local", 1))  # the reference of speed-up and "same φ"
    console = Console(width=150)
    console.print(
        f"[bold]{machine(torch.device('cpu'))}[/]\n$ {' '.join(sys.argv)}\n"
        f"date {time.strftime('%a %b %d %H:%M:%S %Z %Y')}; "
        f"load average before: {os.getloadavg()}"
    )
    if args.threads:
        torch.set_num_threads(args.threads)
    prot = protocol(args)
    t_all = time.perf_counter()
    subset_value(prot, CANDIDATES, frozenset(), 0)  # warm-up: imports, data, lazy kernels
    runs: dict[tuple[str, int], list[tuple[float, AuditResult]]] = {}
    for _ in range(args.repeats):
        for variant in args.variants:
            runs.setdefault(variant, []).append(audit_once(prot, *variant))
    console.print(table(runs, args))
    reference = runs[("local", 1)][0][1]
    for key in reference.candidates:
        console.print(f"φ({key}) = {reference.phi[key]:+.6f} (local:1)")
    console.print(
        f"load average after: {os.getloadavg()}; whole benchmark "
        f"{time.perf_counter() - t_all:.0f} s"
    )


def table(runs: dict, args: argparse.Namespace) -> Table:
    reference = runs[("local", 1)][0][1]
    base = statistics.median(s for s, _ in runs[("local", 1)])
    t = Table(
        title=f"audit wall time, 3 seeds × R=2 = 16 retrains of {args.ticks} ticks × "
        f"{args.batches} batches, digits CNN width 2, fresh cache each, "
        f"median of {args.repeats}"
    )
    for col in ("backend", "workers", "audit s", "min–max s", "s / retrain", "speed-up", "same φ"):
        t.add_column(col, justify="right")
    for (backend, workers), rs in runs.items():
        secs = [s for s, _ in rs]
        med = statistics.median(secs)
        same = all(r.values == reference.values and r.phi == reference.phi for _, r in rs)
        t.add_row(
            backend,
            str(workers),
            f"{med:.1f}",
            f"{min(secs):.1f}–{max(secs):.1f}",
            f"{med / 16:.2f}",
            f"{base / med:.2f}×",
            "yes" if same else "no",
        )
    return t


if __name__ == "__main__":
    main()
