"""Where the audit's retrains run: executors behind one `concurrent.futures` interface.

    local  a spawn process pool of `workers` processes, one torch thread each
           (workers = 1: each job runs in this process, at submit time)
    ray    Ray remote tasks with per-job resources (1 CPU; a GPU fraction when the protocol trains
           on CUDA); on the cluster at `ray_address`, else on a local instance of `workers` CPUs

The audit's submit / wait / retry / store loop (`Audit._execute`) sees only `Executor.submit`
returning futures, and never which backend it drives. Ray is imported lazily: it is an extra.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import math
import multiprocessing
import os
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch

from esper.contracts.errors import ConfigError
from esper.tolaria.remote import connect_ray, import_ray

BACKENDS = ("local", "ray")
GPU_FRACTION = 0.25
"""Default GPU share of one Ray job when the protocol trains on CUDA: a retrain of a small host
uses a fraction of a card, so four share one."""


def check_backend(backend: str, ray_address: str | None = None) -> None:
    """A known backend whose dependency imports, or a clear error."""
    if backend not in BACKENDS:
        raise ConfigError(f"unknown backend {backend!r}; valid backends: {', '.join(BACKENDS)}")
    if ray_address is not None and backend != "ray":
        raise ConfigError("a Ray address needs backend='ray'")
    if backend == "ray":
        import_ray()


def usable_cores() -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return cores or 1


@contextlib.contextmanager
def open_executor(
    backend: str,
    workers: int | None,
    jobs: int,
    *,
    device: str = "auto",
    ray_address: str | None = None,
    ray_resources: Mapping[str, Any] | None = None,
) -> Iterator[tuple[cf.Executor, int]]:
    """The executor for `jobs` jobs and how many of them to keep in flight at once."""
    check_backend(backend, ray_address)
    if backend == "local":
        n = min(workers or usable_cores(), jobs)
        pool = (
            _InProcess()
            if n == 1
            else cf.ProcessPoolExecutor(
                n, mp_context=multiprocessing.get_context("spawn"), initializer=_worker_init
            )
        )
        with pool:
            yield pool, n
        return
    resources = job_resources(device, ray_resources)
    ray = import_ray()
    per_job = max(1, math.ceil(resources.get("num_cpus", 1)))
    # Ray already initialised: the caller's instance or connection, kept open
    started = connect_ray((workers or usable_cores()) * per_job, ray_address)
    # A local instance's CPUs bound the jobs in flight; on a cluster, `workers` (if given) does.
    limit = workers if workers and ray_address is not None else jobs
    pool = RayExecutor(ray, resources, shutdown_ray=started)
    with pool:
        yield pool, limit


# ---------------------------------------------------------------------------------------------
# local
# ---------------------------------------------------------------------------------------------


def _worker_init() -> None:
    torch.set_num_threads(1)  # one core per job: the pool is sized to the cores


class _InProcess(cf.Executor):
    """workers = 1: each job runs at submit time, in this process, behind the Future API."""

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> cf.Future:
        fut: cf.Future = cf.Future()
        try:
            fut.set_result(fn(*args, **kwargs))
        except Exception as err:
            fut.set_exception(err)
        return fut


# ---------------------------------------------------------------------------------------------
# ray
# ---------------------------------------------------------------------------------------------


def job_resources(device: str, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Ray resources of one job: 1 CPU, plus GPU_FRACTION of a GPU when `device` is CUDA
    ("auto" counts as CUDA when this process sees one); `overrides` replace or add keys
    (num_cpus, num_gpus, memory, resources, ...)."""
    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    out: dict[str, Any] = {"num_cpus": 1, **({"num_gpus": GPU_FRACTION} if cuda else {})}
    out.update(overrides or {})
    return out


def _in_ray_worker(threads: int, fn: Callable[..., Any], *args: Any) -> Any:
    """The remote body of every job: as many torch threads as the job has CPUs, then `fn`."""
    torch.set_num_threads(threads)
    return fn(*args)


class RayExecutor(cf.Executor):
    """Ray tasks behind `concurrent.futures.Future`s. Ray's own retries are off (the audit
    counts attempts itself); a task's error arrives as the exception it raised."""

    def __init__(self, ray: Any, resources: Mapping[str, Any], shutdown_ray: bool) -> None:
        self._ray, self._shutdown_ray = ray, shutdown_ray
        self._threads = max(1, int(resources.get("num_cpus", 1)))
        self._task = ray.remote(_in_ray_worker).options(max_retries=0, **resources)
        self._live: dict[cf.Future, Any] = {}
        self._lock = threading.Lock()

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> cf.Future:
        if kwargs:
            raise TypeError("RayExecutor.submit takes positional arguments only")
        ref = self._task.remote(self._threads, fn, *args)
        out: cf.Future = cf.Future()
        with self._lock:
            self._live[out] = ref

        def settle(done: cf.Future) -> None:  # runs on a Ray thread
            with self._lock:
                self._live.pop(out, None)
            err = done.exception()
            if err is None:
                out.set_result(done.result())
            else:
                out.set_exception(self._unwrap(err))

        ref.future().add_done_callback(settle)
        return out

    def _unwrap(self, err: BaseException) -> BaseException:
        """A RayTaskError carries the task's own exception as its cause."""
        from ray.exceptions import RayTaskError

        if isinstance(err, RayTaskError) and err.cause is not None:
            return err.cause
        return err

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._lock:
            live = list(self._live.values())
        for ref in live:  # left behind by an interrupted audit: do not leave them on a cluster
            with contextlib.suppress(Exception):
                self._ray.cancel(ref, force=True)
        if self._shutdown_ray:
            self._ray.shutdown()
