"""α schedules against closed forms written here independently, tick by tick, on the schedule and
on a real slot; plus retargeting, instant jumps, warmup delay and the blend coefficients."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from conftest import grow, slot_input, tick
from esper.contracts import (
    AlphaCurve,
    AlphaSpeed,
    AlphaTarget,
    Blueprint,
    IllegalTransition,
    SeedSpec,
    Stage,
    Style,
    Tempo,
    Topology,
)
from esper.kasmina import AlphaSchedule, Blend, SeedSlot, curve_value


def closed_form(curve: AlphaCurve, u: float) -> float:
    """f(u) on [0, 1] with f(0) = 0, f(1) = 1, written without the library's code."""
    if curve is AlphaCurve.LINEAR:
        return u
    if curve is AlphaCurve.COSINE:
        return (1 - math.cos(math.pi * u)) / 2
    k = {AlphaCurve.SIGMOID_GENTLE: 4, AlphaCurve.SIGMOID: 8, AlphaCurve.SIGMOID_SHARP: 16}[curve]
    # Logistic σ(k(u − ½)) rescaled to [0, 1]; σ(x) = (1 + tanh(x/2))/2 makes it a tanh ratio.
    return (math.tanh(k * (u - 0.5) / 2) + math.tanh(k / 4)) / (2 * math.tanh(k / 4))


def expected_alpha(
    curve: AlphaCurve, target: float, tempo: int, k: int, start: float = 0.0, delay: int = 0
) -> float:
    k = min(max(k - delay, 0), tempo)
    return start + (target - start) * closed_form(curve, k / tempo)


TARGETS = [t.alpha for t in AlphaTarget]
TEMPOS = [t.ticks for t in Tempo]


def test_head_values_are_the_papers() -> None:
    assert TARGETS == [0.5, 0.7, 1.0]
    assert TEMPOS == [3, 5, 8]
    assert [s.ticks for s in AlphaSpeed] == [0, 3, 5, 8]


@pytest.mark.parametrize("curve", list(AlphaCurve))
def test_curves_match_closed_forms(curve: AlphaCurve) -> None:
    assert curve_value(curve, 0.0) == 0.0 and curve_value(curve, 1.0) == 1.0
    for i in range(101):
        u = i / 100
        assert curve_value(curve, u) == pytest.approx(closed_form(curve, u), abs=1e-12)
    values = [curve_value(curve, i / 50) for i in range(51)]
    assert all(b > a for a, b in itertools.pairwise(values))  # strictly increasing


@pytest.mark.parametrize("curve", list(AlphaCurve))
@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("tempo", TEMPOS)
def test_schedule_follows_closed_form_every_tick(
    curve: AlphaCurve, target: float, tempo: int
) -> None:
    s = AlphaSchedule(0.0, target, tempo, curve)
    for k in range(tempo + 3):
        assert s.value == pytest.approx(expected_alpha(curve, target, tempo, k), abs=1e-12)
        assert s.done == (k >= tempo) and s.ticks_left == max(0, tempo - k)
        s = s.step()
    assert s.value == target  # exact at the end


@pytest.mark.parametrize("curve", [AlphaCurve.LINEAR, AlphaCurve.COSINE, AlphaCurve.SIGMOID_SHARP])
@pytest.mark.parametrize(("target", "tempo"), [(0.5, 3), (0.7, 5), (1.0, 8)])
def test_slot_alpha_follows_closed_form_every_tick(
    curve: AlphaCurve, target: float, tempo: int
) -> None:
    torch.manual_seed(0)
    slot = SeedSlot(6, Topology.CNN, "s")
    x = slot_input(Topology.CNN).requires_grad_()
    grow(
        slot,
        slot,
        x,
        SeedSpec(Blueprint.CONV_SMALL),
        Stage.BLENDING,
        target=target,
        tempo=tempo,
        curve=curve,
    )
    for k in range(tempo + 2):
        want = expected_alpha(curve, target, tempo, k)
        assert slot.alpha == pytest.approx(want, abs=1e-12)
        assert float(slot.coef) == pytest.approx(want, abs=1e-6)  # RESIDUAL: c(α) = α
        assert slot.telemetry().alpha == pytest.approx(want, abs=1e-12)
        with torch.no_grad():  # the forward uses exactly this α
            h = slot_input(Topology.CNN, seed=1)
            assert torch.allclose(slot(h), h + float(slot.coef) * slot.seed(h), atol=1e-6)
        tick(slot)
    assert slot.alpha == target
    assert slot.advance() is Stage.HOLDING


@pytest.mark.parametrize("ticks", [1, 3, 5])
@pytest.mark.parametrize("curve", [AlphaCurve.LINEAR, AlphaCurve.SIGMOID])
def test_retarget_mid_ramp_is_continuous_then_follows_new_ramp(
    ticks: int, curve: AlphaCurve
) -> None:
    s = AlphaSchedule(0.0, 1.0, 8, AlphaCurve.COSINE)
    for _ in range(3):
        s = s.step()
    before = s.value
    assert 0.0 < before < 1.0
    r = s.retarget(0.5, ticks, curve)
    assert r.value == before  # continuous: not approximately, exactly
    for k in range(ticks + 2):
        assert r.value == pytest.approx(
            expected_alpha(curve, 0.5, ticks, k, start=before), abs=1e-12
        )
        r = r.step()


def test_slot_retarget_mid_ramp_is_continuous_and_instant_jumps_at_once() -> None:
    torch.manual_seed(0)
    slot = SeedSlot(6, Topology.CNN, "s")
    x = slot_input(Topology.CNN).requires_grad_()
    grow(slot, slot, x, SeedSpec(Blueprint.CONV_SMALL), Stage.BLENDING, target=1.0, tempo=8)
    tick(slot), tick(slot)
    before = slot.alpha
    h = slot_input(Topology.CNN, seed=1)
    with torch.no_grad():
        y_before = slot(h)
    slot.set_alpha_target(0.5, AlphaSpeed.FAST.ticks, AlphaCurve.LINEAR)
    assert slot.alpha == before and slot.stage is Stage.BLENDING
    with torch.no_grad():
        assert torch.equal(slot(h), y_before)
    tick(slot)
    assert slot.alpha == pytest.approx(before + (0.5 - before) / 3, abs=1e-12)

    slot.set_alpha_target(0.7, AlphaSpeed.INSTANT.ticks)  # jumps before any tick
    assert slot.alpha == 0.7 and slot.schedule.done
    assert float(slot.coef) == pytest.approx(0.7)
    assert slot.advance() is Stage.HOLDING


@pytest.mark.parametrize("warmup", [1, 3, 5])
def test_warmup_holds_alpha_at_zero_then_ramps(warmup: int) -> None:
    torch.manual_seed(0)
    slot = SeedSlot(6, Topology.CNN, "s")
    x = slot_input(Topology.CNN).requires_grad_()
    grow(
        slot,
        slot,
        x,
        SeedSpec(Blueprint.CONV_SMALL, warmup_ticks=warmup),
        Stage.BLENDING,
        target=1.0,
        tempo=3,
    )
    h = slot_input(Topology.CNN, seed=1)
    for k in range(warmup + 5):
        assert slot.stage is Stage.BLENDING
        want = expected_alpha(AlphaCurve.LINEAR, 1.0, 3, k, delay=warmup)
        assert slot.alpha == pytest.approx(want, abs=1e-12)
        if k <= warmup:
            assert slot.alpha == 0.0
            with torch.no_grad():
                assert torch.equal(slot(h), h)
        if k == warmup:
            with pytest.raises(IllegalTransition, match="ramp not finished"):
                slot.advance()
        tick(slot)


@pytest.mark.parametrize("style", list(Style))
def test_blend_coefficient(style: Style) -> None:
    blend = Blend(style, 6, Topology.CNN)
    for a in (0.0, 0.1, 0.5, 0.9, 1.0):
        want = closed_form(AlphaCurve.SIGMOID, a) if style is Style.SIGMOID_RAMP else a
        assert blend.coefficient(a) == pytest.approx(want, abs=1e-12)
    assert blend.coefficient(0.0) == 0.0 and blend.coefficient(1.0) == 1.0


def test_schedule_rejects_out_of_range_and_round_trips() -> None:
    with pytest.raises(ValueError):
        AlphaSchedule(0.0, 1.5, 3)
    with pytest.raises(ValueError):
        AlphaSchedule(0.0, 1.0, -1)
    s = AlphaSchedule(0.2, 0.7, 5, AlphaCurve.COSINE, elapsed=2, delay=1)
    assert AlphaSchedule.from_dict(s.to_dict()) == s
