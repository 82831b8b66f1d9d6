"""Shared helpers for the body's tests: tiny hosts, a fixed loss, and driving a slot through its
lifecycle the way the engine does (train within a tick, evaluate G2, act, tick)."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from torch import nn

from esper.contracts import AlphaCurve, SeedSpec, Stage, Topology
from esper.kasmina import CNNHost, MLPHost, SeedSlot, TransformerHost, observe_gradients
from esper.tolaria.remote import start_local_ray

# Tests run in parallel (-n 2) on tensors of a few hundred elements: intra-op threads only
# contend (a 6-channel conv takes ~10 ms with 2 OpenMP threads on a busy machine, ~0.2 ms with 1).
torch.set_num_threads(1)

# ---------------------------------------------------------------------------------------------
# Tiny hosts, one per topology, with an input of the right kind
# ---------------------------------------------------------------------------------------------

CHANNELS = 6


def small_cnn(**kw: object) -> CNNHost:
    return CNNHost(width=CHANNELS, depth=2, image_size=4, **kw)


def small_mlp(**kw: object) -> MLPHost:
    return MLPHost(in_features=8, width=CHANNELS, depth=2, **kw)


def small_transformer(**kw: object) -> TransformerHost:
    return TransformerHost(vocab_size=11, d_model=CHANNELS, n_layers=1, n_heads=2, max_len=8, **kw)


def host_input(model: nn.Module, batch: int = 3, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if isinstance(model, TransformerHost):
        return torch.randint(0, model.tok.num_embeddings, (batch, 5), generator=g)
    if isinstance(model, MLPHost):
        return torch.randn(batch, model.inp[1].in_features, generator=g)
    return torch.randn(batch, model.stem[0].in_channels, 4, 4, generator=g)


HOSTS: dict[Topology, Callable[..., nn.Module]] = {
    Topology.CNN: small_cnn,
    Topology.SEQ: small_transformer,
    Topology.VEC: small_mlp,
}


def slot_input(
    topology: Topology, channels: int = CHANNELS, batch: int = 3, seed: int = 0
) -> torch.Tensor:
    """Features as a slot sees them: (B, C, H, W), (B, T, C) or (B, C)."""
    g = torch.Generator().manual_seed(seed)
    shape = {
        Topology.CNN: (batch, channels, 4, 4),
        Topology.SEQ: (batch, 5, channels),
        Topology.VEC: (batch, channels),
    }[topology]
    return torch.randn(shape, generator=g)


def slot_free(model: nn.Module) -> nn.Module:
    """A deep copy of `model` with every SeedSlot replaced by nn.Identity (same host weights)."""
    clone = copy.deepcopy(model)
    for path, module in list(clone.named_modules()):
        if isinstance(module, SeedSlot):
            parent_path, _, child = path.rpartition(".")
            parent = clone.get_submodule(parent_path) if parent_path else clone
            parent._modules[child] = nn.Identity()
    return clone


# ---------------------------------------------------------------------------------------------
# A fixed loss and one training step
# ---------------------------------------------------------------------------------------------


def fixed_loss(out: torch.Tensor) -> torch.Tensor:
    """Σ out ⊙ w with w fixed and asymmetric, so no gradient cancels by symmetry."""
    n = out.numel()
    w = torch.linspace(-1.0, 2.0, n).sin().view_as(out) + 0.1
    return (out.float() * w).sum() / out.shape[0]


def train_step(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Forward, backward on `fixed_loss`, and feed the gradient telemetry as the engine does."""
    model.zero_grad(set_to_none=True)
    out = model(x)
    fixed_loss(out).backward()
    if isinstance(model, SeedSlot):
        model.observe_gradients(torch.tensor(1.0))
    else:
        observe_gradients(model)
    return out


# ---------------------------------------------------------------------------------------------
# Driving a slot through its lifecycle
# ---------------------------------------------------------------------------------------------


def tick(slot: SeedSlot) -> Stage:
    """One engine tick for this slot (its own clock, strictly increasing)."""
    last = slot.lifecycle.last_tick
    return slot.tick(0 if last is None else last + 1)


def grow(
    model: nn.Module,
    slot: SeedSlot,
    x: torch.Tensor,
    spec: SeedSpec,
    stage: Stage,
    *,
    target: float = 1.0,
    tempo: int = 3,
    curve: AlphaCurve = AlphaCurve.LINEAR,
) -> None:
    """Take a DORMANT `slot` of `model` to `stage` (GERMINATED … COMMITTED) through the real
    operations: G2 is passed by training for one tick, BLENDING is left with α = 0."""
    order = [Stage.GERMINATED, Stage.TRAINING, Stage.BLENDING, Stage.HOLDING, Stage.COMMITTED]
    slot.germinate(spec, alpha_target=target, tempo_ticks=tempo, alpha_curve=curve)
    if order.index(stage) >= 1:
        slot.advance()
    if order.index(stage) >= 2:
        tick(slot)
        train_step(model, x)
        report = slot.evaluate_gate()
        assert report.passed, str(report)
        slot.advance()
    if order.index(stage) >= 3:
        while not slot.schedule.done:
            tick(slot)
        slot.advance()
    if order.index(stage) >= 4:
        slot.fossilize()
    assert slot.stage is stage


# ---------------------------------------------------------------------------------------------
# One local Ray instance per test module that asks for it (the ray backends' tests)
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ray():
    import ray  # a dev dependency: CI must run these tests, not skip them

    if ray.is_initialized():
        pytest.skip("a Ray instance is already running in this process")
    start_local_ray(num_cpus=2)
    yield ray
    ray.shutdown()
