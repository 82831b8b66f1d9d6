"""Phages (paper §9.2–9.3, §9.7): wrapping host blocks and committed seeds, sedation, WEAKEN, lift,
and physical lysis — parameters drop by exactly the deleted rows and columns (counted here from the
layer shapes), FLOPs drop, and the function stays the sedated one."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import HOSTS, fixed_loss, grow, host_input, slot_input, small_cnn
from esper.contracts import Blueprint, SeedSpec, Stage, Style, Topology
from esper.kasmina import (
    LysisError,
    Phage,
    Residual,
    TransformerHost,
    module_cost,
    slots_of,
    wrap_in_phage,
)
from esper.kasmina.layers import conv_of


def _numel(t: torch.Tensor) -> int:
    return t.numel()


def _per_unit_params(producers: list[nn.Module], consumer: nn.Module, group: int = 1) -> int:
    """Parameters one hidden unit owns: its producer rows (weight and bias) in every producer,
    and its input columns in the consumer, each `group` features wide."""
    n = 0
    for p in producers:
        w = conv_of(p).weight
        n += group * _numel(w[0])
        if conv_of(p).bias is not None:
            n += group
    w = conv_of(consumer).weight
    n += group * _numel(w[:, 0])
    return n


def _param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------------------------
# A host residual block wrapped as a phage
# ---------------------------------------------------------------------------------------------


def test_host_block_as_phage_sedate_weaken_lift_lyse() -> None:
    torch.manual_seed(0)
    model = small_cnn()
    x = host_input(model)
    with torch.no_grad():
        y0 = model(x)
    block = model.blocks[0]
    branch = block.branch
    phage = wrap_in_phage(model, "blocks.0")
    assert model.blocks[0] is phage and phage.module is branch
    with torch.no_grad():
        assert torch.equal(model(x), y0)  # same function, bit for bit

    n, k, gone = phage.units, 3, [0, 4, 7]
    assert n == 2 * 6 and branch.body[-1].out_channels == n
    per_unit = _per_unit_params([branch.body[-1]], branch.out)
    assert per_unit == 6 * 9 + 1 + 6  # a 3×3 conv row over 6 channels, its bias, a 1×1 column
    params, flops = _param_count(model), module_cost(phage, (6, 4, 4)).flops

    phage.apply_sedation_mask(gone, 0.0)
    with torch.no_grad():
        y_sedated = model(x)
    assert not torch.allclose(y_sedated, y0)
    assert _param_count(model) == params  # sedation is soft: nothing deleted yet

    with pytest.raises(LysisError, match="not fully sedated"):
        phage.physical_lysis([0, 1])  # 1 is alive
    assert phage.units == n

    removed = phage.physical_lysis(gone)
    assert removed == k * per_unit
    assert _param_count(model) == params - k * per_unit
    assert phage.units == n - k and branch.body[-1].out_channels == n - k
    assert branch.out.in_channels == n - k
    assert phage.unit_mask_values() == [1.0] * (n - k)
    with torch.no_grad():
        assert torch.allclose(model(x), y_sedated, atol=1e-6, rtol=0)
    assert module_cost(phage, (6, 4, 4)).flops < flops


def test_weaken_scales_and_lift_restores() -> None:
    torch.manual_seed(0)
    model = small_cnn()
    phage = wrap_in_phage(model, "blocks.1")
    h = slot_input(Topology.CNN)
    with torch.no_grad():
        full = phage(h)
        phage.apply_sedation_mask([2, 5], 0.0)
        off = phage(h)
        phage.apply_sedation_mask([2, 5], 0.5)
        half = phage(h)
        # The consumer is linear in the mask: WEAKEN 0.5 lands halfway.
        assert torch.allclose(half, (full + off) / 2, atol=1e-6)
        assert not torch.allclose(half, full) and not torch.allclose(half, off)
        phage.lift([2, 5])
        assert torch.equal(phage(h), full)

        phage.apply_sedation_mask("module", 0.5)
        assert torch.allclose(phage(h), h + 0.5 * (full - h), atol=1e-6)
        phage.lift("module")
        assert torch.equal(phage(h), full)


def test_sedation_and_lysis_errors() -> None:
    torch.manual_seed(0)
    phage = wrap_in_phage(small_cnn(), "blocks.0")
    with pytest.raises(LysisError, match="out of range"):
        phage.apply_sedation_mask([99], 0.0)
    with pytest.raises(LysisError, match="in \\[0, 1\\]"):
        phage.apply_sedation_mask([0], 1.5)
    with pytest.raises(LysisError, match="sedate the module fully"):
        phage.physical_lysis("module")
    with pytest.raises(TypeError, match="not a Residual"):
        wrap_in_phage(small_cnn(), "stem")


def test_lysis_of_the_whole_module_leaves_an_identity() -> None:
    torch.manual_seed(0)
    model = small_cnn()
    x = host_input(model)
    phage = wrap_in_phage(model, "blocks.0")
    params = _param_count(model)
    own = phage.param_count()
    phage.apply_sedation_mask("module", 0.0)
    with torch.no_grad():
        y_sedated = model(x)
    h = slot_input(Topology.CNN)
    assert torch.equal(phage(h), h)
    assert phage.physical_lysis("module") == own
    assert phage.module is None and phage.param_count() == 0
    assert phage(h) is h
    assert _param_count(model) == params - own
    assert module_cost(phage, (6, 4, 4)).flops == 0
    with torch.no_grad():
        assert torch.equal(model(x), y_sedated)
    with pytest.raises(LysisError, match="no sedatable units"):
        phage.apply_sedation_mask([0], 0.0)


# ---------------------------------------------------------------------------------------------
# Committed seeds: attention heads, LoRA ranks
# ---------------------------------------------------------------------------------------------


def _committed_seq_phage(spec: SeedSpec, d_model: int = 8) -> tuple[nn.Module, Phage, torch.Tensor]:
    torch.manual_seed(0)
    model = TransformerHost(vocab_size=11, d_model=d_model, n_layers=1, n_heads=2, max_len=8)
    slot = slots_of(model)["slots.l0_attn"]
    x = host_input(model)
    grow(model, slot, x, spec, Stage.COMMITTED, target=0.7)
    return model, slot.phage, x


@pytest.mark.parametrize("style", [Style.RESIDUAL, Style.GATE])
def test_committed_attention_seed_lyses_heads(style: Style) -> None:
    model, phage, x = _committed_seq_phage(SeedSpec(Blueprint.ATTENTION, style, head_count=4))
    seed = phage.module
    assert phage.units == 4 and seed.head_dim == 2
    per_head = _per_unit_params([seed.q, seed.k, seed.v], seed.out, group=seed.head_dim)
    assert per_head == 3 * (8 * 2 + 2) + 8 * 2
    with torch.no_grad():
        y0 = model(x)
    params, flops = _param_count(model), module_cost(phage, (5, 8)).flops

    phage.apply_sedation_mask([1, 2], 0.0)
    with torch.no_grad():
        y_sedated = model(x)
    assert not torch.allclose(y_sedated, y0)
    with pytest.raises(LysisError):
        phage.physical_lysis([0])
    assert phage.physical_lysis([1, 2]) == 2 * per_head
    assert _param_count(model) == params - 2 * per_head
    assert seed.heads == 2 and seed.q.out_features == 4
    with torch.no_grad():
        assert torch.allclose(model(x), y_sedated, atol=1e-6, rtol=0)
    assert module_cost(phage, (5, 8)).flops < flops

    phage.apply_sedation_mask([0], 0.5)  # WEAKEN a surviving head, then lift it
    with torch.no_grad():
        assert not torch.allclose(model(x), y_sedated)
        phage.lift([0])
        assert torch.allclose(model(x), y_sedated, atol=1e-6, rtol=0)

    phage.apply_sedation_mask([0, 1], 0.0)  # every head gone: only the output bias remains
    with torch.no_grad():
        y_none = model(x)
    phage.physical_lysis([0, 1])
    assert seed.heads == 0 and phage.units == 0
    with torch.no_grad():
        assert torch.allclose(model(x), y_none, atol=1e-6, rtol=0)


@pytest.mark.parametrize("topology", [Topology.SEQ, Topology.CNN])
def test_committed_lora_seed_lyses_ranks(topology: Topology) -> None:
    if topology is Topology.SEQ:
        model, phage, x = _committed_seq_phage(SeedSpec(Blueprint.LORA))
        sample, c = (5, 8), 8
    else:
        torch.manual_seed(0)
        model = small_cnn()
        slot, x = slots_of(model)["slots.b0"], host_input(model)
        grow(model, slot, x, SeedSpec(Blueprint.LORA, Style.VALVE), Stage.COMMITTED, target=0.7)
        phage, sample, c = slot.phage, (6, 4, 4), 6
    seed = phage.module
    assert phage.units == 4
    per_rank = _per_unit_params([seed.body[-1]], seed.out)
    assert per_rank == c + 1 + c  # a row of A with its bias, a column of B
    with torch.no_grad():
        y0 = model(x)
    params, flops = _param_count(model), module_cost(phage, sample).flops
    phage.apply_sedation_mask([0, 3], 0.0)
    with torch.no_grad():
        y_sedated = model(x)
    assert not torch.allclose(y_sedated, y0)
    assert phage.physical_lysis([0, 3]) == 2 * per_rank
    assert _param_count(model) == params - 2 * per_rank
    with torch.no_grad():
        assert torch.allclose(model(x), y_sedated, atol=1e-6, rtol=0)
    assert module_cost(phage, sample).flops < flops


LYSABLE = [
    b
    for b in Blueprint
    if b not in (Blueprint.NOOP, Blueprint.NORM, Blueprint.CONV_SMALL, Blueprint.WIDEN)
]  # WIDEN is compacted into the host at commit: no phage


@pytest.mark.parametrize("topology", [Topology.CNN, Topology.SEQ])
@pytest.mark.parametrize("blueprint", LYSABLE)
def test_lysis_is_exact_down_to_the_last_unit(topology: Topology, blueprint: Blueprint) -> None:
    torch.manual_seed(0)
    model = HOSTS[topology]()
    slot = next(iter(slots_of(model).values()))
    x = host_input(model)
    grow(model, slot, x, SeedSpec(blueprint, Style.GATE), Stage.COMMITTED, target=0.7)
    phage = slot.phage
    assert phage.units >= 2
    params = _param_count(model)
    phases = [[0, phage.units - 1], list(range(phage.units - 2))]  # the ends, then the rest
    for gone in filter(None, phases):
        slot.sedate(gone)
        with torch.no_grad():
            y_sedated = model(x)
        removed = phage.physical_lysis(gone)
        assert removed > 0 and _param_count(model) == params - removed
        params -= removed
        with torch.no_grad():
            assert torch.allclose(model(x), y_sedated, atol=1e-6, rtol=0)
    assert phage.units == 0
    fixed_loss(model(x)).backward()  # still trains: the output bias is all that is left
    bias = conv_of(phage.module.out).bias
    assert bias.grad is not None and bias.grad.abs().sum() > 0


def test_committed_slot_whole_module_lysis_is_identity() -> None:
    model, phage, _x = _committed_seq_phage(SeedSpec(Blueprint.MLP_SMALL))
    slot = slots_of(model)["slots.l0_attn"]
    slot.sedate("module", 0.0)
    h = slot_input(Topology.SEQ, channels=8)
    phage.physical_lysis("module")
    assert slot(h) is h and slot.seed_param_count() == 0


def test_phage_roi() -> None:
    phage = Phage(Residual(nn.Identity()))
    assert phage.roi.roi is None
    phage.roi.contribution, phage.roi.rent = 0.3, 0.1
    assert phage.roi.roi == pytest.approx(0.2)
