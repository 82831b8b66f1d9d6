"""Independent benchmark runs on a spawn process pool, one torch thread each, with progress."""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing
from collections.abc import Callable, Sequence
from typing import Any

from rich.console import Console


def run_pool(
    fn: Callable[..., dict[str, Any]],
    jobs: Sequence[tuple[Any, ...]],
    workers: int,
    console: Console,
    describe: Callable[[dict[str, Any]], str],
) -> list[dict[str, Any]]:
    """`fn(*job)` for every job on `workers` spawned processes (each job a whole run: `fn` sets
    its own thread count); the rows in completion order, each printed as it lands."""
    rows: list[dict[str, Any]] = []
    ctx = multiprocessing.get_context("spawn")
    with cf.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
        futures = [pool.submit(fn, *job) for job in jobs]
        for i, f in enumerate(cf.as_completed(futures), 1):
            rows.append(f.result())
            console.print(f"[{i}/{len(jobs)}] {describe(rows[-1])}")
    return rows
