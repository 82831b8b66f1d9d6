"""Models written by others, grown through the Python API: a BatchNorm ResNet with torchvision's
block (one ReLU module called twice) and a Hugging Face GPT-2 (tuple outputs, `ModelOutput`s,
token ids). Each of the failures these models met before is reproduced here."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import esper
from _engine_helpers import digits
from conftest import grow, tick
from esper.config import GrowConfig
from esper.contracts import Blueprint, SeedSpec, Stage
from esper.kasmina import InsertionError, insert_slots, module_cost, slots_of
from esper.tolaria.data import from_tensors
from esper.tolaria.environment import EnvConfig, GrowthEnv

# ---------------------------------------------------------------------------------------------
# A ResNet as torchvision writes it
# ---------------------------------------------------------------------------------------------


class BasicBlock(nn.Module):
    """torchvision's BasicBlock: conv-bn-relu-conv-bn, + identity, relu; `self.relu` runs twice."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.downsample = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """Four stages, each halving 8×8 digits, so the last BatchNorms see 1×1 maps (as ResNet-18's
    layer4 does on small images): a training-mode forward of one sample fails there."""

    def __init__(self, widths: tuple[int, ...] = (4, 8, 8, 8)) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, widths[0], 3, 1, 1, bias=False)
        self.bn1, self.relu = nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True)
        stages, c = [], widths[0]
        for i, w in enumerate(widths):
            stages.append(nn.Sequential(BasicBlock(c, w, 1 if i == 0 else 2)))
            c = w
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.fc = nn.Linear(c, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(x.mean(dim=(2, 3)))


def resnet() -> ResNet:
    """A ResNet with BatchNorm statistics that are not the defaults (a few training batches)."""
    torch.manual_seed(0)
    model = ResNet()
    with torch.no_grad():
        model(digits().train_x[:64])
    return model


def buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.named_buffers()}


def assert_same_buffers(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = dict(model.named_buffers())
    assert set(before) <= set(after)
    for k, v in before.items():
        assert torch.equal(after[k], v), k


def modes(model: nn.Module) -> dict[str, bool]:
    return {n: m.training for n, m in model.named_modules()}


def assert_modes(model: nn.Module, before: dict[str, bool]) -> None:
    now = modes(model)
    assert {n: now[n] for n in before} == before


def test_measuring_a_batchnorm_model_changes_nothing() -> None:
    model = resnet()
    model.layer2.eval()  # mixed modes: each module's mode must come back as it was
    x = digits().train_x
    before, mode = buffers(model), modes(model)
    assert int(before["bn1.num_batches_tracked"]) == 1
    slots = insert_slots(model, ["layer1.0", "layer3.0"], x[:2])
    assert_same_buffers(model, before)
    assert_modes(model, mode)
    # FLOPs on one sample: in training mode the 1×1 BatchNorms would refuse it (the reported
    # failure) and every BatchNorm would take the zero sample's statistics
    cost = module_cost(model, (1, 8, 8))
    assert cost.flops > 0 and cost.params == sum(p.numel() for p in model.parameters())
    assert_same_buffers(model, before)
    assert_modes(model, mode)
    # the engine's evaluation, with a blended seed and a committed one, so that the fused
    # ablation replicas run too
    grow(model, slots["layer1.0"], x[:32], SeedSpec(Blueprint.CONV_LIGHT), Stage.BLENDING)
    grow(model, slots["layer3.0"], x[:32], SeedSpec(Blueprint.MLP), Stage.COMMITTED)
    tick(slots["layer1.0"])
    assert slots["layer1.0"].alpha > 0 and all(s.ablatable for s in slots.values())
    model.train()
    model.layer2.eval()
    before, mode = buffers(model), modes(model)  # training (the seeds') moved the statistics
    y = digits().train_y
    task = from_tensors(x[:256], y[:256], x[256:512], y[256:512])
    env = GrowthEnv(model, task, EnvConfig(batches_per_tick=1), device=torch.device("cpu"), seed=0)
    ev = env.evaluate()
    assert set(ev.contributions) == set(slots)
    assert_same_buffers(model, before)
    assert_modes(model, mode)


def test_a_batchnorm_resnet_grows_on_digits(tmp_path: Path) -> None:
    model = resnet()
    task = digits()
    insert_slots(model, ["layer1.0", "layer2.0"], task.train_x[:2])
    cfg = GrowConfig(ticks=4, device="cpu", env=EnvConfig(batches_per_tick=3))
    grown, result = esper.grow(
        model,
        (task.train_x, task.train_y),
        (task.val_x, task.val_y),
        config=cfg,
        run_dir=tmp_path / "run",
        **{"heuristic.warmup_ticks": 0, "heuristic.plateau_delta": 1.0},
    )
    assert grown is model
    assert result.germinated and result.flops_start > 0
    assert 0.0 <= result.final_metric <= 1.0
    # training moved the statistics, as it should: 4 ticks × 3 batches, plus the one in `resnet()`
    assert int(model.bn1.num_batches_tracked) == 1 + 4 * 3


def test_a_module_called_twice_is_refused_naming_its_calls() -> None:
    model = resnet()
    with pytest.raises(InsertionError) as e:
        insert_slots(model, ["layer1.0.relu"], digits().train_x[:2])
    msg = str(e.value)
    assert "'layer1.0.relu' runs 2 times in one forward" in msg
    assert "call 1 from 'layer1.0' returns Tensor(2, 4, 8, 8)" in msg
    assert "call 2 from 'layer1.0'" in msg
    assert "'layer1.0.bn2'" in msg and "'layer1.0'" in msg  # points that run once, suggested
    # refused before anything changed: no slot, no hook left behind
    assert not slots_of(model)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_a_module_shared_by_two_places_is_refused() -> None:
    shared = nn.Linear(4, 4)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    with pytest.raises(InsertionError, match="'0' runs 2 times"):
        insert_slots(model, ["0"], torch.randn(2, 4))


def test_a_point_that_never_runs_is_refused() -> None:
    class Skips(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.used, self.unused = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.used(x)

    with pytest.raises(InsertionError, match="'unused' never runs"):
        insert_slots(Skips(), ["unused"], torch.randn(2, 4))


class TupleOut(nn.Module):
    """A block that returns (features, aux) as attention layers do."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        h = self.proj(x)
        return h, {"norm": h.norm(dim=-1)}


class UsesTuple(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block, self.head = TupleOut(), nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, _ = self.block(x)
        return self.head(h)


def test_a_selector_puts_the_slot_on_one_element_of_a_tuple_output() -> None:
    torch.manual_seed(0)
    model, x = UsesTuple(), torch.randn(5, 4)
    y0 = model(x).detach()
    with pytest.raises(InsertionError) as e:
        insert_slots(model, ["block"], x)
    assert "tuple(0: Tensor(5, 4), 1: dict('norm': Tensor(5,)))" in str(e.value)
    assert "select={'block': <index or key>}" in str(e.value) and "'block.proj'" in str(e.value)
    for bad in (1, 2, "h"):
        with pytest.raises(InsertionError, match=f"select={bad!r}"):
            insert_slots(model, ["block"], x, select={"block": bad})
    with pytest.raises(InsertionError, match="not among the points"):
        insert_slots(model, ["head"], x, select={"block": 0})
    slot = insert_slots(model, ["block"], x, select={"block": 0})["block"]
    assert torch.equal(model(x), y0)  # DORMANT: an identity
    calls = []
    slot.register_forward_hook(lambda m, i, o: calls.append(i[0].shape))
    out = model.block(x)
    assert calls == [torch.Size([5, 4])] and isinstance(out, tuple) and len(out) == 2
