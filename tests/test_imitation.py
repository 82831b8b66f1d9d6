"""Behaviour cloning: the clone learns a state-dependent teacher, heads its op ignores get no
gradient, the value head fits the returns, and actions map to the indices the policy samples."""

from __future__ import annotations

import pytest
import torch

from esper.contracts import HEADS, TAMIYO_OPS, AlphaTarget, Blueprint, FactoredAction, Op
from esper.tamiyo.features import GLOBAL_DIM, SLOT_DIM
from esper.tamiyo.imitation import (
    Demonstrations,
    ImitationConfig,
    action_indices,
    agreement,
    imitation_update,
)
from esper.tamiyo.masks import HEAD_SIZES_FIXED
from esper.tamiyo.network import HEAD_INDEX, TamiyoNet

SLOTS = 3


def _demos(n: int, ops: torch.Tensor, seed: int = 0) -> Demonstrations:
    """Random features; the teacher germinates (slot = argmax of slot feature 0, blueprint
    CONV_HEAVY) where `ops` says GERMINATE, and waits elsewhere. Every action is legal."""
    gen = torch.Generator().manual_seed(seed)
    g, s = torch.randn(n, GLOBAL_DIM, generator=gen), torch.randn(n, SLOTS, SLOT_DIM, generator=gen)
    actions = [
        FactoredAction(op=Op(int(o)), slot=int(s[i, :, 0].argmax()), blueprint=Blueprint.CONV_HEAVY)
        for i, o in enumerate(ops)
    ]
    sizes = {**HEAD_SIZES_FIXED, "slot": SLOTS}
    masks = {h: torch.ones(n, sizes[h], dtype=torch.bool) for h in HEADS}
    return Demonstrations(g, s, action_indices(actions), masks, 2.0 * g[:, 1])


def _net() -> TamiyoNet:
    torch.manual_seed(0)
    return TamiyoNet(GLOBAL_DIM, SLOT_DIM, hidden=32)


def test_action_indices_are_the_heads_the_policy_samples() -> None:
    a = FactoredAction(
        op=Op.FOSSILIZE, slot=2, blueprint=Blueprint.ATTENTION, alpha_target=AlphaTarget.HALF
    )
    row = action_indices([a, FactoredAction()])
    assert TAMIYO_OPS[int(row[0, HEAD_INDEX["op"]])] is Op.FOSSILIZE
    assert int(row[0, HEAD_INDEX["slot"]]) == 2
    assert Blueprint(int(row[0, HEAD_INDEX["blueprint"]])) is Blueprint.ATTENTION
    assert AlphaTarget(int(row[0, HEAD_INDEX["alpha_target"]])) is AlphaTarget.HALF
    assert row[1].tolist() == [FactoredAction().as_indices()[h] for h in HEADS]


def test_clone_learns_a_state_dependent_teacher() -> None:
    n = 512
    gen = torch.Generator().manual_seed(1)
    g0 = torch.randn(n, generator=gen)
    demos = _demos(n, ops=torch.where(g0 > 0, int(Op.GERMINATE), int(Op.WAIT)))
    demos = demos._replace(g=torch.cat([g0[:, None], demos.g[:, 1:]], dim=1))
    net = _net()
    before, _ = agreement(net, demos)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    stats = imitation_update(
        net,
        opt,
        demos,
        ImitationConfig(epochs=60, minibatch_size=64),
        torch.Generator().manual_seed(0),
    )
    assert stats.accuracy["op"] >= 0.95 and before["op"] < 0.8
    assert stats.accuracy["slot"] >= 0.9  # where to germinate depends on the slot features
    assert stats.accuracy["blueprint"] == 1.0
    assert stats.op_accuracy_by_op["GERMINATE"] >= 0.9 and stats.op_accuracy_by_op["WAIT"] >= 0.9
    assert set(stats.accuracy) == set(HEADS) - {"alpha_speed"}  # GERMINATE ignores alpha_speed


def test_heads_the_teachers_op_ignores_get_no_gradient() -> None:
    demos = _demos(64, ops=torch.full((64,), int(Op.WAIT)))  # WAIT: only the op head matters
    net = _net()
    watched = {
        name: p.detach().clone()
        for name, p in net.named_parameters()
        if name.startswith(("knob_", "slot_head", "op_embed"))
    }
    op_before = net.op_head.weight.detach().clone()
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    stats = imitation_update(net, opt, demos, ImitationConfig(epochs=3, vf_coef=0.0))
    for name, p in net.named_parameters():
        if name in watched:
            assert torch.equal(p, watched[name]), name
    assert not torch.equal(net.op_head.weight, op_before)
    assert set(stats.accuracy) == {"op"}


def test_value_head_fits_the_teachers_returns() -> None:
    demos = _demos(256, ops=torch.zeros(256, dtype=torch.long))
    net = _net()
    with torch.no_grad():
        start = float((net.encode(demos.g, demos.s)[2] - demos.returns).square().mean())
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    stats = imitation_update(net, opt, demos, ImitationConfig(epochs=80, minibatch_size=64))
    with torch.no_grad():
        end = float((net.encode(demos.g, demos.s)[2] - demos.returns).square().mean())
    assert end < start / 10
    assert stats.value_loss == pytest.approx(end / 2, rel=0.5)  # ½ MSE, last epoch's mean


@pytest.mark.parametrize(
    "bad", [{"episodes": 0}, {"epochs": 0}, {"minibatch_size": 0}, {"lr": 0.0}, {"vf_coef": -1.0}]
)
def test_bad_imitation_config_is_refused(bad: dict) -> None:
    with pytest.raises(ValueError, match="imitation"):
        ImitationConfig(**bad)
