"""Behaviour cloning: start the learned policy from a teacher's decisions (a warm start for PPO).

    teacher episodes → (features, teacher action, masks, return) → maximise log π(a_teacher | s)
                                                                   and fit V(s) to the return

PPO from a random initialisation rarely finds growth on `digits` within an hour: a seed pays
only after a germinate → advance → advance → … → fossilize sequence of 4–6 decisions, which a
near-uniform policy seldom completes (bench/RESULTS.md). Cloning the heuristic first puts the
policy where those sequences happen, and fitting the value head to the teacher's returns gives
PPO's first advantages a critic that already knows the game. The loss is the same masked,
relevant-heads-only log-probability that PPO uses (`TamiyoNet.evaluate`), so a head the
teacher's op ignores is never trained towards the teacher's placeholder choice.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from esper.contracts import HEADS, TAMIYO_OPS, FactoredAction
from esper.contracts.errors import ConfigError
from esper.tamiyo.network import HEAD_INDEX, RELEVANT, TamiyoNet
from esper.tamiyo.policies import POLICIES


@dataclass(frozen=True)
class ImitationConfig:
    """The behaviour-cloning phase of `esper train-policy`."""

    teacher: str | None = "heuristic"
    """The policy to imitate (a name `esper.tamiyo.make_policy` knows), or None: no warm start,
    PPO from a random initialisation."""
    episodes: int = 32
    """Teacher episodes to record (rounded up to whole rollouts of every environment); 32
    episodes of 40 ticks are 1280 decisions, ~4.5 min with 8 environments on 2 cores."""
    epochs: int = 60
    """Passes over the demonstrations."""
    minibatch_size: int = 256
    lr: float = 1e-3
    vf_coef: float = 0.5
    """Weight of the value loss (V(s) fitted to the teacher's scaled discounted return)."""
    max_grad_norm: float = 0.5

    def __post_init__(self) -> None:
        if self.episodes < 1 or self.epochs < 1 or self.minibatch_size < 1:
            raise ConfigError("imitation.episodes, epochs and minibatch_size must be >= 1")
        if self.lr <= 0 or self.vf_coef < 0:
            raise ConfigError("imitation.lr must be > 0 and vf_coef >= 0")
        if self.teacher is not None and self.teacher not in POLICIES:
            raise ConfigError(f"unknown teacher {self.teacher!r}; valid: {', '.join(POLICIES)}")


def action_indices(actions: list[FactoredAction]) -> torch.Tensor:
    """(B, 8) long head indices in HEADS order (the op head's index is the Op's value: the
    policy's six ops come first in `Op`)."""
    return torch.tensor([[a.as_indices()[h] for h in HEADS] for a in actions], dtype=torch.long)


class Demonstrations(NamedTuple):
    """N teacher decisions: normalised features, the action, its masks, the return after it."""

    g: torch.Tensor
    """(N, GLOBAL_DIM)"""
    s: torch.Tensor
    """(N, S, SLOT_DIM)"""
    actions: torch.Tensor
    """(N, 8) long"""
    masks: dict[str, torch.Tensor]
    """head -> (N, n) bool, the masks under the teacher's op and slot."""
    returns: torch.Tensor
    """(N,) the (scaled) discounted return from this decision on."""
    valid: torch.Tensor | None = None
    """(N, S) bool: each row's real slots, where hosts of different sizes were padded to S
    (None: every slot is real)."""


@dataclass(frozen=True)
class ImitationStats:
    nll: float
    """Mean negative log-likelihood of the teacher's action (relevant heads), last epoch."""
    accuracy: dict[str, float]
    """Per head: fraction of rows where the head's argmax is the teacher's choice, over the rows
    where the head is relevant (after training)."""
    op_accuracy_by_op: dict[str, float]
    """Op-head argmax accuracy per teacher op (WAIT dominates; the rare ops matter)."""
    value_loss: float
    epochs: int


def imitation_update(
    net: TamiyoNet,
    optimizer: torch.optim.Optimizer,
    demos: Demonstrations,
    cfg: ImitationConfig,
    generator: torch.Generator | None = None,
) -> ImitationStats:
    """`cfg.epochs` passes of minibatch Adam on −log π(a_teacher|s) + vf_coef · ½(V − G)²."""
    for group in optimizer.param_groups:
        group["lr"] = cfg.lr
    n = demos.actions.shape[0]
    nll = v_loss = torch.zeros(())
    for _epoch in range(cfg.epochs):
        order = torch.randperm(n, generator=generator)
        nlls, v_losses = [], []
        for start in range(0, n, cfg.minibatch_size):
            mb = order[start : start + cfg.minibatch_size]
            out = net.evaluate(
                demos.g[mb],
                demos.s[mb],
                demos.actions[mb],
                {h: m[mb] for h, m in demos.masks.items()},
                None if demos.valid is None else demos.valid[mb],
            )
            mb_nll = -out.logprob.mean()
            mb_v = 0.5 * (out.value - demos.returns[mb]).square().mean()
            optimizer.zero_grad()
            (mb_nll + cfg.vf_coef * mb_v).backward()
            nn.utils.clip_grad_norm_(net.parameters(), cfg.max_grad_norm)
            optimizer.step()
            nlls.append(mb_nll.detach())
            v_losses.append(mb_v.detach())
        nll, v_loss = torch.stack(nlls).mean(), torch.stack(v_losses).mean()
    accuracy, by_op = agreement(net, demos)
    return ImitationStats(float(nll), accuracy, by_op, float(v_loss), cfg.epochs)


@torch.no_grad()
def agreement(net: TamiyoNet, demos: Demonstrations) -> tuple[dict[str, float], dict[str, float]]:
    """How often the policy's most probable choice is the teacher's: per head (where relevant,
    each head conditioned on the teacher's earlier choices) and, for the op head, per op."""
    ctx, slots, _ = net.encode(demos.g, demos.s, demos.valid)
    op, slot = demos.actions[:, HEAD_INDEX["op"]], demos.actions[:, HEAD_INDEX["slot"]]
    logits = {
        "op": net.op_head(ctx),
        "slot": net.slot_logits(ctx, slots, op),
        **net.knob_logits(ctx, slots, op, slot),
    }
    relevant = RELEVANT[op]  # (N, 8): the heads each row's op uses
    accuracy: dict[str, float] = {}
    by_op: dict[str, float] = {}
    for h in HEADS:
        i = HEAD_INDEX[h]
        chosen = logits[h].masked_fill(~demos.masks[h], float("-inf")).argmax(-1)
        hit, rows = chosen == demos.actions[:, i], relevant[:, i]
        if bool(rows.any()):
            accuracy[h] = float(hit[rows].float().mean())
        if h == "op":
            by_op = {
                o.name: float(hit[op == k].float().mean())
                for k, o in enumerate(TAMIYO_OPS)
                if bool((op == k).any())
            }
    return accuracy, by_op
