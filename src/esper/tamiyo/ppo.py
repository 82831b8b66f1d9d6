"""PPO for the factored growth policy, after CleanRL's `ppo.py`: config → buffer → GAE → update.

The update runs `update_epochs` passes over shuffled minibatches of one rollout. The first
minibatch sees ratio = 1 (the stored log-probs come from the same weights); every later one sees
the policy the earlier steps moved, which is where clipping and the KL early stop act.
`UpdateStats.ratio_max_abs_dev` shows that they had something to act on. Log-probs and the
entropy bonus count only the heads relevant to each row's op (`RELEVANT_HEADS`).

Diagnostics are summarised after the loop (`_summarise`) from a few per-minibatch tensors, and
`HealthMonitor` turns them into warnings when the policy or the critic collapses.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import nn

from esper.contracts import HEADS, TAMIYO_OPS
from esper.tamiyo.features import GLOBAL_DIM, SLOT_DIM, RunningNormalizer, pad_slots
from esper.tamiyo.masks import HEAD_SIZES_FIXED
from esper.tamiyo.network import HEAD_INDEX, ActOut, EvalOut, TamiyoNet


@dataclass(frozen=True)
class PPOConfig:
    gamma: float = 0.995
    """Discount per control tick (paper §5.2)."""
    gae_lambda: float = 0.98
    """GAE λ (paper §5.2)."""
    clip_coef: float = 0.2
    """Surrogate clipping: the ratio is held within 1 ± clip_coef."""
    clip_vloss: bool = True
    """Clip the value update around the rollout's values, as the policy's ratio is clipped."""
    ent_coef: float = 0.01
    """Weight of the entropy bonus (sum over heads of each head's mean entropy where relevant)."""
    vf_coef: float = 0.5
    """Weight of the value loss."""
    max_grad_norm: float = 0.5
    """Global gradient-norm clip."""
    update_epochs: int = 4
    """Passes over the rollout per update (more than one, or the ratio never leaves 1)."""
    num_minibatches: int = 4
    """Minibatches per pass."""
    target_kl: float | None = 0.03
    """Stop the update once a minibatch's approximate KL exceeds this (None: never)."""
    lr: float = 3e-4
    """Adam learning rate at the start of training."""
    anneal_lr: bool = True
    """Scale the learning rate by `lr_frac` (the fraction of updates left)."""
    norm_adv: bool = True
    """Normalise advantages within each minibatch."""
    scale_rewards: bool = True
    """Divide rewards by the running std of the discounted return (`RewardScaler`), so values
    and value clipping work in units of about one, whatever the task reward's scale."""

    def __post_init__(self) -> None:
        if self.update_epochs < 1 or self.num_minibatches < 1:
            raise ValueError("ppo.update_epochs and ppo.num_minibatches must be >= 1")
        if not 0 < self.gamma <= 1 or not 0 <= self.gae_lambda <= 1:
            raise ValueError(
                f"ppo.gamma must be in (0, 1] and gae_lambda in [0, 1], "
                f"got {self.gamma}, {self.gae_lambda}"
            )
        if self.clip_coef <= 0 or self.lr <= 0:
            raise ValueError("ppo.clip_coef and ppo.lr must be > 0")


# ---------------------------------------------------------------------------------------------
# Reward scaling (CleanRL's NormalizeReward): r / std(discounted return)
# ---------------------------------------------------------------------------------------------


class RewardScaler:
    """Scales each reward by 1 / sqrt(var + eps) of the running discounted return.

    Per environment, G ← γ·G·(1 − done_before) + r; the variance is that of every G seen
    (population, merged by `RunningNormalizer`). The mean is not subtracted: a constant shift
    of the reward would change which episodes end sooner, a scale does not change the optimum.
    With the `level` task reward a 40-tick return is ~25 (accuracy summed over ticks) while a
    seed changes it by ~1; unscaled, a value clipped to ±clip_coef per update would take ~100
    updates to reach it.
    """

    def __init__(self, num_envs: int, gamma: float, eps: float = 1e-8) -> None:
        self.gamma, self.eps = gamma, eps
        self.returns = torch.zeros(num_envs, dtype=torch.float64)
        self.stats = RunningNormalizer(1)

    def __call__(self, rewards: torch.Tensor, dones: torch.Tensor) -> torch.Tensor:
        """`rewards` (K,) of this step; `dones` (K,) True where this step ended the episode."""
        self.returns = self.returns * self.gamma + rewards.to(torch.float64)
        self.stats.update(self.returns.unsqueeze(-1))
        self.returns = self.returns * (1.0 - dones.to(torch.float64))
        return (rewards / torch.sqrt(self.stats.var[0] + self.eps)).to(rewards.dtype)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {
            "returns": self.returns.clone(),
            **{f"stats.{k}": v for k, v in self.stats.state_dict().items()},
        }

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.returns = torch.as_tensor(state["returns"], dtype=torch.float64).clone()
        self.stats.load_state_dict({k: state[f"stats.{k}"] for k in ("mean", "var", "count")})


# ---------------------------------------------------------------------------------------------
# Rollout buffer: T steps of K environments
# ---------------------------------------------------------------------------------------------


class Batch(NamedTuple):
    """A flattened rollout, (N = T·K, ...) each."""

    g: torch.Tensor
    s: torch.Tensor
    actions: torch.Tensor
    masks: dict[str, torch.Tensor]
    logprobs: torch.Tensor
    values: torch.Tensor
    valid: torch.Tensor
    """(N, S) bool: the real slots of each row."""


class RolloutBuffer:
    """Normalised features, actions, masks, log-probs and values of T steps × K envs.

    `dones[t]` follows CleanRL: 1 when observation t is the first of a new episode (the step
    before it ended one). `rewards[t]` is the reward for the action taken at step t.

    Slots are stored padded to the largest slot count seen (`num_slots` to start with; a step
    with more slots widens the buffer), with `valid` marking each row's real ones: with a
    curriculum, the K environments hold hosts of different sizes.
    """

    def __init__(
        self,
        num_steps: int,
        num_envs: int,
        num_slots: int,
        global_dim: int = GLOBAL_DIM,
        slot_dim: int = SLOT_DIM,
    ) -> None:
        T, K = num_steps, num_envs
        self.num_steps, self.num_envs = T, K
        sizes = {**HEAD_SIZES_FIXED, "slot": num_slots}
        self.g = torch.zeros(T, K, global_dim)
        self.s = torch.zeros(T, K, num_slots, slot_dim)
        self.actions = torch.zeros(T, K, len(HEADS), dtype=torch.long)
        self.masks = {h: torch.zeros(T, K, sizes[h], dtype=torch.bool) for h in HEADS}
        self.logprobs = torch.zeros(T, K)
        self.values = torch.zeros(T, K)
        self.rewards = torch.zeros(T, K)
        self.dones = torch.zeros(T, K)
        self.valid = torch.zeros(T, K, num_slots, dtype=torch.bool)

    def add(
        self, t: int, g: torch.Tensor, s: torch.Tensor, out: ActOut, dones: torch.Tensor
    ) -> None:
        """Store step t for all K envs: features (K, G), (K, S, F), the net's output, dones (K,)."""
        n = max(s.shape[1], self.s.shape[2])
        if n > self.s.shape[2]:
            self._widen(n)
        self.g[t], self.s[t], self.actions[t] = g, pad_slots(s, n), out.actions
        for h in HEADS:
            self.masks[h][t] = pad_slots(out.masks[h], n) if h == "slot" else out.masks[h]
        self.valid[t] = pad_slots(out.valid, n)
        self.logprobs[t], self.values[t], self.dones[t] = out.logprob, out.value, dones

    def _widen(self, n: int) -> None:
        """Pad the stored slots (and their masks) of every step to n."""

        def pad(x: torch.Tensor) -> torch.Tensor:  # (T, K, S, ...) -> (T, K, n, ...)
            return pad_slots(x.flatten(0, 1), n).unflatten(0, x.shape[:2])

        self.s, self.valid = pad(self.s), pad(self.valid)
        self.masks["slot"] = pad(self.masks["slot"])

    def flat(self) -> Batch:
        n = self.num_steps * self.num_envs
        return Batch(
            self.g.reshape(n, -1),
            self.s.reshape(n, *self.s.shape[2:]),
            self.actions.reshape(n, -1),
            {h: m.reshape(n, -1) for h, m in self.masks.items()},
            self.logprobs.reshape(n),
            self.values.reshape(n),
            self.valid.reshape(n, -1),
        )


# ---------------------------------------------------------------------------------------------
# Generalised advantage estimation
# ---------------------------------------------------------------------------------------------


def compute_gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    dones: torch.Tensor,
    last_value: torch.Tensor,
    last_done: torch.Tensor,
    gamma: float,
    lam: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Advantages and returns (T, K). `dones` as in `RolloutBuffer`; `last_value`, `last_done`
    (K,) are V and the done flag of the observation after the last step."""
    T = rewards.shape[0]
    advantages = torch.zeros_like(rewards)
    last_gae = torch.zeros_like(last_value)
    for t in reversed(range(T)):
        if t == T - 1:
            next_nonterminal, next_values = 1.0 - last_done, last_value
        else:
            next_nonterminal, next_values = 1.0 - dones[t + 1], values[t + 1]
        delta = rewards[t] + gamma * next_values * next_nonterminal - values[t]
        last_gae = delta + gamma * lam * next_nonterminal * last_gae
        advantages[t] = last_gae
    return advantages, advantages + values


# ---------------------------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------------------------


def clipped_surrogate(
    ratio: torch.Tensor, advantages: torch.Tensor, clip_coef: float
) -> torch.Tensor:
    """PPO's policy loss: mean of max(−A·r, −A·clip(r, 1 ± ε))."""
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip_coef, 1 + clip_coef)
    return torch.max(unclipped, clipped).mean()


def value_loss(
    new_values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, cfg: PPOConfig
) -> torch.Tensor:
    unclipped = (new_values - returns).square()
    if not cfg.clip_vloss:
        return 0.5 * unclipped.mean()
    clipped = old_values + (new_values - old_values).clamp(-cfg.clip_coef, cfg.clip_coef)
    return 0.5 * torch.max(unclipped, (clipped - returns).square()).mean()


# ---------------------------------------------------------------------------------------------
# The update
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class UpdateStats:
    policy_loss: float
    """Clipped surrogate, mean over the minibatches run."""
    value_loss: float
    approx_kl: float
    """Mean over minibatches of ((r − 1) − log r), Schulman's low-variance KL estimator."""
    clipfrac: float
    """Fraction of rows with |r − 1| > clip_coef."""
    ratio_max_abs_dev: float
    """max |r − 1| seen: 0 means clipping and the KL stop could never act."""
    explained_variance: float
    """1 − Var(returns − values) / Var(returns) of the rollout's values (NaN: constant returns)."""
    entropy: dict[str, float]
    """Per head: mean entropy over the rows (of every minibatch run) where that head is relevant
    (0 where it never was)."""
    op_distribution: dict[str, float]
    """Fraction of the rollout's actions per op."""
    minibatches: int
    early_stopped: bool
    lr: float
    anchor_kl: float = 0.0
    """Mean KL(anchor ‖ policy) over the minibatches run (0 without an anchor)."""


@dataclass
class _Log:
    """What each minibatch leaves behind for the summary (detached)."""

    policy_loss: list[torch.Tensor] = field(default_factory=list)
    value_loss: list[torch.Tensor] = field(default_factory=list)
    approx_kl: list[torch.Tensor] = field(default_factory=list)
    ratio: list[torch.Tensor] = field(default_factory=list)
    entropy_sum: torch.Tensor = field(default_factory=lambda: torch.zeros(len(HEADS)))
    relevant_rows: torch.Tensor = field(default_factory=lambda: torch.zeros(len(HEADS)))
    anchor_kl: list[torch.Tensor] = field(default_factory=list)


class Anchor(NamedTuple):
    """Keep what the clone knows while PPO improves on it (issue 15): a frozen reference
    network (the warm start) and the weight of KL(reference ‖ policy) in this update's loss."""

    net: TamiyoNet
    coef: float


def anchor_kl(
    reference: dict[str, torch.Tensor], new: dict[str, torch.Tensor], relevant: torch.Tensor
) -> torch.Tensor:
    """(N,) KL(reference ‖ new) of the factored policy, per row: Σ over the heads relevant to the
    row's op of each head's KL, the slot and knob heads conditioned on the row's op and slot
    (the chain rule, its expectation over op and slot taken on the rollout's actions). Masked
    entries carry probability 0 in both and add nothing."""
    kls = torch.stack([(reference[h].exp() * (reference[h] - new[h])).sum(-1) for h in HEADS], 1)
    return torch.where(relevant, kls, torch.zeros((), dtype=kls.dtype)).sum(1)


def ppo_update(
    net: TamiyoNet,
    optimizer: torch.optim.Optimizer,
    buffer: RolloutBuffer,
    advantages: torch.Tensor,
    returns: torch.Tensor,
    cfg: PPOConfig,
    lr_frac: float = 1.0,
    generator: torch.Generator | None = None,
    anchor: Anchor | None = None,
) -> UpdateStats:
    """One PPO update on a full rollout. `lr_frac` is the fraction of training left (CleanRL:
    1 − (update − 1) / num_updates); `generator` seeds the minibatch shuffle; `anchor` adds
    coef × KL(anchor ‖ policy) to the loss."""
    lr = cfg.lr * lr_frac if cfg.anneal_lr else cfg.lr
    for group in optimizer.param_groups:
        group["lr"] = lr

    b = buffer.flat()
    b_advantages, b_returns = advantages.reshape(-1), returns.reshape(-1)
    n = b_advantages.numel()
    minibatch_size = max(1, n // cfg.num_minibatches)
    log, early_stopped = _Log(), False

    for _epoch in range(cfg.update_epochs):
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, minibatch_size):
            mb = order[start : start + minibatch_size]
            new = net.evaluate(
                b.g[mb], b.s[mb], b.actions[mb], {h: m[mb] for h, m in b.masks.items()}, b.valid[mb]
            )
            logratio = new.logprob - b.logprobs[mb]
            ratio = logratio.exp()
            with torch.no_grad():
                approx_kl = ((ratio - 1) - logratio).mean()  # http://joschu.net/blog/kl-approx.html

            mb_advantages = b_advantages[mb]
            if cfg.norm_adv and mb_advantages.numel() > 1:
                mb_advantages = (mb_advantages - mb_advantages.mean()) / (
                    mb_advantages.std() + 1e-8
                )
            pg_loss = clipped_surrogate(ratio, mb_advantages, cfg.clip_coef)
            v_loss = value_loss(new.value, b.values[mb], b_returns[mb], cfg)
            # Each head's mean entropy over the rows where it matters (N, 8) -> (8,).
            head_entropy = new.entropy.sum(0) / new.relevant.sum(0).clamp(min=1)
            loss = pg_loss - cfg.ent_coef * head_entropy.sum() + cfg.vf_coef * v_loss
            if anchor is not None and anchor.coef > 0:
                kl = _anchor_loss(anchor, b, mb, new)
                loss = loss + anchor.coef * kl
                log.anchor_kl.append(kl.detach())

            log.policy_loss.append(pg_loss.detach())
            log.value_loss.append(v_loss.detach())
            log.approx_kl.append(approx_kl)
            log.ratio.append(ratio.detach())
            log.entropy_sum += new.entropy.detach().sum(0)
            log.relevant_rows += new.relevant.sum(0)
            if cfg.target_kl is not None and approx_kl > cfg.target_kl:
                early_stopped = True  # this minibatch has moved too far already: no step on it
                break

            optimizer.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(net.parameters(), cfg.max_grad_norm)
            optimizer.step()
        if early_stopped:
            break

    return _summarise(log, b, b_returns, cfg, early_stopped, lr)


def _anchor_loss(anchor: Anchor, b: Batch, mb: torch.Tensor, new: EvalOut) -> torch.Tensor:
    """Mean over the minibatch of KL(anchor ‖ policy) (`anchor_kl`)."""
    with torch.no_grad():
        ref = anchor.net.evaluate(
            b.g[mb], b.s[mb], b.actions[mb], {h: m[mb] for h, m in b.masks.items()}, b.valid[mb]
        )
    assert ref.logp is not None and new.logp is not None
    return anchor_kl(ref.logp, new.logp, new.relevant).mean()


def explained_variance(values: torch.Tensor, returns: torch.Tensor) -> float:
    var = returns.var(unbiased=False)
    if var == 0:
        return float("nan")
    return float(1 - (returns - values).var(unbiased=False) / var)


def _summarise(
    log: _Log, b: Batch, b_returns: torch.Tensor, cfg: PPOConfig, early_stopped: bool, lr: float
) -> UpdateStats:
    ratio = torch.cat(log.ratio)
    ops = b.actions[:, HEAD_INDEX["op"]]
    head_entropy = log.entropy_sum / log.relevant_rows.clamp(min=1)
    return UpdateStats(
        policy_loss=float(torch.stack(log.policy_loss).mean()),
        value_loss=float(torch.stack(log.value_loss).mean()),
        approx_kl=float(torch.stack(log.approx_kl).mean()),
        clipfrac=float(((ratio - 1).abs() > cfg.clip_coef).float().mean()),
        ratio_max_abs_dev=float((ratio - 1).abs().max()),
        explained_variance=explained_variance(b.values, b_returns),
        entropy={h: float(e) for h, e in zip(HEADS, head_entropy, strict=True)},
        op_distribution={
            op.name: float((ops == i).float().mean()) for i, op in enumerate(TAMIYO_OPS)
        },
        minibatches=len(log.ratio),
        early_stopped=early_stopped,
        lr=lr,
        anchor_kl=float(torch.stack(log.anchor_kl).mean()) if log.anchor_kl else 0.0,
    )


# ---------------------------------------------------------------------------------------------
# Collapse detection
# ---------------------------------------------------------------------------------------------


@dataclass
class HealthMonitor:
    """Warns when the policy collapses onto one op or the critic never learns.

    `check(stats)` after every update returns warnings to log: op-head entropy below
    `min_op_entropy` while one op takes at least `max_op_share` of the rollout's actions, for
    `patience` updates in a row (repeated while it lasts), or explained variance ≤ 0 (or NaN) in
    every one of the first `patience` updates (once). Low entropy alone is not collapse: a
    policy cloned from the heuristic is confident in every state (entropy ~0.08) yet chooses
    WAIT, GERMINATE, ADVANCE and FOSSILIZE as the state demands (WAIT ~60% of actions).
    """

    patience: int = 5
    min_op_entropy: float = 0.1
    """0.05 let a policy choosing WAIT ~95% of the time (entropy 0.075) pass unflagged."""
    max_op_share: float = 0.9
    """The most frequent op's share of actions above which low entropy means collapse."""
    updates: int = field(default=0, init=False)
    low_entropy_streak: int = field(default=0, init=False)
    critic_never_learned: bool = field(default=True, init=False)

    def check(self, stats: UpdateStats) -> list[str]:
        warnings = []
        self.updates += 1
        op_entropy = stats.entropy["op"]
        collapsed = (
            op_entropy < self.min_op_entropy
            and max(stats.op_distribution.values(), default=1.0) >= self.max_op_share
        )
        self.low_entropy_streak = self.low_entropy_streak + 1 if collapsed else 0
        if self.low_entropy_streak >= self.patience:
            warnings.append(
                f"op-head entropy {op_entropy:.4f} < {self.min_op_entropy} for "
                f"{self.low_entropy_streak} updates: the policy has collapsed onto "
                f"one op ({_top_op(stats)})"
            )
        if self.updates <= self.patience:
            self.critic_never_learned &= not stats.explained_variance > 0
            if self.updates == self.patience and self.critic_never_learned:
                warnings.append(
                    f"explained variance <= 0 in each of the first {self.patience} "
                    "updates: the value head is not learning"
                )
        return warnings


def _top_op(stats: UpdateStats) -> str:
    op, share = max(stats.op_distribution.items(), key=lambda kv: kv[1])
    return f"{op} {share:.0%} of actions"
