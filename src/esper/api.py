"""The Python API: grow a user's own module on the user's own data."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from esper.config import GrowConfig, override
from esper.run import Callback, GrowResult, start_run
from esper.tolaria.data import from_tensors
from esper.tolaria.determinism import pick_device

Data = tuple[torch.Tensor, torch.Tensor] | Iterable[tuple[torch.Tensor, torch.Tensor]]


def _tensors(data: Data) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y) as given, or gathered once from a DataLoader-like iterable of (x, y) batches."""
    if isinstance(data, tuple) and len(data) == 2 and isinstance(data[0], torch.Tensor):
        return data
    xs, ys = zip(*((x, y) for x, y in data), strict=True)
    return torch.cat(xs), torch.cat(ys)


def grow(
    model: nn.Module,
    train: Data,
    val: Data,
    *,
    policy: str | None = None,
    ticks: int | None = None,
    seed: int | None = None,
    run_dir: str | Path | None = None,
    config: GrowConfig | None = None,
    callbacks: Iterable[Callback] = (),
    **overrides: Any,
) -> tuple[nn.Module, GrowResult]:
    """Grow `model` (which must contain SeedSlots, see `esper.kasmina.insert_slots`) on
    classification data `train`/`val` — (x, y) tensors or DataLoaders — and return the grown
    model and the run's result. The run's settings are `config` (default: `GrowConfig()`); only
    the keywords given here (`policy`, `ticks`, `seed`, and `overrides` as dotted config keys, e.g.
    `**{"economy.w_rent": 0.1}`) replace its values. For bit-reproducible runs, build the model
    after `torch.manual_seed(seed)`."""
    cfg = override(
        config or GrowConfig(), policy=policy, ticks=ticks, seed=seed, task="custom", **overrides
    )
    device = pick_device(cfg.device)
    task = from_tensors(*_tensors(train), *_tensors(val), device=device)
    run = start_run(
        cfg,
        model=model,
        task=task,
        run_dir=Path(run_dir) if run_dir is not None else None,
        callbacks=callbacks,
    )
    return run.env.model, run.run()
