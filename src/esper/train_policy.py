"""`esper train-policy`: Phase 1, PPO over vectorised growth environments (CleanRL-style).

    config → vector envs → policy → warm start → [rollout (T × K) → GAE → PPO update → log]×U

The warm start (`tamiyo.imitation`) records a few episodes of a teacher (the heuristic) in the
same environments, clones its decisions and fits the value head to its returns; PPO then starts
from there. `imitation.teacher = None` starts PPO from a random initialisation instead.

Each environment draws its host seed, data order and host width from `widths` (held-out seeds
≥ 1000 are never drawn), so the policy sees variety. Every decision of every episode goes to the
flight recorder of the training run; the policy is checkpointed (weights-only, with its
normalisers) after every update, together with the optimizer, so training resumes at an update
boundary (environments restart their episodes from fresh specs on resume).
"""

from __future__ import annotations

import itertools
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from esper.config import config_to_dict
from esper.contracts import LifecycleConfig, Observation, Op
from esper.kasmina import CNNHost, save_tensors
from esper.recorder import DecisionRecord, RunStore, build_manifest
from esper.run import SPEC_VERSIONS, action_names, obs_vector, slot_state
from esper.simic import Critic, EconomyConfig, load_critic
from esper.tamiyo.features import featurize_batch
from esper.tamiyo.imitation import (
    Demonstrations,
    ImitationConfig,
    action_indices,
    imitation_update,
)
from esper.tamiyo.learned import LearnedPolicy
from esper.tamiyo.masks import illegal_reason
from esper.tamiyo.policies import make_policy
from esper.tamiyo.ppo import (
    HealthMonitor,
    PPOConfig,
    RewardScaler,
    RolloutBuffer,
    UpdateStats,
    compute_gae,
    ppo_update,
)
from esper.tolaria.data import load_task
from esper.tolaria.determinism import seed_everything
from esper.tolaria.environment import EnvConfig
from esper.tolaria.vector import EnvSpec, VectorEnv, sample_specs, spec_stream


@dataclass(frozen=True)
class TrainPolicyConfig:
    """Everything `esper train-policy` needs."""

    task: str = "digits"
    num_envs: int = 8
    """K environments stepped in lockstep."""
    episode_ticks: int = 40
    """Control ticks per growth episode (the `esper grow` default, so the shipped policy is
    trained in the setting it is deployed in)."""
    num_steps: int = 40
    """Ticks per rollout (per environment) between PPO updates."""
    updates: int = 50
    """PPO updates (the budget below may stop training earlier)."""
    budget_minutes: float = 55.0
    """Wall-clock budget; training stops after the update that crosses it."""
    seed: int = 0
    widths: tuple[int, ...] = (2, 3, 4)
    """Host widths environments draw from (the impaired CNN and two slightly wider ones)."""
    depth: int = 3
    backend: str = "auto"
    """Vector env backend: auto, inprocess, processes."""
    hidden: int = 128
    eval_every: int = 10
    """Evaluate the deterministic policy on held-out environments every this many updates
    (and after the last); 0 turns it off."""
    eval_envs: int = 2
    """Held-out environments (host and data seeds ≥ 1000, never drawn in training)."""
    out: str = "policies/digits"
    critic: str | None = None
    """A critic file (`esper train-critic`): each seed's predicted audit φ, read `lag` ticks
    after it germinated, is added to that tick's training reward × `critic_weight` (paper
    §5.4: audited credit without an audit at training time). None: the economy alone."""
    critic_weight: float = 1.0
    env: EnvConfig = field(default_factory=EnvConfig)
    """One epoch per tick, as `esper grow`: shorter ticks end episodes before the width-2 host
    plateaus, and growth cannot pay before then (bench/RESULTS.md)."""
    economy: EconomyConfig = field(default_factory=EconomyConfig)
    ppo: PPOConfig = field(
        default_factory=lambda: PPOConfig(
            clip_vloss=False, lr=3e-4, update_epochs=4, ent_coef=0.001
        )
    )
    """Tuned for fine-tuning the warm start in ~50 updates: small steps (lr 3e-4, 4 epochs) and
    a small entropy bonus (summed over up to 8 heads) so PPO refines the clone rather than
    washing it out; value clipping off (it holds V within ±clip_coef of the rollout's values
    per update, so the critic would not reach the returns in tens of updates; Andrychowicz et
    al. 2021 found it no help either). From a random start (`imitation.teacher = None`) the
    run in bench/RESULTS.md used lr 1e-3, 8 epochs, entropy 0.003: lr 3e-4 × 4 epochs moved a
    near-uniform policy by KL ~0.002 per update."""
    imitation: ImitationConfig = field(default_factory=ImitationConfig)
    """The warm start: behaviour cloning of a teacher before PPO (`teacher=None`: none)."""


def _host(in_channels: int, classes: int, size: int, depth: int, spec: EnvSpec) -> nn.Module:
    return CNNHost(spec.width, depth, in_channels, classes, size, lifecycle=LifecycleConfig())


def _record(
    store: RunStore,
    tick: int,
    obs: list[Observation],
    decisions: list[Any],
    rewards: torch.Tensor,
    metrics: dict[str, float],
    policy: str = "learned",
) -> None:
    with store.tick(tick) as tx:
        tx.metrics(metrics)
        for i, (o, d) in enumerate(zip(obs, decisions, strict=True)):
            tx.decision(
                DecisionRecord(
                    env=i,
                    tick=tick,
                    policy=policy,
                    action=action_names(d.action),
                    slot_states=[slot_state(s) for s in o.slots],
                    obs_before=obs_vector(o),
                    obs_after=None,
                    mask=d.mask,
                    probs=d.probs,
                    entropy=d.entropy,
                    value=d.value,
                    reward=float(rewards[i]),
                    spec_versions=SPEC_VERSIONS,
                )
            )


class CriticBonus:
    """Adds `weight` × the critic's predicted φ of each seed once, `critic.lag` ticks after
    the seed germinated (when its telemetry matches what the critic was trained on)."""

    def __init__(self, critic: Critic, weight: float, num_envs: int) -> None:
        self.critic, self.weight = critic, weight
        self.born: list[dict[str, int]] = [{} for _ in range(num_envs)]

    def germinated(self, infos: Any) -> None:
        """After `act`: note the germinations each env executed, forget finished episodes."""
        for born, info in zip(self.born, infos, strict=True):
            born.update({slot: info.tick for slot, op in info.ops if op is Op.GERMINATE})

    def reset(self, dones: torch.Tensor) -> None:
        for born, done in zip(self.born, dones.tolist(), strict=True):
            if done:
                born.clear()

    def __call__(self, obs: list[Observation]) -> torch.Tensor:
        """The bonus for the tick whose observations are `obs` (before acting on them)."""
        out = torch.zeros(len(obs))
        for i, (o, born) in enumerate(zip(obs, self.born, strict=True)):
            for slot, tick in list(born.items()):
                if o.tick - tick >= self.critic.lag:
                    out[i] += self.weight * self.critic.predict_observation(o, slot)
                    del born[slot]
        return out


def _held_out(
    cfg: TrainPolicyConfig, task: Any, build: Callable[[EnvSpec], nn.Module], policy: LearnedPolicy
) -> dict[str, float]:
    """One episode per held-out environment with the policy's most probable actions."""
    specs = [
        EnvSpec(1000 + s.host_seed, 1000 + s.data_seed, s.width)
        for s in sample_specs(cfg.eval_envs, seed=cfg.seed + 1, widths=cfg.widths, seed_bound=1000)
    ]
    saved = policy.deterministic, policy.update_normalizers
    policy.deterministic, policy.update_normalizers = True, False
    returns, metrics = torch.zeros(cfg.eval_envs), []
    try:
        with VectorEnv(
            task,
            cfg.eval_envs,
            iter(specs * 2),
            env_cfg=cfg.env,
            economy_cfg=cfg.economy,
            episode_ticks=cfg.episode_ticks,
            build_host=build,
            validator=illegal_reason,
            backend="inprocess",
        ) as venv:
            for _ in range(cfg.episode_ticks):
                obs = venv.step_train()
                result = venv.act([d.action for d in policy.act_batch(obs)])
                returns += result.rewards.float()
                metrics += [i.metric for i, d in zip(result.infos, result.dones, strict=True) if d]
    finally:
        policy.deterministic, policy.update_normalizers = saved
    return {"heldout_return": float(returns.mean()), "heldout_metric": sum(metrics) / len(metrics)}


def _demo_rollouts(cfg: TrainPolicyConfig) -> int:
    """Whole rollouts (num_steps × num_envs ticks) that hold `imitation.episodes` episodes."""
    return math.ceil(cfg.imitation.episodes * cfg.episode_ticks / (cfg.num_envs * cfg.num_steps))


def _demonstrate(
    cfg: TrainPolicyConfig,
    venv: VectorEnv,
    policy: LearnedPolicy,
    store: RunStore,
    obs: list[Observation],
    scaler: RewardScaler,
) -> tuple[Demonstrations, list[Observation], torch.Tensor]:
    """Whole rollouts of the teacher (one fresh teacher per episode) in `venv`, recorded to
    `store`; folds their features into the policy's normalisers. Returns the demonstrations,
    and the observations and done flags for PPO to continue from."""
    teacher = cfg.imitation.teacher
    assert teacher is not None
    seeds = itertools.count(cfg.seed * 100_003 + 1)  # one per teacher (used by `random`)

    def fresh() -> Any:
        return make_policy(teacher, seed=next(seeds))

    teachers = [fresh() for _ in range(cfg.num_envs)]
    gs, ss, actions, masks = [], [], [], []
    T = _demo_rollouts(cfg) * cfg.num_steps
    rewards, dones = torch.zeros(T, cfg.num_envs), torch.zeros(T, cfg.num_envs)
    next_done = torch.zeros(cfg.num_envs)
    for t in range(T):
        g, s = featurize_batch(obs)
        decisions = [p.act(o) for p, o in zip(teachers, obs, strict=True)]
        result = venv.act([d.action for d in decisions])
        gs.append(g)
        ss.append(s)
        actions.append(action_indices([d.action for d in decisions]))
        masks.append({h: torch.tensor([d.mask[h] for d in decisions]) for h in decisions[0].mask})
        _record(
            store,
            t,
            obs,
            decisions,
            result.rewards,
            {"reward_mean": float(result.rewards.mean())},
            policy=teacher,
        )
        dones[t] = next_done
        raw = result.rewards.float()
        rewards[t] = scaler(raw, result.dones) if cfg.ppo.scale_rewards else raw
        next_done = result.dones.float()
        teachers = [
            fresh() if d else p for p, d in zip(teachers, result.dones.tolist(), strict=True)
        ]
        obs = venv.step_train()
    # Discounted returns of the teacher: GAE with V = 0 and λ = 1, bootstrapped with 0 where an
    # episode is cut by the end of the demonstrations (they end on an episode boundary when
    # episode_ticks divides num_steps, as in the defaults).
    zeros = torch.zeros(cfg.num_envs)
    _, returns = compute_gae(
        rewards, torch.zeros_like(rewards), dones, zeros, next_done, cfg.ppo.gamma, 1.0
    )
    g_all, s_all = torch.stack(gs), torch.stack(ss)  # (T, K, G), (T, K, S, F)
    policy.global_norm.update(g_all)
    policy.slot_norm.update(s_all)
    n = T * cfg.num_envs
    demos = Demonstrations(
        policy.global_norm(g_all.reshape(n, -1)),
        policy.slot_norm(s_all.reshape(n, *s_all.shape[2:])),
        torch.stack(actions).reshape(n, -1),
        {h: torch.stack([m[h] for m in masks]).reshape(n, -1) for h in masks[0]},
        returns.reshape(n),
    )
    return demos, obs, next_done


def _warm_start(
    cfg: TrainPolicyConfig,
    venv: VectorEnv,
    policy: LearnedPolicy,
    out: Path,
    obs: list[Observation],
    scaler: RewardScaler,
) -> tuple[dict[str, Any], list[Observation], torch.Tensor]:
    """Demonstrations (recorded in `out/demos`), then behaviour cloning. The cloned policy is
    also saved alone as `out/warm_start.safetensors` (to evaluate what PPO added), with its
    statistics (returned as well) in `warm_start.json`."""
    manifest = build_manifest(config_to_dict(cfg), {"seed": cfg.seed}, "cpu")
    out.mkdir(parents=True, exist_ok=True)
    with RunStore.create(out / "demos", manifest) as store:
        demos, obs, next_done = _demonstrate(cfg, venv, policy, store, obs, scaler)
    optimizer = torch.optim.Adam(policy.net.parameters(), lr=cfg.imitation.lr, eps=1e-5)
    generator = torch.Generator().manual_seed(cfg.seed)
    stats = imitation_update(policy.net, optimizer, demos, cfg.imitation, generator)
    policy.save(out / "warm_start.safetensors")
    summary = {**stats.__dict__, "decisions": int(demos.actions.shape[0])}
    (out / "warm_start.json").write_text(json.dumps(summary, indent=1))
    return summary, obs, next_done


def _open_store(cfg: TrainPolicyConfig, out: Path, resume_at: int | None) -> RunStore:
    """The training run's flight recorder: created, or reopened and cut back to the ticks of
    the `resume_at` updates already saved."""
    if resume_at is None:
        manifest = build_manifest(config_to_dict(cfg), {"seed": cfg.seed}, "cpu")
        return RunStore.create(out / "run", manifest)
    store = RunStore.open(out / "run")
    store.truncate_after(resume_at * cfg.num_steps - 1)
    return store


def _rollout(
    cfg: TrainPolicyConfig,
    venv: VectorEnv,
    policy: LearnedPolicy,
    store: RunStore,
    update: int,
    buf: RolloutBuffer,
    obs: list[Observation],
    next_done: torch.Tensor,
    scaler: RewardScaler,
    bonus: CriticBonus | None,
) -> tuple[torch.Tensor, list[float], list[Observation], torch.Tensor]:
    """`cfg.num_steps` ticks of every environment into `buf` (rewards scaled, plus the critic's
    bonus), each recorded. Returns the raw rewards (T, K), the final metrics of the episodes
    that ended, and the observations and done flags to continue from."""
    raw = torch.zeros(cfg.num_steps, cfg.num_envs)
    finished: list[float] = []
    for t in range(cfg.num_steps):
        step = policy.step(obs)
        result = venv.act([d.action for d in step.decisions])
        buf.add(t, step.g, step.s, step.out, next_done)
        raw[t] = result.rewards.float()
        finished += [i.metric for i, d in zip(result.infos, result.dones, strict=True) if d]
        _record(
            store,
            update * cfg.num_steps + t,
            obs,
            step.decisions,
            result.rewards,
            {"reward_mean": float(result.rewards.mean())},
        )
        next_done = result.dones.float()
        obs = venv.step_train()
        if bonus is not None:  # credited to this step's action, as the reward is
            bonus.germinated(result.infos)
            bonus.reset(result.dones)
            raw[t] += bonus(obs)
        buf.rewards[t] = scaler(raw[t], result.dones) if cfg.ppo.scale_rewards else raw[t]
    return raw, finished, obs, next_done


def train_policy(
    cfg: TrainPolicyConfig,
    *,
    resume: bool = False,
    log: Callable[[int, dict[str, Any]], None] | None = None,
) -> Path:
    """Train; returns the path of the final policy file."""
    out = Path(cfg.out)
    seed_everything(cfg.seed, torch.device("cpu"))
    task = load_task(cfg.task, seed=cfg.seed)
    c, size = task.input_shape[0], task.input_shape[-1]
    build = partial(_host, c, task.num_outputs, size, cfg.depth)
    specs = spec_stream(seed=cfg.seed, widths=cfg.widths, seed_bound=1000)
    slot_names = sorted(f"slots.b{i}" for i in range(cfg.depth))
    policy = LearnedPolicy(slot_names, hidden=cfg.hidden, seed=cfg.seed)
    policy.update_normalizers = True
    optimizer = torch.optim.Adam(policy.net.parameters(), lr=cfg.ppo.lr, eps=1e-5)
    scaler = RewardScaler(cfg.num_envs, cfg.ppo.gamma)
    bonus = (
        None
        if cfg.critic is None
        else CriticBonus(load_critic(cfg.critic), cfg.critic_weight, cfg.num_envs)
    )
    start = 0
    if resume:
        start = _load_training_state(out, policy, optimizer, scaler)
        used = start + (_demo_rollouts(cfg) if cfg.imitation.teacher is not None else 0)
        for _ in range(used * cfg.num_envs):  # later specs than those already used
            next(specs)
    monitor = HealthMonitor()
    t0 = time.perf_counter()
    with VectorEnv(
        task,
        cfg.num_envs,
        specs,
        env_cfg=cfg.env,
        economy_cfg=cfg.economy,
        episode_ticks=cfg.episode_ticks,
        build_host=build,
        validator=illegal_reason,
        backend=cfg.backend,
    ) as venv:
        obs = venv.step_train()
        next_done = torch.zeros(cfg.num_envs)
        if not resume and cfg.imitation.teacher is not None:
            clone, obs, next_done = _warm_start(cfg, venv, policy, out, obs, scaler)
            _save_training_state(out, policy, optimizer, scaler, 0)
            _log(
                out,
                log,
                -1,
                {"update": 0, "minutes": (time.perf_counter() - t0) / 60, "imitation": clone},
            )
        with _open_store(cfg, out, start if resume else None) as store:
            for update in range(start, cfg.updates):
                buf = RolloutBuffer(cfg.num_steps, cfg.num_envs, len(slot_names))
                raw, finished, obs, next_done = _rollout(
                    cfg, venv, policy, store, update, buf, obs, next_done, scaler, bonus
                )
                stats = _ppo_step(cfg, policy, optimizer, buf, obs, next_done, update)
                _save_training_state(out, policy, optimizer, scaler, update + 1)
                info = {
                    "update": update + 1,
                    "approx_kl": stats.approx_kl,
                    "clipfrac": stats.clipfrac,
                    "explained_variance": stats.explained_variance,
                    "entropy_op": stats.entropy.get("op", 0.0),
                    "return_mean": float(raw.sum(0).mean()),
                    "final_metric_mean": sum(finished) / len(finished) if finished else None,
                    "op_distribution": stats.op_distribution,
                    "warnings": monitor.check(stats),
                    "minutes": (time.perf_counter() - t0) / 60,
                }
                last = update + 1 == cfg.updates or info["minutes"] > cfg.budget_minutes
                if cfg.eval_every and ((update + 1) % cfg.eval_every == 0 or last):
                    info.update(_held_out(cfg, task, build, policy))
                _log(out, log, update, info)
                if info["minutes"] > cfg.budget_minutes:
                    break
    return out / "policy.safetensors"


def _ppo_step(
    cfg: TrainPolicyConfig,
    policy: LearnedPolicy,
    optimizer: torch.optim.Optimizer,
    buf: RolloutBuffer,
    obs: list[Observation],
    next_done: torch.Tensor,
    update: int,
) -> UpdateStats:
    """GAE over the rollout in `buf` (bootstrapped from V of `obs`), then one PPO update."""
    with torch.no_grad():
        last_value = policy.value(obs)
    adv, ret = compute_gae(
        buf.rewards, buf.values, buf.dones, last_value, next_done, cfg.ppo.gamma, cfg.ppo.gae_lambda
    )
    frac = 1.0 - update / cfg.updates if cfg.ppo.anneal_lr else 1.0
    return ppo_update(policy.net, optimizer, buf, adv, ret, cfg.ppo, lr_frac=frac)


def _log(
    out: Path, log: Callable[[int, dict[str, Any]], None] | None, update: int, info: dict[str, Any]
) -> None:
    with (out / "train_log.jsonl").open("a") as f:
        f.write(json.dumps(info) + "\n")
    if log is not None:
        log(update, info)


def _save_training_state(
    out: Path,
    policy: LearnedPolicy,
    optimizer: torch.optim.Optimizer,
    scaler: RewardScaler,
    updates: int,
) -> None:
    out.mkdir(parents=True, exist_ok=True)
    policy.save(out / "policy.safetensors")
    opt = optimizer.state_dict()
    tensors = {
        f"{i}.{k}": torch.as_tensor(v).clone()
        for i, st in opt["state"].items()
        for k, v in st.items()
    }
    meta = {
        "updates": updates,
        "param_groups": opt["param_groups"],
        "policy_state": policy.state_dict(),
        "reward_scaler": {k: v.tolist() for k, v in scaler.state_dict().items()},
    }
    save_tensors(out / "training.safetensors", tensors, {"esper_training": json.dumps(meta)})


def _load_training_state(
    out: Path, policy: LearnedPolicy, optimizer: torch.optim.Optimizer, scaler: RewardScaler
) -> int:
    path = out / "training.safetensors"
    if not path.is_file():
        raise ValueError(f"nothing to resume in {out}: {path.name} is missing")
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["esper_training"])
    loaded = LearnedPolicy.load(out / "policy.safetensors", expect_slots=policy.slot_names)
    policy.net.load_state_dict(loaded.net.state_dict())
    policy.load_state_dict(meta["policy_state"])
    state: dict[int, dict[str, torch.Tensor]] = {}
    for k, v in load_file(str(path)).items():
        i, name = k.split(".", 1)
        state.setdefault(int(i), {})[name] = v
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    scaler.load_state_dict({k: torch.tensor(v) for k, v in meta["reward_scaler"].items()})
    return int(meta["updates"])
