"""Zones and Narset (paper §9.6–9.7): the partition and its authority, per-zone budgets masking
germination, Narset's price step against a hand computation, Narset's blind input, and a real
two-zone run on the deep CNN that resumes bit-identically."""

from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Sequence
from pathlib import Path

import pytest

from _engine_helpers import FAST_HEURISTIC, text_config
from esper.config import GrowConfig, HostConfig, config_from_dict, config_to_dict
from esper.contracts import (
    Blueprint,
    DecayAction,
    DecayObservation,
    FactoredAction,
    Op,
    Stage,
)
from esper.contracts.errors import ConfigError
from esper.contracts.zones import (
    POOL,
    TELEMETRY_KINDS,
    NarsetConfig,
    ZonesConfig,
    ZoneSpec,
    ZoneTelemetry,
    ZoneViolation,
    layout_of,
)
from esper.kasmina import CNNHost
from esper.narset import Narset
from esper.narset.allocator import relative_productivity
from esper.run import build_episode, resume_run, start_run
from esper.tamiyo.masks import action_masks, illegal_reason
from esper.tamiyo.policies import HeuristicPolicy
from esper.tolaria.environment import EnvConfig
from esper.tolaria.lysis import LysisConfig

DEEP = HostConfig(kind="cnn", width=2, depth=8)


def _zones(early: int = 1, late: int = 1, **kw: object) -> ZonesConfig:
    return ZonesConfig(
        zone=(
            ZoneSpec("early", blocks=(0, 3), growth_budget=early, risk_share=0.5),
            ZoneSpec("late", blocks=(4, 7), growth_budget=late, risk_share=0.5),
        ),
        **kw,  # type: ignore[arg-type]
    )


def _cfg(ticks: int, zones: ZonesConfig, **kw: object) -> GrowConfig:
    kw.setdefault("env", EnvConfig(batches_per_tick=2, eval_samples=256))
    kw.setdefault("heuristic", FAST_HEURISTIC)
    return GrowConfig(ticks=ticks, device="cpu", host=DEEP, zones=zones, **kw)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# The partition and its authority
# ---------------------------------------------------------------------------------------------


def test_the_layout_partitions_the_deep_cnn_by_block_range() -> None:
    host = CNNHost(2, 8, 1, 10, 8)
    layout = layout_of(_zones(), host.stream.slot_blocks)
    assert layout.slots_of("early") == ("slots.b0", "slots.b1", "slots.b2", "slots.b3")
    assert layout.slots_of("late") == ("slots.b4", "slots.b5", "slots.b6", "slots.b7")
    assert [layout.owner(f"blocks.{i}") for i in (0, 3, 4, 7)] == ["early"] * 2 + ["late"] * 2
    assert layout.owner("stream.w0") == POOL  # a widening spans every zone
    overlapping = ZonesConfig(zone=(ZoneSpec("a", blocks=(0, 4)), ZoneSpec("b", blocks=(4, 7))))
    with pytest.raises(ConfigError, match="in zones 'a' and 'b'"):
        layout_of(overlapping, host.stream.slot_blocks)
    typo = ZonesConfig(zone=(ZoneSpec("a", slots=("slots.b9",)),))
    with pytest.raises(ConfigError, match=r"zone 'a' names slots \['slots.b9'\]"):
        layout_of(typo, host.stream.slot_blocks)
    with pytest.raises(ConfigError, match="sum above the global sedation budget"):
        ZonesConfig(zone=(ZoneSpec("a", (0, 3), risk_share=0.6), ZoneSpec("b", (4, 7))))


def test_a_zone_cannot_touch_another_zones_slot_or_phage() -> None:
    host = CNNHost(2, 8, 1, 10, 8)
    layout = layout_of(_zones(), host.stream.slot_blocks)
    with pytest.raises(
        ZoneViolation, match=r"zone 'early' may not act on 'slots\.b5'.*zone 'late'"
    ):
        layout.check("early", "slots.b5")
    layout.check("late", "slots.b5")

    episode = build_episode(_cfg(4, _zones()))
    episode.observe()
    views = episode.zone_views()
    assert [s.name for s in views["late"].observation.slots] == list(layout.slots_of("late"))
    assert all(
        Blueprint.WIDEN not in legal for legal in views["early"].observation.legal_blueprints
    )
    grow = FactoredAction(op=Op.GERMINATE, slot=4, blueprint=Blueprint.CONV_LIGHT)
    ok = FactoredAction(op=Op.GERMINATE, slot=1, blueprint=Blueprint.CONV_LIGHT)
    outcome = episode.act_zones({"early": (grow, "reach into late"), "late": (ok, "")})
    assert outcome.rejected is not None and "zone 'early' has no slot 4" in outcome.rejected
    assert outcome.ops == (("slots.b5", Op.GERMINATE),)  # late's slot 1 is the host's b5
    stages = {n: s.stage for n, s in episode.env.slots.items()}
    assert stages.pop("slots.b5") is Stage.GERMINATED
    assert set(stages.values()) == {Stage.DORMANT}
    (refusal,) = [e for e in outcome.events if e.kind == "rejected_action"]
    assert refusal.payload["zone"] == "early"

    zones = episode.zones
    assert zones is not None
    sedate = DecayAction(Op.SEDATE, "blocks.6", 0)
    nothing = DecayObservation(tick=0, units=(), budget=100, sedated=0)
    granted, refused = zones.vet_decay("early", [sedate], nothing)
    assert granted == []
    assert "zone 'early' may not act on 'blocks.6'" in refused[0].payload["reason"]


def _sedating(zone_units: dict[str, list[str]], asked: dict[str, DecayObservation]) -> dict:  # type: ignore[type-arg]
    """Scripted Emrakuls: each zone asks to sedate unit 0 of the phages listed for it."""

    def one(zone: str):  # type: ignore[no-untyped-def]
        def act(obs: DecayObservation) -> list[DecayAction]:
            asked[zone] = obs
            return [DecayAction(Op.SEDATE, p, 0) for p in zone_units[zone]]

        return act

    return {z: one(z) for z in zone_units}


def test_each_zones_emrakul_acts_on_its_own_units_within_its_risk_share() -> None:
    cfg = _cfg(3, _zones(), decay="heuristic", lysis=LysisConfig(sedation_budget=1.0))
    episode = build_episode(cfg)
    assert episode.decay is not None
    asked: dict[str, DecayObservation] = {}
    plan = {"early": ["blocks.1", "blocks.6"], "late": ["blocks.6", "blocks.2"]}
    episode.zone_emrakuls = _sedating(plan, asked)
    episode.observe()
    events = episode.act_zones({}).events
    lysis = {
        (e.kind, e.payload["phage"], e.payload["zone"]) for e in events if "phage" in e.payload
    }
    assert ("lysis_probation", "blocks.1", "early") in lysis
    assert ("lysis_probation", "blocks.6", "late") in lysis
    refused = [e.payload["reason"] for e in events if e.kind == "lysis_refused"]
    assert len(refused) == 2 and all(" may not act on " in r for r in refused)
    assert {u.phage for u in asked["early"].units} == {f"blocks.{i}" for i in range(4)}
    assert asked["early"].budget == math.floor(0.5 * episode.decay.governor.budget)

    stingy = ZonesConfig(zone=(ZoneSpec("early", (0, 3), risk_share=0.0), ZoneSpec("late", (4, 7))))
    episode = build_episode(_cfg(3, stingy, decay="heuristic"))
    episode.zone_emrakuls = _sedating({"early": ["blocks.1"]}, asked)
    episode.observe()
    (refusal,) = [e for e in episode.act_zones({}).events if e.kind == "lysis_refused"]
    assert "zone 'early' risk budget" in refusal.payload["reason"]


# ---------------------------------------------------------------------------------------------
# Budgets
# ---------------------------------------------------------------------------------------------


def test_the_growth_budget_masks_germination_and_is_recorded() -> None:
    episode = build_episode(_cfg(6, _zones(early=0, late=1, window=3)))
    obs = episode.observe()
    first = [e for e in episode._tick.events if e.kind == "zone_masked"]  # type: ignore[union-attr]
    assert [e.payload["zone"] for e in first] == ["early"]
    assert "growth budget: 0 of 0" in first[0].payload["reason"]
    early = episode.zone_views()["early"].observation
    assert early.growth_blocked is not None and obs.growth_blocked is None
    assert action_masks(early)["op"][Op.GERMINATE] is False
    assert not any(action_masks(early, Op.GERMINATE)["slot"])
    grow = FactoredAction(op=Op.GERMINATE, slot=0, blueprint=Blueprint.CONV_LIGHT)
    assert "GERMINATE masked: growth budget" in (illegal_reason(grow, early) or "")
    policy = HeuristicPolicy(FAST_HEURISTIC)
    for _ in range(3):  # past warm-up, on a plateau: it would germinate if it could
        policy.since_improvement = 5
        assert policy.act(dataclasses.replace(early, tick=5)).action.op is not Op.GERMINATE

    outcome = episode.act_zones({"early": (grow, ""), "late": (grow, "")})
    assert outcome.ops == (("slots.b4", Op.GERMINATE),)
    assert "GERMINATE masked" in (outcome.rejected or "")
    episode.observe()  # late used its one germination of the window: masked now, recorded
    late = [e for e in episode._tick.events if e.kind == "zone_masked"]  # type: ignore[union-attr]
    assert [e.payload["zone"] for e in late] == ["late"]
    episode.act_zones({})
    for _ in range(2):  # the window (3 ticks) closes: late's budget is back
        episode.observe()
        events = episode._tick.events  # type: ignore[union-attr]
        episode.act_zones({})
    assert [e.payload["zone"] for e in events if e.kind == "zone_unmasked"] == ["late"]


def test_a_zone_over_its_rent_ceiling_cannot_germinate() -> None:
    zones = ZonesConfig(
        zone=(
            ZoneSpec("early", blocks=(0, 3), growth_budget=5, rent_ceiling=1e-6),
            ZoneSpec("late", blocks=(4, 7), growth_budget=5, rent_ceiling=1.0),
        )
    )
    episode = build_episode(_cfg(4, zones))
    z = episode.zones
    assert z is not None
    changes = z.refresh({"slots.b1": 2e-6, "slots.b6": 2e-6})
    assert changes == [
        ("zone_masked", {"zone": "early", "reason": z.blocked["early"]}),
    ]
    assert "over the ceiling" in (z.blocked["early"] or "") and z.blocked["late"] is None


# ---------------------------------------------------------------------------------------------
# Narset
# ---------------------------------------------------------------------------------------------


def _telemetry(
    zone: str, utilisation: float, ipr: float, spikes: int = 0, rent: float = 0.01
) -> ZoneTelemetry:
    return ZoneTelemetry(
        zone=zone,
        ticks=4,
        loss_spikes=spikes,
        nonfinite_grads=0,
        grad_norm_p50=1.0,
        grad_norm_p90=2.0,
        val_slope=0.0,
        contribution=0.0,
        improvement_per_rent=ipr,
        rent=rent,
        churn=0.0,
        rent_utilisation=utilisation,
        transitions=0,
        germinations=0,
        minibatch_variance=0.0,
    )


def test_narset_price_update_matches_a_hand_computation() -> None:
    specs = (
        ZoneSpec("a", blocks=(0, 3), growth_budget=2, rent_ceiling=0.01, risk_share=0.4),
        ZoneSpec("b", blocks=(4, 7), growth_budget=2, rent_ceiling=0.01, risk_share=0.4),
    )
    narset = Narset(specs, NarsetConfig(step=0.5, productivity_weight=0.5, spike_penalty=0.5))
    # Window 1. Productivity p: a 0, b 2; mean p̄ = 1, mean |p| = 1 → r_a = −1, r_b = +1.
    # a overspends 3×, below the mean: λ = 0 + 0.5·(3 − 1) − 0.5·(−1) = 1.5.
    # b spends half its ceiling, above the mean: λ = max(0, 0.5·(−0.5) − 0.5·1) = 0.
    out = narset.update([_telemetry("a", 3.0, 0.0), _telemetry("b", 0.5, 2.0, spikes=1)])
    assert relative_productivity([_telemetry("a", 3.0, 0.0), _telemetry("b", 0.5, 2.0)]) == {
        "a": -1.0,
        "b": 1.0,
    }
    assert (out["a"].price, out["b"].price) == (1.5, 0.0)
    assert (out["a"].growth_budget, out["b"].growth_budget) == (0, 2)  # floor(2 / (1 + λ))
    assert out["a"].rent_ceiling == pytest.approx(0.004) and out["b"].rent_ceiling == 0.01
    # Risk: a 0.4·2.5 = 1.0, b 0.4 / (1 + 0.5·1) = 0.2667; Σ 1.2667 > 0.8 → both scaled.
    scale = 0.8 / (1.0 + 0.4 / 1.5)
    assert out["a"].risk_share == pytest.approx(1.0 * scale)
    assert out["b"].risk_share == pytest.approx(0.4 / 1.5 * scale)
    # Window 2. b paid no rent: not judged on productivity; a alone is its own mean (r = 0).
    # a: 1.5 + 0.5·(1.5 − 1) = 1.75; b: 0 + 0.5·(0 − 1) → clipped at 0.
    out = narset.update([_telemetry("a", 1.5, 1.0), _telemetry("b", 0.0, 5.0, rent=0.0)])
    assert (out["a"].price, out["b"].price) == (1.75, 0.0)
    assert out["a"].growth_budget == 0  # floor(2 / 2.75)
    raw = {"a": 0.4 * 2.75, "b": 0.4}
    scale = 0.8 / sum(raw.values())
    assert out["a"].risk_share == pytest.approx(raw["a"] * scale)
    assert sum(b.risk_share for b in out.values()) <= 0.8 + 1e-12
    # Relative productivity is scale-free and clipped: 100 vs 300 reads as −0.5 vs +0.5.
    r = relative_productivity([_telemetry("a", 1.0, 100.0), _telemetry("b", 1.0, 300.0)])
    assert r == {"a": -0.5, "b": 0.5}
    # A boundary breach counts as trouble, like a loss spike: it cuts the zone's risk share.
    calm, breached = Narset(specs), Narset(specs)
    quiet = [_telemetry("a", 1.0, 0.0), _telemetry("b", 1.0, 0.0)]
    broken = [quiet[0], dataclasses.replace(quiet[1], boundary_breaches=2)]
    assert breached.update(broken)["b"].risk_share < calm.update(quiet)["b"].risk_share
    restored = Narset(specs, NarsetConfig(step=0.5, productivity_weight=0.5))
    restored.load_state_dict(narset.state_dict())
    assert restored.prices == narset.prices


_TOPOLOGY = ("slot", "stage", "seed", "blueprint", "topology", "layout", "phage", "unit", "block")


def test_narset_never_receives_topology() -> None:
    hints = typing.get_type_hints(ZoneTelemetry)
    for f in dataclasses.fields(ZoneTelemetry):
        assert not any(word in f.name for word in _TOPOLOGY), f.name
        assert hints[f.name] in TELEMETRY_KINDS, f"{f.name}: {hints[f.name]}"
    assert typing.get_type_hints(Narset.update)["telemetry"] == Sequence[ZoneTelemetry]


# ---------------------------------------------------------------------------------------------
# A real run: two zones on the deep CNN, Narset on, decay on; resumed bit-identically
# ---------------------------------------------------------------------------------------------


class _Crash(RuntimeError):
    pass


def test_a_two_zone_run_records_books_and_resumes_bit_identically(tmp_path: Path) -> None:
    zones = _zones(early=1, late=1, window=4)  # the resumed checkpoint falls mid-window
    cfg = _cfg(8, zones, checkpoint_every=3, decay="heuristic")
    seen: list[object] = []

    reference = start_run(cfg, run_dir=tmp_path / "whole")
    assert reference.episode.zones is not None and reference.episode.zones.allocator is not None
    narset = reference.episode.zones.allocator
    update = narset.update
    narset.update = lambda telemetry: (seen.extend(telemetry), update(telemetry))[1]  # type: ignore[method-assign]
    whole = reference.run()

    assert seen and all(type(t) is ZoneTelemetry for t in seen)
    events = reference.store.events()
    books = next(e for e in events if e.kind == "zone_books").payload
    assert set(books) == {"early", "late"}
    assert math.fsum(b["rent_paid"] for b in books.values()) == pytest.approx(whole.rent_paid)
    assert sum(b["germinations"] for b in books.values()) == len(whole.germinated) > 0
    assert whole.zone_books == books
    updates = [e for e in events if e.kind == "narset_update"]
    assert [e.tick for e in updates] == [3, 7]
    assert set(updates[0].payload["zones"]) == {"early", "late"}
    for e in events:
        if e.slot is not None and e.kind != "decision":
            owner = "early" if int(e.slot[-1]) < 4 else "late"
            assert e.payload["zone"] == owner, e
    policies = {d.policy for d in reference.store.decisions()}
    assert policies == {"heuristic@early", "heuristic@late"}
    metrics = reference.store.metrics()[-1][1]
    assert {"zone.early.rent", "zone.late.price"} <= set(metrics)

    def crash(t: int, env: object) -> None:
        if t == 7:
            raise _Crash

    broken = start_run(cfg, run_dir=tmp_path / "crashed", callbacks=[crash])
    with pytest.raises(_Crash):
        broken.run()
    broken.store.close()
    run = resume_run(tmp_path / "crashed")
    assert run.start_tick == 6  # the checkpoint after tick 5
    result = run.run()
    assert result.weights_hash == whole.weights_hash
    assert result.event_log_hash == whole.event_log_hash


def test_zones_round_trip_through_the_config() -> None:
    cfg = _cfg(3, _zones(window=4))
    assert config_from_dict(config_to_dict(cfg)) == cfg
    assert not GrowConfig().zones.enabled


def test_a_six_layer_transformer_splits_into_zones_by_sublayer_and_trains(tmp_path: Path) -> None:
    zones = ZonesConfig(zone=(ZoneSpec("low", blocks=(0, 5)), ZoneSpec("high", blocks=(6, 11))))
    cfg = dataclasses.replace(
        text_config(4),
        host=HostConfig(kind="transformer", width=32, depth=6),
        env=EnvConfig(batches_per_tick=4, batch_size=16, eval_samples=64),
        zones=zones,
    )
    run = start_run(cfg, run_dir=tmp_path / "text")
    layout = run.episode.zones.layout  # type: ignore[union-attr]
    assert layout.slots_of("low") == tuple(
        sorted(f"slots.l{i}_{part}" for i in range(3) for part in ("attn", "mlp"))
    )
    assert layout.owner("layers.5") == "low" and layout.owner("layers.6") == "high"
    run.run()
    losses = [m["train_loss"] for _, m in run.store.metrics()]
    assert losses[-1] < losses[0]


def _block(name: str) -> int | None:
    """The block of a CNN parameter (`blocks.<i>.…`, `slots.b<i>.…`), by hand; None: stem, head."""
    head, _, rest = name.partition(".")
    index = rest.split(".")[0].lstrip("b")
    return int(index) if head in ("blocks", "slots") else None


def test_each_zone_measures_the_gradient_norm_of_its_own_parameters() -> None:
    episode = build_episode(_cfg(2, _zones()))
    episode.observe()
    zones, model = episode.zones, episode.env.model
    assert zones is not None
    squares = {"early": 0.0, "late": 0.0}
    for name, p in model.named_parameters():
        block = _block(name)
        if p.grad is not None and block is not None:
            squares["early" if block < 4 else "late"] += float(p.grad.pow(2).sum())
    by_hand = {z: math.sqrt(v) for z, v in squares.items()}
    assert zones._grad == pytest.approx(by_hand, rel=1e-6)
    assert by_hand["early"] > 0 and by_hand["late"] > 0
