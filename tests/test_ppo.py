"""PPO against independent computations: GAE by forward sums, the clipped surrogate and value
loss by hand; the ratio leaves 1 after the first minibatch and clipping engages; the KL stop
acts; a toy bandit is learned; the health monitor flags collapse."""

from __future__ import annotations

import copy
import math
from dataclasses import replace

import pytest
import torch
from torch.distributions import Categorical, kl_divergence

from esper.contracts import HEADS, TAMIYO_OPS, AlphaCurve, Observation, Op, SlotTelemetry, Stage
from esper.tamiyo.learned import LearnedPolicy
from esper.tamiyo.network import masked_log_softmax
from esper.tamiyo.ppo import (
    Anchor,
    HealthMonitor,
    PPOConfig,
    RewardScaler,
    RolloutBuffer,
    UpdateStats,
    anchor_kl,
    clipped_surrogate,
    compute_gae,
    explained_variance,
    ppo_update,
)

# ---------------------------------------------------------------------------------------------
# GAE
# ---------------------------------------------------------------------------------------------

REWARDS = [[1.0, 0.0], [0.5, -1.0], [2.0, 0.3], [-0.7, 1.1], [0.2, 0.4]]
VALUES = [[0.3, 0.1], [0.8, -0.2], [0.1, 0.5], [0.9, 0.0], [-0.4, 0.6]]
# CleanRL's flags: dones[t] = 1 when observation t starts a new episode. Env 0's episode ends
# after step 2; env 1's rollout ends on a terminal step (last_done).
DONES = [[0.0, 0.0], [0.0, 0.0], [0.0, 0.0], [1.0, 0.0], [0.0, 0.0]]
LAST_VALUE, LAST_DONE = [0.7, -0.3], [0.0, 1.0]


def gae_by_forward_sums(gamma: float, lam: float) -> list[list[float]]:
    """A_t = Σ_l (γλ)^l δ_{t+l}, summed forward until the episode ends, one env at a time."""
    T, K = len(REWARDS), len(REWARDS[0])
    out = [[0.0] * K for _ in range(T)]
    for k in range(K):
        ends = [DONES[t + 1][k] == 1.0 for t in range(T - 1)] + [LAST_DONE[k] == 1.0]
        nexts = [VALUES[t + 1][k] for t in range(T - 1)] + [LAST_VALUE[k]]
        deltas = [
            REWARDS[t][k] + (0.0 if ends[t] else gamma * nexts[t]) - VALUES[t][k] for t in range(T)
        ]
        for t in range(T):
            total, weight = 0.0, 1.0
            for u in range(t, T):
                total += weight * deltas[u]
                if ends[u]:
                    break
                weight *= gamma * lam
            out[t][k] = total
    return out


def test_gae_matches_an_independent_forward_computation() -> None:
    gamma, lam = 0.9, 0.8
    adv, ret = compute_gae(
        torch.tensor(REWARDS),
        torch.tensor(VALUES),
        torch.tensor(DONES),
        torch.tensor(LAST_VALUE),
        torch.tensor(LAST_DONE),
        gamma,
        lam,
    )
    expected = torch.tensor(gae_by_forward_sums(gamma, lam))
    torch.testing.assert_close(adv, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(ret, expected + torch.tensor(VALUES), rtol=0, atol=1e-6)
    # The episode boundary cuts the sum: env 0's step 2 is δ_2 alone (no bootstrap from V_3).
    assert float(adv[2, 0]) == pytest.approx(REWARDS[2][0] - VALUES[2][0])


def test_gae_with_unit_discount_and_zero_values_is_the_reward_to_go() -> None:
    zeros = torch.zeros(5, 2)
    adv, _ = compute_gae(
        torch.tensor(REWARDS),
        zeros,
        torch.tensor(DONES),
        torch.zeros(2),
        torch.tensor(LAST_DONE),
        1.0,
        1.0,
    )
    # env 0: episode steps 0..2 then 3..4 (bootstrapped with V=0); env 1: one episode.
    assert adv[:, 0].tolist() == pytest.approx([3.5, 2.5, 2.0, -0.5, 0.2])
    assert adv[:, 1].tolist() == pytest.approx([0.8, 0.8, 1.8, 1.5, 0.4])


# ---------------------------------------------------------------------------------------------
# A toy rollout from the real policy
# ---------------------------------------------------------------------------------------------


def tele(name: str, stage: Stage, **kw: object) -> SlotTelemetry:
    base = dict(
        name=name,
        stage=stage,
        ticks_in_stage=2,
        alpha=0.0,
        alpha_target=1.0,
        alpha_curve=AlphaCurve.LINEAR,
        alpha_ticks_left=0,
        seed_grad_norm=0.1,
        host_grad_norm=1.0,
        grad_ratio=0.1,
        param_count=10,
        spec=None,
    )
    return SlotTelemetry(**{**base, **kw})


def observe(tick: int, stages: tuple[Stage, ...]) -> Observation:
    slots = tuple(tele(f"s{i}", st, gate_passed=True) for i, st in enumerate(stages))
    return Observation(
        tick=tick,
        max_ticks=20,
        metric=0.5 + 0.01 * tick,
        higher_is_better=True,
        val_loss=1.0,
        train_loss=1.0,
        history=(0.5,),
        host_params=1000,
        seed_params=0,
        rent_paid=0.0,
        slots=slots,
        legal_blueprints=tuple(tuple(range(13)) for _ in slots),
    )  # type: ignore


STAGES = [
    (Stage.DORMANT, Stage.TRAINING),
    (Stage.HOLDING, Stage.DORMANT),
    (Stage.BLENDING, Stage.HOLDING),
    (Stage.DORMANT, Stage.DORMANT),
]


def rollout(
    policy: LearnedPolicy, T: int = 8, K: int = 4, seed: int = 0
) -> tuple[RolloutBuffer, torch.Tensor, torch.Tensor]:
    """Fill a buffer from the policy on fixed observations, with arbitrary fixed rewards."""
    buffer = RolloutBuffer(T, K, num_slots=2)
    g = torch.Generator().manual_seed(seed)
    for t in range(T):
        step = policy.step([observe(t, STAGES[(t + k) % len(STAGES)]) for k in range(K)])
        buffer.add(t, step.g, step.s, step.out, torch.zeros(K))
        buffer.rewards[t] = torch.randn(K, generator=g)
    advantages, returns = compute_gae(
        buffer.rewards, buffer.values, buffer.dones, torch.zeros(K), torch.ones(K), 0.99, 0.95
    )
    return buffer, advantages, returns


def setup(
    lr: float = 3e-4, **cfg: object
) -> tuple[
    LearnedPolicy, torch.optim.Optimizer, RolloutBuffer, torch.Tensor, torch.Tensor, PPOConfig
]:
    policy = LearnedPolicy(hidden=32, seed=0)
    config = PPOConfig(lr=lr, anneal_lr=False, **cfg)  # type: ignore[arg-type]
    optimizer = torch.optim.Adam(policy.net.parameters(), lr=lr, eps=1e-5)
    return (policy, optimizer, *rollout(policy), config)


# ---------------------------------------------------------------------------------------------
# Losses against hand computations
# ---------------------------------------------------------------------------------------------


def test_clipped_surrogate_known_answer() -> None:
    ratio = torch.tensor([0.5, 1.5, 1.1, 0.7])
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0])
    # rows: max(−0.5, −0.8) = −0.5; max(−1.5, −1.2) = −1.2; max(1.1, 1.1) = 1.1;
    # max(0.7, 0.8) = 0.8 (ratio clipped up to 0.8 for a negative advantage)
    assert float(clipped_surrogate(ratio, adv, 0.2)) == pytest.approx((-0.5 - 1.2 + 1.1 + 0.8) / 4)


def test_update_losses_match_a_hand_computation_on_a_fixed_batch() -> None:
    policy, optimizer, buffer, adv, ret, cfg = setup(
        update_epochs=1, num_minibatches=1, norm_adv=False, target_kl=None
    )
    # Pretend the rollout came from a different policy, so the ratio is not 1.
    shift = torch.linspace(-0.6, 0.6, buffer.logprobs.numel()).reshape(buffer.logprobs.shape)
    buffer.logprobs += shift
    b = buffer.flat()
    with torch.no_grad():
        new = policy.net.evaluate(b.g, b.s, b.actions, b.masks)
    new_lp, old_lp = new.logprob.tolist(), b.logprobs.tolist()
    a, r_, v_old, v_new = (
        adv.reshape(-1).tolist(),
        ret.reshape(-1).tolist(),
        b.values.tolist(),
        new.value.tolist(),
    )
    eps, n = cfg.clip_coef, len(a)
    ratios = [math.exp(x - y) for x, y in zip(new_lp, old_lp, strict=True)]
    surrogate = (
        sum(max(-a[i] * ratios[i], -a[i] * min(max(ratios[i], 1 - eps), 1 + eps)) for i in range(n))
        / n
    )
    vloss = (
        0.5
        * sum(
            max(
                (v_new[i] - r_[i]) ** 2,
                (v_old[i] + min(max(v_new[i] - v_old[i], -eps), eps) - r_[i]) ** 2,
            )
            for i in range(n)
        )
        / n
    )
    kl = sum((r - 1) - math.log(r) for r in ratios) / n

    stats = ppo_update(policy.net, optimizer, buffer, adv, ret, cfg)
    assert stats.minibatches == 1
    assert stats.policy_loss == pytest.approx(surrogate, abs=1e-5)
    assert stats.value_loss == pytest.approx(vloss, abs=1e-5)
    assert stats.approx_kl == pytest.approx(kl, abs=1e-6)
    assert stats.ratio_max_abs_dev == pytest.approx(max(abs(r - 1) for r in ratios), abs=1e-5)
    assert stats.clipfrac == pytest.approx(sum(abs(r - 1) > eps for r in ratios) / n)


def test_the_first_minibatch_sees_ratio_one_and_later_ones_do_not() -> None:
    policy, optimizer, buffer, adv, ret, cfg = setup(
        update_epochs=1, num_minibatches=1, target_kl=None
    )
    stats = ppo_update(policy.net, optimizer, buffer, adv, ret, cfg)
    assert stats.ratio_max_abs_dev < 1e-5  # stored log-probs come from the same weights

    policy, optimizer, buffer, adv, ret, cfg = setup(
        update_epochs=4, num_minibatches=4, target_kl=None
    )
    stats = ppo_update(policy.net, optimizer, buffer, adv, ret, cfg)
    assert stats.minibatches == 16
    assert stats.ratio_max_abs_dev > 1e-3


def test_clipping_engages_with_a_large_learning_rate() -> None:
    policy, optimizer, buffer, adv, ret, cfg = setup(lr=0.02, target_kl=None)
    stats = ppo_update(policy.net, optimizer, buffer, adv, ret, cfg)
    assert stats.clipfrac > 0
    assert stats.ratio_max_abs_dev > cfg.clip_coef


def test_kl_early_stop_ends_the_update() -> None:
    policy, optimizer, buffer, adv, ret, cfg = setup(lr=0.05, target_kl=0.001)
    stats = ppo_update(policy.net, optimizer, buffer, adv, ret, cfg)
    assert stats.early_stopped and stats.minibatches < cfg.update_epochs * cfg.num_minibatches


def test_stats_report_relevant_head_entropies_and_the_op_mix() -> None:
    policy, optimizer, buffer, adv, ret, cfg = setup()
    stats = ppo_update(policy.net, optimizer, buffer, adv, ret, cfg, lr_frac=0.5)
    assert stats.lr == pytest.approx(3e-4)  # anneal_lr off in `setup`
    assert sum(stats.op_distribution.values()) == pytest.approx(1.0)
    counts = torch.bincount(buffer.actions[..., 7].reshape(-1), minlength=6) / 32
    assert stats.op_distribution["WAIT"] == pytest.approx(float(counts[0]))
    assert stats.entropy["op"] > 0
    germinated = bool((buffer.actions[..., 7] == TAMIYO_OPS.index(Op.GERMINATE)).any())
    assert (stats.entropy["blueprint"] > 0) == germinated
    set_alpha = bool((buffer.actions[..., 7] == TAMIYO_OPS.index(Op.SET_ALPHA_TARGET)).any())
    assert (stats.entropy["alpha_speed"] > 0) == set_alpha
    annealed = ppo_update(
        policy.net, optimizer, buffer, adv, ret, replace(cfg, anneal_lr=True), lr_frac=0.5
    )
    assert annealed.lr == pytest.approx(1.5e-4)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1.5e-4)


def test_explained_variance_by_hand() -> None:
    returns = torch.tensor([1.0, 2.0, 3.0, 4.0])
    values = torch.tensor([1.5, 2.0, 2.5, 4.0])
    # Var(returns) = 1.25; returns − values = [−0.5, 0, 0.5, 0] has variance 0.125.
    assert explained_variance(values, returns) == pytest.approx(1 - 0.125 / 1.25)
    assert math.isnan(explained_variance(values, torch.ones(4)))


def test_a_toy_bandit_is_learned() -> None:
    """Only GERMINATE and WAIT are legal; GERMINATE pays 1. P(GERMINATE) must rise."""
    policy = LearnedPolicy(hidden=32, seed=1)
    cfg = PPOConfig(lr=3e-3, anneal_lr=False)
    optimizer = torch.optim.Adam(policy.net.parameters(), lr=cfg.lr, eps=1e-5)
    obs = [observe(0, (Stage.DORMANT,))] * 8
    germinate = TAMIYO_OPS.index(Op.GERMINATE)

    def p_germinate() -> float:
        return policy.act(obs[0]).probs["op"][germinate]

    before = p_germinate()
    for _ in range(12):
        buffer = RolloutBuffer(4, 8, num_slots=1)
        for t in range(4):
            step = policy.step(obs)
            buffer.add(t, step.g, step.s, step.out, torch.ones(8))  # one-step episodes
            buffer.rewards[t] = (step.out.actions[:, 7] == germinate).float()
        adv, ret = compute_gae(
            buffer.rewards,
            buffer.values,
            buffer.dones,
            torch.zeros(8),
            torch.ones(8),
            cfg.gamma,
            cfg.gae_lambda,
        )
        ppo_update(policy.net, optimizer, buffer, adv, ret, cfg)
    assert before == pytest.approx(0.5, abs=0.05)
    assert p_germinate() > 0.8


# ---------------------------------------------------------------------------------------------
# Health monitor
# ---------------------------------------------------------------------------------------------


def stats_with(op_entropy: float, ev: float, ops: dict[str, float] | None = None) -> UpdateStats:
    return UpdateStats(
        policy_loss=0.0,
        value_loss=0.0,
        approx_kl=0.0,
        clipfrac=0.0,
        ratio_max_abs_dev=0.1,
        explained_variance=ev,
        entropy={"op": op_entropy},
        op_distribution=ops or {"WAIT": 0.97, "PRUNE": 0.03},
        minibatches=16,
        early_stopped=False,
        lr=3e-4,
    )


def test_a_confident_but_state_dependent_policy_is_not_collapse() -> None:
    """The cloned heuristic: op entropy ~0.08 in every state, but four ops in use."""
    monitor = HealthMonitor(patience=2)
    varied = {"WAIT": 0.6, "GERMINATE": 0.08, "ADVANCE": 0.24, "FOSSILIZE": 0.08}
    assert [monitor.check(stats_with(0.08, 0.9, varied)) for _ in range(4)] == [[]] * 4
    monitor.check(stats_with(0.08, 0.9))  # WAIT 97%: now it is one op
    assert "collapsed" in monitor.check(stats_with(0.08, 0.9))[0]


def test_health_monitor_flags_op_entropy_collapse_after_patience() -> None:
    monitor = HealthMonitor(patience=3)
    assert monitor.check(stats_with(0.01, 0.5)) == []
    assert monitor.check(stats_with(0.01, 0.5)) == []
    warnings = monitor.check(stats_with(0.01, 0.5))
    assert len(warnings) == 1 and "op-head entropy" in warnings[0] and "WAIT 97%" in warnings[0]
    assert monitor.check(stats_with(0.5, 0.5)) == []  # recovered: the streak restarts
    assert monitor.check(stats_with(0.01, 0.5)) == []


def test_health_monitor_flags_a_critic_that_never_learns() -> None:
    monitor = HealthMonitor(patience=3)
    out = [monitor.check(stats_with(1.0, ev)) for ev in (-0.2, float("nan"), 0.0, -1.0)]
    assert out[:2] == [[], []] and "explained variance" in out[2][0] and out[3] == []

    monitor = HealthMonitor(patience=3)
    out = [monitor.check(stats_with(1.0, ev)) for ev in (-0.2, 0.1, -0.3)]
    assert out == [[], [], []]


def test_reward_scaler_divides_by_the_std_of_discounted_returns() -> None:
    # Independent computation: discounted returns per env, reset after done, population std.
    gamma = 0.9
    rewards = torch.tensor([[1.0, 2.0], [3.0, -1.0], [0.5, 4.0]])
    dones = torch.tensor([[False, False], [True, False], [False, False]])
    scaler = RewardScaler(2, gamma)
    got = [scaler(rewards[t], dones[t]) for t in range(3)]
    g, seen = [0.0, 0.0], []
    for t in range(3):
        for k in range(2):
            g[k] = g[k] * gamma + float(rewards[t, k])
            seen.append(g[k])
        std = float(torch.tensor(seen, dtype=torch.float64).std(unbiased=False))
        assert torch.allclose(got[t], rewards[t] / std, rtol=1e-6)
        g = [0.0 if bool(dones[t, k]) else g[k] for k in range(2)]
    restored = RewardScaler(2, gamma)
    restored.load_state_dict(scaler.state_dict())
    r = torch.tensor([1.0, 1.0])
    assert torch.equal(
        restored(r, torch.zeros(2, dtype=torch.bool)), scaler(r, torch.zeros(2, dtype=torch.bool))
    )


# ---------------------------------------------------------------------------------------------
# The anchor: KL to the clone
# ---------------------------------------------------------------------------------------------


def test_anchor_kl_matches_torch_distributions_head_by_head() -> None:
    g = torch.Generator().manual_seed(3)
    n, sizes = 5, {h: 3 + i for i, h in enumerate(HEADS)}
    masks = {h: torch.rand(n, k, generator=g) > 0.3 for h, k in sizes.items()}
    for m in masks.values():
        m[:, 0] = True  # every head keeps a legal choice
    logp = [
        {h: masked_log_softmax(torch.randn(n, k, generator=g), masks[h]) for h, k in sizes.items()}
        for _ in range(2)
    ]
    relevant = torch.rand(n, len(HEADS), generator=g) > 0.5
    got = anchor_kl(logp[0], logp[1], relevant)
    for row in range(n):
        expected = 0.0
        for i, h in enumerate(HEADS):
            if relevant[row, i]:
                legal = masks[h][row]
                p = Categorical(probs=logp[0][h][row][legal].exp())
                q = Categorical(probs=logp[1][h][row][legal].exp())
                expected += float(kl_divergence(p, q))
        assert float(got[row]) == pytest.approx(expected, abs=1e-5)
    assert torch.allclose(anchor_kl(logp[0], logp[0], relevant), torch.zeros(n), atol=1e-6)


def _kl_to(anchor: torch.nn.Module, policy: LearnedPolicy, buffer: RolloutBuffer) -> float:
    b = buffer.flat()
    with torch.no_grad():
        ref = anchor.evaluate(b.g, b.s, b.actions, b.masks, b.valid)
        new = policy.net.evaluate(b.g, b.s, b.actions, b.masks, b.valid)
    return float(anchor_kl(ref.logp, new.logp, new.relevant).mean())


def test_the_anchor_holds_the_policy_near_the_clone() -> None:
    moved = {}
    for coef in (0.0, 5.0):
        policy, optimizer, buffer, adv, ret, cfg = setup(lr=0.01, target_kl=None)
        clone = copy.deepcopy(policy.net).requires_grad_(False)
        stats = ppo_update(policy.net, optimizer, buffer, adv, ret, cfg, anchor=Anchor(clone, coef))
        moved[coef] = _kl_to(clone, policy, buffer)
        assert (stats.anchor_kl > 0) == (coef > 0)
    assert moved[0.0] > 0.01  # PPO alone moves away from the clone ...
    assert moved[5.0] < 0.5 * moved[0.0]  # ... and the anchor holds it at under half that
