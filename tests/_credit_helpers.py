"""A hand-written recorded run for the estimator and critic tests: germinations, decision records
with known ablation contributions, and a fake value function over the audit's candidates."""

from __future__ import annotations

from pathlib import Path

from esper.audits.replay import Candidate, candidates_from_run
from esper.audits.retrain import AuditProtocol
from esper.recorder import DecisionRecord, RunStore

SLOTS = ("slots.b0", "slots.b1", "slots.b2")
TICKS = 8
# slot -> tick -> (stage, alpha, contribution); DORMANT with no contribution where absent.
SCRIPT: dict[str, dict[int, tuple[str, float, float | None]]] = {
    # A: germinated at 0, blends from 2, pruned at 4; the slot is germinated again at 5 (MLP).
    "slots.b0": {
        1: ("GERMINATED", 0.0, None),
        2: ("BLENDING", 0.3, 0.1),
        3: ("BLENDING", 0.6, 0.3),
        4: ("PRUNED", 0.0, None),
        6: ("TRAINING", 0.0, None),
        7: ("BLENDING", 0.5, 0.9),
    },
    # B: germinated at 1, blends from 3 on; last contribution 0.2.
    "slots.b1": {
        2: ("TRAINING", 0.0, None),
        3: ("BLENDING", 0.2, 0.05),
        5: ("BLENDING", 0.6, -0.1),
        6: ("BLENDING", 0.8, 0.2),
        7: ("HOLDING", 1.0, 0.2),
    },
    # C: germinated at 1, never passes G2: no contribution ever.
    "slots.b2": {t: ("TRAINING", 0.0, None) for t in range(2, TICKS)},
}
GERMINATIONS = [
    (0, "slots.b0", "CONV_LIGHT"),
    (1, "slots.b1", "CONV_SMALL"),
    (1, "slots.b2", "NORM"),
    (5, "slots.b0", "MLP"),
]
LAST_CONTRIBUTION = {"slots.b0": 0.3, "slots.b1": 0.2, "slots.b2": None}


def slot_states(t: int) -> list[dict]:
    out = []
    for name in SLOTS:
        known = [k for k in SCRIPT[name] if k <= t]  # a state holds until the next scripted one
        stage, alpha, contribution = SCRIPT[name][max(known)] if known else ("DORMANT", 0.0, None)
        out.append(
            {
                "name": name,
                "stage": stage,
                "alpha": alpha,
                "blueprint": None,
                "ticks_in_stage": 1,
                "contribution": contribution,
                "rent": 0.01,
            }
        )
    return out


def synthetic_run(path: Path, sense: str = "higher") -> list[Candidate]:
    """The scripted run; returns its audit candidates A (b0@0), B (b1@1), C (b2@1)."""
    store = RunStore.create(
        path, {"config": {}, "task": f"digits: CNN, accuracy ({sense} is better)"}
    )
    for t in range(TICKS):
        states = slot_states(t)
        obs = [t / TICKS, 0.5 + 0.01 * t, 1.0 - 0.05 * t, 1.1 - 0.05 * t, 300.0, 20.0 * t, 0.01 * t]
        for s in states:
            obs += [1.0, s["alpha"], 1.0, s["contribution"] or 0.0, s["rent"]]
        with store.tick(t) as tx:
            tx.decision(
                DecisionRecord(
                    env=0,
                    tick=t,
                    policy="script",
                    action={},
                    slot_states=states,
                    obs_before=obs,
                    obs_after=obs,
                    mask={},
                    probs={},
                    entropy={},
                    value=None,
                    reward=None,
                    spec_versions={},
                )
            )
            for tick, slot, blueprint in GERMINATIONS:
                if tick == t:
                    tx.event("germinate", {"blueprint": blueprint, "seed_id": "s"}, slot=slot)
    store.close()
    return candidates_from_run(path)


WORTH = {"slots.b0": 1.0, "slots.b1": 2.0, "slots.b2": -0.5}


def fake_value(protocol: AuditProtocol, candidates, subset: frozenset, repeat: int) -> float:
    """Additive worth per slot, a synergy of b0 and b1, an offset per repeat, all scaled by the
    budget (a shorter protocol sees a proportionally smaller game)."""
    slots = {c.slot for c in subset}
    v = sum(WORTH[s] for s in slots) + 3.0 * ({"slots.b0", "slots.b1"} <= slots)
    return (v + 0.1 * repeat * len(subset)) * protocol.ticks / 10


def bumpy_value(protocol: AuditProtocol, candidates, subset: frozenset, repeat: int) -> float:
    """`fake_value` plus a bonus for pairs: symmetric, so the same exact Shapley values, but an
    order's credit now depends on positions that an antithetic pair does not cancel."""
    return fake_value(protocol, candidates, subset, repeat) + 2.0 * (len(subset) == 2)
