"""Model checkpoints: hosts with a slot in every stage (and lysed phages, in slots and on host
blocks) round-trip into a freshly built host bit for bit, state and clock included, and carry on
identically; bad files fail with a CheckpointError that says what is wrong."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from conftest import grow, tick
from esper.contracts import Actor, Blueprint, SeedSpec, Stage, Style
from esper.kasmina import (
    CheckpointError,
    CNNHost,
    Phage,
    SeedSlot,
    TransformerHost,
    load_model,
    read_checkpoint,
    save_model,
    slots_of,
    wrap_in_phage,
)

# ---------------------------------------------------------------------------------------------
# A host with a slot in every stage
# ---------------------------------------------------------------------------------------------


def _populate(model: nn.Module, x: torch.Tensor, blueprints: list[Blueprint]) -> None:
    """Drive the model's slots, in order, into: DORMANT, GERMINATED, TRAINING, BLENDING
    (mid-ramp), HOLDING, COMMITTED (units lysed and weakened), PRUNED (a seed fading),
    PRUNED (a phage fading), EMBARGOED. `blueprints` gives the seed of slots 1…8."""
    s = list(slots_of(model).values())
    assert len(s) >= 9 and len(blueprints) == 8
    b = iter(blueprints)
    grow(model, s[1], x, SeedSpec(next(b), Style.VALVE), Stage.GERMINATED)
    grow(model, s[2], x, SeedSpec(next(b), Style.GATE, lr_multiplier=0.5), Stage.TRAINING)
    tick(s[2])
    grow(
        model,
        s[3],
        x,
        SeedSpec(next(b), Style.SIGMOID_RAMP, warmup_ticks=1),
        Stage.BLENDING,
        target=0.7,
        tempo=5,
    )
    tick(s[3]), tick(s[3]), tick(s[3])
    grow(
        model,
        s[4],
        x,
        SeedSpec(next(b), Style.RESIDUAL, channel_width=0.5),
        Stage.HOLDING,
        target=0.5,
    )
    s[4].contribution, s[4].contribution_tick, s[4].seed_id = 0.125, 7, "env0-seed4"
    grow(model, s[5], x, SeedSpec(next(b), Style.GATE, head_count=4), Stage.COMMITTED)
    s[5].sedate([0, 2])
    s[5].phage.physical_lysis([0, 2])
    s[5].sedate([1], 0.5)
    grow(model, s[6], x, SeedSpec(next(b), Style.RESIDUAL), Stage.BLENDING, tempo=2)
    tick(s[6]), tick(s[6])
    s[6].prune(fade_ticks=3)
    tick(s[6])
    grow(model, s[7], x, SeedSpec(next(b), Style.VALVE), Stage.COMMITTED, target=0.7)
    s[7].lyse(fade_ticks=4)
    tick(s[7])
    grow(model, s[8], x, SeedSpec(next(b)), Stage.TRAINING)
    s[8].prune(actor=Actor.TOLARIA)
    tick(s[8])
    stages = [slot.stage for slot in s[:9]]
    assert stages == [
        Stage.DORMANT,
        Stage.GERMINATED,
        Stage.TRAINING,
        Stage.BLENDING,
        Stage.HOLDING,
        Stage.COMMITTED,
        Stage.PRUNED,
        Stage.PRUNED,
        Stage.EMBARGOED,
    ]
    assert 0 < s[3].alpha < 0.7 and 0 < s[6].alpha < 1 and 0 < float(s[7].phage.sedation) < 1


def _lyse_host_block(model: nn.Module, path: str) -> Phage:
    phage = wrap_in_phage(model, path)
    phage.apply_sedation_mask([0], 0.0)
    phage.physical_lysis([0])
    phage.apply_sedation_mask([phage.units - 1], 0.5)
    return phage


def _cnn(seed: int) -> CNNHost:
    torch.manual_seed(seed)
    return CNNHost(width=6, depth=9, image_size=8)


def _transformer(seed: int) -> TransformerHost:
    torch.manual_seed(seed)
    return TransformerHost(vocab_size=13, d_model=8, n_layers=5, n_heads=2, max_len=8)


CASES: dict[
    str, tuple[Callable[[int], nn.Module], Callable[[], torch.Tensor], list[Blueprint], list[str]]
] = {
    "cnn": (
        _cnn,
        lambda: torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1)),
        [
            Blueprint.LORA,
            Blueprint.CONV_LIGHT,
            Blueprint.CONV_HEAVY,
            Blueprint.MLP_SMALL,
            Blueprint.DEPTHWISE,
            Blueprint.BOTTLENECK,
            Blueprint.ATTENTION,
            Blueprint.CONV_SMALL,
        ],
        ["blocks.0"],
    ),
    "transformer": (
        _transformer,
        lambda: torch.randint(0, 13, (2, 6), generator=torch.Generator().manual_seed(1)),
        [
            Blueprint.GATED_MLP,
            Blueprint.LORA_LARGE,
            Blueprint.ATTENTION,
            Blueprint.NORM,
            Blueprint.ATTENTION,
            Blueprint.MLP,
            Blueprint.DEPTHWISE,
            Blueprint.NOOP,
        ],
        ["layers.1", "layers.2"],
    ),
}


def _slot_state(slot: SeedSlot) -> tuple:
    lc, phage, gate = slot.lifecycle, slot.phage, slot.last_gate
    return (
        slot.stage,
        lc.ticks_in_stage,
        lc.last_tick,
        slot.alpha,
        slot.schedule,
        slot.spec,
        slot.pending,
        slot.seed_id,
        slot.contribution,
        slot.contribution_tick,
        slot._mode,
        None if slot.seed is None else slot.seed.units,
        None if gate is None else (gate.passed, gate.reasons),
        None
        if phage is None
        else (
            phage.units,
            phage.unit_mask_values(),
            float(phage.sedation),
            phage.module_sedated,
            phage.fade,
            phage.blend is not None,
            phage.param_count(),
        ),
    )


@pytest.mark.parametrize("case", list(CASES))
def test_round_trip_into_a_fresh_host(case: str, tmp_path: Path) -> None:
    build, make_x, blueprints, host_blocks = CASES[case]
    model, x = build(0), make_x()
    _populate(model, x, blueprints)
    for path in host_blocks:
        _lyse_host_block(model, path)
    file = tmp_path / "model.safetensors"
    save_model(model, file, extra={"note": "round trip"})

    fresh = build(123)  # other weights, every slot DORMANT, no phages
    with torch.no_grad():
        assert not torch.allclose(fresh(x), model(x))
    meta = load_model(fresh, file)
    assert meta["extra"] == {"note": "round trip"}

    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))
    for path in host_blocks:
        assert isinstance(fresh.get_submodule(path), Phage)
        a, b = model.get_submodule(path), fresh.get_submodule(path)
        assert (a.units, a.unit_mask_values(), a.param_count()) == (
            b.units,
            b.unit_mask_values(),
            b.param_count(),
        )
    mine, theirs = slots_of(model), slots_of(fresh)
    assert list(mine) == list(theirs)
    for name in mine:
        assert _slot_state(theirs[name]) == _slot_state(mine[name]), name
    assert model.state_dict().keys() == fresh.state_dict().keys()

    # ... and both carry on identically: α ramps, fades, clocks, embargo, a commit.
    for _ in range(4):
        for m in (model, fresh):
            for slot in slots_of(m).values():
                tick(slot)
        with torch.no_grad():
            assert torch.equal(fresh(x), model(x))
    for m in (model, fresh):
        slots_of(m)[list(mine)[4]].fossilize()
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))
    for name in mine:
        assert _slot_state(theirs[name]) == _slot_state(mine[name]), name


def test_save_does_not_change_the_model(tmp_path: Path) -> None:
    model, x = _cnn(0), CASES["cnn"][1]()
    _populate(model, x, CASES["cnn"][2])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    states = {n: _slot_state(s) for n, s in slots_of(model).items()}
    save_model(model, tmp_path / "sub" / "m.safetensors")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert states == {n: _slot_state(s) for n, s in slots_of(model).items()}
    meta, tensors = read_checkpoint(tmp_path / "sub" / "m.safetensors")
    assert meta["format"] == "esper.kasmina.model" and set(tensors) == set(before)


# ---------------------------------------------------------------------------------------------
# Bad files
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    model = _cnn(0)
    x = CASES["cnn"][1]()
    grow(model, slots_of(model)["slots.b1"], x, SeedSpec(Blueprint.CONV_LIGHT), Stage.HOLDING)
    file = tmp_path / "good.safetensors"
    save_model(model, file)
    return file


def test_truncated_file(saved: Path, tmp_path: Path) -> None:
    data = saved.read_bytes()
    for cut in (len(data) // 2, 20, 5):
        bad = tmp_path / f"cut{cut}.safetensors"
        bad.write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match="corrupt or not a safetensors file"):
            load_model(_cnn(1), bad)


def test_garbage_file(tmp_path: Path) -> None:
    bad = tmp_path / "garbage.safetensors"
    bad.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(CheckpointError, match="corrupt"):
        load_model(_cnn(1), bad)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(_cnn(1), tmp_path / "missing.safetensors")


def test_non_esper_safetensors_file(tmp_path: Path) -> None:
    other = tmp_path / "other.safetensors"
    save_file({"weight": torch.zeros(3, 3)}, str(other))
    with pytest.raises(CheckpointError, match="no Esper metadata"):
        load_model(_cnn(1), other)
    tagged = tmp_path / "tagged.safetensors"
    save_file({"weight": torch.zeros(3)}, str(tagged), metadata={"esper": "{not json"})
    with pytest.raises(CheckpointError, match="unreadable Esper metadata"):
        load_model(_cnn(1), tagged)
    listed = tmp_path / "listed.safetensors"
    save_file({"weight": torch.zeros(3)}, str(listed), metadata={"esper": "[1, 2]"})
    with pytest.raises(CheckpointError, match="not an object"):
        load_model(_cnn(1), listed)
    wrong = tmp_path / "wrong.safetensors"
    save_file(
        {"weight": torch.zeros(3)},
        str(wrong),
        metadata={"esper": json.dumps({"format": "something.else", "version": 1})},
    )
    with pytest.raises(CheckpointError, match=r"expected esper\.kasmina\.model"):
        load_model(_cnn(1), wrong)


def test_checkpoint_from_a_host_of_different_width(saved: Path) -> None:
    torch.manual_seed(1)
    narrow = CNNHost(width=5, depth=9, image_size=8)
    with pytest.raises(CheckpointError, match=r"6 channels.*model has 5"):
        load_model(narrow, saved)


def test_checkpoint_from_a_host_of_different_depth(saved: Path) -> None:
    torch.manual_seed(1)
    shallow = CNNHost(width=6, depth=3, image_size=8)
    with pytest.raises(CheckpointError, match="slots only in the file"):
        load_model(shallow, saved)


def test_checkpoint_with_different_host_weights_shape(tmp_path: Path) -> None:
    model = CNNHost(width=6, depth=2, num_classes=10)
    save_model(model, tmp_path / "m.safetensors")
    with pytest.raises(CheckpointError, match="does not fit this model"):
        load_model(CNNHost(width=6, depth=2, num_classes=7), tmp_path / "m.safetensors")
