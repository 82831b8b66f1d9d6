"""Action masks: the one function that says which actions are legal, for sampling and validation.

Built from the lifecycle's authority table plus the slot-level guards (G2 passed before
TRAINING → BLENDING, α ramp finished before BLENDING → HOLDING). Heads the chosen op does not
use are all-True (and excluded from losses; see `RELEVANT_HEADS`).
"""

from __future__ import annotations

from esper.contracts import (
    HEADS,
    TAMIYO_OPS,
    Actor,
    AlphaCurve,
    AlphaSpeed,
    AlphaTarget,
    Blueprint,
    FactoredAction,
    Observation,
    Op,
    SlotTelemetry,
    Stage,
    Style,
    Tempo,
    is_legal,
)

HEAD_SIZES_FIXED = {
    "blueprint": len(Blueprint),
    "style": len(Style),
    "tempo": len(Tempo),
    "alpha_target": len(AlphaTarget),
    "alpha_speed": len(AlphaSpeed),
    "alpha_curve": len(AlphaCurve),
    "op": len(TAMIYO_OPS),
}


def slot_allows(slot: SlotTelemetry, op: Op) -> bool:
    """Can Tamiyo perform `op` on this slot now?"""
    if op is Op.WAIT:
        return True
    if not is_legal(slot.stage, Actor.TAMIYO, op):
        return False
    if op is Op.ADVANCE and slot.stage is Stage.TRAINING:
        return bool(slot.gate_passed)
    if op is Op.ADVANCE and slot.stage is Stage.BLENDING:
        return slot.alpha_ticks_left == 0
    return True


def slot_mask(obs: Observation, op: Op) -> list[bool]:
    if op is Op.GERMINATE and obs.growth_blocked is not None:
        return [False] * len(obs.slots)
    return [slot_allows(s, op) for s in obs.slots]


def op_mask(obs: Observation) -> list[bool]:
    return [op is Op.WAIT or any(slot_mask(obs, op)) for op in TAMIYO_OPS]


def blueprint_mask(obs: Observation, slot: int) -> list[bool]:
    legal = set(obs.legal_blueprints[slot])
    return [b in legal for b in Blueprint]


def action_masks(
    obs: Observation, op: Op | None = None, slot: int | None = None
) -> dict[str, list[bool]]:
    """Masks for every head; `slot` and `blueprint` are conditioned on the chosen op and slot
    (heads are sampled in that order: op → slot → blueprint → the rest)."""
    masks = {h: [True] * n for h, n in HEAD_SIZES_FIXED.items()}
    masks["op"] = op_mask(obs)
    masks["slot"] = slot_mask(obs, op) if op is not None else [True] * len(obs.slots)
    if slot is not None:
        masks["blueprint"] = blueprint_mask(obs, slot)
    return {h: masks[h] for h in HEADS}


def illegal_reason(action: FactoredAction, obs: Observation) -> str | None:
    """Why `action` is illegal in `obs`, or None when it is legal."""
    if action.op not in TAMIYO_OPS:
        return f"op {action.op.name} is not a growth-policy op"
    if action.op is Op.WAIT:
        return None
    if not 0 <= action.slot < len(obs.slots):
        return f"slot index {action.slot} out of range"
    slot = obs.slots[action.slot]
    if action.op is Op.GERMINATE and obs.growth_blocked is not None:
        return f"GERMINATE masked: {obs.growth_blocked}"
    if not slot_allows(slot, action.op):
        return f"{action.op.name} not allowed on slot {slot.name} in stage {slot.stage.name}"
    if action.op is Op.GERMINATE and action.blueprint not in obs.legal_blueprints[action.slot]:
        return f"blueprint {action.blueprint.name} not supported on slot {slot.name}"
    return None
