"""The learned policy's features: positions and values on a hand-built observation, and the
running normaliser against NumPy."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from esper.contracts import (
    AlphaCurve,
    Blueprint,
    Observation,
    SeedSpec,
    SlotTelemetry,
    Stage,
    Topology,
)
from esper.tamiyo.features import (
    GLOBAL_DIM,
    GLOBAL_FEATURES,
    SLOT_DIM,
    SLOT_FEATURES,
    RunningNormalizer,
    featurize,
    featurize_batch,
    slope,
)


def tele(name: str, stage: Stage = Stage.DORMANT, **kw: object) -> SlotTelemetry:
    base = dict(
        name=name,
        stage=stage,
        ticks_in_stage=0,
        alpha=0.0,
        alpha_target=1.0,
        alpha_curve=AlphaCurve.LINEAR,
        alpha_ticks_left=0,
        seed_grad_norm=0.0,
        host_grad_norm=0.0,
        grad_ratio=0.0,
        param_count=0,
        spec=None,
    )
    return SlotTelemetry(**{**base, **kw})


def observe(
    slots: list[SlotTelemetry], history: tuple[float, ...] = (0.5,), tick: int = 10, **kw: object
) -> Observation:
    base = dict(
        tick=tick,
        max_ticks=100,
        metric=history[-1] if history else 0.5,
        higher_is_better=True,
        val_loss=1.2,
        train_loss=0.9,
        history=history,
        host_params=1000,
        seed_params=50,
        rent_paid=0.3,
        slots=tuple(slots),
        legal_blueprints=tuple(tuple(Blueprint) for _ in slots),
    )
    return Observation(**{**base, **kw})


def gf(g: torch.Tensor, name: str) -> float:
    return float(g[GLOBAL_FEATURES.index(name)])


def sf(s: torch.Tensor, slot: int, name: str) -> float:
    return float(s[slot, SLOT_FEATURES.index(name)])


# ---------------------------------------------------------------------------------------------
# featurize
# ---------------------------------------------------------------------------------------------


def test_shapes_and_global_values_on_a_linear_history() -> None:
    history = tuple(0.1 + 0.05 * t for t in range(8))  # slope 0.05 per tick
    obs = observe([tele("a"), tele("b")], history=history)
    g, s = featurize(obs)
    assert g.shape == (GLOBAL_DIM,) and s.shape == (2, SLOT_DIM)
    assert g.dtype == s.dtype == torch.float32
    assert gf(g, "progress") == pytest.approx(0.1)
    assert gf(g, "metric") == pytest.approx(0.45)
    assert gf(g, "val_loss") == pytest.approx(1.2) and gf(g, "train_loss") == pytest.approx(0.9)
    for i in (1, 2, 3):
        assert gf(g, f"metric_delta_{i}") == pytest.approx(0.05, abs=1e-6)
    assert gf(g, "metric_trend") == pytest.approx(0.05, abs=1e-6)
    assert gf(g, "log1p_rent_paid") == pytest.approx(math.log1p(0.3))
    assert gf(g, "seed_param_frac") == pytest.approx(0.05)
    assert gf(g, "higher_is_better") == 1.0
    assert gf(g, "log_host_params") == pytest.approx(3 / 9)  # log10(1000) / 9


def test_short_history_is_zero_padded_and_trend_uses_the_last_five() -> None:
    g, _ = featurize(observe([tele("a")], history=(0.2, 0.5)))
    assert [gf(g, f"metric_delta_{i}") for i in (1, 2, 3)] == pytest.approx([0.3, 0.0, 0.0])
    g, _ = featurize(observe([tele("a")], history=(0.7,)))
    assert gf(g, "metric_trend") == 0.0 and gf(g, "metric_delta_1") == 0.0
    # Only the last five count: an early jump leaves the slope of a flat tail at 0.
    g, _ = featurize(observe([tele("a")], history=(9.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0)))
    assert gf(g, "metric_trend") == 0.0
    assert slope([3.0, 1.0, 2.0]) == pytest.approx(np.polyfit([0, 1, 2], [3.0, 1.0, 2.0], 1)[0])


def test_slot_features_of_a_blending_seed_and_a_dormant_slot() -> None:
    seed = tele(
        "a",
        Stage.BLENDING,
        ticks_in_stage=30,
        alpha=0.4,
        alpha_target=0.7,
        alpha_ticks_left=4,
        seed_grad_norm=1e-3,
        host_grad_norm=10.0,
        grad_ratio=1e-4,
        param_count=200,
        spec=SeedSpec(Blueprint.CONV_LIGHT),
        contribution=0.02,
        contribution_tick=8,
        gate_passed=True,
        rent=0.01,
    )
    _, s = featurize(observe([seed, tele("b")], tick=10))
    first = SLOT_FEATURES.index("stage_dormant")
    stage = s[:, first : first + len(Stage)]
    assert stage[0].argmax() == Stage.BLENDING and stage[0].sum() == 1
    assert stage[1].argmax() == Stage.DORMANT and stage[1].sum() == 1
    assert sf(s, 0, "alpha") == pytest.approx(0.4)
    assert sf(s, 0, "alpha_target") == pytest.approx(0.7)
    assert sf(s, 0, "alpha_ticks_left") == pytest.approx(0.5)
    assert sf(s, 0, "ticks_in_stage") == 1.0  # capped at 20
    assert sf(s, 0, "log_seed_grad") == pytest.approx(-3.0)
    assert sf(s, 0, "log_host_grad") == pytest.approx(1.0)
    assert sf(s, 0, "log_grad_ratio") == pytest.approx(-4.0)
    assert sf(s, 0, "gate_passed") == 1.0 and sf(s, 1, "gate_passed") == -1.0
    assert sf(s, 0, "contribution") == pytest.approx(0.02)
    assert sf(s, 0, "contribution_staleness") == pytest.approx(0.2)  # 2 ticks old, cap 10
    assert sf(s, 0, "has_contribution") == 1.0
    assert sf(s, 1, "contribution") == 0.0 and sf(s, 1, "has_contribution") == 0.0
    assert sf(s, 1, "contribution_staleness") == 1.0
    assert sf(s, 0, "param_frac") == pytest.approx(0.2)
    assert sf(s, 0, "blueprint_conv_light") == 1.0 and sf(s, 1, "blueprint_none") == 1.0
    blueprint = s[:, SLOT_FEATURES.index("blueprint_noop") : SLOT_FEATURES.index("rent")]
    assert blueprint.shape[1] == len(Blueprint) + 1 and (blueprint.sum(1) == 1).all()
    assert sf(s, 0, "rent") == pytest.approx(0.01)


def test_a_slot_is_described_by_what_it_is_not_by_its_name_or_index() -> None:
    a = tele("blocks.3", topology=Topology.SEQ, channels=64, depth=0.25)
    b = tele("head", topology=Topology.VEC, channels=1, depth=1.0)
    _, s = featurize(observe([a, b]))
    assert [sf(s, 0, f"topology_{t.value}") for t in Topology] == [0.0, 1.0, 0.0]  # cnn seq vec
    assert [sf(s, 1, f"topology_{t.value}") for t in Topology] == [0.0, 0.0, 1.0]
    assert sf(s, 0, "log_channels") == pytest.approx(0.6)  # log2(64) / 10
    assert sf(s, 1, "log_channels") == 0.0
    assert sf(s, 0, "depth") == 0.25 and sf(s, 1, "depth") == 1.0
    # The same slot under another name, or in another position, reads the same.
    renamed = replace(a, name="x")
    _, s2 = featurize(observe([b, renamed]))
    assert torch.equal(s2[1], s[0]) and torch.equal(s2[0], s[1])
    assert not any("name" in f or "index" in f for f in SLOT_FEATURES)


def test_extremes_are_clamped_and_finite() -> None:
    wild = tele(
        "a", seed_grad_norm=0.0, host_grad_norm=1e30, grad_ratio=float("inf"), gate_passed=False
    )
    g, s = featurize(observe([wild], val_loss=float("nan"), train_loss=float("inf")))
    assert torch.isfinite(g).all() and torch.isfinite(s).all()
    assert sf(s, 0, "log_seed_grad") == -8.0 and sf(s, 0, "log_host_grad") == 4.0
    assert sf(s, 0, "log_grad_ratio") == 4.0 and sf(s, 0, "gate_passed") == 0.0


def test_batches_of_mixed_hosts_are_padded_to_the_largest() -> None:
    g, s, valid = featurize_batch([observe([tele("a"), tele("b")])] * 3)
    assert g.shape == (3, GLOBAL_DIM) and s.shape == (3, 2, SLOT_DIM) and bool(valid.all())
    small, large = observe([tele("a")]), observe([tele("a"), tele("b"), tele("c")])
    g, s, valid = featurize_batch([small, large])
    assert s.shape == (2, 3, SLOT_DIM)
    assert valid.tolist() == [[True, False, False], [True, True, True]]
    assert torch.equal(s[0, :1], featurize(small)[1]) and not s[0, 1:].any()  # zero padding
    assert torch.equal(s[1], featurize(large)[1])


# ---------------------------------------------------------------------------------------------
# RunningNormalizer
# ---------------------------------------------------------------------------------------------


def test_normalizer_matches_numpy_over_all_rows_seen() -> None:
    rng = np.random.default_rng(0)
    batches = [rng.normal(3.0, 2.0, size=(n, 4)) * [1, 10, 0.1, 1] for n in (5, 1, 17, 40)]
    norm = RunningNormalizer(4)
    for b in batches:
        norm.update(torch.tensor(b))
    every = np.concatenate(batches)
    np.testing.assert_allclose(norm.mean.numpy(), every.mean(0), rtol=1e-12)
    np.testing.assert_allclose(norm.var.numpy(), every.var(0), rtol=1e-12)
    assert float(norm.count) == len(every)

    x = torch.tensor(every[:3], dtype=torch.float32)
    expected = (every[:3] - every.mean(0)) / np.sqrt(every.var(0) + 1e-8)
    np.testing.assert_allclose(norm(x).numpy(), expected, rtol=1e-5, atol=1e-6)
    assert norm(x).dtype == torch.float32


def test_normalizer_clips_and_round_trips() -> None:
    norm = RunningNormalizer(2)
    norm.update(torch.tensor([[0.0, 1.0], [2.0, 1.0], [4.0, 1.0]]))
    out = norm(torch.tensor([[1e6, 1.0], [-1e6, 3.0]]))
    assert out.tolist() == [[5.0, 0.0], [-5.0, 5.0]]  # a constant column maps its value to 0

    other = RunningNormalizer(2)
    other.load_state_dict(norm.state_dict())
    x = torch.randn(6, 2)
    assert torch.equal(other(x), norm(x))
    with pytest.raises(ValueError, match="shape"):
        RunningNormalizer(3).load_state_dict(norm.state_dict())
