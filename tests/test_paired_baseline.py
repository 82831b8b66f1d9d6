"""The paired counterfactual baseline (issue 15, signal to noise): each training episode beside
its host-alone twin, the reward their difference — checked against separately run episodes."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from esper.config import GrowConfig
from esper.contracts import Blueprint, FactoredAction, Op
from esper.contracts.errors import ConfigError
from esper.recorder import RunStore
from esper.run import build_episode
from esper.tamiyo.imitation import ImitationConfig
from esper.tolaria.environment import EnvConfig
from esper.tolaria.vector import PairedVectorEnv, VectorEnv
from esper.train_policy import TrainPolicyConfig, episode_specs, train_policy

TICKS, STEPS = 3, 5  # every position finishes one episode and starts the next


def _cfg(**kw: object) -> TrainPolicyConfig:
    episode = GrowConfig(ticks=TICKS, device="cpu", env=EnvConfig(batches_per_tick=2))
    return TrainPolicyConfig(episode=episode, num_envs=2, backend="inprocess", **kw)  # type: ignore[arg-type]


def _action(t: int, i: int) -> FactoredAction:
    """Env 0 germinates at the start of each episode; env 1 only waits."""
    if i == 0 and t % TICKS == 0:
        return FactoredAction(op=Op.GERMINATE, slot=0, blueprint=Blueprint.CONV_LIGHT)
    return FactoredAction()


def _alone(spec: GrowConfig, actions: list[FactoredAction]) -> list[float]:
    """The rewards of one episode run by itself with `actions`."""
    episode = build_episode(spec)
    out = []
    for a in actions:
        episode.observe()
        out.append(episode.act(a).reward.total)
    return out


def test_paired_rewards_equal_the_episode_minus_its_host_alone_twin_run_separately() -> None:
    cfg = _cfg()
    main = VectorEnv(build_episode, 2, episode_specs(cfg), backend="inprocess")
    twin = VectorEnv(build_episode, 2, episode_specs(cfg), backend="inprocess")
    rewards, baselines, specs = [], [], []
    with PairedVectorEnv(main, twin) as venv:
        for t in range(STEPS):
            venv.observe()
            result = venv.act([_action(t, i) for i in range(2)])
            rewards.append(result.rewards)
            baselines.append(result.baseline)
            specs.append(result.specs)
    assert rewards[0][0] != 0  # the germination's churn: the pair differs from tick 0 on
    for i in range(2):
        for first in (0, TICKS):  # the position's first episode and its replacement
            ticks = range(first, min(first + TICKS, STEPS))
            spec = specs[first][i]
            assert all(specs[t][i] == spec for t in ticks)
            episode = _alone(spec, [_action(t, i) for t in ticks])
            host = _alone(spec, [FactoredAction() for _ in ticks])
            for k, t in enumerate(ticks):
                assert baselines[t][i].item() == host[k]
                assert rewards[t][i].item() == episode[k] - host[k]
    # env 1 only waits: it is its twin, so its paired reward is exactly 0 every tick
    assert torch.equal(torch.stack(rewards)[:, 1], torch.zeros(STEPS, dtype=torch.float64))


def test_twins_on_another_spec_stream_are_refused() -> None:
    cfg = _cfg()
    main = VectorEnv(build_episode, 2, episode_specs(cfg), backend="inprocess")
    other = VectorEnv(build_episode, 2, episode_specs(replace(cfg, seed=1)), backend="inprocess")
    with pytest.raises(ValueError, match="same K specs"):
        PairedVectorEnv(main, other)
    main.close()
    other.close()


def test_training_with_the_paired_baseline_and_the_anchor(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="baseline must be one of none, paired"):
        _cfg(baseline="lagged")
    with pytest.raises(ConfigError, match="anchor needs a warm start"):
        _cfg(anchor=1.0, imitation=ImitationConfig(teacher=None))
    logs: list[dict] = []
    cfg = _cfg(
        baseline="paired",
        anchor=1.0,
        anchor_updates=2,
        num_steps=3,
        updates=2,
        eval_every=0,
        out=str(tmp_path),
        imitation=ImitationConfig(episodes=2, epochs=2),
    )
    train_policy(cfg, log=lambda u, info: logs.append(info))
    assert [info["update"] for info in logs] == [0, 1, 2]
    assert [info["anchor_coef"] for info in logs[1:]] == [1.0, 0.5]  # annealed linearly
    assert logs[1]["anchor_kl"] > 0
    clone = logs[0]["imitation"]["accuracy"]
    for info in logs[1:]:  # agreement with the teacher's decisions, head by head, as PPO moves
        assert set(info["teacher_agreement"]) == set(clone)
        assert all(0.0 <= v <= 1.0 for v in info["teacher_agreement"].values())
    with RunStore.open(tmp_path / "run") as store:
        assert len(store.decisions()) == 2 * 3 * 2
