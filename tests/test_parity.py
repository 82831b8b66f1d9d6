"""One tick, every driver: the same config, policy and seed played as a recorded run (`GrowthRun`)
and as one of K episodes of a `VectorEnv` (K = 1 and 3, in-process and in worker processes) give
the same decisions, rewards, events (the whole flight record, hashed) and final weights — with
the heuristic, the seeded random policy and a learned policy (most probable actions; seeded
random weights, as the shipped policy predates the current blueprint library), and in runs with an
illegal action and with a governor rollback."""

from __future__ import annotations

import functools
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from _engine_helpers import FAST_HEURISTIC
from esper.config import GrowConfig, HostConfig
from esper.contracts import RELEVANT_HEADS, FactoredAction, Observation, Op
from esper.recorder import RunStore
from esper.run import build_episode, load_policy, record_tick, start_run
from esper.tamiyo.learned import LearnedPolicy
from esper.tamiyo.policies import Decision, Policy
from esper.tolaria.environment import EnvConfig, GrowthEnv
from esper.tolaria.episode import Episode
from esper.tolaria.vector import VectorEnv

TICKS = 8
BASE = GrowConfig(
    ticks=TICKS,
    device="cpu",
    host=HostConfig(width=2, depth=3),  # the shipped learned policy's training host
    env=EnvConfig(batches_per_tick=2, eval_samples=256),
    heuristic=FAST_HEURISTIC,
)
SEEDS = (11, 12, 13)
WIDTHS = (2, 3, 2)
ILLEGAL_TICK, POISON_TICK = 2, 5


def config(policy: str, i: int) -> GrowConfig:
    host = replace(BASE.host, width=WIDTHS[i])
    policy = str(learned_policy_file()) if policy == "learned" else policy
    return replace(BASE, policy=policy, seed=SEEDS[i], host=host)


@functools.cache
def learned_policy_file() -> Path:
    """A learned policy with seeded random weights (one file per process)."""
    path = Path(tempfile.mkdtemp(prefix="esper-parity-")) / "policy.safetensors"
    LearnedPolicy(hidden=32, seed=0).save(path)
    return path


# ---------------------------------------------------------------------------------------------
# Variants: an illegal action, a governor rollback (module level: worker processes import them)
# ---------------------------------------------------------------------------------------------


class IllegalAt:
    """`inner`, except at tick ILLEGAL_TICK: FOSSILIZE on a slot that holds no seed."""

    def __init__(self, inner: Policy) -> None:
        self.inner, self.name = inner, inner.name

    def act(self, obs: Observation) -> Decision:
        if obs.tick != ILLEGAL_TICK:
            return self.inner.act(obs)
        empty = next(i for i, s in enumerate(obs.slots) if s.seed_id is None)
        return Decision(FactoredAction(op=Op.FOSSILIZE, slot=empty), mask={}, reason="illegal")

    def state_dict(self) -> dict[str, Any]:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.inner.load_state_dict(state)


class PoisonSeed:
    """At tick POISON_TICK, NaN into the youngest live seed's weights (else the host's)."""

    def __call__(self, t: int, env: GrowthEnv) -> None:
        if t != POISON_TICK:
            return
        live = [s for s in env.slots.values() if s.seed is not None]
        params = live[-1].seed.parameters() if live else env.model.parameters()
        with torch.no_grad():
            next(params).fill_(float("nan"))


def poisoned(cfg: GrowConfig) -> Episode:
    return build_episode(cfg, callbacks=[PoisonSeed()])


MAKERS = {"plain": build_episode, "faults": poisoned}
"""plain; faults: an illegal action at ILLEGAL_TICK and a poisoned seed at POISON_TICK."""


def policy_for(cfg: GrowConfig, variant: str) -> Policy:
    policy = load_policy(cfg)
    return IllegalAt(policy) if variant == "faults" else policy


# ---------------------------------------------------------------------------------------------
# The two drivers
# ---------------------------------------------------------------------------------------------


def run_dir(policy: str, i: int, variant: str, root: Path) -> Path:
    return root / f"run-{policy}-{i}-{variant}"


@functools.cache
def reference(policy: str, i: int, variant: str, root: Path) -> tuple[str, str]:
    """(event-log hash, final weights hash) of the recorded run."""
    cfg = config(policy, i)
    callbacks = [PoisonSeed()] if variant == "faults" else []
    run = start_run(
        cfg,
        policy=policy_for(cfg, variant),
        run_dir=run_dir(policy, i, variant, root),
        callbacks=callbacks,
    )
    result = run.run()
    run.store.close()
    return result.event_log_hash, result.weights_hash


def vector_run(
    policy: str, variant: str, k: int, backend: str, root: Path
) -> list[tuple[str, str, RunStore]]:
    """Each of the k episodes, recorded as a run records itself: (event-log hash, weights hash,
    store)."""
    cfgs = [config(policy, i) for i in range(k)]
    policies = [policy_for(c, variant) for c in cfgs]
    learned = policy == "learned"
    stores = [
        RunStore.create(root / f"vec-{policy}-{variant}-{k}-{backend}-{i}", {}) for i in range(k)
    ]
    hashes: list[str | None] = [None] * k
    # Episodes end at TICKS; later specs are never used (the vector stops there).
    specs = iter([*cfgs, *cfgs])
    with VectorEnv(MAKERS[variant], k, specs, backend=backend, workers=2) as venv:
        for t in range(TICKS):
            obs = venv.observe()
            if learned:  # one batched forward for all k (the deployed learned policy, batched)
                decisions = policies[0].act_batch(obs)  # type: ignore[attr-defined]
            else:
                decisions = [p.act(o) for p, o in zip(policies, obs, strict=True)]
            result = venv.act([d.action for d in decisions], [d.reason for d in decisions])
            for i, outcome in enumerate(result.outcomes):
                with stores[i].tick(t) as tx:
                    record_tick(tx, 0, policies[i].name, decisions[i], obs[i], outcome)
                hashes[i] = outcome.weights_hash or hashes[i]
    return [(s.event_log_hash(), str(h), s) for s, h in zip(stores, hashes, strict=True)]


def check(policy: str, variant: str, k: int, backend: str, root: Path) -> list[RunStore]:
    got = vector_run(policy, variant, k, backend, root)
    for i, (events, weights, _) in enumerate(got):
        assert (events, weights) == reference(policy, i, variant, root), (
            f"{policy}/{variant}, episode {i} of {k} ({backend}) differs from its recorded run"
        )
    return [s for _, _, s in got]


def kinds(store: RunStore) -> set[str]:
    return {e.kind for e in store.events()}


# ---------------------------------------------------------------------------------------------
# The parity tests
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("parity")


@pytest.mark.parametrize("policy", ["heuristic", "random"])
@pytest.mark.parametrize("k", [1, 3])
def test_vector_in_process_equals_recorded_runs(policy: str, k: int, root: Path) -> None:
    stores = check(policy, "plain", k, "inprocess", root)
    assert any("germinate" in kinds(s) for s in stores), "no growth: the parity would be thin"


@pytest.mark.parametrize("backend", ["inprocess", "processes"])
def test_an_illegal_action_and_a_rollback_are_the_same_in_every_driver(
    backend: str, root: Path
) -> None:
    stores = check("heuristic", "faults", 3, backend, root)
    for store in stores:
        (event,) = store.events("rejected_action")
        assert event.tick == ILLEGAL_TICK and event.payload["op"] == "FOSSILIZE"
        assert {"governor_nan", "governor_rollback"} <= kinds(store)
        assert all(e.tick == POISON_TICK for e in store.events("governor_rollback"))


def test_the_random_policy_in_worker_processes_equals_recorded_runs(root: Path) -> None:
    check("random", "plain", 3, "processes", root)


def test_the_learned_policy_one_at_a_time_equals_a_recorded_run(root: Path) -> None:
    check("learned", "plain", 1, "inprocess", root)


def test_the_learned_policy_batched_differs_only_in_the_last_bits(root: Path) -> None:
    # Argmax actions, so no RNG; but a forward over K stacked observations rounds differently
    # from K single ones (batched matmuls), so the probabilities, entropies and V(s) recorded
    # differ in their last bits, and a head the op ignores (the slot of a WAIT) can flip on a
    # near tie. Everything that acts matches exactly: the op and its heads, hence the run.
    got = vector_run("learned", "plain", 3, "inprocess", root)
    for i, (_, weights, store) in enumerate(got):
        _, ref_weights = reference("learned", i, "plain", root)
        assert weights == ref_weights
        with RunStore.open(run_dir("learned", i, "plain", root)) as ref:
            mine, theirs = store.events(), ref.events()
            assert [(e.tick, e.kind, e.slot) for e in mine] == [
                (e.tick, e.kind, e.slot) for e in theirs
            ]
            for a, b in zip(mine, theirs, strict=True):
                if a.kind != "decision":
                    assert a.payload == b.payload
            for a, b in zip(store.decisions(), ref.decisions(), strict=True):
                heads = RELEVANT_HEADS[Op[a.action["op"]]]
                assert {h: a.action[h] for h in heads} == {h: b.action[h] for h in heads}
                assert (a.reward, a.obs_before, a.obs_after) == (
                    b.reward,
                    b.obs_before,
                    b.obs_after,
                )
                for head, probs in a.probs.items():
                    assert probs == pytest.approx(b.probs[head], abs=1e-6)
                assert a.value == pytest.approx(b.value, abs=1e-5)
