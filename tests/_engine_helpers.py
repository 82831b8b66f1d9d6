"""Shared helpers for the engine's tests: small configs, cached tasks, and an episode driven one
control tick at a time by hand (the episode's own tick: `Episode.observe`, then `Episode.act`),
without a policy or the recorder."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from esper.config import GrowConfig, HostConfig
from esper.contracts import Blueprint, FactoredAction, Op, Stage, Tempo
from esper.kasmina import CNNHost, SeedSlot, TransformerHost
from esper.run import build_episode
from esper.tamiyo.policies import HeuristicConfig
from esper.tolaria.data import TaskData, load_task
from esper.tolaria.environment import EnvConfig, GrowthEnv
from esper.tolaria.episode import Episode, Outcome

# A heuristic that grows from tick 1 and judges a held seed after one tick.
FAST_HEURISTIC = HeuristicConfig(warmup_ticks=1, plateau_patience=0, hold_ticks=1)


def small_config(ticks: int = 10, **kw: object) -> GrowConfig:
    """A digits run of a few ticks of 4 batches each, on the CPU."""
    kw.setdefault("heuristic", FAST_HEURISTIC)
    kw.setdefault("env", EnvConfig(batches_per_tick=4))
    return GrowConfig(ticks=ticks, device="cpu", **kw)


@functools.cache
def digits() -> TaskData:
    """The digits task (seed 0), built once per test process: its tensors are never written."""
    return load_task("digits", seed=0)


@functools.cache
def tiny_text() -> TaskData:
    return load_task("text", text_bytes=20_000, seq_len=32)


def text_config(ticks: int = 4, **kw: object) -> GrowConfig:
    kw.setdefault("heuristic", FAST_HEURISTIC)
    kw.setdefault("env", EnvConfig(batches_per_tick=3, batch_size=16, eval_samples=64))
    return GrowConfig(
        task="text", ticks=ticks, device="cpu", host=HostConfig(width=32, depth=1), **kw
    )


def finite_params(model: torch.nn.Module) -> bool:
    return all(torch.isfinite(p).all() for p in model.parameters())


def finite(x: float) -> bool:
    return math.isfinite(x)


# ---------------------------------------------------------------------------------------------
# An episode driven by hand
# ---------------------------------------------------------------------------------------------

Decide = Callable[[GrowthEnv], FactoredAction | None]


@dataclass
class Driver:
    """An episode; `tick(action)` is one control tick with that action."""

    episode: Episode

    @property
    def env(self) -> GrowthEnv:
        return self.episode.env

    @property
    def t(self) -> int:
        return self.episode.t

    def tick(self, action: FactoredAction | Decide | None = None) -> Outcome:
        """`action` may be a function of the env, called after the gates (as a policy is). An
        action the episode rejects fails the test."""
        self.episode.observe()
        if callable(action):
            action = action(self.env)
        outcome = self.episode.act(action or FactoredAction())
        assert outcome.rejected is None, outcome.rejected
        return outcome

    def slot(self, i: int) -> SeedSlot:
        return self.env.slot_at(i)

    def grow(self, i: int, stage: Stage, blueprint: Blueprint = Blueprint.CONV_LIGHT) -> SeedSlot:
        """Take DORMANT slot `i` to `stage` through real ticks and actions (α ramp: FAST)."""
        order = [Stage.GERMINATED, Stage.TRAINING, Stage.BLENDING, Stage.HOLDING, Stage.COMMITTED]
        slot = self.slot(i)
        self.tick(FactoredAction(op=Op.GERMINATE, slot=i, blueprint=blueprint, tempo=Tempo.FAST))
        if order.index(stage) >= 1:
            self.tick(FactoredAction(op=Op.ADVANCE, slot=i))
        if order.index(stage) >= 2:

            def blend_if_passed(env: GrowthEnv) -> FactoredAction | None:
                gate = slot.last_gate
                return FactoredAction(op=Op.ADVANCE, slot=i) if gate and gate.passed else None

            for _ in range(5):  # G2 needs one training tick; allow a few
                if slot.stage is Stage.BLENDING:
                    break
                self.tick(blend_if_passed)
            assert slot.stage is Stage.BLENDING, str(slot.last_gate)
        if order.index(stage) >= 3:
            while slot.schedule.ticks_left > 0:
                self.tick()
            self.tick(FactoredAction(op=Op.ADVANCE, slot=i))
        if order.index(stage) >= 4:
            self.tick(FactoredAction(op=Op.FOSSILIZE, slot=i))
        assert slot.stage is stage
        return slot


def _driver(model: torch.nn.Module, task: TaskData, seed: int, env: EnvConfig) -> Driver:
    cfg = GrowConfig(ticks=10_000, seed=seed, device="cpu", env=env)
    return Driver(build_episode(cfg, model=model, task=task))


def cnn_driver(seed: int = 0, width: int = 4, **env_kw: object) -> Driver:
    torch.manual_seed(seed)
    task = digits()
    model = CNNHost(width, 2, 1, task.num_outputs, 8)
    env_kw.setdefault("batches_per_tick", 3)
    return _driver(model, task, seed, EnvConfig(**env_kw))


def text_driver(seed: int = 0, **env_kw: object) -> Driver:
    torch.manual_seed(seed)
    task = tiny_text()
    model = TransformerHost(task.num_outputs, 16, 1, 2, task.train_x.shape[1])
    env_kw.setdefault("batches_per_tick", 3)
    env_kw.setdefault("batch_size", 16)
    env_kw.setdefault("eval_samples", 64)
    return _driver(model, task, seed, EnvConfig(**env_kw))
