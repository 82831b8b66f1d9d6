"""VectorEnv: K episodes in lockstep, one policy call per tick, auto-reset, backends, and the
governor acting on one episode alone. (That the vector's tick is the recorded run's, bit for bit,
is tests/test_parity.py.)"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace

import pytest
import torch

from _engine_helpers import digits
from esper.config import GrowConfig, HostConfig
from esper.contracts import FactoredAction, LifecycleConfig, Observation, Op
from esper.kasmina import slots_of
from esper.run import build_episode
from esper.tamiyo.policies import RandomPolicy
from esper.tolaria.environment import EnvConfig, GrowthEnv
from esper.tolaria.episode import Episode
from esper.tolaria.vector import StepResult, VectorEnv

K = 3
SPEC_SEED = 8
WIDTHS = (3, 4, 2)
BASE = GrowConfig(
    device="cpu",
    host=HostConfig(width=2, depth=2),
    env=EnvConfig(batches_per_tick=2, eval_samples=128),
)
Policy = Callable[[Sequence[Observation]], list[FactoredAction]]


def specs(episode_ticks: int = 3, base: GrowConfig = BASE) -> Iterator[GrowConfig]:
    """Episode i: seed SPEC_SEED + i, host width WIDTHS[i % 3]."""
    for i in itertools.count():
        host = replace(base.host, width=WIDTHS[i % len(WIDTHS)])
        yield replace(base, ticks=episode_ticks, seed=SPEC_SEED + i, host=host)


def make_venv(
    backend: str = "inprocess", episode_ticks: int = 3, make: Callable = build_episode
) -> VectorEnv:
    return VectorEnv(make, K, specs(episode_ticks), backend=backend, workers=2)


def random_policy(k: int = K) -> Policy:
    policies = [RandomPolicy(i) for i in range(k)]
    return lambda obs: [p.act(o).action for p, o in zip(policies, obs, strict=True)]


def rollout(
    venv: VectorEnv, policy: Policy, ticks: int
) -> tuple[list[list[Observation]], list[StepResult]]:
    observations, results = [], []
    with venv:
        for _ in range(ticks):
            obs = venv.observe()
            observations.append(obs)
            results.append(venv.act(policy(obs)))
    return observations, results


def test_lockstep_ticks_one_policy_call_and_auto_reset() -> None:
    calls: list[int] = []
    inner = random_policy()

    def policy(obs: Sequence[Observation]) -> list[FactoredAction]:
        calls.append(len(obs))
        return inner(obs)

    venv = make_venv(episode_ticks=3)
    first_specs = list(venv.specs)
    observations, results = rollout(venv, policy, ticks=4)
    assert calls == [K] * 4  # once per tick, with every episode's observation
    assert [[o.tick for o in obs] for obs in observations] == [[0] * K, [1] * K, [2] * K, [0] * K]
    assert [r.dones.tolist() for r in results] == [[False] * K] * 2 + [[True] * K, [False] * K]
    assert all(r.rewards.shape == (K,) and r.rewards.dtype == torch.float64 for r in results)
    # done: the result carries the finished episode's spec and final metric; then a fresh host
    expected = list(itertools.islice(specs(3), 2 * K))
    assert first_specs == expected[:K] and venv.specs == expected[K:]
    for i in range(K):
        assert results[2].specs[i] == first_specs[i]
        assert results[2].outcomes[i].metric == observations[2][i].metric
        assert results[2].outcomes[i].weights_hash is not None  # the episode's final weights
        assert results[3].specs[i] == venv.specs[i]
        assert len(observations[3][i].history) == 1  # the new episode's first evaluation
        assert observations[3][i].seed_params == 0


def test_each_episode_is_its_own_config() -> None:
    obs = make_venv().observe()
    first = list(itertools.islice(specs(), K))
    params = [o.host_params for o in obs]
    assert params == [build_episode(c).env.host_params() for c in first]
    assert len(set(params)) == K  # widths 3, 4, 2


def test_lifecycle_config_reaches_every_slot() -> None:
    lifecycle = LifecycleConfig(embargo_ticks=7, reset_ticks=2)
    venv = VectorEnv(
        build_episode, K, specs(2, replace(BASE, lifecycle=lifecycle)), backend="inprocess"
    )
    for episode in venv._envs.episodes:
        assert all(s.lifecycle.config == lifecycle for s in slots_of(episode.env.model).values())


def test_illegal_actions_are_recorded_and_execute_nothing() -> None:
    # FOSSILIZE on a DORMANT slot and a slot index out of range: both illegal at tick 0.
    illegal = [
        FactoredAction(op=Op.FOSSILIZE, slot=0),
        FactoredAction(op=Op.GERMINATE, slot=9),
        FactoredAction(op=Op.WAIT),
    ]
    _, bad = rollout(make_venv(), lambda obs: list(illegal), ticks=2)
    _, wait = rollout(make_venv(), lambda obs: [FactoredAction()] * K, ticks=2)
    first = bad[0].outcomes
    assert first[0].rejected is not None and "FOSSILIZE" in first[0].rejected
    assert first[1].rejected is not None and "out of range" in first[1].rejected
    assert first[2].rejected is None
    for outcome, reason in zip(first[:2], ("FOSSILIZE", "out of range"), strict=True):
        (event,) = [e for e in outcome.events if e.kind == "rejected_action"]
        assert reason in event.payload["reason"] and event.payload["op"] in (
            "FOSSILIZE",
            "GERMINATE",
        )
    assert all(o.ops == () for r in bad for o in r.outcomes)
    for b, w in zip(bad, wait, strict=True):
        assert torch.equal(b.rewards, w.rewards)


def test_reward_of_a_host_that_never_grows_is_its_metric() -> None:
    # Known answer: no seed, so no rent and no churn; R_task = accuracy (the `level` reward).
    observations, results = rollout(
        make_venv(episode_ticks=5), lambda obs: [FactoredAction()] * K, ticks=3
    )
    for i in range(K):
        expected = [obs[i].metric for obs in observations]
        assert [r.rewards[i].item() for r in results] == pytest.approx(expected, abs=1e-12)


def test_two_instances_replay_identically() -> None:
    obs_a, res_a = rollout(make_venv(), random_policy(), ticks=4)
    obs_b, res_b = rollout(make_venv(), random_policy(), ticks=4)
    assert obs_a == obs_b
    assert all(torch.equal(a.rewards, b.rewards) for a, b in zip(res_a, res_b, strict=True))
    assert [a.outcomes for a in res_a] == [b.outcomes for b in res_b]
    assert any(o.ops for r in res_a for o in r.outcomes), "the random policy should have grown"


def test_process_backend_matches_in_process() -> None:
    # Each episode owns its RNG stream and data order, so which process runs it does not matter.
    obs_a, res_a = rollout(make_venv("inprocess"), random_policy(), ticks=4)
    venv = make_venv("processes")
    assert venv.backend == "processes"
    obs_b, res_b = rollout(venv, random_policy(), ticks=4)
    assert obs_a == obs_b
    assert all(torch.equal(a.rewards, b.rewards) for a, b in zip(res_a, res_b, strict=True))
    assert [a.outcomes for a in res_a] == [b.outcomes for b in res_b]


def test_tick_order_is_enforced() -> None:
    venv = make_venv()
    with pytest.raises(RuntimeError, match="before observe"):
        venv.act([FactoredAction()] * K)
    venv.observe()
    with pytest.raises(RuntimeError, match="twice"):
        venv.observe()
    with pytest.raises(ValueError, match="expected 3 actions"):
        venv.act([FactoredAction()])


# ---------------------------------------------------------------------------------------------
# The governor: a NaN in one episode rolls that episode back, alone, and is recorded
# ---------------------------------------------------------------------------------------------


class PoisonHost:
    """At tick `tick`, NaN into the host's first weight (picklable: module level)."""

    def __init__(self, tick: int) -> None:
        self.tick = tick

    def __call__(self, t: int, env: GrowthEnv) -> None:
        if t == self.tick:
            with torch.no_grad():
                next(env.model.parameters()).fill_(float("nan"))


def poisoned_second(cfg: GrowConfig) -> Episode:
    """`build_episode`, with the episode of seed SPEC_SEED + 1 poisoned at its tick 1."""
    callbacks = [PoisonHost(1)] if cfg.seed == SPEC_SEED + 1 else []
    return build_episode(cfg, callbacks=callbacks)


def test_a_nan_rolls_back_that_episode_only() -> None:
    # (in worker processes too: tests/test_parity.py)
    _, clean = rollout(make_venv(), random_policy(), ticks=3)
    _, hit = rollout(make_venv(make=poisoned_second), random_policy(), ticks=3)
    kinds = [[e.kind for e in r.outcomes[1].events] for r in hit]
    assert kinds[1][:2] == ["governor_nan", "governor_rollback"]
    for i in (0, 2):  # the others are untouched, bit for bit
        assert [r.outcomes[i] for r in hit] == [r.outcomes[i] for r in clean]
    assert not any(
        e.kind.startswith("governor") for r in clean for o in r.outcomes for e in o.events
    )
    # the rolled-back episode trained its tick again from the snapshot and goes on finite
    assert all(torch.isfinite(r.rewards).all() for r in hit)


# ---------------------------------------------------------------------------------------------
# Overlap (CUDA) and the split tick
# ---------------------------------------------------------------------------------------------


def test_overlap_is_cuda_only() -> None:
    assert make_venv().overlap is False  # CPU: nothing to overlap, the one-phase path runs
    assert make_venv()._envs.two_phase is False


def test_two_phase_tick_equals_one_phase_bit_for_bit() -> None:
    # The CUDA overlap path (launch all, read back once, finish in order) run on the CPU without
    # streams: the split train/evaluate must change no result, a governor rollback included.
    obs_a, res_a = rollout(make_venv(make=poisoned_second), random_policy(), ticks=4)
    venv = make_venv(make=poisoned_second)
    venv._envs.two_phase = True
    obs_b, res_b = rollout(venv, random_policy(), ticks=4)
    assert obs_a == obs_b
    assert all(torch.equal(a.rewards, b.rewards) for a, b in zip(res_a, res_b, strict=True))
    assert [a.outcomes for a in res_a] == [b.outcomes for b in res_b]
    assert any(o.ops for r in res_a for o in r.outcomes), "the random policy should have grown"
    assert any(e.kind == "governor_rollback" for r in res_b for o in r.outcomes for e in o.events)


def test_split_train_and_evaluate_equal_the_fused_calls() -> None:
    cfg = next(specs())

    def env() -> GrowthEnv:
        return build_episode(cfg, task=digits()).env

    a, b = env(), env()
    assert a.train_tick() == b.finish_train(b.train_tick_async())
    assert a.evaluate() == b.finish_evaluate(b.evaluate_async())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_overlap_matches_serial() -> None:
    # Each episode runs the same kernels on the same data either way, on its own stream or not,
    # so the results are expected to be identical; the tolerance (1e-6) only allows for a kernel
    # that is nondeterministic across runs (cuDNN is pinned to deterministic algorithms here).
    base = replace(BASE, device="cuda")

    def run(overlap: bool) -> tuple[list[list[Observation]], list[StepResult]]:
        venv = VectorEnv(
            build_episode, 4, specs(3, base), device="cuda", backend="inprocess", overlap=overlap
        )
        assert venv.overlap is overlap
        return rollout(venv, random_policy(4), ticks=5)

    with torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=True):
        obs_a, res_a = run(overlap=False)
        obs_b, res_b = run(overlap=True)
    for a, b in zip(res_a, res_b, strict=True):
        assert torch.allclose(a.rewards, b.rewards, rtol=0.0, atol=1e-6)
        assert torch.equal(a.dones, b.dones)
        assert [o.ops for o in a.outcomes] == [o.ops for o in b.outcomes]
        assert [o.metric for o in a.outcomes] == pytest.approx(
            [o.metric for o in b.outcomes], abs=1e-6
        )
    for xs, ys in zip(obs_a, obs_b, strict=True):
        for x, y in zip(xs, ys, strict=True):
            assert (x.metric, x.val_loss, x.train_loss) == pytest.approx(
                (y.metric, y.val_loss, y.train_loss), abs=1e-6
            )
            assert [s.stage for s in x.slots] == [s.stage for s in y.slots]
            assert [s.gate_passed for s in x.slots] == [s.gate_passed for s in y.slots]
    assert any(o.ops for r in res_a for o in r.outcomes), "the random policy should have grown"
