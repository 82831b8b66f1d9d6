"""A committed widening's channels as decay tissue (`kasmina.channels`): sedation that equals
lysis through the grouped norms, reversible masks, exact lysis across every stream layer, the
fused evaluation's replicas, the optimizer's moments, checkpoints, and the seeds that read them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import esper
from _engine_helpers import digits
from conftest import grow, host_input, small_cnn, small_mlp, small_transformer
from esper.contracts import (
    Actor,
    Blueprint,
    DecayAction,
    IllegalTransition,
    Op,
    Scope,
    SeedSpec,
    Stage,
    Topology,
)
from esper.kasmina import (
    MLPHost,
    StreamNorm,
    load_model,
    save_model,
    slots_of,
    tissue_of,
)
from esper.simic import EconomyConfig
from esper.tolaria.decay import Decay
from esper.tolaria.environment import EnvConfig, GrowthEnv
from esper.tolaria.lysis import LysisConfig
from test_export import run_without_esper

HOSTS = {"cnn": small_cnn, "mlp": small_mlp, "transformer": small_transformer}
WIDEN = SeedSpec(Blueprint.WIDEN)


def _widened(kind: str, where: int = 1) -> tuple[nn.Module, torch.Tensor]:
    """A host of `kind` with a committed widening from slot `where`'s block on."""
    torch.manual_seed(0)
    model = HOSTS[kind]()
    x = host_input(model)
    grow(model, list(slots_of(model).values())[where], x, WIDEN, Stage.COMMITTED)
    model.eval()
    return model, x


def _out(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("kind", list(HOSTS))
def test_a_committed_widening_is_channel_tissue_and_sedation_is_reversible(kind: str) -> None:
    model, x = _widened(kind)
    k = model.stream.widenings[0][1]
    t = tissue_of(model)["stream.w0"]
    assert t.kind == "host" and t.scope is Scope.CHANNEL_SLICE and t.units == k
    before = _out(model, x)
    t.set([0, 3], 0.0, Actor.EMRAKUL)
    sedated = _out(model, x)
    assert not torch.allclose(sedated, before)  # the channels carried signal
    t.set([0, 3], 1.0, Actor.EMRAKUL)
    assert torch.equal(_out(model, x), before)  # bit for bit: an unset mask is no op at all
    with pytest.raises(IllegalTransition, match="tamiyo may not SEDATE"):
        t.set([1], 0.0, Actor.TAMIYO)  # custody: the host's tissue is Emrakul's


@pytest.mark.parametrize("kind", list(HOSTS))
def test_lysis_of_channels_equals_their_sedation_and_shrinks_every_stream_layer(
    kind: str,
) -> None:
    model, x = _widened(kind)
    b, k = model.stream.widenings[0]
    t = tissue_of(model)["stream.w0"]
    per_channel, params = t.unit_params(), _params(model)
    t.set([1, 4], 0.0, Actor.EMRAKUL)
    sedated = _out(model, x)
    removed = t.lyse([1, 4])
    assert model.stream.widenings == [(b, k - 2)]
    assert removed == 2 * per_channel == params - _params(model)
    assert torch.allclose(_out(model, x), sedated, atol=1e-6, rtol=0)
    # independent count: the same host built narrower from the record has the same parameters
    torch.manual_seed(1)
    fresh = HOSTS[kind]()
    fresh.stream.rebuild(fresh, [(b, k - 2)])
    assert _params(fresh) == _params(model)
    slot = list(slots_of(model).values())[1]
    assert slot.absorbed == (k - 2) * per_channel  # rent follows what is left


def test_the_masked_group_norm_is_the_norm_of_the_channels_left() -> None:
    torch.manual_seed(0)
    x = torch.randn(5, 3 + 4, 6, 6)
    norm = StreamNorm([3, 4], Topology.CNN, affine=True)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 2)
        norm.bias.uniform_(-1, 1)
    from esper.kasmina.lysis import UnitMask

    mask = UnitMask(4)
    mask.set([2], 0.0)
    mask.set([0], 0.5)
    norm.channel_masks = {1: mask}
    y = norm(x)
    keep = [0, 1, 3]
    z = x[:, 3:][:, keep]
    alone = F.group_norm(z, 1, norm.weight[3:][keep], norm.bias[3:][keep], 1e-5)
    assert torch.allclose(
        y[:, 3:][:, keep], alone * torch.tensor([0.5, 1, 1]).view(1, 3, 1, 1), atol=1e-5
    )
    assert torch.equal(y[:, 5], torch.zeros_like(y[:, 5]))  # nothing of it is read
    assert torch.equal(y[:, :3], F.group_norm(x[:, :3], 1, norm.weight[:3], norm.bias[:3]))


@pytest.mark.parametrize("kind", ["cnn", "transformer"])
def test_a_weakened_channel_folds_into_its_readers(kind: str) -> None:
    model, x = _widened(kind)
    t = tissue_of(model)["stream.w0"]
    t.set([2], 0.25, Actor.EMRAKUL)
    weakened = _out(model, x)
    t.fold([2])
    assert not t.mask.active
    assert torch.allclose(_out(model, x), weakened, atol=1e-6, rtol=0)


@pytest.mark.parametrize("kind", list(HOSTS))
def test_every_channel_lysed_puts_the_stream_back_and_runs(kind: str) -> None:
    model, x = _widened(kind)
    b, k = model.stream.widenings[0]
    t = tissue_of(model)["stream.w0"]
    t.set(list(range(k)), 0.0, Actor.EMRAKUL)
    sedated = _out(model, x)
    t.lyse(list(range(k)))
    assert model.stream.widenings == [(b, 0)] and "stream.w0" not in tissue_of(model)
    assert torch.allclose(_out(model, x), sedated, atol=1e-6, rtol=0)
    torch.manual_seed(1)
    assert _params(model) == _params(HOSTS[kind]())  # the host's own shape again


def _env(where: str = "b1") -> GrowthEnv:
    torch.manual_seed(0)
    model = MLPHost(64, 8, 2, 10)
    grow(model, model.slots[where], torch.randn(4, 64), WIDEN, Stage.COMMITTED)
    return GrowthEnv(
        model, digits(), EnvConfig(batches_per_tick=3), device=torch.device("cpu"), seed=0
    )


def test_a_channels_replica_in_the_fused_evaluation_equals_evaluating_it_sedated() -> None:
    env = _env()
    env.train_tick()
    units = [("stream.w0", 0), ("stream.w0", 5)]
    ev = env.evaluate(units)
    t = tissue_of(env.model)["stream.w0"]
    for name, u in units:
        t.set([u], 0.0, Actor.EMRAKUL)
        alone = env.evaluate()
        t.set([u], 1.0, Actor.EMRAKUL)
        contribution, rise = ev.units[(name, u)]
        assert contribution == pytest.approx(ev.metric - alone.metric, abs=1e-6)
        assert rise == pytest.approx(alone.loss - ev.loss, abs=1e-5)


def test_the_safe_boundary_lyses_condemned_channels_and_slices_their_moments() -> None:
    env = _env()
    env.train_tick()
    decay = Decay(
        env.model, env.slots, LysisConfig(sedation_budget=0.5, probation_checks=1), EconomyConfig()
    )
    head = env.model.head
    old = env.optimizer.state[head.weight]["exp_avg"].clone()
    (e,) = decay.execute([DecayAction(Op.SEDATE, "stream.w0", 2)], tick=0, baseline_loss=1.0)
    assert e.kind == "lysis_probation"
    x = env.val_x[:16]
    sedated = _out(env.model, x)
    decay.after_evaluation({}, 0.9, 1)
    events = decay.safe_boundary(env.optimizer)
    env.sync_optimizer()
    assert [e.kind for e in events] == ["lysed"]
    assert torch.allclose(_out(env.model, x), sedated, atol=1e-6, rtol=0)
    keep = [c for c in range(16) if c != 8 + 2]  # the head reads 8 host channels, then the group
    assert torch.equal(env.optimizer.state[env.model.head.weight]["exp_avg"], old[:, keep])
    env.train_tick()
    assert all(torch.isfinite(p).all() for p in env.model.parameters())


def test_a_seed_born_downstream_takes_the_channels_out_of_decay_and_lifts_their_masks() -> None:
    env = _env("b0")  # the whole stream, which slot b1 reads
    decay = Decay(env.model, env.slots, LysisConfig(sedation_budget=0.5), EconomyConfig())
    decay.execute([DecayAction(Op.SEDATE, "stream.w0", 1)], tick=0, baseline_loss=1.0)
    group = tissue_of(env.model)["stream.w0"]
    assert group.mask.active
    env.slots["slots.b1"].germinate(SeedSpec(Blueprint.MLP))  # reads the whole stream there
    assert "stream.w0" not in tissue_of(env.model)
    (e,) = decay.safe_boundary(env.optimizer)
    assert e.kind == "lysis_dropped" and "reads" in e.payload["reason"]
    assert not group.mask.active and decay.governor.sedated_mass == 0


def test_checkpoints_carry_lysed_channels_and_their_masks(tmp_path: Path) -> None:
    model, x = _widened("cnn")
    t = tissue_of(model)["stream.w0"]
    t.set([0], 0.0, Actor.EMRAKUL)
    t.lyse([0])
    t = tissue_of(model)["stream.w0"]
    t.set([2], 0.0, Actor.EMRAKUL)  # in probation when the checkpoint is written
    save_model(model, tmp_path / "m.safetensors")
    torch.manual_seed(3)
    fresh = small_cnn()
    load_model(fresh, tmp_path / "m.safetensors")
    fresh.eval()
    assert fresh.stream.widenings == model.stream.widenings
    assert torch.equal(_out(fresh, x), _out(model, x))
    assert tissue_of(fresh)["stream.w0"].values() == t.values()


@pytest.mark.parametrize("kind", ["cnn", "transformer"])
def test_lysed_and_sedated_channels_export_and_run_without_esper(kind: str, tmp_path: Path) -> None:
    model, x = _widened(kind)
    t = tissue_of(model)["stream.w0"]
    t.set([0, 1], 0.0, Actor.EMRAKUL)
    t.lyse([0])
    t = tissue_of(model)["stream.w0"]  # channel 1 is now 0, still sedated: its mask is traced
    assert t.values()[0] == 0.0
    esper.export(model, x[:2], tmp_path / "model")
    got = run_without_esper(tmp_path, x)
    assert torch.allclose(got["program"], _out(model, x), atol=1e-5, rtol=0)


def test_a_seed_born_before_the_widening_reads_only_its_own_channels_so_they_stay_tissue() -> None:
    torch.manual_seed(0)
    model = small_cnn()
    x = host_input(model)
    first, second = list(slots_of(model).values())[:2]
    grow(model, second, x, SeedSpec(Blueprint.CONV_LIGHT), Stage.COMMITTED)
    grow(model, first, x, WIDEN, Stage.COMMITTED)
    assert second.channels == model.stream.width < model.head.in_features  # the host's only
    assert {"stream.w0", second.name} <= set(tissue_of(model))
