"""TamiyoNet: the actor-critic behind the learned growth policy.

    g (B, G) ─ global encoder ─┐
    s (B, S, F) ─ slot encoder ─ mean, max over slots ─┴─ context (B, H) ─ value V(s)
                                                              │
    op      logits from context
    slot    logits per slot from [slot embedding, context, op embedding]
    knobs   blueprint … alpha_curve logits from [context, chosen slot's embedding, op embedding]

The slots are a set: the slot encoder has one set of weights for every slot, pooling makes the
context invariant to slot order, and the slot head scores each slot from its own embedding and
the shared context, so the slot scores are permutation-equivariant (permute the slots, the scores
permute the same way) and any number of slots can be scored by the same weights.

Hosts of different sizes share a batch padded to its largest slot count (`valid` (B, S), from
`featurize_batch`): padded slots are left out of the pooling and their slot logits are masked
like illegal slots, so a row's log-probabilities and value are those it has alone.

Heads are sampled in the order op → slot → the rest, each under the mask that
`tamiyo.masks.action_masks` gives for the choices so far. Illegal actions get a logit of −1e9
and therefore probability exactly 0: there is no probability floor anywhere.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import nn

from esper.contracts import HEADS, RELEVANT_HEADS, TAMIYO_OPS
from esper.tamiyo.features import GLOBAL_DIM, SLOT_DIM
from esper.tamiyo.masks import HEAD_SIZES_FIXED

KNOB_HEADS = tuple(h for h in HEADS if h not in ("op", "slot"))
HEAD_INDEX = {h: i for i, h in enumerate(HEADS)}
ILLEGAL_LOGIT = -1e9

# RELEVANT[op index, head index]: does this head's choice matter for this op?
RELEVANT = torch.tensor([[h in RELEVANT_HEADS[op] for h in HEADS] for op in TAMIYO_OPS])

MaskFn = Callable[..., dict[str, list[bool]]]
"""`mask_fn(b)`, `mask_fn(b, op)`, `mask_fn(b, op, slot)` -> every head's mask for row b, given
the choices so far (`action_masks(obs[b], op, slot)` is one)."""


class ActOut(NamedTuple):
    actions: torch.Tensor
    """(B, 8) long, one index per head in HEADS order."""
    masks: dict[str, torch.Tensor]
    """head -> (B, n) bool: the masks sampled under (store them for `evaluate`)."""
    logprob: torch.Tensor
    """(B,) log-probability of the action, summed over the heads relevant to its op."""
    entropy: torch.Tensor
    """(B, 8) entropy of each head's (conditional) distribution, every head."""
    relevant: torch.Tensor
    """(B, 8) bool: heads that matter for the chosen op."""
    value: torch.Tensor
    """(B,) V(s)."""
    probs: dict[str, torch.Tensor]
    """head -> (B, n) the distribution each head was sampled from."""
    valid: torch.Tensor
    """(B, S) bool: the real slots of each row (False: padding); store it for `evaluate`."""


class EvalOut(NamedTuple):
    logprob: torch.Tensor
    """(N,) summed over relevant heads."""
    entropy: torch.Tensor
    """(N, 8), zero on irrelevant heads."""
    relevant: torch.Tensor
    """(N, 8) bool."""
    value: torch.Tensor
    """(N,)"""
    logp: dict[str, torch.Tensor] | None = None
    """head -> (N, n) log-distribution of each head under the row's op and slot."""


def layer_init(layer: nn.Linear, std: float = math.sqrt(2), bias: float = 0.0) -> nn.Linear:
    """Orthogonal weights, constant bias (CleanRL's PPO initialisation)."""
    nn.init.orthogonal_(layer.weight, std)
    nn.init.constant_(layer.bias, bias)
    return layer


def masked_log_softmax(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Log-probabilities with illegal entries at ≈ −1e9 (probability exactly 0, no NaN)."""
    if not bool(mask.any(-1).all()):
        raise ValueError("a mask row allows no action; every head needs at least one legal option")
    return torch.log_softmax(logits.masked_fill(~mask, ILLEGAL_LOGIT), dim=-1)


def entropy_of(logp: torch.Tensor) -> torch.Tensor:
    return -(logp.exp() * logp).sum(-1)  # masked entries: 0 · (−1e9) = 0


def pick(
    logp: torch.Tensor, generator: torch.Generator | None, deterministic: bool
) -> torch.Tensor:
    """(B, n) log-probs -> (B,) indices: a sample, or the argmax when deterministic."""
    if deterministic:
        return logp.argmax(-1)
    return torch.multinomial(logp.exp(), 1, generator=generator).squeeze(-1)


class TamiyoNet(nn.Module):
    def __init__(
        self, global_dim: int = GLOBAL_DIM, slot_dim: int = SLOT_DIM, hidden: int = 128
    ) -> None:
        super().__init__()
        h, n_ops = hidden, len(TAMIYO_OPS)
        self.hidden = hidden
        self.slot_encoder = nn.Sequential(  # the same weights for every slot
            layer_init(nn.Linear(slot_dim, h)), nn.Tanh(), layer_init(nn.Linear(h, h)), nn.Tanh()
        )
        self.global_encoder = nn.Sequential(layer_init(nn.Linear(global_dim, h)), nn.Tanh())
        self.context = nn.Sequential(layer_init(nn.Linear(3 * h, h)), nn.Tanh())
        self.op_embed = nn.Embedding(n_ops, h)
        self.op_head = layer_init(nn.Linear(h, n_ops), std=0.01)
        self.slot_head = nn.Sequential(
            layer_init(nn.Linear(3 * h, h)), nn.Tanh(), layer_init(nn.Linear(h, 1), std=0.01)
        )
        self.knob_trunk = nn.Sequential(layer_init(nn.Linear(3 * h, h)), nn.Tanh())
        self.knob_heads = nn.ModuleDict(
            {k: layer_init(nn.Linear(h, HEAD_SIZES_FIXED[k]), std=0.01) for k in KNOB_HEADS}
        )
        self.value_head = nn.Sequential(
            layer_init(nn.Linear(h, h)), nn.Tanh(), layer_init(nn.Linear(h, 1), std=1.0)
        )

    # -- the shared encoder and the three conditional stages --------------------------------------
    def encode(
        self, g: torch.Tensor, s: torch.Tensor, valid: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> context (B, H), slot embeddings (B, S, H), value (B,); `valid` (B, S) marks the
        real slots (None: all)."""
        slots = self.slot_encoder(s)
        pooled = pool_slots(slots, valid)  # (B, 2H), order-invariant
        ctx = self.context(torch.cat([self.global_encoder(g), pooled], dim=-1))
        return ctx, slots, self.value_head(ctx).squeeze(-1)

    def slot_logits(self, ctx: torch.Tensor, slots: torch.Tensor, op: torch.Tensor) -> torch.Tensor:
        """(B, S) given the chosen op (B,)."""
        n = slots.shape[1]
        per_slot = torch.cat(
            [slots, ctx[:, None].expand(-1, n, -1), self.op_embed(op)[:, None].expand(-1, n, -1)],
            dim=-1,
        )
        return self.slot_head(per_slot).squeeze(-1)

    def knob_logits(
        self, ctx: torch.Tensor, slots: torch.Tensor, op: torch.Tensor, slot: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """blueprint … alpha_curve logits given the chosen op and slot (B,)."""
        chosen = slots[torch.arange(slots.shape[0]), slot]  # (B, H)
        x = self.knob_trunk(torch.cat([ctx, chosen, self.op_embed(op)], dim=-1))
        return {k: head(x) for k, head in self.knob_heads.items()}

    # -- acting: sample head by head, asking for each mask once the earlier choices are known ----
    @torch.no_grad()
    def act(
        self,
        g: torch.Tensor,
        s: torch.Tensor,
        mask_fn: MaskFn,
        generator: torch.Generator | None = None,
        deterministic: bool = False,
        valid: torch.Tensor | None = None,
    ) -> ActOut:
        rows, n_slots = range(g.shape[0]), s.shape[1]
        valid = torch.ones(s.shape[:2], dtype=torch.bool) if valid is None else valid
        ctx, slots, value = self.encode(g, s, valid)
        masks, logp, chosen = {}, {}, {}

        masks["op"] = _as_mask([mask_fn(b)["op"] for b in rows])
        logp["op"] = masked_log_softmax(self.op_head(ctx), masks["op"])
        chosen["op"] = pick(logp["op"], generator, deterministic)
        ops = [TAMIYO_OPS[i] for i in chosen["op"].tolist()]

        # mask_fn knows each row's own slots: the padding is masked like an illegal slot
        masks["slot"] = _as_mask([mask_fn(b, ops[b])["slot"] for b in rows], n_slots)
        logp["slot"] = masked_log_softmax(self.slot_logits(ctx, slots, chosen["op"]), masks["slot"])
        chosen["slot"] = pick(logp["slot"], generator, deterministic)

        full = [mask_fn(b, ops[b], int(chosen["slot"][b])) for b in rows]
        knobs = self.knob_logits(ctx, slots, chosen["op"], chosen["slot"])
        for k in KNOB_HEADS:
            masks[k] = _as_mask([m[k] for m in full])
            logp[k] = masked_log_softmax(knobs[k], masks[k])
            chosen[k] = pick(logp[k], generator, deterministic)

        actions = torch.stack([chosen[h] for h in HEADS], dim=1)
        logprob, entropy, relevant = _per_head(actions, logp)
        masks = {h: masks[h] for h in HEADS}
        probs = {h: logp[h].exp() for h in HEADS}
        summed = torch.where(relevant, logprob, torch.zeros(())).sum(1)
        return ActOut(actions, masks, summed, entropy, relevant, value, probs, valid)

    # -- learning: the same distributions, recomputed under the stored masks ---------------------
    def evaluate(
        self,
        g: torch.Tensor,
        s: torch.Tensor,
        actions: torch.Tensor,
        masks: dict[str, torch.Tensor],
        valid: torch.Tensor | None = None,
    ) -> EvalOut:
        ctx, slots, value = self.encode(g, s, valid)
        op, slot = actions[:, HEAD_INDEX["op"]], actions[:, HEAD_INDEX["slot"]]
        logp = {
            "op": masked_log_softmax(self.op_head(ctx), masks["op"]),
            "slot": masked_log_softmax(self.slot_logits(ctx, slots, op), masks["slot"]),
        }
        knobs = self.knob_logits(ctx, slots, op, slot)
        for k in KNOB_HEADS:
            logp[k] = masked_log_softmax(knobs[k], masks[k])
        logprob, entropy, relevant = _per_head(actions, logp)
        zero = torch.zeros((), dtype=logprob.dtype)
        return EvalOut(
            torch.where(relevant, logprob, zero).sum(1),
            torch.where(relevant, entropy, zero),
            relevant,
            value,
            logp,
        )


def pool_slots(slots: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """(B, S, H) -> (B, 2H): mean and max over each row's real slots (`valid`; None: all)."""
    if valid is None or bool(valid.all()):
        return torch.cat([slots.mean(1), slots.amax(1)], dim=-1)
    w = valid.unsqueeze(-1)  # (B, S, 1)
    mean = (slots * w).sum(1) / w.sum(1).clamp(min=1)
    top = slots.masked_fill(~w, float("-inf")).amax(1)
    top = torch.where(w.any(1), top, torch.zeros(()))  # a row without slots: 0, not −inf
    return torch.cat([mean, top], dim=-1)


def _as_mask(rows: list[list[bool]], width: int | None = None) -> torch.Tensor:
    """Rows of booleans; with `width`, each padded with False to it (slots a row lacks)."""
    if width is not None:
        rows = [r + [False] * (width - len(r)) for r in rows]
    return torch.tensor(rows, dtype=torch.bool)


def _per_head(
    actions: torch.Tensor, logp: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> log-prob of each head's action (B, 8), each head's entropy (B, 8), relevant (B, 8)."""
    logprob = torch.stack(
        [logp[h].gather(1, actions[:, i : i + 1]).squeeze(1) for i, h in enumerate(HEADS)], dim=1
    )
    entropy = torch.stack([entropy_of(logp[h]) for h in HEADS], dim=1)
    relevant = RELEVANT.to(actions.device)[actions[:, HEAD_INDEX["op"]]]
    return logprob, entropy, relevant
