"""VectorEnv's Ray backend: the K episodes shared over Ray actors give the in-process backend's
ticks bit for bit (an episode replacement and a governor rollback included); a failure inside an
actor surfaces as a RuntimeError carrying the actor's traceback; the backend refuses CUDA and an
address without it, and says how to install a missing Ray. One local Ray instance of 2 CPUs
serves the whole module (starting one takes seconds)."""

from __future__ import annotations

import itertools
import sys
from collections.abc import Iterator
from dataclasses import replace

import pytest
import torch

from esper.config import GrowConfig
from esper.contracts import FactoredAction
from esper.contracts.errors import BackendUnavailable
from esper.run import build_episode
from esper.tolaria.remote import RAY_MISSING
from esper.tolaria.vector import VectorEnv
from test_vector import BASE, K, make_venv, poisoned_second, random_policy, rollout, specs

# One xdist worker runs this module and tests/test_audit_backends.py (`make test` uses --dist
# loadgroup): one Ray instance at a time, not one per worker.
pytestmark = pytest.mark.xdist_group("ray")

EPISODE_TICKS = 3
TICKS = 5  # every tick of the first K episodes, then two of their replacements


def test_ray_actors_match_in_process_bit_for_bit(ray) -> None:
    # poisoned_second: the episode of position 1 hits a NaN at its tick 1 (a governor rollback
    # inside an actor); the same factory on both sides.
    obs_a, res_a = rollout(
        make_venv("inprocess", EPISODE_TICKS, poisoned_second), random_policy(), TICKS
    )
    venv = make_venv("ray", EPISODE_TICKS, poisoned_second)
    assert venv.backend == "ray" and [len(s) for s in venv._envs.shares] == [1, 2]  # workers=2
    obs_b, res_b = rollout(venv, random_policy(), TICKS)
    assert venv._envs.actors == [] and ray.is_initialized()  # closed; the module's Ray kept

    assert obs_a == obs_b  # every observation, tick by tick
    for a, b in zip(res_a, res_b, strict=True):
        assert torch.equal(a.rewards, b.rewards) and torch.equal(a.dones, b.dones)
        assert a.specs == b.specs
        assert a.outcomes == b.outcomes  # events, metrics, observations, weights_hash, ...
        for x, y in zip(a.outcomes, b.outcomes, strict=True):  # spelled out
            assert (x.events, x.metrics, x.observation) == (y.events, y.metrics, y.observation)
            assert x.weights_hash == y.weights_hash
    # What was compared: every episode finished (its final weights hashed) and was replaced,
    # the random policy grew seeds, and the poisoned episode was rolled back.
    assert [r.dones.tolist() for r in res_b] == [[False] * K] * 2 + [[True] * K] + [[False] * K] * 2
    assert all(o.weights_hash is not None for o in res_b[2].outcomes)
    assert [o.tick for o in obs_b[3]] == [0] * K
    assert any(o.ops for r in res_b for o in r.outcomes), "the random policy should have grown"
    assert any(e.kind == "governor_rollback" for e in res_b[1].outcomes[1].events)


def bad_spec(bad: int) -> Iterator[GrowConfig]:
    """One-tick episodes of `specs`, except spec `bad` names a task that does not exist."""
    for i, spec in enumerate(specs(episode_ticks=1)):
        yield replace(spec, task="no-such-task") if i == bad else spec


def test_an_actor_failure_is_a_runtime_error_with_its_traceback(ray) -> None:
    # One actor of two one-tick episodes; the replacement of position 0 cannot be built, so the
    # actor fails in `act`.
    with VectorEnv(build_episode, 2, bad_spec(2), backend="ray", workers=1) as venv:
        venv.observe()
        with pytest.raises(RuntimeError, match="a VectorEnv Ray actor failed") as info:
            venv.act([FactoredAction()] * 2)
    message = str(info.value)
    assert "Traceback" in message and "unknown task 'no-such-task'" in message
    assert "build_episode" in message  # the actor's own frames

    # Building an episode fails the same way, in the actor's constructor.
    with pytest.raises(RuntimeError, match="unknown task 'no-such-task'"):
        VectorEnv(build_episode, 1, bad_spec(0), backend="ray")
    assert ray.is_initialized()


def test_backend_names_address_and_device_are_checked() -> None:
    with pytest.raises(ValueError, match=r"unknown backend 'dask'; valid: auto, .*, ray"):
        VectorEnv(build_episode, K, specs(), backend="dask")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="needs backend='ray'"):
        VectorEnv(build_episode, K, specs(), backend="processes", ray_address="auto")
    cuda = replace(BASE, device="cuda")
    with pytest.raises(ValueError, match="the ray backend is CPU-only"):
        VectorEnv(build_episode, K, itertools.repeat(cuda), device="cuda", backend="ray")


def test_missing_ray_says_how_to_install_it(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    with pytest.raises(BackendUnavailable, match=r"pip install 'esper\[ray\]'") as info:
        VectorEnv(build_episode, K, specs(), backend="ray")
    assert str(info.value) == RAY_MISSING
