"""The Python API: grow a user's own module on the user's own data; fork a recorded run and
compare two (forensic replay, paper §8.2)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from esper.config import GrowConfig, load_config, override
from esper.contracts.errors import ConfigError
from esper.contracts.zones import ZonesConfig
from esper.forensics import RunDiff, diff_runs
from esper.forensics import replay as replay_run
from esper.kasmina import describe, probing
from esper.kasmina.export import export_model
from esper.run import Callback, GrowResult, start_run, task_of
from esper.tamiyo.policies import Policy
from esper.tolaria.data import TASK_NAMES, TaskData, from_tensors
from esper.tolaria.determinism import pick_device

Data = tuple[torch.Tensor, torch.Tensor] | Iterable[tuple[torch.Tensor, torch.Tensor]]


def _tensors(data: Data) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y) as given, or gathered once from a DataLoader-like iterable of (x, y) batches."""
    if isinstance(data, tuple) and len(data) == 2 and isinstance(data[0], torch.Tensor):
        return data
    xs, ys = zip(*((x, y) for x, y in data), strict=True)
    return torch.cat(xs), torch.cat(ys)


class Logits(nn.Module):
    """A user's model with `output` applied to what it returns: the tensor of logits the engine
    trains and scores (e.g. `output=lambda out: out.logits` for a Hugging Face model)."""

    def __init__(self, model: nn.Module, output: Callable[[Any], torch.Tensor]) -> None:
        super().__init__()
        self.model, self.output = model, output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output(self.model(x))


def _check_logits(model: nn.Module, task: TaskData) -> None:
    """One probe forward on two validation samples: the model must return logits the task's
    loss can use, or the run would fail deep inside its first tick."""
    x = task.val_x[:2]
    with probing(model):
        out = model(x.to(next(model.parameters()).device))
    lm = task.vocab_size is not None
    want = "(batch, positions, vocabulary)" if lm else "(batch, classes)"
    if not isinstance(out, torch.Tensor):
        raise ConfigError(
            f"the model returns {describe(out)}, not a tensor of logits {want}: pass "
            "output=<function of the output>, e.g. output=lambda out: out.logits"
        )
    expected = (*x.shape, task.num_outputs) if lm else (len(x), task.num_outputs)
    ok = out.dim() == len(expected) and out.shape[:-1] == expected[:-1]
    if not ok or out.shape[-1] < task.num_outputs:
        raise ConfigError(
            f"the model's logits are {tuple(out.shape)} for input {tuple(x.shape)}; the task "
            f"{task.name!r} needs {want} with at least {task.num_outputs} outputs"
        )


def _task(cfg: GrowConfig, train: Data | None, val: Data | None, task: str | None) -> TaskData:
    if task is not None:
        if train is not None or val is not None:
            raise ConfigError("give either train and val data or a built-in task, not both")
        return task_of(cfg)
    if train is None or val is None:
        raise ConfigError(
            f"give train and val data, or task=<name> for a built-in task ({', '.join(TASK_NAMES)})"
        )
    return from_tensors(*_tensors(train), *_tensors(val), device=pick_device(cfg.device))


def grow(
    model: nn.Module,
    train: Data | None = None,
    val: Data | None = None,
    *,
    task: str | None = None,
    output: Callable[[Any], torch.Tensor] | None = None,
    policy: str | Path | Policy | None = None,
    ticks: int | None = None,
    seed: int | None = None,
    run_dir: str | Path | None = None,
    config: GrowConfig | None = None,
    zones: ZonesConfig | str | Path | None = None,
    callbacks: Iterable[Callback] = (),
    **overrides: Any,
) -> tuple[nn.Module, GrowResult]:
    """Grow `model` (which must contain SeedSlots, see `esper.kasmina.insert_slots`) and return
    it, grown, with the run's result.

    Data: `train` and `val` — (x, y) tensors or DataLoaders of (x, y) batches: classification
    (y holds one label per sample) or language modelling (x and y (N, T) token ids, y the next
    tokens) — or `task`, a built-in task by name (`"digits"`, `"text"`, `"cifar10"`).
    `output` turns what the model returns into the logits tensor, for models that return
    something else (`output=lambda out: out.logits` for a Hugging Face model).

    `policy`: a policy by name (`"heuristic"`, `"learned"`, …), a trained policy file, or a
    policy object (a `LearnedPolicy`, used as it is: its own sampling RNG). A learned policy
    acts on any module's slots, however many and whatever their topologies.

    The run's settings are `config` (default: `GrowConfig()`); only the keywords given here
    (`policy`, `ticks`, `seed`, and `overrides` as dotted config keys, e.g.
    `**{"economy.w_rent": 0.1}`) replace its values. `zones`: a zone layout (a `ZonesConfig`, or
    the path of a zone file as `esper grow --zones` takes); a user's model has no block index,
    so its zones name their slots (`slots = [...]`). For bit-reproducible runs, build the model
    after `torch.manual_seed(seed)`."""
    if policy is None or isinstance(policy, str | Path):
        given, name = None, None if policy is None else str(policy)
    else:  # an object: the manifest names the file it came from, or its kind
        given, name = policy, getattr(policy, "source", None) or policy.name
    cfg = override(
        config or GrowConfig(),
        policy=name,
        ticks=ticks,
        seed=seed,
        task=task or "custom",
        **overrides,
    )
    if zones is not None:
        layout = zones if isinstance(zones, ZonesConfig) else load_config(zones, ZonesConfig)
        cfg = replace(cfg, zones=layout)
    data = _task(cfg, train, val, task)
    wrapped = model if output is None else Logits(model, output)
    _check_logits(wrapped, data)
    run = start_run(
        cfg,
        model=wrapped,
        task=data,
        policy=given,
        run_dir=Path(run_dir) if run_dir is not None else None,
        callbacks=callbacks,
    )
    try:
        result = run.run()
    finally:  # closed now: its WAL is folded into run.sqlite before anyone hashes the run
        run.store.close()
    return model, result


def export(model: nn.Module, example_input: torch.Tensor, out: str | Path) -> tuple[Path, Path]:
    """Write `model` (grown or not) as plain PyTorch that loads without Esper: `out` as a
    `torch.export` program (`.pt2`) and its weights beside it (`.safetensors`); returns both
    paths. `example_input`: a batch the model accepts (the batch size stays dynamic)."""
    return export_model(model, example_input, out)


def replay(
    run_dir: str | Path, from_tick: int, inject: str | None = None, out: str | Path | None = None
) -> GrowResult:
    """Fork the recorded run `run_dir` at tick `from_tick` into a new run (`out`, default
    `RUN_DIR-replay-tT`) and play it to the end; the source is only read. Without `inject` the
    fork reproduces the source bit for bit; with it (e.g. `"op=PRUNE,slot=b1"`, or
    `"blueprint=CONV_LIGHT"`: heads not named keep the policy's choice) that action replaces the
    policy's at `from_tick`, and the policy plays on. `result.run_dir` is the fork."""
    return replay_run(run_dir, from_tick, inject, out)


def diff(run_a: str | Path, run_b: str | Path) -> RunDiff:
    """Where two recorded runs diverge: the first tick whose decision, events or metrics differ,
    and both runs' slots, metric and parameters tick by tick."""
    return diff_runs(run_a, run_b)
