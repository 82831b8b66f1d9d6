"""TamiyoNet and LearnedPolicy: masked sampling is always legal (no floors), irrelevant heads
leave the log-prob alone, act and evaluate agree, slots are exchangeable, and a saved policy
reloads exactly, stores no slot layout and refuses other specs."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file

from esper.contracts import (
    HEADS,
    TAMIYO_OPS,
    AlphaCurve,
    Blueprint,
    Observation,
    Op,
    SeedSpec,
    SlotTelemetry,
    Stage,
    Topology,
)
from esper.tamiyo.features import GLOBAL_DIM, OBS_SPEC, SLOT_DIM
from esper.tamiyo.learned import LearnedPolicy, PolicyLoadError, PolicyStep
from esper.tamiyo.masks import action_masks, illegal_reason
from esper.tamiyo.network import HEAD_INDEX, TamiyoNet

OP, SLOT, BLUEPRINT = HEAD_INDEX["op"], HEAD_INDEX["slot"], HEAD_INDEX["blueprint"]


def tele(name: str, stage: Stage = Stage.DORMANT, **kw: object) -> SlotTelemetry:
    base = dict(
        name=name,
        stage=stage,
        ticks_in_stage=0,
        alpha=0.0,
        alpha_target=1.0,
        alpha_curve=AlphaCurve.LINEAR,
        alpha_ticks_left=0,
        seed_grad_norm=0.0,
        host_grad_norm=0.0,
        grad_ratio=0.0,
        param_count=0,
        spec=None,
    )
    return SlotTelemetry(**{**base, **kw})


def observe(
    slots: list[SlotTelemetry], tick: int = 5, legal: tuple[Blueprint, ...] = tuple(Blueprint)
) -> Observation:
    return Observation(
        tick=tick,
        max_ticks=50,
        metric=0.5,
        higher_is_better=True,
        val_loss=1.0,
        train_loss=1.0,
        history=(0.4, 0.45, 0.5),
        host_params=1000,
        seed_params=0,
        rent_paid=0.0,
        slots=tuple(slots),
        legal_blueprints=tuple(legal for _ in slots),
    )


MIXED = [
    tele("s0"),
    tele("s1", Stage.TRAINING, gate_passed=True, spec=SeedSpec(Blueprint.MLP)),
    tele(
        "s2", Stage.HOLDING, spec=SeedSpec(Blueprint.NORM), contribution=0.01, contribution_tick=4
    ),
]


def opinionated(policy: LearnedPolicy, seed: int = 0) -> LearnedPolicy:
    """Give every head large random biases, so a leaky mask would show up at once."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for head in [policy.net.op_head, policy.net.slot_head[-1], *policy.net.knob_heads.values()]:
            head.bias.copy_(torch.randn(head.bias.shape, generator=g) * 8)
    return policy


# ---------------------------------------------------------------------------------------------
# Masked sampling never yields an illegal action
# ---------------------------------------------------------------------------------------------


@st.composite
def observations(draw: st.DrawFn) -> Observation:
    n = draw(st.integers(1, 4))
    slots = []
    for i in range(n):
        stage = draw(st.sampled_from(Stage))
        spec = None if stage is Stage.DORMANT else SeedSpec(draw(st.sampled_from(Blueprint)))
        slots.append(
            tele(
                f"s{i}",
                stage,
                ticks_in_stage=draw(st.integers(0, 25)),
                alpha=draw(st.floats(0, 1)),
                alpha_ticks_left=draw(st.integers(0, 3)),
                gate_passed=draw(st.sampled_from([None, False, True])),
                spec=spec,
            )
        )
    legal = tuple(
        tuple(draw(st.lists(st.sampled_from(Blueprint), min_size=1, unique=True))) for _ in range(n)
    )
    return Observation(
        tick=draw(st.integers(0, 40)),
        max_ticks=40,
        metric=0.5,
        higher_is_better=True,
        val_loss=1.0,
        train_loss=1.0,
        history=(0.5,),
        host_params=1000,
        seed_params=0,
        rent_paid=0.0,
        slots=tuple(slots),
        legal_blueprints=legal,
    )


@settings(max_examples=60, deadline=None)
@given(obs=observations(), seed=st.integers(0, 3))
def test_sampled_actions_are_always_legal(obs: Observation, seed: int) -> None:
    policy = opinionated(LearnedPolicy(hidden=16, seed=seed), seed)
    for d in policy.act_batch([obs] * 8):
        assert illegal_reason(d.action, obs) is None
        slot = None if d.action.op is Op.WAIT else d.action.slot
        assert d.mask == action_masks(obs, d.action.op, slot)  # what the engine records
        for h in HEADS:  # illegal options have probability exactly 0: no floor
            assert all(p == 0.0 for p, ok in zip(d.probs[h], d.mask[h], strict=True) if not ok)
        assert sum(d.probs["op"]) == pytest.approx(1.0, abs=1e-5)


def test_an_illegal_op_is_never_chosen_even_when_the_net_prefers_it() -> None:
    policy = LearnedPolicy(hidden=16)
    with torch.no_grad():
        policy.net.op_head.bias.fill_(0.0)
        policy.net.op_head.bias[TAMIYO_OPS.index(Op.PRUNE)] = 50.0  # PRUNE illegal on DORMANT
    obs = observe([tele("s0")])
    decisions = policy.act_batch([obs] * 64)
    assert {d.action.op for d in decisions} <= {Op.WAIT, Op.GERMINATE}
    assert decisions[0].probs["op"][TAMIYO_OPS.index(Op.PRUNE)] == 0.0


# ---------------------------------------------------------------------------------------------
# Log-probs: act and evaluate agree; irrelevant heads are excluded
# ---------------------------------------------------------------------------------------------


def _step(n: int = 16, seed: int = 0) -> tuple[LearnedPolicy, PolicyStep]:
    policy = opinionated(LearnedPolicy(hidden=32, seed=seed), seed)
    with torch.no_grad():
        policy.net.op_head.bias.fill_(0.0)  # every op comes up
    return policy, policy.step([observe(MIXED)] * n)


def test_evaluate_recomputes_the_sampled_log_probs() -> None:
    policy, step = _step()
    new = policy.net.evaluate(step.g, step.s, step.out.actions, step.out.masks)
    torch.testing.assert_close(new.logprob, step.out.logprob, rtol=0, atol=1e-5)
    torch.testing.assert_close(new.value, step.out.value, rtol=0, atol=1e-5)
    torch.testing.assert_close(policy.value([observe(MIXED)] * 16), step.out.value)
    assert torch.equal(new.relevant, step.out.relevant)
    assert (new.entropy[~new.relevant] == 0).all()
    assert (new.entropy[new.relevant] > 0).any()


def test_irrelevant_heads_do_not_change_the_log_prob() -> None:
    policy, step = _step(n=4)
    actions, masks = step.out.actions.clone(), {h: m.clone() for h, m in step.out.masks.items()}
    actions[:, OP] = TAMIYO_OPS.index(Op.WAIT)
    actions[:2, OP] = TAMIYO_OPS.index(Op.GERMINATE)
    actions[:2, SLOT] = 0  # s0 is DORMANT: GERMINATE is legal there
    for h in HEADS:
        masks[h][:] = True
    before = policy.net.evaluate(step.g, step.s, actions, masks)
    changed = actions.clone()
    for h in ("blueprint", "style", "tempo", "alpha_speed"):
        changed[:, HEAD_INDEX[h]] = (changed[:, HEAD_INDEX[h]] + 1) % 3
    changed[2:, SLOT] = (changed[2:, SLOT] + 1) % 3  # the slot of a WAIT row is irrelevant too
    after = policy.net.evaluate(step.g, step.s, changed, masks)
    # WAIT rows: only the op head counts, whatever the other indices say.
    assert torch.equal(after.logprob[2:], before.logprob[2:])
    assert after.relevant[2:].sum(1).tolist() == [1, 1]
    # GERMINATE rows: blueprint and style are relevant, so the same change moves the log-prob.
    assert not torch.allclose(after.logprob[:2], before.logprob[:2])
    # alpha_speed is not relevant to GERMINATE.
    speed = actions.clone()
    speed[:, HEAD_INDEX["alpha_speed"]] = 3
    assert torch.equal(policy.net.evaluate(step.g, step.s, speed, masks).logprob, before.logprob)


def test_slots_are_exchangeable() -> None:
    torch.manual_seed(0)
    net = TamiyoNet(GLOBAL_DIM, SLOT_DIM, hidden=16)
    g, s = torch.randn(2, GLOBAL_DIM), torch.randn(2, 3, SLOT_DIM)
    perm = torch.tensor([2, 0, 1])
    ctx, slots, value = net.encode(g, s)
    ctx_p, slots_p, value_p = net.encode(g, s[:, perm])
    torch.testing.assert_close(ctx_p, ctx)
    torch.testing.assert_close(value_p, value)
    op = torch.tensor([1, 3])
    torch.testing.assert_close(
        net.slot_logits(ctx_p, slots_p, op), net.slot_logits(ctx, slots, op)[:, perm]
    )


def test_a_row_with_no_legal_option_is_an_error() -> None:
    net = TamiyoNet(GLOBAL_DIM, SLOT_DIM, hidden=8)
    g, s = torch.zeros(1, GLOBAL_DIM), torch.zeros(1, 2, SLOT_DIM)
    masks = {
        h: torch.ones(1, n, dtype=torch.bool)
        for h, n in zip(HEADS, (2, 13, 4, 3, 3, 4, 5, 6), strict=True)
    }
    masks["blueprint"][:] = False
    with pytest.raises(ValueError, match="no action"):
        net.evaluate(g, s, torch.zeros(1, 8, dtype=torch.long), masks)


# ---------------------------------------------------------------------------------------------
# LearnedPolicy: batching, determinism, resumable RNG
# ---------------------------------------------------------------------------------------------


def test_batched_and_single_deterministic_decisions_agree() -> None:
    policy = opinionated(LearnedPolicy(hidden=16, deterministic=True))
    variants = [observe(MIXED, tick=t) for t in (1, 7, 30)]
    batch = policy.act_batch(variants)
    for obs, d in zip(variants, batch, strict=True):
        single = policy.act(obs)
        assert single.action == d.action
        for h in HEADS:
            assert single.probs[h] == pytest.approx(d.probs[h], abs=1e-6)
        # argmax: the chosen op is the most probable legal op
        assert d.probs["op"][TAMIYO_OPS.index(d.action.op)] == max(d.probs["op"])


def test_one_policy_acts_on_any_number_of_slots_of_any_topology() -> None:
    policy = opinionated(LearnedPolicy(hidden=16))
    kinds = [Topology.CNN, Topology.SEQ, Topology.VEC]
    for n in (1, 2, 5):
        slots = [tele(f"x{i}", topology=kinds[i % 3], channels=8 * (i + 1)) for i in range(n)]
        obs = observe(slots)
        for d in policy.act_batch([obs] * 8):
            assert illegal_reason(d.action, obs) is None
            assert len(d.probs["slot"]) == n


def test_slot_scores_permute_with_the_slots() -> None:
    """Permutation equivariance end to end: features, normalisers and the slot head."""
    policy = opinionated(LearnedPolicy(hidden=16, deterministic=True))
    slots = [
        *MIXED,
        tele("s3", Stage.TRAINING, topology=Topology.SEQ, channels=64, depth=0.9),
        tele("s4", topology=Topology.VEC, channels=16, depth=0.2),
    ]
    perm = [3, 0, 4, 2, 1]
    legal = [(Blueprint.NORM,), (Blueprint.MLP, Blueprint.NOOP), *[tuple(Blueprint)] * 3]

    def obs_of(order: list[int]) -> Observation:
        o = observe([slots[i] for i in order])
        return replace(o, legal_blueprints=tuple(legal[i] for i in order))

    base, permuted = obs_of(list(range(5))), obs_of(perm)
    g, s = policy.features([base])
    g_p, s_p = policy.features([permuted])
    ctx, emb, value = policy.net.encode(g, s)
    ctx_p, emb_p, value_p = policy.net.encode(g_p, s_p)
    torch.testing.assert_close(value_p, value)
    for op in range(len(TAMIYO_OPS)):
        scores = policy.net.slot_logits(ctx, emb, torch.tensor([op]))
        scores_p = policy.net.slot_logits(ctx_p, emb_p, torch.tensor([op]))
        torch.testing.assert_close(scores_p, scores[:, perm])
    a, b = policy.act(base), policy.act(permuted)
    assert a.action.op == b.action.op
    assert b.probs["slot"] == pytest.approx([a.probs["slot"][i] for i in perm], abs=1e-6)
    if a.action.op is not Op.WAIT:
        assert perm[b.action.slot] == a.action.slot


def test_rng_state_resumes_the_same_samples() -> None:
    policy = LearnedPolicy(hidden=16, seed=3)
    obs = observe(MIXED)
    policy.act_batch([obs] * 5)
    state = json.loads(json.dumps(policy.state_dict()))  # it must survive a JSON checkpoint
    policy.value([obs])  # bootstrapping a value draws nothing from the sampling RNG
    first = [d.action for d in policy.act_batch([obs] * 20)]
    resumed = LearnedPolicy(hidden=16, seed=3)
    resumed.load_state_dict(state)
    assert [d.action for d in resumed.act_batch([obs] * 20)] == first


# ---------------------------------------------------------------------------------------------
# Save / load
# ---------------------------------------------------------------------------------------------


def _trained_looking(tmp_path: Path) -> tuple[LearnedPolicy, Path]:
    policy = opinionated(LearnedPolicy(hidden=16, seed=1))
    policy.update_normalizers = True
    policy.act_batch([observe(MIXED, tick=t) for t in range(6)])  # non-trivial statistics
    policy.update_normalizers = False
    path = tmp_path / "tamiyo.safetensors"
    policy.save(path)
    return policy, path


def test_saved_policy_reproduces_its_probabilities_exactly(tmp_path: Path) -> None:
    policy, path = _trained_looking(tmp_path)
    loaded = LearnedPolicy.load(path)
    assert loaded.hidden == 16 and loaded.source == str(path)
    assert torch.equal(loaded.slot_norm.mean, policy.slot_norm.mean)
    obs = [observe(MIXED, tick=t) for t in (3, 9)]
    loaded.load_state_dict(policy.state_dict())  # the same sampling RNG: the same choices
    a, b = policy.step(obs), loaded.step(obs)
    assert torch.equal(a.out.actions, b.out.actions)
    for h in HEADS:
        assert torch.equal(a.out.probs[h], b.out.probs[h])
    assert torch.equal(a.out.value, b.out.value)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        assert all(k.startswith(("net.", "norm.")) for k in f.keys())  # noqa: SIM118
    assert json.loads(meta["obs_spec"]) == OBS_SPEC and json.loads(meta["hidden"]) == 16
    # No slot layout: nothing in the file names or counts slots.
    assert not {k for k in meta if "slot" in k or "topolog" in k} - {"slot_dim"}
    assert "s0" not in json.dumps(meta)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("obs_spec", "obs-v0"),
        ("slot_dim", SLOT_DIM - 1),
        ("blueprint_library", "kasmina-13-v1"),
        ("blueprints", [b.name for b in Blueprint][:-1]),
    ],
)
def test_load_refuses_other_specs(tmp_path: Path, key: str, value: object) -> None:
    _, path = _trained_looking(tmp_path)
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        meta = dict(f.metadata())
    other = tmp_path / "other.safetensors"
    save_file(tensors, str(other), metadata={**meta, key: json.dumps(value)})
    with pytest.raises(PolicyLoadError, match=rf"saved with {key} = .*retrain the policy"):
        LearnedPolicy.load(other)


def test_load_refuses_junk(tmp_path: Path) -> None:
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a policy")
    with pytest.raises(PolicyLoadError, match="not a readable policy"):
        LearnedPolicy.load(junk)
