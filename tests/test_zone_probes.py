"""Boundary contracts and leave-one-zone-out probes (paper §9.7): what crosses a zone's output
boundary against an independent forward and backward, the drift formula by hand, breaches
recorded, the fused group ablation against separate evaluations, probes that leave a run
exactly as it would have been without them, and the probe's contribution reaching Narset."""

from __future__ import annotations

import copy
import dataclasses
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from _engine_helpers import FAST_HEURISTIC, cnn_driver
from esper.config import GrowConfig, HostConfig
from esper.contracts import Stage
from esper.contracts.errors import ConfigError
from esper.contracts.zones import NarsetConfig, ProbeConfig, ZonesConfig, ZoneSpec, ZoneTelemetry
from esper.run import GrowthRun, build_episode, start_run
from esper.tolaria.environment import EnvConfig
from esper.tolaria.zones import drift

DEEP = HostConfig(kind="cnn", width=2, depth=8)


def _zones(**kw: object) -> ZonesConfig:
    return ZonesConfig(
        zone=(
            ZoneSpec("early", blocks=(0, 3), growth_budget=2, risk_share=0.5),
            ZoneSpec("late", blocks=(4, 7), growth_budget=2, risk_share=0.5),
        ),
        **kw,  # type: ignore[arg-type]
    )


def _cfg(ticks: int, zones: ZonesConfig) -> GrowConfig:
    env = EnvConfig(batches_per_tick=2, eval_samples=256)
    return GrowConfig(
        ticks=ticks, device="cpu", host=DEEP, zones=zones, env=env, heuristic=FAST_HEURISTIC
    )


def _run_watching_narset(
    zones: ZonesConfig, run_dir: Path
) -> tuple[GrowthRun, list[ZoneTelemetry]]:
    """A 6-tick run, and every `ZoneTelemetry` Narset received, in order."""
    run = start_run(_cfg(6, zones), run_dir=run_dir)
    seen: list[ZoneTelemetry] = []
    narset = run.episode.zones.allocator  # type: ignore[union-attr]
    update = narset.update
    narset.update = lambda t: (seen.extend(t), update(t))[1]  # type: ignore[method-assign]
    run.run()
    return run, seen


# ---------------------------------------------------------------------------------------------
# Boundary contracts
# ---------------------------------------------------------------------------------------------


def test_drift_matches_a_hand_computation() -> None:
    ref = ([0.0, 1.0], [1.0, 2.0])
    assert drift(ref, ref) == 0.0
    # channel 0: mean +1 σ, σ unchanged → 1; channel 1: mean +0, σ ×e → log² = 1. sqrt(2/2) = 1.
    now = ([1.0, 1.0], [1.0, 2.0 * math.e])
    assert drift(ref, now) == pytest.approx(1.0, abs=1e-5)
    # a widening added a channel: only the channels both have are compared
    assert drift(ref, ([1.0, 1.0, 9.0], [1.0, 2.0 * math.e, 9.0])) == drift(ref, now)


def test_the_boundary_probe_matches_an_independent_forward_and_backward() -> None:
    episode = build_episode(_cfg(2, _zones()))
    episode.observe()
    zones, env = episode.zones, episode.env
    assert zones is not None
    assert zones.boundary == {"early": "slots.b3", "late": "slots.b7"}
    assert zones.upstream == {"early": None, "late": "early"}
    grads_before = {
        n: p.grad.clone() for n, p in env.model.named_parameters() if p.grad is not None
    }
    readings = env.boundary_probe(["slots.b3", "slots.b7"], 64)
    for n, p in env.model.named_parameters():  # the probe leaves every parameter's .grad alone
        assert (p.grad is None) == (n not in grads_before)
        if p.grad is not None:
            assert torch.equal(p.grad, grads_before[n])

    model = copy.deepcopy(env.model).eval()  # by hand: retain the two outputs, full backward
    slots = dict(model.named_modules())
    outs: dict[str, torch.Tensor] = {}
    for name in ("slots.b3", "slots.b7"):
        slots[name].register_forward_hook(lambda _m, _i, o, n=name: outs.__setitem__(n, o))
    loss = F.cross_entropy(model(env.val_x[:64]), env.val_y[:64])
    for o in outs.values():
        o.retain_grad()
    loss.backward()
    for name, o in outs.items():
        r = readings[name]
        assert r.grad_norm == pytest.approx(float(o.grad.norm()), rel=1e-5)
        by_channel = o.detach().transpose(0, 1).reshape(o.shape[1], -1)
        assert r.mean == pytest.approx(by_channel.mean(1).tolist(), abs=1e-6)
        assert r.std == pytest.approx(by_channel.std(1, correction=0).tolist(), abs=1e-6)
    assert readings["slots.b3"].grad_norm > 0
    crossing = zones._crossing
    gain = readings["slots.b3"].grad_norm / readings["slots.b7"].grad_norm
    assert crossing["late"]["gain"] == pytest.approx(gain, rel=1e-5)
    assert crossing["early"]["gain"] == 1.0  # nothing upstream of the first zone
    assert crossing["early"]["drift"] == 0.0  # the window's first tick is its reference


def test_a_breached_boundary_contract_is_recorded_and_reaches_narset(tmp_path: object) -> None:
    zones = _zones(window=3, drift_limit=1e-9, gain_limit=1.0001)  # any change breaches
    run, seen = _run_watching_narset(zones, tmp_path / "run")  # type: ignore[operator]
    breaches = [e for e in run.store.events() if e.kind == "boundary_breach"]
    assert breaches and {e.payload["zone"] for e in breaches} == {"early", "late"}
    assert all(e.payload["reason"] for e in breaches)
    assert any("drift" in e.payload["reason"] for e in breaches)
    per_zone = {(t.zone, i // 2): t.boundary_breaches for i, t in enumerate(seen)}
    booked = {}
    for e in breaches:
        key = (e.payload["zone"], e.tick // 3)
        booked[key] = booked.get(key, 0) + 1
    assert {k: v for k, v in per_zone.items() if v} == booked
    metrics = run.store.metrics()[-1][1]
    assert {"zone.early.drift", "zone.late.gain"} <= set(metrics)


def test_bad_boundary_and_probe_settings_are_refused() -> None:
    with pytest.raises(ConfigError, match="gain_limit"):
        _zones(gain_limit=1.0)
    with pytest.raises(ConfigError, match="kind must be one of ablate, freeze"):
        ProbeConfig(kind="shuffle")
    with pytest.raises(ConfigError, match="steps >= 1"):
        ProbeConfig(steps=0)


# ---------------------------------------------------------------------------------------------
# Leave-one-zone-out probes
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def _accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return float((model(x).argmax(-1) == y).float().mean())


def test_a_group_ablation_equals_a_separate_evaluation_with_the_group_at_alpha_zero() -> None:
    d = cnn_driver(eval_batch_size=100)
    committed = d.grow(1, Stage.COMMITTED)
    blended = d.grow(0, Stage.HOLDING)
    env = d.env
    names = (blended.name, committed.name)
    ev = env.evaluate(groups={"both": names, "one": (blended.name,), "none": ("slots.b2",)})
    x, y = env.val_x, env.val_y
    clone = copy.deepcopy(env.model)
    for n in names:
        dict(clone.named_modules())[n].set_ablation(torch.zeros(len(x)))
    expected = _accuracy(copy.deepcopy(env.model), x, y) - _accuracy(clone, x, y)
    assert ev.groups["both"] == pytest.approx(expected, abs=1e-6)
    assert ev.groups["one"] == pytest.approx(ev.contributions[blended.name], abs=1e-6)
    assert ev.groups["none"] == 0.0  # nothing grown there: exactly 0, no replica spent
    assert expected != 0.0
    assert ev.metric == env.evaluate().metric  # the extra replicas change nothing else


@pytest.mark.parametrize("kind", ["ablate", "freeze"])
def test_probes_leave_the_run_exactly_as_without_them(kind: str, tmp_path: object) -> None:
    fixed = dataclasses.replace(_zones(window=3), narset=NarsetConfig(enabled=False))
    probed = dataclasses.replace(fixed, probe=ProbeConfig(every=2, kind=kind, steps=3))
    plain = start_run(_cfg(6, fixed), run_dir=tmp_path / "plain")  # type: ignore[operator]
    reference = plain.run()
    run = start_run(_cfg(6, probed), run_dir=tmp_path / "probed")  # type: ignore[operator]
    result = run.run()
    assert result.weights_hash == reference.weights_hash
    assert [m for _, m in run.store.metrics()] == [m for _, m in plain.store.metrics()]
    decisions = [(d.tick, d.policy, d.action) for d in run.store.decisions()]
    assert decisions == [(d.tick, d.policy, d.action) for d in plain.store.decisions()]
    probes = [e for e in run.store.events() if e.kind == "zone_probe"]
    assert [e.tick for e in probes] == [1, 3, 5]
    assert all(set(e.payload["contribution"]) == {"early", "late"} for e in probes)
    assert all(e.payload["kind"] == kind for e in probes)
    if kind == "freeze":  # training one zone alone for 3 batches moves the metric
        assert any(v != 0.0 for e in probes for v in e.payload["contribution"].values())


def test_the_probe_contribution_is_narsets_productivity(tmp_path: object) -> None:
    zones = dataclasses.replace(_zones(window=3), probe=ProbeConfig(every=3, kind="freeze"))
    run, seen = _run_watching_narset(zones, tmp_path / "run")  # type: ignore[operator]
    probes = {
        e.tick: e.payload["contribution"] for e in run.store.events() if e.kind == "zone_probe"
    }
    assert sorted(probes) == [2, 5]
    for i, t in enumerate(seen):
        assert t.probed == 1
        assert t.probe_contribution == probes[3 * (i // 2) + 2][t.zone]
        rent_per_tick = t.rent / t.ticks
        expected = t.probe_contribution / rent_per_tick if rent_per_tick > 0 else 0.0
        assert t.improvement_per_rent == pytest.approx(expected)
