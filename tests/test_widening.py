"""WIDEN: k new channels in a host's residual stream, inside the seed lifecycle.

Isolation (TRAINING: outputs and host gradients bit-identical, through the grouped norms), alive
at birth, α = 0 identity, compaction by concatenation at commit (output-equal, exact shapes and
counts), prune, checkpoints and resume across a widening, the optimizer's moments, a governor
rollback across a commit, and where WIDEN is legal."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch import nn

from _engine_helpers import FAST_HEURISTIC, cnn_driver, small_config, text_driver
from conftest import (
    fixed_loss,
    grow,
    host_input,
    small_cnn,
    small_mlp,
    small_transformer,
    tick,
)
from esper.audits.replay import AuditReplayError, candidates_from_run
from esper.config import GrowConfig
from esper.contracts import (
    Blueprint,
    FactoredAction,
    IllegalTransition,
    Op,
    SeedSpec,
    Stage,
    Topology,
)
from esper.kasmina import (
    BlueprintError,
    CNNHost,
    SeedSlot,
    StreamNorm,
    build_seed,
    insert_slots,
    load_model,
    save_model,
    slots_of,
    supported_topologies,
)
from esper.kasmina.stream import _Wide
from esper.run import SHIPPED_POLICY, load_policy, resume_run, start_run
from esper.tamiyo.learned import LearnedPolicy
from esper.tamiyo.masks import illegal_reason
from esper.tolaria.environment import GrowthEnv

HOSTS: dict[str, Callable[[], nn.Module]] = {
    "cnn": small_cnn,
    "mlp": small_mlp,
    "transformer": small_transformer,
}
WIDEN = SeedSpec(Blueprint.WIDEN)


def host(kind: str) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = HOSTS[kind]()
    return model, host_input(model)


def slot_named(model: nn.Module, i: int) -> SeedSlot:
    return list(slots_of(model).values())[i]


def host_grads(model: nn.Module) -> dict[str, torch.Tensor]:
    """Gradients of the host's own parameters, named as in the host alone (a wrapper's `base`
    is the host's layer; the seed's parameters are not the host's)."""
    return {
        n.replace(".base.", "."): p.grad.clone()
        for n, p in model.named_parameters()
        if ".seed." not in n and p.grad is not None
    }


def no_wrappers(model: nn.Module) -> bool:
    return not any(isinstance(m, _Wide) for m in model.modules())


# ---------------------------------------------------------------------------------------------
# Isolation, birth, α = 0
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(HOSTS))
@pytest.mark.parametrize("where", [0, 1])
def test_training_is_bit_identical_to_the_host_alone(kind: str, where: int) -> None:
    model, x = host(kind)
    alone = copy.deepcopy(model)
    slot = slot_named(model, where)
    slot.germinate(WIDEN)
    slot.advance()
    assert slot.stage is Stage.TRAINING and slot.widening_live
    out, ref = model(x), alone(x)
    assert torch.equal(out, ref)
    fixed_loss(out).backward()
    fixed_loss(ref).backward()
    mine, theirs = host_grads(model), host_grads(alone)
    assert mine.keys() == theirs.keys() and len(theirs) > 0
    for name, g in theirs.items():
        assert torch.equal(mine[name], g), name
    # alive at birth: every new row and column gets a gradient
    for name, p in slot.seed.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("kind", list(HOSTS))
def test_the_stream_really_widens_through_grouped_norms(kind: str) -> None:
    model, x = host(kind)
    slot = slot_named(model, 0)
    slot.germinate(WIDEN)
    slot.advance()
    seen: dict[str, torch.Size] = {}
    for name, m in model.named_modules():
        if name.endswith("body.0") or name.endswith("branch.norm"):
            m.register_forward_hook(lambda m, i, o, name=name: seen.__setitem__(name, o.shape))
    model(x)
    k, width = slot.seed.k, slot.channels
    later = [n for n in seen if not n.startswith(("blocks.0.", "layers.0."))]
    assert later and all(seen[n][1 if kind == "cnn" else -1] == width + k for n in later)


@pytest.mark.parametrize("kind", list(HOSTS))
def test_blending_at_alpha_zero_is_the_host(kind: str) -> None:
    model, x = host(kind)
    slot = slot_named(model, 0)
    grow(model, slot, x, WIDEN, Stage.BLENDING)  # the host trained one step alongside
    assert slot.alpha == 0.0
    alone = copy.deepcopy(model)  # the same host weights, the widening pruned away
    pruned = slot_named(alone, 0)
    pruned.prune(fade_ticks=0)
    while pruned.stage is not Stage.DORMANT:
        tick(pruned)
    assert no_wrappers(alone)
    with torch.no_grad():
        assert torch.equal(model(x), alone(x))
        tick(slot)
        assert slot.alpha > 0 and not torch.equal(model(x), alone(x))


# ---------------------------------------------------------------------------------------------
# Commit: compaction by concatenation
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(HOSTS))
def test_commit_compacts_into_wider_plain_layers(kind: str) -> None:
    model, x = host(kind)
    slot = slot_named(model, 0)
    grow(model, slot, x, WIDEN, Stage.HOLDING, target=0.7)
    k, w = slot.seed.k, slot.channels
    params = sum(p.numel() for p in model.parameters())
    model.eval()
    with torch.no_grad():
        before = model(x)
        slot.fossilize()
        after = model(x)
    assert torch.allclose(after, before, atol=1e-6, rtol=0)
    assert no_wrappers(model) and slot.stage is Stage.COMMITTED and slot.seed is None
    assert sum(p.numel() for p in model.parameters()) == params  # the seed became host
    assert model.stream.widenings == [(0, k)]
    later = slot_named(model, 1)
    assert later.channels == w + k  # a dormant slot downstream sees the whole stream


def test_compacted_cnn_layers_have_the_expected_shapes() -> None:
    torch.manual_seed(0)
    model = CNNHost(width=3, depth=3, image_size=8)
    x = torch.randn(4, 1, 8, 8)
    slot = model.slots["b1"]
    grow(model, slot, x, SeedSpec(Blueprint.WIDEN, channel_width=2 / 3), Stage.HOLDING)
    seed_params = slot.seed_param_count()
    host_params = sum(p.numel() for p in CNNHost(width=3, depth=3, image_size=8).parameters())
    slot.fossilize()
    k = 2  # from block 1's input on: block 0 writes z, blocks 1 and 2 and the head read it
    b0, b1, b2 = (model.blocks[i].branch for i in range(3))
    assert model.stem[0].weight.shape == (3, 1, 3, 3) and b0.body[1].weight.shape == (6, 3, 3, 3)
    assert b0.out.weight.shape == (3 + k, 6, 1, 1)
    for b in (b1, b2):
        assert isinstance(b.body[0], StreamNorm) and b.body[0].groups == [3, k]
        assert b.body[1].weight.shape == (6, 3 + k, 3, 3) and b.out.weight.shape == (3 + k, 6, 1, 1)
    assert model.head.weight.shape == (10, 3 + k)
    # new: three blocks' k output rows (6k + k each), two blocks' k read columns (9·6·k), head k·10
    assert seed_params == 3 * (6 * k + k) + 2 * 9 * 6 * k + 10 * k
    assert sum(p.numel() for p in model.parameters()) == host_params + seed_params


def test_the_first_slot_widens_the_whole_stream() -> None:
    for kind, first in (("cnn", "stem.0"), ("mlp", "inp.1"), ("transformer", "tok")):
        model, x = host(kind)
        slot = slot_named(model, 0)
        w = slot.channels
        grow(model, slot, x, WIDEN, Stage.COMMITTED)
        layer = model.get_submodule(first)
        channels = layer.embedding_dim if kind == "transformer" else layer.weight.shape[0]
        assert channels == 2 * w  # k = w: widen_factor 1
        assert slot_named(model, 1).channels == 2 * w
        if kind == "transformer":
            assert model.pos.embedding_dim == 2 * w


def test_a_seed_born_before_a_widening_keeps_acting_on_its_own_channels() -> None:
    model, x = host("cnn")
    early = slot_named(model, 1)
    grow(model, early, x, SeedSpec(Blueprint.CONV_LIGHT), Stage.BLENDING)
    tick(early)
    slot = slot_named(model, 0)
    grow(model, slot, x, WIDEN, Stage.COMMITTED)
    assert early.channels == slot.channels and model.head.in_features > early.channels
    out = model(x)
    fixed_loss(out).backward()
    assert torch.isfinite(out).all()
    assert all(p.grad is not None for p in early.seed.parameters())


def test_prune_puts_the_host_back() -> None:
    model, x = host("mlp")
    alone = copy.deepcopy(model)
    slot = slot_named(model, 0)
    slot.germinate(WIDEN)
    slot.advance()
    slot.prune()
    while slot.stage is not Stage.DORMANT:
        tick(slot)
    assert no_wrappers(model) and slot.seed is None
    assert [p.shape for p in model.parameters()] == [p.shape for p in alone.parameters()]
    with torch.no_grad():
        assert torch.equal(model(x), alone(x))


# ---------------------------------------------------------------------------------------------
# Where WIDEN is legal
# ---------------------------------------------------------------------------------------------


def test_a_users_module_cannot_widen() -> None:
    model = nn.Sequential(nn.Linear(4, 6), nn.GELU(), nn.Linear(6, 3))
    slot = insert_slots(model, ["1"], torch.randn(2, 4))["1"]
    with pytest.raises(IllegalTransition, match="declares its residual stream"):
        slot.germinate(WIDEN)
    assert slot.stage is Stage.DORMANT


def test_widen_is_not_a_slot_seed() -> None:
    with pytest.raises(BlueprintError, match="not a slot seed"):
        build_seed(WIDEN, Topology.CNN, 4)
    assert supported_topologies(Blueprint.WIDEN) == frozenset()


def test_one_live_widening_at_a_time() -> None:
    d = cnn_driver()
    before = d.tick().observation.legal_blueprints
    assert all(Blueprint.WIDEN in bps for bps in before)
    germinate = FactoredAction(op=Op.GERMINATE, slot=0, blueprint=Blueprint.WIDEN)
    after = d.tick(germinate).observation.legal_blueprints
    assert not any(Blueprint.WIDEN in bps for bps in after)


SHIPPED = sorted(SHIPPED_POLICY.parent.glob("*.safetensors"))


def test_the_shipped_policies_are_there() -> None:
    # `learned` (digits) and the curriculum policy; both are package data (pyproject.toml)
    assert {p.stem for p in SHIPPED} >= {"digits", "curriculum"}


@pytest.mark.parametrize("path", ["learned", *map(str, SHIPPED)], ids=lambda p: Path(p).stem)
def test_the_shipped_policy_loads_for_this_library_and_can_widen(path: str) -> None:
    policy = load_policy(GrowConfig(policy=path))
    assert isinstance(policy, LearnedPolicy)
    for driver in (cnn_driver(), text_driver()):  # a feature-map host and a sequence host
        obs = driver.tick().observation  # the first tick: WIDEN is legal
        assert all(Blueprint.WIDEN in bps for bps in obs.legal_blueprints)
        decision = policy.act(obs)
        assert illegal_reason(decision.action, obs) is None


# ---------------------------------------------------------------------------------------------
# State across a widening: files, optimizer, governor
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("stage", [Stage.TRAINING, Stage.BLENDING, Stage.COMMITTED])
@pytest.mark.parametrize("kind", list(HOSTS))
def test_a_checkpoint_rebuilds_the_widened_host(stage: Stage, kind: str, tmp_path: Path) -> None:
    model, x = host(kind)
    grow(model, slot_named(model, 0), x, WIDEN, stage)
    model.eval()
    path = tmp_path / "m.safetensors"
    save_model(model, path)
    fresh, _ = host(kind)
    with torch.no_grad():
        fresh(x)  # a different init would not matter: the file holds every weight
    load_model(fresh, path)
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))
    assert fresh.stream.widenings == model.stream.widenings
    assert {n: p.shape for n, p in fresh.named_parameters()} == {
        n: p.shape for n, p in model.named_parameters()
    }


def test_commit_keeps_old_moments_and_starts_new_ones_fresh() -> None:
    d = cnn_driver(width=3)
    slot = d.grow(0, Stage.HOLDING, Blueprint.WIDEN)
    read = d.env.model.blocks[1].branch.body[1]
    assert isinstance(read, _Wide)
    old = read.base.weight
    d.episode.observe()  # this tick's training, then the commit
    moments = {k: v.clone() for k, v in d.env.optimizer.state[old].items()}
    d.episode.act(_op("FOSSILIZE", 0))
    assert slot.stage is Stage.COMMITTED
    new = d.env.model.blocks[1].branch.body[1].weight
    state = d.env.optimizer.state[new]
    c = old.shape[1]
    for key in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(state[key][:, :c], moments[key]) and not state[key][:, c:].any()
    assert torch.equal(state["step"], moments["step"])
    assert any(new is p for g in d.env.optimizer.param_groups for p in g["params"])
    d.tick()  # and training goes on with the wider tensors
    assert d.env.history and torch.isfinite(torch.tensor(d.env.history[-1]))


def test_a_rollback_across_a_commit_restores_the_narrow_host() -> None:
    d = cnn_driver(width=3)
    d.grow(0, Stage.HOLDING, Blueprint.WIDEN)
    d.episode.observe()
    info, tensors = d.env.state_dict()  # what the governor keeps: before the commit
    x = d.env.val_x[:16]
    d.env.model.eval()
    with torch.no_grad():
        before = d.env.model(x)
    d.episode.act(_op("FOSSILIZE", 0))
    assert no_wrappers(d.env.model) and d.env.model.stream.widenings
    d.env.load_state_dict(info, tensors)
    model = d.env.model
    assert not model.stream.widenings and not no_wrappers(model)
    assert d.env.slot_at(0).stage is Stage.HOLDING
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), before)
    d.tick()  # the optimizer was rebuilt for the narrow host: training goes on
    d.tick(_op("FOSSILIZE", 0))
    assert model.stream.widenings


def _op(name: str, slot: int) -> FactoredAction:
    return FactoredAction(op=Op[name], slot=slot)


def test_a_run_widens_commits_and_resumes_across_the_widening(tmp_path: Path) -> None:
    heuristic = replace(FAST_HEURISTIC, fossilize_margin=-10.0, rotation=("NORM",))
    cfg = small_config(12, heuristic=heuristic, checkpoint_every=2)
    whole = start_run(cfg, run_dir=tmp_path / "whole")
    result = whole.run()
    events = whole.store.events()
    widen = next(e for e in events if e.kind == "germinate")
    assert widen.payload["blueprint"] == "WIDEN" and widen.slot == "slots.b0"
    committed = next(e for e in events if e.kind == "fossilize")
    assert committed.payload["seed_id"] == widen.payload["seed_id"]
    assert whole.env.model.stream.widenings and result.params_end > result.params_start
    # stopped after a tick past the commit; resumed from its last checkpoint
    cut = committed.tick + 2
    part = start_run(cfg, run_dir=tmp_path / "cut")
    for t in range(cut):
        part.step(t)
    part.store.close()
    resumed = resume_run(tmp_path / "cut")
    assert resumed.start_tick <= cut and resumed.env.model.stream.widenings
    assert resumed.run().weights_hash == result.weights_hash


def test_the_governor_rolls_back_and_removes_a_widening_that_poisons_the_host() -> None:
    d = cnn_driver(width=3)
    slot = d.grow(0, Stage.BLENDING, Blueprint.WIDEN)
    d.tick()  # α > 0: the read-outs reach the host
    assert slot.alpha > 0
    narrow = {n: p.shape for n, p in d.env.model.named_parameters() if ".seed." not in n}

    def poison(t: int, env: GrowthEnv) -> None:
        if slot.widening:
            with torch.no_grad():
                next(iter(slot.seed.parameters())).fill_(float("inf"))

    d.episode.callbacks.append(poison)
    outcome = d.tick()
    kinds = [e.kind for e in outcome.events]
    assert "governor_rollback" in kinds and "governor_lobotomy" in kinds
    assert slot.stage in (Stage.PRUNED, Stage.EMBARGOED) and not slot.widening_live
    d.episode.callbacks.clear()
    while slot.stage is not Stage.DORMANT:
        d.tick()
    assert no_wrappers(d.env.model) and not d.env.model.stream.widenings
    shapes = {n: p.shape for n, p in d.env.model.named_parameters()}
    assert shapes == {n.replace(".base.", "."): s for n, s in narrow.items()}
    assert torch.isfinite(torch.tensor(d.env.history[-1]))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("kind", list(HOSTS))
def test_widening_on_cuda_is_isolated_then_compacts(kind: str) -> None:
    model, x = host(kind)
    model, x = model.cuda(), x.cuda()
    alone = copy.deepcopy(model)
    slot = slot_named(model, 0)
    slot.germinate(WIDEN)
    slot.advance()
    assert all(p.is_cuda for p in slot.seed.parameters())
    out, ref = model(x), alone(x)
    assert torch.equal(out, ref)
    out.square().sum().backward()
    ref.square().sum().backward()
    mine, theirs = host_grads(model), host_grads(alone)
    assert all(torch.equal(mine[n], g) for n, g in theirs.items())
    with torch.no_grad():
        for _ in range(slot.gate_config.min_training_ticks):
            tick(slot)
    slot.observe_gradients(torch.ones((), device="cuda"))
    assert slot.evaluate_gate().passed, str(slot.last_gate)
    slot.advance()
    while not slot.schedule.done:
        tick(slot)
    slot.advance()
    model.eval()
    with torch.no_grad():
        before = model(x)
        slot.fossilize()
        assert no_wrappers(model) and torch.allclose(model(x), before, atol=1e-5, rtol=0)


def test_an_audit_replays_a_widening_of_the_runs_width(tmp_path: Path) -> None:
    cfg = small_config(6, heuristic=FAST_HEURISTIC)
    cfg = replace(cfg, env=replace(cfg.env, widen_factor=0.5))
    run = start_run(cfg, run_dir=tmp_path / "r")
    run.run()
    run.store.close()
    (widen,) = [c for c in candidates_from_run(tmp_path / "r") if c.blueprint == "WIDEN"]
    action, spec = widen.germinate_action(0, cfg.env)  # the run's config: its width
    assert action.blueprint is Blueprint.WIDEN and spec.channel_width == 0.5
    with pytest.raises(AuditReplayError, match="cannot be replayed"):
        widen.germinate_action(0)  # another environment would grow another width
