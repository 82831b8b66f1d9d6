"""Ray, the optional extra (`pip install 'esper[ray]'`) behind the `ray` backends of the vector
(`VectorEnv(backend="ray")`: actors) and of the audits (`esper.audits.backends`: tasks). It is
imported lazily, and a missing Ray raises `BackendUnavailable` saying how to install it."""

from __future__ import annotations

import os
import sys
from typing import Any

from esper.contracts.errors import BackendUnavailable

RAY_MISSING = "the ray backend needs the ray extra: pip install 'esper[ray]'"


def import_ray() -> Any:
    """The `ray` module, or `BackendUnavailable` (an ImportError) saying how to install it."""
    try:
        import ray
    except ImportError as err:
        raise BackendUnavailable(RAY_MISSING) from err
    return ray


def start_local_ray(num_cpus: int) -> None:
    """A local Ray instance of `num_cpus` CPUs (and the GPUs it finds) whose workers import from
    this process's sys.path, as a spawned process pool's do: a value function defined in a
    script or a test module reaches them by reference."""
    ray = import_ray()
    path = [p for p in sys.path if p]
    # Ray's own channel for the driver's path, ~5 s faster to a first task than a runtime_env. A
    # worker puts each entry in front of its own path in turn, which reverses their order: given
    # reversed, they keep the driver's order, so that an entry of PYTHONPATH still comes before
    # an installed copy of the same package (as an editable install's .pth in another checkout).
    try:
        job = ray.job_config.JobConfig(_py_driver_sys_path=path[::-1])
        where: dict[str, Any] = {"job_config": job}
    except TypeError:  # a Ray without it
        where = {"runtime_env": {"env_vars": {"PYTHONPATH": os.pathsep.join(path)}}}
    ray.init(
        num_cpus=num_cpus,
        include_dashboard=False,
        log_to_driver=False,
        logging_level="WARNING",
        **where,
    )


def connect_ray(num_cpus: int, address: str | None = None) -> bool:
    """Ray initialised for this process: left as it is if it already is (the caller's instance
    or connection), else joined to the cluster at `address`, else a local instance of `num_cpus`
    CPUs (`start_local_ray`). Returns whether this call initialised it: its caller then shuts it
    down when done."""
    ray = import_ray()
    if ray.is_initialized():
        return False
    if address is not None:
        ray.init(address=address, log_to_driver=False, logging_level="WARNING")
    else:
        start_local_ray(num_cpus)
    return True
