"""Every blueprint × topology × style against the body's contracts, on real hosts: exact identity in
TRAINING (output and host gradients), exact identity at α = 0, alive at birth, shape kept; then
the library's errors, costs against hand formulas, and the §9.7 knobs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import (
    HOSTS,
    fixed_loss,
    grow,
    host_input,
    slot_free,
    slot_input,
    tick,
    train_step,
)
from esper.contracts import Blueprint, SeedSpec, Stage, Style, Topology
from esper.kasmina import (
    BlueprintError,
    SeedSlot,
    blueprint_cost,
    blueprints_for,
    build_seed,
    parse_blueprint,
    slots_of,
    supported_topologies,
)

MATRIX = [(t, b, s) for t in Topology for b in blueprints_for(t) for s in Style]
IDS = [f"{t.value}-{b.name}-{s.name}" for t, b, s in MATRIX]


def _host_with_first_slot(topology: Topology) -> tuple[nn.Module, SeedSlot, torch.Tensor]:
    torch.manual_seed(0)
    model = HOSTS[topology]()
    slot = next(iter(slots_of(model).values()))
    return model, slot, host_input(model)


def _host_grads(model: nn.Module) -> dict[str, torch.Tensor]:
    """Gradients of the host's own parameters, by the names they have in a slot-free copy."""
    return {
        n: p.grad.clone()
        for n, p in model.named_parameters()
        if ".seed." not in f".{n}" and ".blend." not in f".{n}" and p.grad is not None
    }


def _seed_params(slot: SeedSlot) -> dict[str, nn.Parameter]:
    return {f"seed.{n}": p for n, p in slot.seed.named_parameters()} | {
        f"blend.{n}": p for n, p in slot.blend.named_parameters()
    }


SEEDS = set(Blueprint) - {Blueprint.WIDEN}  # WIDEN grows the stream, not a slot: test_widening


def test_matrix_covers_every_blueprint_and_topology() -> None:
    assert {b for _, b, _ in MATRIX} == SEEDS
    assert blueprints_for(Topology.VEC) == (
        Blueprint.NOOP,
        Blueprint.NORM,
        Blueprint.LORA,
        Blueprint.LORA_LARGE,
        Blueprint.MLP_SMALL,
        Blueprint.MLP,
        Blueprint.GATED_MLP,
    )
    assert set(blueprints_for(Topology.CNN)) == SEEDS
    assert set(blueprints_for(Topology.SEQ)) == SEEDS
    for b in SEEDS:
        assert {t for t in Topology if b in blueprints_for(t)} == supported_topologies(b)


# ---------------------------------------------------------------------------------------------
# Contracts, for every blueprint × topology × style
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("topology", "blueprint", "style"), MATRIX, ids=IDS)
def test_training_is_exact_identity_and_seed_is_alive_at_birth(
    topology: Topology, blueprint: Blueprint, style: Style
) -> None:
    model, slot, x = _host_with_first_slot(topology)
    plain = slot_free(model)
    grow(model, slot, x, SeedSpec(blueprint, style), Stage.TRAINING)

    out = train_step(model, x)
    ref = plain(x)
    fixed_loss(ref).backward()
    assert torch.equal(out, ref)

    grads, ref_grads = _host_grads(model), dict(plain.named_parameters())
    assert set(grads) == {n for n, p in ref_grads.items() if p.grad is not None}
    for name, g in grads.items():
        assert torch.equal(g, ref_grads[name].grad), name

    # Shape preserved, on the slot's own features.
    h = slot_input(topology)
    with torch.no_grad():
        assert slot.seed(h).shape == h.shape

    params = _seed_params(slot)
    if blueprint is Blueprint.NOOP:
        assert params == {}  # nothing to train, and no gate on a seed that outputs 0
        return
    assert params
    for name, p in params.items():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"{name} dead at birth"


@pytest.mark.parametrize(("topology", "blueprint", "style"), MATRIX, ids=IDS)
def test_alpha_zero_is_exact_identity(
    topology: Topology, blueprint: Blueprint, style: Style
) -> None:
    model, slot, x = _host_with_first_slot(topology)
    plain = slot_free(model)
    grow(model, slot, x, SeedSpec(blueprint, style), Stage.BLENDING, tempo=3)
    assert slot.stage is Stage.BLENDING and slot.alpha == 0.0 and float(slot.coef) == 0.0

    with torch.no_grad():
        assert torch.equal(model(x), plain(x))
        h = slot_input(topology)
        assert torch.equal(slot(h), h)

    # After one tick α > 0 and the seed really changes the output (the test above is not vacuous).
    tick(slot)
    assert slot.alpha > 0
    if blueprint is not Blueprint.NOOP:
        with torch.no_grad():
            assert not torch.equal(model(x), plain(x))


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------


def test_unknown_blueprint_name_lists_valid_choices() -> None:
    with pytest.raises(BlueprintError) as e:
        parse_blueprint("conv_giant")
    msg = str(e.value)
    assert "conv_giant" in msg
    assert all(b.name in msg for b in Blueprint)
    assert parse_blueprint("lora") is Blueprint.LORA


@pytest.mark.parametrize(
    "blueprint",
    [Blueprint.ATTENTION, Blueprint.CONV_SMALL, Blueprint.DEPTHWISE, Blueprint.BOTTLENECK],
)
def test_unsupported_topology_lists_valid_blueprints(blueprint: Blueprint) -> None:
    with pytest.raises(BlueprintError) as e:
        build_seed(SeedSpec(blueprint), Topology.VEC, 6)
    msg = str(e.value)
    assert blueprint.name in msg and "vec" in msg
    for valid in blueprints_for(Topology.VEC):
        assert valid.name in msg
    # and a slot refuses to germinate it, staying DORMANT
    slot = SeedSlot(6, Topology.VEC, "v")
    with pytest.raises(BlueprintError):
        slot.germinate(SeedSpec(blueprint))
    assert slot.stage is Stage.DORMANT and slot.seed is None


def test_unknown_topology_and_bad_channels() -> None:
    with pytest.raises(BlueprintError, match="valid topologies: cnn, seq, vec"):
        build_seed(SeedSpec(Blueprint.LORA), "graph", 6)  # type: ignore[arg-type]
    with pytest.raises(BlueprintError, match=">= 1 channel"):
        build_seed(SeedSpec(Blueprint.LORA), Topology.VEC, 0)


# ---------------------------------------------------------------------------------------------
# Costs against hand formulas
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("topology", "blueprint"), [(t, b) for t in Topology for b in blueprints_for(t)]
)
def test_blueprint_cost_params_are_the_module_numel(
    topology: Topology, blueprint: Blueprint
) -> None:
    shape = {Topology.CNN: (6, 4, 4), Topology.SEQ: (5, 6), Topology.VEC: (6,)}[topology]
    spec = SeedSpec(blueprint)
    cost = blueprint_cost(spec, topology, shape)
    seed = build_seed(spec, topology, 6)
    assert cost.params == sum(p.numel() for p in seed.parameters())
    assert (cost.params == 0) == (blueprint is Blueprint.NOOP)
    # FLOPs are counted for matrix products: a seed has some exactly when it has a layer that
    # multiplies (NOOP and NORM have none).
    multiplies = any(isinstance(m, nn.Linear | nn.Conv1d | nn.Conv2d) for m in seed.modules())
    assert (cost.flops > 0) == multiplies, (blueprint.name, cost.flops)


@pytest.mark.parametrize(("c", "h", "w"), [(6, 4, 4), (8, 5, 3)])
def test_conv_small_flops_match_hand_formula(c: int, h: int, w: int) -> None:
    cost = blueprint_cost(SeedSpec(Blueprint.CONV_SMALL), Topology.CNN, (c, h, w))
    assert cost.flops == 2 * c * c * 9 * h * w  # one 3×3 conv, C→C, 2 FLOPs per MAC
    assert cost.params == c * c * 9 + c


@pytest.mark.parametrize(("blueprint", "rank"), [(Blueprint.LORA, 4), (Blueprint.LORA_LARGE, 16)])
def test_lora_flops_match_hand_formula(blueprint: Blueprint, rank: int) -> None:
    c, h, w = 8, 4, 4
    cost = blueprint_cost(SeedSpec(blueprint), Topology.CNN, (c, h, w))
    # Two 1×1 convs, C→r and r→C, at every position: 2·(C·r + r·C)·H·W.
    assert cost.flops == 2 * (c * rank + rank * c) * h * w
    assert cost.params == (c * rank + rank) + (rank * c + c)
    seq = blueprint_cost(SeedSpec(blueprint), Topology.SEQ, (5, c))
    assert seq.flops == 2 * (c * rank + rank * c) * 5


# ---------------------------------------------------------------------------------------------
# Knobs (§9.7)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("topology", list(Topology))
@pytest.mark.parametrize(
    "blueprint",
    [Blueprint.MLP_SMALL, Blueprint.MLP, Blueprint.LORA, Blueprint.LORA_LARGE, Blueprint.GATED_MLP],
)
def test_channel_width_two_doubles_hidden_units(topology: Topology, blueprint: Blueprint) -> None:
    one = build_seed(SeedSpec(blueprint, channel_width=1.0), topology, 6)
    two = build_seed(SeedSpec(blueprint, channel_width=2.0), topology, 6)
    assert one.units > 0 and two.units == 2 * one.units
    half = build_seed(SeedSpec(blueprint, channel_width=0.5), topology, 6)
    assert half.units < one.units


@pytest.mark.parametrize("heads", [1, 2, 4, 8])
def test_head_count_sets_attention_heads(heads: int) -> None:
    seed = build_seed(SeedSpec(Blueprint.ATTENTION, head_count=heads), Topology.SEQ, 8)
    assert seed.heads == heads and seed.units == heads
    assert seed.q.out_features == heads * seed.head_dim
    h = slot_input(Topology.SEQ, channels=8)
    assert seed(h).shape == h.shape


def test_seed_spec_rejects_bad_knobs() -> None:
    for kw in (
        {"head_count": 0},
        {"channel_width": 0.0},
        {"lr_multiplier": -1.0},
        {"warmup_ticks": -1},
    ):
        with pytest.raises(ValueError):
            SeedSpec(Blueprint.LORA, **kw)  # type: ignore[arg-type]
