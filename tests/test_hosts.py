"""Reference hosts and slots in a user's own model: named slots, slot insertion that leaves the
user's state dict and function alone until a seed blends, and torch.compile agreeing with eager."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import grow, small_cnn, tick
from esper.contracts import Blueprint, SeedSpec, Stage, Style, Topology
from esper.kasmina import (
    CNNHost,
    MLPHost,
    SeedSlot,
    TransformerHost,
    insert_slots,
    slots_of,
)


def test_slots_of_names_every_host_slot() -> None:
    assert list(slots_of(CNNHost(depth=3))) == ["slots.b0", "slots.b1", "slots.b2"]
    assert list(slots_of(MLPHost(depth=2))) == ["slots.b0", "slots.b1"]
    assert list(slots_of(TransformerHost(n_layers=2))) == [
        "slots.l0_attn",
        "slots.l0_mlp",
        "slots.l1_attn",
        "slots.l1_mlp",
    ]
    cnn = slots_of(CNNHost(width=5, depth=2))
    assert all(s.channels == 5 and s.topology is Topology.CNN for s in cnn.values())
    seq = slots_of(TransformerHost(d_model=16, n_heads=2, n_layers=1))
    assert all(s.channels == 16 and s.topology is Topology.SEQ for s in seq.values())


def test_host_argument_errors() -> None:
    with pytest.raises(ValueError, match="width >= 1"):
        CNNHost(width=0)
    with pytest.raises(ValueError, match="divisible"):
        TransformerHost(d_model=10, n_heads=4)
    with pytest.raises(ValueError, match="exceeds max_len"):
        TransformerHost(max_len=4)(torch.zeros(1, 5, dtype=torch.long))


def test_host_slots_grow_and_shape_is_kept() -> None:
    torch.manual_seed(0)
    model = TransformerHost(vocab_size=11, d_model=8, n_layers=2, n_heads=2, max_len=8)
    x = torch.randint(0, 11, (2, 6))
    with torch.no_grad():
        y0 = model(x)
    for slot, bp in zip(
        slots_of(model).values(),
        [Blueprint.ATTENTION, Blueprint.GATED_MLP, Blueprint.DEPTHWISE, Blueprint.LORA],
        strict=True,
    ):
        grow(model, slot, x, SeedSpec(bp), Stage.BLENDING)
        tick(slot)
    with torch.no_grad():
        y = model(x)
    assert y.shape == y0.shape == (2, 6, 11) and not torch.allclose(y, y0)


def test_transformer_host_stays_causal_with_seeds() -> None:
    """Seeds on sequences must not leak the future: position t's logits ignore tokens > t."""
    torch.manual_seed(0)
    model = TransformerHost(vocab_size=11, d_model=8, n_layers=1, n_heads=2, max_len=8)
    x = torch.randint(0, 11, (2, 6))
    for slot, bp in zip(
        slots_of(model).values(), [Blueprint.ATTENTION, Blueprint.CONV_HEAVY], strict=True
    ):
        grow(model, slot, x, SeedSpec(bp, Style.GATE), Stage.HOLDING)
    x2 = x.clone()
    x2[:, 4:] = (x2[:, 4:] + 1) % 11
    with torch.no_grad():
        assert torch.allclose(model(x)[:, :4], model(x2)[:, :4], atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Slots in a user's own model
# ---------------------------------------------------------------------------------------------


class UserNet(nn.Module):
    """A model written without Esper in mind: a feature stack and a list of blocks."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 6, 3, padding=1), nn.ReLU()
        )
        self.blocks = nn.ModuleList(nn.Linear(6, 6) for _ in range(2))
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.features(x).mean(dim=(2, 3))
        for block in self.blocks:  # iterates the list: a slot stored in it would run here
            z = torch.relu(block(z))
        return self.head(z)


def _user_sequential() -> nn.Sequential:
    return nn.Sequential(nn.Linear(8, 6), nn.GELU(), nn.Linear(6, 6), nn.GELU(), nn.Linear(6, 3))


def _blend_one(model: nn.Module, slot: SeedSlot, x: torch.Tensor, bp: Blueprint) -> None:
    grow(model, slot, x, SeedSpec(bp), Stage.BLENDING, tempo=2)
    tick(slot)
    assert slot.alpha > 0


@pytest.mark.parametrize(
    ("points", "bp"), [(["0", "2"], Blueprint.MLP_SMALL), (["1"], Blueprint.LORA)]
)
def test_insert_slots_into_a_user_sequential(points: list[str], bp: Blueprint) -> None:
    torch.manual_seed(0)
    model = _user_sequential()
    x = torch.randn(4, 8)
    keys, y0 = list(model.state_dict()), model(x).detach()
    slots = insert_slots(model, points, x)
    assert list(slots) == points and set(slots_of(model)) == set(points)
    assert all(s.channels == 6 and s.topology is Topology.VEC for s in slots.values())
    assert list(model.state_dict()) == keys
    with torch.no_grad():
        assert torch.equal(model(x), y0)
    # a slot's seed runs exactly once, on the output of its point
    _blend_one(model, slots[points[0]], x, bp)
    with torch.no_grad():
        y = model(x)
    assert y.shape == y0.shape and not torch.allclose(y, y0)
    # by hand: the user's layers in order (forward called directly, bypassing the hooks), each
    # slot applied once right after its point
    assert not any(isinstance(m, SeedSlot) for m in model.children())
    manual = x
    with torch.no_grad():
        for i, layer in enumerate(model):
            manual = layer.forward(manual)
            if str(i) in slots:
                manual = slots[str(i)](manual)
    assert torch.allclose(y, manual, atol=1e-6)


def _user_net_by_hand(model: UserNet, slots: dict[str, SeedSlot], x: torch.Tensor) -> torch.Tensor:
    """UserNet's forward written out, calling `forward` directly (no hooks) and each slot once,
    right after its point."""

    def at(path: str, layer: nn.Module, z: torch.Tensor) -> torch.Tensor:
        z = layer.forward(z)
        return slots[path](z) if path in slots else z

    z = x
    for i in range(4):
        z = at(f"features.{i}", model.features[i], z)
    z = z.mean(dim=(2, 3))
    for i in range(2):
        z = torch.relu(at(f"blocks.{i}", model.blocks[i], z))
    return at("head", model.head, z)


def test_insert_slots_into_a_custom_module() -> None:
    torch.manual_seed(0)
    model = UserNet()
    x = torch.randn(2, 1, 4, 4)
    keys = list(model.state_dict())
    with torch.no_grad():
        y0 = model(x)
    slots = insert_slots(model, ["features.2", "blocks.0", "head"], x)
    assert [(s.topology, s.channels) for s in slots.values()] == [
        (Topology.CNN, 6),
        (Topology.VEC, 6),
        (Topology.VEC, 3),
    ]
    assert list(model.state_dict()) == keys
    with torch.no_grad():
        assert torch.equal(model(x), y0)
    # a seed in the ModuleList's slot must not turn into an extra block of the user's loop
    _blend_one(model, slots["blocks.0"], x, Blueprint.MLP_SMALL)
    assert len(model.blocks) == 2 and len(model.features) == 4
    with torch.no_grad():
        y1 = model(x)
        assert not torch.allclose(y1, y0)
        assert torch.allclose(y1, _user_net_by_hand(model, slots, x), atol=1e-6)
    # the seed's weights join the state dict; the user's keys are all still there, unchanged
    grown = list(model.state_dict())
    assert set(keys) <= set(grown) and len(grown) > len(keys)

    _blend_one(model, slots["features.2"], x, Blueprint.CONV_SMALL)
    with torch.no_grad():
        y2 = model(x)
        assert y2.shape == y0.shape and not torch.allclose(y2, y1)
        assert torch.allclose(y2, _user_net_by_hand(model, slots, x), atol=1e-6)


def test_insert_slots_errors() -> None:
    model = _user_sequential()
    with pytest.raises(KeyError, match="no submodule"):
        insert_slots(model, ["7"], torch.randn(2, 8))
    with pytest.raises(ValueError, match="2-, 3- or 4-d feature tensor"):
        insert_slots(nn.Sequential(nn.Flatten(0)), ["0"], torch.randn(2, 3))


# ---------------------------------------------------------------------------------------------
# torch.compile
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_compiled_host_matches_eager() -> None:
    torch.manual_seed(0)
    model = small_cnn()
    x = torch.randn(3, 1, 4, 4)
    slot = slots_of(model)["slots.b1"]
    grow(model, slot, x, SeedSpec(Blueprint.CONV_LIGHT, Style.GATE), Stage.BLENDING, tempo=4)
    tick(slot)
    assert slots_of(model)["slots.b0"].stage is Stage.DORMANT and 0 < slot.alpha < 1
    model.eval()
    compiled = torch.compile(model)
    with torch.no_grad():
        assert torch.allclose(compiled(x), model(x), atol=1e-5, rtol=1e-5)
        tick(slot)  # a new α: the compiled model must follow it
        assert torch.allclose(compiled(x), model(x), atol=1e-5, rtol=1e-5)
