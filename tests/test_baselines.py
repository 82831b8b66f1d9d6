"""Honest baselines (paper §7): the matched host, the parameter-matched host and the grown
architecture retrained from scratch."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from _engine_helpers import small_config
from esper.baselines import (
    from_scratch,
    grown_architecture,
    host_params,
    matched_width,
    parameter_matched,
    record_baseline,
)
from esper.config import HostConfig
from esper.contracts import Stage
from esper.kasmina import slots_of
from esper.recorder import RunStore
from esper.run import grown_model, start_run


def _grown_run(tmp_path: Path, ticks: int = 16, **kw: object) -> Path:
    run = start_run(small_config(ticks, **kw), run_dir=tmp_path / "run")
    try:
        r = run.run()
    finally:
        run.store.close()
    assert r.committed, "the fast heuristic commits a seed within these ticks"
    return r.run_dir


def _count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    "kind, width", [("cnn", 2), ("mlp", 8), ("transformer", 16), ("transformer", 2)]
)
def test_the_matched_width_is_the_nearest_parameter_count(kind: str, width: int) -> None:
    task = "text" if kind == "transformer" else "digits"
    cfg = replace(small_config(), task=task, host=HostConfig(kind=kind, width=width, depth=1))
    target = int(host_params(cfg) * 2.7)
    w = matched_width(cfg, target)
    step = cfg.host.heads if kind == "transformer" else 1
    built = 64 if kind == "transformer" and width < 8 else width  # build_host's own rule
    counts = {
        v: host_params(replace(cfg, host=replace(cfg.host, width=v)))
        for v in (w - step, w, w + step)
        if v >= built
    }
    assert min(counts, key=lambda v: abs(counts[v] - target)) == w  # nearer than its neighbours
    assert w % step == 0 and w > built
    matched = parameter_matched(cfg, target)
    assert (matched.policy, matched.decay, matched.host.width) == ("none", "none", w)


def test_the_grown_architecture_has_the_grown_shapes_and_fresh_weights(tmp_path: Path) -> None:
    run_dir = _grown_run(tmp_path, host=HostConfig(width=4))  # commits WIDEN and CONV_HEAVY
    grown, _ = grown_model(run_dir)
    cfg, fresh = grown_architecture(run_dir, seed=5)
    assert cfg.policy == "none" and cfg.seed == 5
    committed = {n for n, s in slots_of(grown).items() if s.stage is Stage.COMMITTED}
    assert committed and committed == {
        n for n, s in slots_of(fresh).items() if s.stage is Stage.COMMITTED
    }
    live = {n for n, s in slots_of(fresh).items() if s.seed is not None}
    assert not live  # seeds still in the lifecycle at the end are not part of it
    in_lifecycle = sum(
        sum(p.numel() for p in s.parameters())
        for s in slots_of(grown).values()
        if s.seed is not None
    )
    assert _count(fresh) == _count(grown) - in_lifecycle
    a, b = dict(grown.named_parameters()), dict(fresh.named_parameters())
    assert a.keys() >= b.keys()
    assert not any(torch.equal(a[k].cpu(), b[k]) for k in b if a[k].numel() > 8)  # fresh
    again = dict(grown_architecture(run_dir, seed=5)[1].named_parameters())
    assert all(torch.equal(again[k], b[k]) for k in b)  # the seed fixes them
    r = from_scratch(run_dir, 5, tmp_path / "scratch")  # trains from tick 0, no growth
    assert r.params_start == r.params_end == _count(fresh) and not r.germinated


def test_the_matched_baseline_is_recorded_once(tmp_path: Path) -> None:
    cfg = small_config(3)
    run_dir = tmp_path / "run"
    run = start_run(cfg, run_dir=run_dir)
    run.run()
    run.store.close()
    first = record_baseline(run_dir, cfg)
    with RunStore.open(run_dir / "baseline") as store:
        assert store.manifest()["config"]["policy"] == "none"
        n = len(store.events())
    again = record_baseline(run_dir, cfg)
    assert again == first
    with RunStore.open(run_dir / "baseline") as store:
        assert len(store.events()) == n
