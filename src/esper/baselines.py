"""Honest baselines beside a growth run (paper §7): is growing better than training a bigger
model?

    matched host      the same host, seed and ticks with no growth and no decay — what the run
                      would have reached without Esper (`esper grow` records it by default in
                      RUN/baseline)
    parameter-matched the same host family widened until its parameter count is nearest the grown
                      model's final count, trained from scratch for the same ticks
    from scratch      the grown model's final architecture (its committed seeds, widenings and
                      lysed shapes) with fresh weights, every seed present from tick 0, trained
                      for the same ticks with no growth

Each is an ordinary recorded run (policy "none"), so `esper show` and `esper report` read them as
any other.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from esper.config import GrowConfig, config_from_dict
from esper.contracts import Stage
from esper.contracts.errors import ConfigError
from esper.kasmina import apply_model_structure
from esper.recorder import RunStore
from esper.run import (
    GrowResult,
    build_host,
    last_checkpoint,
    resume_run,
    start_run,
    task_of,
)
from esper.tolaria.determinism import RunSeeds, pick_device

BASELINE_DIR = "baseline"
"""Where `esper grow` records a run's matched host, inside the run directory."""


def host_alone(cfg: GrowConfig) -> GrowConfig:
    """`cfg` with no growth and no decay: the matched host."""
    return replace(cfg, policy="none", decay="none")


@dataclass(frozen=True)
class Finished:
    """A recorded run's final metric (a baseline that finished earlier is read, not rerun)."""

    run_dir: Path
    final_metric: float
    params_end: int


def run_config(run_dir: Path) -> GrowConfig:
    with RunStore.open(run_dir) as store:
        return config_from_dict(store.manifest()["config"])


def finished(run_dir: Path) -> Finished | None:
    """The run's final metric and parameters if it played all its ticks, else None."""
    if not (run_dir / "run.sqlite").is_file():
        return None
    with RunStore.open(run_dir) as store:
        cfg = config_from_dict(store.manifest()["config"])
        metrics = store.metrics()
    if not metrics or metrics[-1][0] != cfg.ticks - 1:
        return None
    last = metrics[-1][1]
    return Finished(run_dir, last["metric"], int(last["host_params"] + last["seed_params"]))


def record_baseline(run_dir: Path, cfg: GrowConfig, progress: Any = None) -> Finished:
    """The matched host of the run in `run_dir` (config `cfg`), recorded in
    `run_dir/baseline`: read if it finished, resumed if it was interrupted, else run."""
    where = run_dir / BASELINE_DIR
    done = finished(where)
    if done is not None:
        return done
    run = resume_run(where) if (where / "run.sqlite").is_file() else None
    if run is None:
        run = start_run(host_alone(cfg), run_dir=where)
    try:
        r = run.run(progress)
    finally:
        run.store.close()
    return Finished(where, r.final_metric, r.params_end)


# ---------------------------------------------------------------------------------------------
# Parameter-matched host
# ---------------------------------------------------------------------------------------------


def host_params(cfg: GrowConfig) -> int:
    """Parameters of `cfg`'s host as built (no seed)."""
    model = build_host(cfg, task_of(cfg))
    return sum(p.numel() for p in model.parameters())


def matched_width(cfg: GrowConfig, target: int, max_width: int = 1024) -> int:
    """The host width (of `cfg`'s family and depth) whose parameter count is nearest `target`
    (the transformer's d_model stays a multiple of its heads). Widths are searched upwards from
    the config's own until the count passes the target."""
    step = cfg.host.heads if _family(cfg) == "transformer" else 1
    width = _built_width(cfg)
    start = max(step, width - width % step)
    best, best_gap = start, None
    for w in range(start, max_width + 1, step):
        n = host_params(_with_width(cfg, w))
        gap = abs(n - target)
        if best_gap is None or gap < best_gap:
            best, best_gap = w, gap
        if n >= target:
            break
    return best


def parameter_matched(cfg: GrowConfig, target: int) -> GrowConfig:
    """`cfg`'s host widened to about `target` parameters, with no growth and no decay."""
    return host_alone(_with_width(cfg, matched_width(cfg, target)))


def _family(cfg: GrowConfig) -> str:
    kind = cfg.host.kind
    return ("transformer" if cfg.task == "text" else "cnn") if kind == "auto" else kind


def _built_width(cfg: GrowConfig) -> int:
    """The width `build_host` really gives (a transformer below d_model 8 is raised to 64)."""
    w = cfg.host.width
    return 64 if _family(cfg) == "transformer" and w < 8 else w


def _with_width(cfg: GrowConfig, width: int) -> GrowConfig:
    if _family(cfg) == "transformer" and width < 8:
        raise ConfigError(f"a transformer host needs d_model >= 8, got {width}")
    return replace(cfg, host=replace(cfg.host, width=width))


# ---------------------------------------------------------------------------------------------
# The grown architecture, from scratch
# ---------------------------------------------------------------------------------------------


def grown_architecture(run_dir: Path, seed: int) -> tuple[GrowConfig, nn.Module]:
    """(config, model): the final architecture of the run in `run_dir` — its committed seeds
    and widenings, lysed shapes and host tissue — with fresh weights drawn from `seed`; seeds
    that were still in the lifecycle at the end are left out (they were not part of the grown
    model yet)."""
    cfg = run_config(run_dir)
    if cfg.task == "custom":
        raise ConfigError(f"{run_dir} grew a user's module: its architecture cannot be rebuilt")
    fresh = replace(host_alone(cfg), seed=seed)
    with RunStore.open(run_dir) as store:
        _, info, _ = last_checkpoint(store, run_dir, torch.device("cpu"))
    meta = _committed_only(info["model"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RunSeeds(seed).host)
        model = build_host(fresh, task_of(fresh))
        apply_model_structure(model, meta, source=f"run {run_dir}")
    return fresh, model.to(pick_device(cfg.device))


def _committed_only(meta: dict[str, Any]) -> dict[str, Any]:
    """`meta` with every slot not COMMITTED left dormant (None), and the committed ones' clocks
    reset: the new run starts at tick 0."""
    slots = {
        name: {**st, "last_tick": None, "ticks_in_stage": 0}
        if st["stage"] == Stage.COMMITTED.name
        else None
        for name, st in meta["slots"].items()
    }
    return {**meta, "slots": slots}


def from_scratch(run_dir: Path, seed: int, out: Path) -> GrowResult:
    """Train the grown architecture of `run_dir` from fresh weights (seed `seed`) for the same
    ticks with no growth; recorded in `out`."""
    cfg, model = grown_architecture(run_dir, seed)
    run = start_run(cfg, model=model, run_dir=out)
    try:
        return run.run()
    finally:
        run.store.close()
