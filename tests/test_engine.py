"""GrowthEnv: the optimizer follows the model through prune and commit, and the fused α=0
ablation in `evaluate` equals separate evaluations of the ablated models."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from _engine_helpers import Driver, cnn_driver, text_driver
from esper.contracts import Actor, Blueprint, FactoredAction, Op, Stage
from esper.kasmina import SeedSlot

# ---------------------------------------------------------------------------------------------
# Optimizer layout: one host group, one group per live seed
# ---------------------------------------------------------------------------------------------


def _seed_params(slot: SeedSlot) -> list[torch.nn.Parameter]:
    return [*slot.seed.parameters(), *slot.blend.parameters()]


def _group(opt: torch.optim.Optimizer, name: str) -> dict | None:
    return next((g for g in opt.param_groups if g["name"] == name), None)


@pytest.mark.parametrize(
    ("stage", "fade"), [(Stage.TRAINING, 0), (Stage.HOLDING, 2)], ids=["training", "holding-fading"]
)
def test_pruned_seed_leaves_no_tensor_in_the_optimizer(stage: Stage, fade: int) -> None:
    d = cnn_driver(prune_fade_ticks=fade)
    slot = d.grow(0, stage)
    d.tick()
    old = _seed_params(slot)  # references keep the ids below from being reused
    old_ids = {id(p) for p in old}
    opt = d.env.optimizer
    assert all(p in opt.state and "exp_avg" in opt.state[p] for p in old), "seed never trained"
    assert {id(p) for p in _group(opt, slot.name)["params"]} == old_ids
    assert math.isclose(_group(opt, slot.name)["lr"], d.env.cfg.lr * slot.spec.lr_multiplier)

    d.tick(FactoredAction(op=Op.PRUNE, slot=0))
    for _ in range(fade + 2):
        if slot.seed is None:
            break
        assert slot.stage is Stage.PRUNED  # still fading: the seed runs and is still held
        d.tick()
    assert slot.seed is None and slot.stage in (Stage.EMBARGOED, Stage.RESETTING)

    opt = d.env.optimizer
    assert not old_ids & {id(p) for p in opt.state}
    assert not old_ids & {id(p) for g in opt.param_groups for p in g["params"]}
    assert [g["name"] for g in opt.param_groups] == ["host"]
    d.tick()  # the host still trains afterwards
    assert all(torch.isfinite(p).all() for p in d.env.model.parameters())


def test_fossilized_seed_joins_the_host_group_with_its_moments() -> None:
    d = cnn_driver()
    slot = d.grow(0, Stage.HOLDING)
    opt = d.env.optimizer
    seed_params = _seed_params(slot)
    before = {id(p): {k: v.clone() for k, v in opt.state[p].items()} for p in seed_params}
    host_before = [id(p) for p in _group(opt, "host")["params"]]

    d.env.execute(FactoredAction(op=Op.FOSSILIZE, slot=0))
    assert slot.stage is Stage.COMMITTED
    opt = d.env.optimizer
    phage = list(slot.phage.parameters())
    assert phage and {id(p) for p in phage} <= set(before)  # the same tensors, rewrapped
    host = [id(p) for p in _group(opt, "host")["params"]]
    assert host[: len(host_before)] == host_before
    assert {id(p) for p in phage} <= set(host)
    assert [g["name"] for g in opt.param_groups] == ["host"]
    assert _group(opt, "host")["lr"] == d.env.cfg.lr
    for p in phage:
        for k, v in before[id(p)].items():
            assert torch.equal(opt.state[p][k], v), k

    steps = {id(p): int(opt.state[p]["step"]) for p in phage}
    d.tick(FactoredAction(op=Op.WAIT))
    opt = d.env.optimizer
    for p in phage:  # the kept moments go on counting: they were not reset
        assert int(opt.state[p]["step"]) == steps[id(p)] + d.env.cfg.batches_per_tick


def test_sync_optimizer_keeps_host_moments_across_a_germination() -> None:
    d = cnn_driver()
    d.tick()
    opt = d.env.optimizer
    host = _group(opt, "host")["params"]
    before = [opt.state[p]["exp_avg"].clone() for p in host]
    d.env.execute(FactoredAction(op=Op.GERMINATE, slot=1, blueprint=Blueprint.CONV_LIGHT))
    opt = d.env.optimizer
    assert [g["name"] for g in opt.param_groups] == ["host", d.slot(1).name]
    for p, m in zip(host, before, strict=True):
        assert torch.equal(opt.state[p]["exp_avg"], m)


# ---------------------------------------------------------------------------------------------
# Fused α=0 ablation
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def _scores(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """(loss, accuracy) of one plain, unreplicated forward over the whole validation set."""
    model.eval()
    logits = model(x)
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
    return float(loss), float((logits.argmax(-1) == y).float().mean())


def _without(model: torch.nn.Module, name: str) -> torch.nn.Module:
    """A deep copy with the seed in slot `name` removed at once (an emergency prune, no fade)."""
    clone = copy.deepcopy(model)
    slot = dict(clone.named_modules())[name]
    slot.prune(actor=Actor.TOLARIA)
    return clone


def _ablated(model: torch.nn.Module, name: str, n: int) -> torch.nn.Module:
    """A deep copy whose slot `name` runs with α forced to 0 for every sample."""
    clone = copy.deepcopy(model)
    dict(clone.named_modules())[name].set_ablation(torch.zeros(n))
    return clone


def _blended_and_committed(d: Driver) -> tuple[SeedSlot, SeedSlot]:
    committed = d.grow(1, Stage.COMMITTED)
    blended = d.grow(0, Stage.HOLDING)
    return blended, committed


def test_fused_ablation_equals_separate_evaluations_for_accuracy() -> None:
    d = cnn_driver(eval_batch_size=100)  # 360 validation samples: 4 fused batches, one partial
    blended, committed = _blended_and_committed(d)
    env = d.env
    ev = env.evaluate()
    assert set(ev.contributions) == {blended.name, committed.name}
    assert blended._ablation is None and committed._ablation is None  # ablation switched off

    x, y = env.val_x, env.val_y
    loss, acc = _scores(env.model, x, y)
    assert ev.metric == pytest.approx(acc, abs=1e-6)
    assert ev.loss == pytest.approx(loss, rel=1e-5)
    host_path = blended.name
    _, acc_without = _scores(_without(env.model, host_path), x, y)
    _, acc_ablated = _scores(_ablated(env.model, host_path, len(x)), x, y)
    assert acc_without == pytest.approx(acc_ablated, abs=1e-6)
    # Accuracy is higher-is-better: positive means the seed raised it.
    assert ev.contributions[host_path] == pytest.approx(acc - acc_without, abs=1e-6)
    _, acc_no_phage = _scores(_ablated(env.model, committed.name, len(x)), x, y)
    assert ev.contributions[committed.name] == pytest.approx(acc - acc_no_phage, abs=1e-6)
    assert any(abs(c) > 1e-3 for c in ev.contributions.values()), "seeds change nothing"


def test_fused_ablation_flips_sign_for_bits_per_char() -> None:
    d = text_driver(eval_batch_size=24)
    slot = d.grow(0, Stage.HOLDING, Blueprint.MLP)
    env = d.env
    assert env.task.metric == "bits_per_char" and not env.task.higher_is_better
    ev = env.evaluate()
    x, y = env.val_x, env.val_y
    loss, _ = _scores(env.model, x, y)
    loss_without, _ = _scores(_without(env.model, slot.name), x, y)
    assert ev.metric == pytest.approx(loss / math.log(2), rel=1e-5)
    # Lower is better: the contribution is bpc(without) − bpc(with), positive when it helps.
    expected = (loss_without - loss) / math.log(2)
    assert ev.contributions[slot.name] == pytest.approx(expected, abs=1e-5)
    assert expected != 0.0

    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a seed that wrecks the prediction must read as harmful
        for p in slot.seed.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 3.0)
    harmful = env.evaluate().contributions[slot.name]
    loss_bad, _ = _scores(env.model, x, y)
    assert loss_bad > loss_without
    assert harmful == pytest.approx((loss_without - loss_bad) / math.log(2), abs=1e-4)
    assert harmful < 0


def test_only_blended_or_committed_seeds_are_ablated() -> None:
    d = cnn_driver()
    d.grow(0, Stage.TRAINING)  # TRAINING: forward is the host's, nothing to ablate
    assert d.env.evaluate().contributions == {}
