"""`esper train-policy`: Phase 1, PPO over vectorised growth environments (CleanRL-style).

    config → vector envs → policy → warm start → [rollout (T × K) → GAE → PPO update → log]×U

The warm start (`tamiyo.imitation`) records a few episodes of a teacher (the heuristic) in the
same environments, clones its decisions and fits the value head to its returns; PPO then starts
from there. `imitation.teacher = None` starts PPO from a random initialisation instead.

Each episode is an `esper grow` run (`cfg.episode`, built by `esper.run.build_episode`) whose
seed (below 1000: held-out seeds are never drawn) and host width (from `widths`) are drawn, so
the policy sees variety. With a `curriculum` (`esper.curriculum`; examples/curriculum.toml) each
episode first draws a family — a task and a host of several widths and depths: the digits CNN,
MLPs on vector tasks, the char transformer — so the K environments step hosts of different
sizes in lockstep; the policy reads them in one padded batch (`featurize_batch`), and the rollout
buffer pads to the largest slot count seen. Every decision and event of every episode goes to
the flight recorder of the training run (an `episode` event says what each episode is); the
policy is checkpointed (weights-only, with its normalisers) after every update, together with
the optimizer, so training resumes at an update boundary (episodes restart from fresh specs on
resume). The periodic held-out evaluation is `esper evaluate`'s (`run_held_out`).
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from esper.config import GrowConfig, config_to_dict
from esper.contracts import HEADS, Observation, Op
from esper.contracts.errors import ConfigError
from esper.curriculum import Family, check_curriculum, draw_family, mean_ticks
from esper.evaluate import FIRST_HELD_OUT, Contender, held_out_seeds, run_held_out
from esper.kasmina import save_tensors
from esper.recorder import RunStore, build_manifest
from esper.run import build_episode, load_policy, record_tick
from esper.simic import Critic, load_critic
from esper.tamiyo.features import featurize_batch, stack_padded
from esper.tamiyo.imitation import (
    Demonstrations,
    ImitationConfig,
    action_indices,
    agreement,
    imitation_update,
)
from esper.tamiyo.learned import LearnedPolicy
from esper.tamiyo.network import TamiyoNet
from esper.tamiyo.policies import Decision, Policy
from esper.tamiyo.ppo import (
    Anchor,
    HealthMonitor,
    PPOConfig,
    RewardScaler,
    RolloutBuffer,
    UpdateStats,
    compute_gae,
    ppo_update,
)
from esper.tolaria.determinism import pick_device, rng_state, seed_everything, set_rng_state
from esper.tolaria.vector import BACKENDS as VECTOR_BACKENDS
from esper.tolaria.vector import PairedVectorEnv, StepResult, VectorEnv


@dataclass(frozen=True)
class TrainPolicyConfig:
    """Everything `esper train-policy` needs."""

    episode: GrowConfig = field(default_factory=GrowConfig)
    """Every training episode is this `esper grow` run (task, host, env, economy, governor;
    `ticks` is the episode's length) with its seed drawn below 1000 (held-out seeds are never
    drawn) and its host width from `widths`, built by the same code as `esper grow`
    (`esper.run.build_episode`): the policy trains in the setting it is deployed in. One epoch
    per tick (the default env): shorter ticks end episodes before the width-2 host plateaus, and
    growth cannot pay before then (bench/RESULTS.md)."""
    widths: tuple[int, ...] = (2, 3, 4)
    """Host widths episodes draw from (the impaired CNN and two slightly wider ones); unused
    with a curriculum (each family has its own)."""
    curriculum: tuple[Family, ...] = ()
    """Families of episodes (`[[curriculum]]` tables: task, host, widths, depths, ticks, env,
    weight) drawn per episode in proportion to their weights; each is `episode` with the
    family's settings (`Family.episode`). Empty: every episode is `episode` on a width from
    `widths`. The held-out evaluation (`eval_every`) stays on `episode`."""
    num_envs: int = 8
    """K episodes stepped in lockstep."""
    num_steps: int = 40
    """Ticks per rollout (per environment) between PPO updates."""
    updates: int = 50
    """PPO updates (the budget below may stop training earlier)."""
    budget_minutes: float = 55.0
    """Wall-clock budget; training stops after the update that crosses it."""
    seed: int = 0
    """Seeds the stream of episodes, the network's initialisation and its sampling."""
    backend: str = "auto"
    """Vector env backend (`esper.tolaria.vector`): auto, inprocess, processes or ray (Ray
    actors on a local instance, or on the Ray this process has initialised; the `ray` extra)."""
    hidden: int = 128
    eval_every: int = 10
    """Evaluate the deterministic policy on held-out seeds every this many updates (and after
    the last); 0 turns it off."""
    eval_seeds: int = 2
    """Held-out runs per evaluation: `esper evaluate`'s runs, seeds 1000, 1001, ..."""
    out: str = "policies/digits"
    critic: str | None = None
    """A critic file (`esper train-critic`): each seed's predicted audit φ, read `lag` ticks
    after it germinated, is added to that tick's training reward × `critic_weight` (paper
    §5.4: audited credit without an audit at training time). None: the economy alone."""
    critic_weight: float = 1.0
    anchor: float = 0.0
    """Keep what the clone knows while PPO improves on it: the weight of KL(clone ‖ policy) in
    PPO's loss at the first update (`tamiyo.ppo.Anchor`), annealed linearly to 0 over
    `anchor_updates` (0: no anchor). Needs the warm start."""
    anchor_updates: int = 20
    baseline: str = "none"
    """none: the reward is the episode's own. paired: each episode runs beside its host-alone
    twin (same seed, host and data order; `tolaria.vector.PairedVectorEnv`) and the reward is
    the difference, which cancels the seed's and the host's share of the return (issue 15:
    that noise dwarfs the difference between good schedules; measured in bench/RESULTS.md,
    "Signal to noise"). Doubles the environment work."""
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

    def __post_init__(self) -> None:
        if not self.widths or min(self.widths) < 1:
            raise ConfigError(f"widths must be non-empty and >= 1, got {self.widths}")
        for name in ("num_envs", "num_steps", "eval_seeds", "hidden"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.updates < 0 or self.eval_every < 0 or not self.budget_minutes > 0:
            raise ConfigError("updates and eval_every must be >= 0 and budget_minutes > 0")
        if self.anchor < 0 or self.anchor_updates < 1:
            raise ConfigError("anchor must be >= 0 and anchor_updates >= 1")
        if self.anchor > 0 and self.imitation.teacher is None:
            raise ConfigError("anchor needs a warm start to anchor to (imitation.teacher)")
        if self.baseline not in BASELINES:
            raise ConfigError(
                f"baseline must be one of {', '.join(BASELINES)}, got {self.baseline!r}"
            )
        check_curriculum(self.curriculum)
        if self.backend not in VECTOR_BACKENDS:
            raise ConfigError(
                f"backend must be one of {', '.join(VECTOR_BACKENDS)}, got {self.backend!r}"
            )


BASELINES = ("none", "paired")


def _environments(
    cfg: TrainPolicyConfig, device: torch.device, skip: int
) -> VectorEnv | PairedVectorEnv:
    """The K lockstep episodes (and with `baseline = "paired"` their twins, drawing the same
    spec stream), the first `skip` specs of the stream already used."""

    def vector() -> VectorEnv:
        specs = episode_specs(cfg)
        for _ in range(skip):
            next(specs)
        return VectorEnv(build_episode, cfg.num_envs, specs, device=device, backend=cfg.backend)

    if cfg.baseline == "none":
        return vector()
    main = vector()
    try:
        return PairedVectorEnv(main, vector())
    except BaseException:
        main.close()
        raise


def episode_specs(cfg: TrainPolicyConfig) -> Iterator[GrowConfig]:
    """The endless, reproducible stream of training episodes: `cfg.episode` with a seed drawn
    uniformly below FIRST_HELD_OUT and a host width drawn from `cfg.widths`; with a curriculum,
    a family drawn by weight, then the seed, then the family's width and depth."""
    rng = random.Random(cfg.seed)
    while True:
        if cfg.curriculum:
            family = draw_family(cfg.curriculum, rng)
            yield family.episode(cfg.episode, rng.randrange(FIRST_HELD_OUT), rng)
            continue
        seed, width = rng.randrange(FIRST_HELD_OUT), rng.choice(cfg.widths)
        yield replace(cfg.episode, seed=seed, host=replace(cfg.episode.host, width=width))


def _record(
    store: RunStore,
    tick: int,
    obs: list[Observation],
    decisions: list[Decision],
    result: StepResult,
    policy: str = "learned",
) -> None:
    """One tick of every environment: the decisions and events (env = position), the mean
    reward as the tick's metric; an `episode` event where an episode starts (what it is)."""
    with store.tick(tick) as tx:
        tx.metrics({"reward_mean": float(result.rewards.mean())})
        for i, (o, d, outcome) in enumerate(zip(obs, decisions, result.outcomes, strict=True)):
            if o.tick == 0:
                tx.event("episode", _episode_payload(result.specs[i]), env=i)
            record_tick(tx, i, policy, d, o, outcome)


def _episode_payload(spec: GrowConfig) -> dict[str, Any]:
    h = spec.host
    host = {"kind": h.kind, "width": h.width, "depth": h.depth}
    return {"task": spec.task, "host": host, "seed": spec.seed, "ticks": spec.ticks}


class CriticBonus:
    """Adds `weight` × the critic's predicted φ of each seed once, `critic.lag` ticks after
    the seed germinated (when its telemetry matches what the critic was trained on)."""

    def __init__(self, critic: Critic, weight: float, num_envs: int) -> None:
        self.critic, self.weight = critic, weight
        self.born: list[dict[str, int]] = [{} for _ in range(num_envs)]

    def germinated(self, outcomes: Any) -> None:
        """After `act`: note the germinations each env executed."""
        for born, out in zip(self.born, outcomes, strict=True):
            born.update({slot: out.tick for slot, op in out.ops if op is Op.GERMINATE})

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


def _held_out(cfg: TrainPolicyConfig, policy: LearnedPolicy, out: Path, update: int) -> dict:
    """The policy's most probable actions on held-out seeds, by `esper evaluate`'s evaluator:
    recorded runs under `out/heldout/update-N`."""
    saved = policy.deterministic, policy.update_normalizers
    policy.deterministic, policy.update_normalizers = True, False
    global_rngs = rng_state()  # the runs seed every RNG; training's streams must not notice
    try:
        config = replace(cfg.episode, policy=str(out / "policy.safetensors"))
        results = run_held_out(
            [Contender("learned", config, policy)],
            held_out_seeds(cfg.eval_seeds),
            out / "heldout" / f"update-{update:04d}",
        )["learned"]
    finally:
        policy.deterministic, policy.update_normalizers = saved
        set_rng_state(global_rngs)
    n = len(results)
    return {
        "heldout_return": sum(r.reward_total for r in results) / n,
        "heldout_metric": sum(r.final_metric for r in results) / n,
    }


def _demo_rollouts(cfg: TrainPolicyConfig) -> int:
    """Whole rollouts (num_steps × num_envs ticks) that hold `imitation.episodes` episodes."""
    ticks = cfg.imitation.episodes * mean_ticks(cfg.curriculum, cfg.episode)
    return math.ceil(ticks / (cfg.num_envs * cfg.num_steps))


def _demonstrate(
    cfg: TrainPolicyConfig,
    venv: VectorEnv | PairedVectorEnv,
    policy: LearnedPolicy,
    store: RunStore,
    obs: list[Observation],
    scaler: RewardScaler,
) -> tuple[Demonstrations, list[Observation], torch.Tensor]:
    """Whole rollouts of the teacher (one fresh teacher per episode) in `venv`, recorded to
    `store`; folds their features into the policy's normalisers. Returns the demonstrations
    (raw features), and the observations and done flags for PPO to continue from."""
    teacher = cfg.imitation.teacher
    assert teacher is not None

    def fresh(spec: GrowConfig) -> Policy:  # as `esper grow --policy TEACHER` on that episode
        return load_policy(replace(spec, policy=teacher))

    teachers = [fresh(spec) for spec in venv.specs]
    gs, ss, valids, actions, masks = [], [], [], [], []
    T = _demo_rollouts(cfg) * cfg.num_steps
    rewards, dones = torch.zeros(T, cfg.num_envs), torch.zeros(T, cfg.num_envs)
    next_done = torch.zeros(cfg.num_envs)
    for t in range(T):
        g, s, valid = featurize_batch(obs)
        decisions = [p.act(o) for p, o in zip(teachers, obs, strict=True)]
        result = venv.act([d.action for d in decisions], [d.reason for d in decisions])
        gs.append(g)
        ss.append(s)
        valids.append(valid)
        actions.append(action_indices([d.action for d in decisions]))
        masks.append({h: _mask_rows([d.mask[h] for d in decisions]) for h in HEADS})
        _record(store, t, obs, decisions, result, policy=teacher)
        dones[t] = next_done
        raw = result.rewards.float()
        rewards[t] = scaler(raw, result.dones) if cfg.ppo.scale_rewards else raw
        next_done = result.dones.float()
        teachers = [
            fresh(spec) if d else p
            for p, d, spec in zip(teachers, result.dones.tolist(), venv.specs, strict=True)
        ]
        obs = venv.observe()
    # Discounted returns of the teacher: GAE with V = 0 and λ = 1, bootstrapped with 0 where an
    # episode is cut by the end of the demonstrations (they end on an episode boundary when
    # episode.ticks divides num_steps, as in the defaults).
    zeros = torch.zeros(cfg.num_envs)
    _, returns = compute_gae(
        rewards, torch.zeros_like(rewards), dones, zeros, next_done, cfg.ppo.gamma, 1.0
    )
    # (T, K, G), (T, K, S, F), (T, K, S): slots padded to the largest host of the demonstrations
    g_all, s_all, valid_all = torch.stack(gs), stack_padded(ss), stack_padded(valids)
    policy.global_norm.update(g_all)
    policy.slot_norm.update(s_all[valid_all])
    n = T * cfg.num_envs
    demos = Demonstrations(  # raw features: `_normalised` at each use, as the policy sees them
        g_all.reshape(n, -1),
        s_all.reshape(n, *s_all.shape[2:]),
        torch.stack(actions).reshape(n, -1),
        {h: stack_padded([m[h] for m in masks]).reshape(n, -1) for h in HEADS},
        returns.reshape(n),
        valid_all.reshape(n, -1),
    )
    return demos, obs, next_done


def _mask_rows(rows: list[list[bool]]) -> torch.Tensor:
    """(K, n) bool, shorter rows (the slot masks of smaller hosts) padded with False."""
    n = max(len(r) for r in rows)
    return torch.tensor([r + [False] * (n - len(r)) for r in rows], dtype=torch.bool)


def _warm_start(
    cfg: TrainPolicyConfig,
    venv: VectorEnv | PairedVectorEnv,
    policy: LearnedPolicy,
    out: Path,
    obs: list[Observation],
    scaler: RewardScaler,
) -> tuple[dict[str, Any], list[Observation], torch.Tensor, Demonstrations]:
    """Demonstrations (recorded in `out/demos`), then behaviour cloning. The cloned policy is
    also saved alone as `out/warm_start.safetensors` (to evaluate what PPO added), with its
    statistics (returned as well) in `warm_start.json`. Returns the demonstrations too (raw
    features), to measure the policy's agreement with the teacher as PPO moves it."""
    manifest = build_manifest(config_to_dict(cfg), {"seed": cfg.seed}, str(venv.device))
    out.mkdir(parents=True, exist_ok=True)
    with RunStore.create(out / "demos", manifest) as store:
        demos, obs, next_done = _demonstrate(cfg, venv, policy, store, obs, scaler)
    optimizer = torch.optim.Adam(policy.net.parameters(), lr=cfg.imitation.lr, eps=1e-5)
    generator = torch.Generator().manual_seed(cfg.seed)
    normalised = _normalised(policy, demos)
    stats = imitation_update(policy.net, optimizer, normalised, cfg.imitation, generator)
    policy.save(out / "warm_start.safetensors")
    summary = {**stats.__dict__, "decisions": int(demos.actions.shape[0])}
    (out / "warm_start.json").write_text(json.dumps(summary, indent=1))
    return summary, obs, next_done, demos


def _normalised(policy: LearnedPolicy, demos: Demonstrations) -> Demonstrations:
    """The demonstrations' raw features through the policy's normalisers as they are now (the
    padding slots kept at zero)."""
    s = policy.slot_norm(demos.s)
    if demos.valid is not None:
        s = torch.where(demos.valid.unsqueeze(-1), s, torch.zeros(()))
    return demos._replace(g=policy.global_norm(demos.g), s=s)


def _clone(cfg: TrainPolicyConfig, out: Path) -> TamiyoNet | None:
    """The frozen clone (`out/warm_start.safetensors`) PPO is anchored to, or None (no anchor)."""
    if cfg.anchor <= 0:
        return None
    net = LearnedPolicy.load(out / "warm_start.safetensors").net
    return net.requires_grad_(False)


def _anchor(cfg: TrainPolicyConfig, clone: TamiyoNet | None, update: int) -> Anchor | None:
    """The clone and its KL weight at `update` (annealed linearly to 0)."""
    coef = cfg.anchor * max(0.0, 1.0 - update / cfg.anchor_updates)
    return Anchor(clone, coef) if clone is not None and coef > 0 else None


def _open_store(
    cfg: TrainPolicyConfig, out: Path, resume_at: int | None, device: torch.device
) -> RunStore:
    """The training run's flight recorder: created, or reopened and cut back to the ticks of
    the `resume_at` updates already saved."""
    if resume_at is None:
        manifest = build_manifest(config_to_dict(cfg), {"seed": cfg.seed}, str(device))
        return RunStore.create(out / "run", manifest)
    store = RunStore.open(out / "run")
    store.truncate_after(resume_at * cfg.num_steps - 1)
    return store


def _rollout(
    cfg: TrainPolicyConfig,
    venv: VectorEnv | PairedVectorEnv,
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
        decisions = step.decisions
        result = venv.act([d.action for d in decisions], [d.reason for d in decisions])
        buf.add(t, step.g, step.s, step.out, next_done)
        raw[t] = result.rewards.float()
        finished += [o.metric for o in result.outcomes if o.done]
        _record(store, update * cfg.num_steps + t, obs, decisions, result)
        next_done = result.dones.float()
        obs = venv.observe()
        if bonus is not None:  # credited to this step's action, as the reward is
            bonus.germinated(result.outcomes)
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
    device = pick_device(cfg.episode.device)
    seed_everything(cfg.seed, device)
    policy = LearnedPolicy(hidden=cfg.hidden, seed=cfg.seed)
    policy.update_normalizers = True
    optimizer = torch.optim.Adam(policy.net.parameters(), lr=cfg.ppo.lr, eps=1e-5)
    scaler = RewardScaler(cfg.num_envs, cfg.ppo.gamma)
    bonus = (
        None
        if cfg.critic is None
        else CriticBonus(load_critic(cfg.critic), cfg.critic_weight, cfg.num_envs)
    )
    start = used = 0
    if resume:  # later specs than those already used
        start = _load_training_state(out, policy, optimizer, scaler)
        used = start + (_demo_rollouts(cfg) if cfg.imitation.teacher is not None else 0)
    monitor = HealthMonitor()
    t0 = time.perf_counter()
    with _environments(cfg, device, used * cfg.num_envs) as venv:
        obs = venv.observe()
        next_done = torch.zeros(cfg.num_envs)
        demos: Demonstrations | None = None  # (not kept across a resume)
        if not resume and cfg.imitation.teacher is not None:
            clone, obs, next_done, demos = _warm_start(cfg, venv, policy, out, obs, scaler)
            _save_training_state(out, policy, optimizer, scaler, 0)
            _log(
                out,
                log,
                -1,
                {"update": 0, "minutes": (time.perf_counter() - t0) / 60, "imitation": clone},
            )
        clone = _clone(cfg, out)
        with _open_store(cfg, out, start if resume else None, device) as store:
            for update in range(start, cfg.updates):
                buf = RolloutBuffer(cfg.num_steps, cfg.num_envs, max(len(o.slots) for o in obs))
                raw, finished, obs, next_done = _rollout(
                    cfg, venv, policy, store, update, buf, obs, next_done, scaler, bonus
                )
                anchor = _anchor(cfg, clone, update)
                stats = _ppo_step(cfg, policy, optimizer, buf, obs, next_done, update, anchor)
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
                    "anchor_coef": anchor.coef if anchor is not None else 0.0,
                    "anchor_kl": stats.anchor_kl,
                    "warnings": monitor.check(stats),
                    "minutes": (time.perf_counter() - t0) / 60,
                }
                if demos is not None:  # how much of the teacher PPO kept (per head)
                    kept, _ = agreement(policy.net, _normalised(policy, demos))
                    info["teacher_agreement"] = kept
                last = update + 1 == cfg.updates or info["minutes"] > cfg.budget_minutes
                if cfg.eval_every and ((update + 1) % cfg.eval_every == 0 or last):
                    info.update(_held_out(cfg, policy, out, update + 1))
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
    anchor: Anchor | None = None,
) -> UpdateStats:
    """GAE over the rollout in `buf` (bootstrapped from V of `obs`), then one PPO update."""
    with torch.no_grad():
        last_value = policy.value(obs)
    adv, ret = compute_gae(
        buf.rewards, buf.values, buf.dones, last_value, next_done, cfg.ppo.gamma, cfg.ppo.gae_lambda
    )
    frac = 1.0 - update / cfg.updates if cfg.ppo.anneal_lr else 1.0
    return ppo_update(policy.net, optimizer, buf, adv, ret, cfg.ppo, lr_frac=frac, anchor=anchor)


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
        raise ConfigError(f"nothing to resume in {out}: {path.name} is missing")
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["esper_training"])
    loaded = LearnedPolicy.load(out / "policy.safetensors")
    policy.net.load_state_dict(loaded.net.state_dict())
    policy.load_state_dict(meta["policy_state"])
    state: dict[int, dict[str, torch.Tensor]] = {}
    for k, v in load_file(str(path)).items():
        i, name = k.split(".", 1)
        state.setdefault(int(i), {})[name] = v
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    scaler.load_state_dict({k: torch.tensor(v) for k, v in meta["reward_scaler"].items()})
    return int(meta["updates"])
