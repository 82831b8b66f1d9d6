"""One growth run: an episode (the paper's control tick, `esper.tolaria.episode`), a policy, and
the flight recorder and checkpoints around it. `esper grow`, `esper.grow()`, `esper evaluate` and
the audits' retrains all end up here; vectorised training builds its episodes here too
(`build_episode`), so every driver runs the same hosts, seeds and tick.

    obs = episode.observe() → decision = policy.act(obs) → outcome = episode.act(decision.action)
    → one SQLite transaction: metrics, the decision record, the tick's events (+ a checkpoint)
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from esper.config import GrowConfig, config_from_dict, config_to_dict
from esper.contracts import Observation, Topology, obs_vector, slot_state
from esper.contracts.errors import ConfigError
from esper.emrakul import make_emrakul
from esper.kasmina import (
    CheckpointError,
    CNNHost,
    MLPHost,
    TransformerHost,
    mark_host_phages,
    module_cost,
    save_tensors,
    slots_of,
)
from esper.narset import Narset
from esper.recorder import CheckpointRecord, DecisionRecord, RunStore, TickWriter, build_manifest
from esper.tamiyo.features import OBS_SPEC
from esper.tamiyo.learned import BLUEPRINT_LIBRARY, LearnedPolicy
from esper.tamiyo.masks import illegal_reason
from esper.tamiyo.policies import POLICIES, Decision, Policy, make_policy
from esper.tolaria.data import TaskData, shared_task
from esper.tolaria.determinism import RunSeeds, pick_device, seed_everything
from esper.tolaria.environment import GrowthEnv
from esper.tolaria.episode import Callback, Episode, Outcome, weights_hash
from esper.tolaria.zones import ZoneView

SPEC_VERSIONS = {
    "obs": OBS_SPEC,
    "reward": "simic-v2",
    "blueprints": BLUEPRINT_LIBRARY,
    "actions": "factored-8-v1",
    "events": "events-v2",
}
SHIPPED_POLICY = Path(__file__).parent / "tamiyo" / "trained" / "digits.safetensors"
"""The PPO policy trained on digits (`make policy`); `--policy learned` deploys it on any host
(the policy is layout-free)."""


# ---------------------------------------------------------------------------------------------
# Building an episode: task, host, seeds, environment — one code path for every driver
# ---------------------------------------------------------------------------------------------


def build_host(cfg: GrowConfig, task: TaskData) -> nn.Module:
    h, kind = cfg.host, cfg.host.kind
    if kind == "auto":
        vector = task.topology is Topology.VEC
        kind = "transformer" if task.name == "text" else "mlp" if vector else "cnn"
    slot_kw = {"lifecycle": cfg.lifecycle}
    if kind == "cnn":
        c, size = task.input_shape[0], task.input_shape[-1]
        return CNNHost(
            h.width, h.depth, c, task.num_outputs, size, hidden=h.hidden, narrow=h.narrow, **slot_kw
        )
    if kind == "mlp":
        return MLPHost(
            int(torch.tensor(task.input_shape).prod()),
            h.width,
            h.depth,
            task.num_outputs,
            **slot_kw,
        )
    if kind == "transformer":
        d = h.width if h.width >= 8 else 64
        return TransformerHost(
            task.num_outputs, d, h.depth, h.heads, task.train_x.shape[1], **slot_kw
        )
    raise ConfigError(f"unknown host kind {kind!r}; valid: auto, cnn, mlp, transformer")


def task_of(cfg: GrowConfig) -> TaskData:
    """The config's built-in task, with the validation split its seed picks (`RunSeeds`)."""
    data_dir = Path(cfg.data_dir) if cfg.data_dir else None
    device = pick_device(cfg.device)
    return shared_task(cfg.task, seed=RunSeeds(cfg.seed).split, device=device, data_dir=data_dir)


def build_episode(
    cfg: GrowConfig,
    *,
    model: nn.Module | None = None,
    task: TaskData | None = None,
    callbacks: Iterable[Callback] = (),
) -> Episode:
    """The episode `cfg` describes: its task (unless given), its host built on the seed's stream
    (unless a model is given), its environment, economy and governor. Module level and driven by
    a picklable config, so vector environments build their episodes with it in worker processes."""
    seeds = RunSeeds(cfg.seed)
    task = task if task is not None else task_of(cfg)
    with torch.random.fork_rng(devices=[]):  # hosts are built and initialised on CPU
        torch.manual_seed(seeds.host)
        if model is None:
            model = build_host(cfg, task)
            if cfg.decay != "none":  # custody of the host's blocks: Emrakul's, as phages
                mark_host_phages(model)
        rng = torch.get_rng_state()  # the episode's stream continues from here
    env = GrowthEnv(model, task, cfg.env, device=pick_device(cfg.device), seed=cfg.seed)
    emrakul = make_emrakul(cfg.decay, cfg.emrakul)
    zones, narset = cfg.zones, cfg.zones.narset
    zone_emrakuls = {}
    if zones.enabled and emrakul is not None:  # each zone its own Emrakul
        zone_emrakuls = {z.name: make_emrakul(cfg.decay, cfg.emrakul).act for z in zones.zone}  # type: ignore[union-attr]
    return Episode(
        env,
        ticks=cfg.ticks,
        economy=cfg.economy,
        governor=cfg.governor,
        validator=illegal_reason,
        callbacks=callbacks,
        rng=rng,
        decay=cfg.lysis if emrakul is not None else None,
        emrakul=emrakul.act if emrakul is not None else None,
        zones=zones if zones.enabled else None,
        allocator=Narset(zones.zone, narset) if zones.enabled and narset.enabled else None,
        zone_emrakuls=zone_emrakuls,
    )


def slot_layout(cfg: GrowConfig) -> list[str]:
    """The slot names of `cfg`'s host, in the order policies see them."""
    return sorted(slots_of(build_host(cfg, task_of(cfg))))


def load_policy(cfg: GrowConfig, offset: int = 0) -> Policy:
    """A built-in policy by name, or a trained one from a `.safetensors` file (deployed
    deterministically, the most probable action, unless `cfg.sample_actions`), seeded by the
    run's seed (`RunSeeds.policy`) + `offset`. A trained policy acts on any host's slots."""
    seed = RunSeeds(cfg.seed).policy + offset
    if cfg.policy in POLICIES:
        return make_policy(cfg.policy, seed, cfg.heuristic)
    path = SHIPPED_POLICY if cfg.policy == "learned" else Path(cfg.policy)
    if path.suffix == ".safetensors" or path.is_file():
        return LearnedPolicy.load(path, seed=seed, deterministic=not cfg.sample_actions)
    raise ConfigError(
        f"unknown policy {cfg.policy!r}; valid: {', '.join(POLICIES)}, learned, "
        "or the path of a trained policy (.safetensors)"
    )


class ZonePolicies:
    """One growth policy per zone (paper §9.6), each acting on its zone's view of the tick."""

    def __init__(self, by_zone: dict[str, Policy]) -> None:
        self.by_zone = by_zone
        self.name = next(iter(by_zone.values())).name

    def act(self, views: dict[str, ZoneView]) -> dict[str, Decision]:
        return {z: p.act(views[z].observation) for z, p in self.by_zone.items()}

    def state_dict(self) -> dict[str, Any]:
        return {z: p.state_dict() for z, p in self.by_zone.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for z, p in self.by_zone.items():
            p.load_state_dict(state[z])


def policy_for(cfg: GrowConfig, episode: Episode) -> Policy | ZonePolicies:
    """The run's policy (`load_policy`), or one per zone when `cfg` has zones — a built-in one
    or a trained (layout-free) one acting on the zone's view — the i-th zone's seeded with the
    run's policy seed + i."""
    if episode.zones is None:
        return load_policy(cfg)
    return ZonePolicies({z: load_policy(cfg, i) for i, z in enumerate(episode.zones.names)})


def _cost(model: nn.Module, task: TaskData) -> tuple[int, int]:
    """Parameters and FLOPs per sample of the whole model, probed on the first validation sample
    (a real one: a user's model may not accept zeros)."""
    c = module_cost(model, task.val_x[:1])
    return c.params, c.flops


# ---------------------------------------------------------------------------------------------
# The flight record of one tick (a run's, or one environment's in vectorised training)
# ---------------------------------------------------------------------------------------------


def record_tick(
    tx: TickWriter,
    env: int,
    policy: str,
    decision: Decision,
    obs: Observation,
    outcome: Outcome,
    metrics: dict[str, float] | None = None,
) -> None:
    """One environment's tick into the open transaction `tx`: its decision record (paper §8.1)
    and its events, and `metrics` when given (one set per transaction). The record names
    `policy`, or `decision.by` when set (an action injected by a forensic replay)."""
    if metrics is not None:
        tx.metrics(metrics)
    tx.decision(decision_record(tx.tick, env, policy, decision, obs, outcome.observation, outcome))
    for e in outcome.events:
        tx.event(e.kind, e.payload, slot=e.slot, env=env)


def decision_record(
    tick: int,
    env: int,
    policy: str,
    decision: Decision,
    obs: Observation,
    after: Observation,
    outcome: Outcome,
) -> DecisionRecord:
    """The flight record of one decision taken on `obs` (`after`: the same view after the
    tick)."""
    return DecisionRecord(
        env=env,
        tick=tick,
        policy=decision.by or policy,
        action=decision.action.names(),
        slot_states=[slot_state(s) for s in obs.slots],
        obs_before=obs_vector(obs),
        obs_after=obs_vector(after),
        mask=decision.mask,
        probs=decision.probs,
        entropy=decision.entropy,
        value=decision.value,
        reward=outcome.reward.total,
        spec_versions=SPEC_VERSIONS,
    )


# ---------------------------------------------------------------------------------------------
# Result
# ---------------------------------------------------------------------------------------------


@dataclass
class GrowResult:
    run_dir: Path
    metric_name: str
    start_metric: float
    """Validation metric after the first tick (the host, before any seed could matter)."""
    final_metric: float
    params_start: int
    params_end: int
    flops_start: int
    flops_end: int
    params_removed: int = 0
    """Parameters removed by decay (lysis); growth added params_end − params_start + this."""
    flops_removed: int = 0
    """FLOPs per sample removed by decay."""
    germinated: list[str] = field(default_factory=list)
    committed: list[str] = field(default_factory=list)
    pruned: list[str] = field(default_factory=list)
    rent_paid: float = 0.0
    churn_paid: float = 0.0
    reward_total: float = 0.0
    rollbacks: int = 0
    seed_accounts: dict[str, dict[str, float]] = field(default_factory=dict)
    """seed_id -> rent_paid, churn_paid, ticks_alive (reward units)."""
    zone_books: dict[str, dict[str, float]] = field(default_factory=dict)
    """With zones: zone -> rent_paid, churn_paid (reward units), germinations, transitions."""
    wall_time: float = 0.0
    weights_hash: str = ""
    event_log_hash: str = ""


# ---------------------------------------------------------------------------------------------
# The run: episode + policy + recorder + checkpoints
# ---------------------------------------------------------------------------------------------


class GrowthRun:
    """One recorded, resumable episode; `run()` plays its ticks."""

    def __init__(
        self,
        cfg: GrowConfig,
        episode: Episode,
        policy: Policy | ZonePolicies,
        run_dir: Path,
        *,
        store: RunStore,
    ) -> None:
        self.cfg, self.episode, self.policy = cfg, episode, policy
        self.run_dir, self.store = run_dir, store
        self.env, self.task = episode.env, episode.env.task
        self.params_start, self.flops_start = _cost(self.env.model, self.task)
        self.checkpoint_also: set[int] = set()
        """Ticks to checkpoint besides every `cfg.checkpoint_every` (a fork's injected tick)."""

    @property
    def start_tick(self) -> int:
        """The next tick to play."""
        return self.episode.t

    # -- state: everything a resumed run needs --------------------------------------------------
    def state(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        info, tensors = self.episode.state()
        info.update(
            policy=self.policy.state_dict(),
            params_start=self.params_start,
            flops_start=self.flops_start,
        )
        return info, tensors

    def save_checkpoint(self, tick: int) -> tuple[str, str]:
        info, tensors = self.state()
        path = self.run_dir / "checkpoints" / f"tick_{tick:05d}.safetensors"
        save_tensors(path, tensors, {"esper_run": json.dumps({**info, "tick_saved": tick})})
        return str(path.relative_to(self.run_dir)), hashlib.sha256(path.read_bytes()).hexdigest()

    def load(self, info: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        """Continue from a checkpoint's `state()`: the episode, the policy, the start costs."""
        self.episode.restore(info, tensors)
        self.policy.load_state_dict(info["policy"])
        self.params_start, self.flops_start = info["params_start"], info["flops_start"]

    def resume(self) -> int:
        """Load the last checkpoint within the last complete tick; drop what came after."""
        tick, info, tensors = last_checkpoint(self.store, self.run_dir, self.env.device)
        self.load(info, tensors)
        self.store.truncate_after(tick)
        return tick

    # -- the ticks -------------------------------------------------------------------------------
    def run(self, progress: Callable[[int, dict[str, float]], None] | None = None) -> GrowResult:
        t0 = time.perf_counter()
        for t in range(self.start_tick, self.cfg.ticks):
            metrics = self.step(t)
            if progress is not None:
                progress(t, metrics)
        return self.result(time.perf_counter() - t0)

    def step(self, t: int) -> dict[str, float]:
        """Play tick `t` (the next one) and record it; its metrics."""
        if t != self.episode.t:
            raise ValueError(f"tick {t} asked for, but the run is at tick {self.episode.t}")
        obs = self.episode.observe()
        if isinstance(self.policy, ZonePolicies):
            return self._step_zones(t)
        decision = self.policy.act(obs)
        outcome = self.episode.act(decision.action, decision.reason)
        metrics, ckpt = self._after(t, outcome)
        with self.store.tick(t) as tx:
            record_tick(tx, 0, self.policy.name, decision, obs, outcome, metrics)
            if ckpt is not None:
                tx.checkpoint(*ckpt)
        return metrics

    def _step_zones(self, t: int) -> dict[str, float]:
        """The rest of tick `t` with zones: each zone's policy on its view, one decision
        record per zone (its policy named `policy@zone`)."""
        assert isinstance(self.policy, ZonePolicies) and self.episode.zones is not None
        views = self.episode.zone_views()
        decisions = self.policy.act(views)
        outcome = self.episode.act_zones({z: (d.action, d.reason) for z, d in decisions.items()})
        metrics, ckpt = self._after(t, outcome)
        after = self.episode.zones.views(outcome.observation)
        with self.store.tick(t) as tx:
            tx.metrics(metrics)
            for z, d in decisions.items():
                name = f"{self.policy.name}@{z}"
                before, now = views[z].observation, after[z].observation
                tx.decision(decision_record(t, 0, name, d, before, now, outcome))
            for e in outcome.events:
                tx.event(e.kind, e.payload, slot=e.slot, env=0)
            if ckpt is not None:
                tx.checkpoint(*ckpt)
        return metrics

    def _after(self, t: int, outcome: Outcome) -> tuple[dict[str, float], tuple[str, str] | None]:
        """The tick's metrics, and its checkpoint when one is due."""
        # The grown model's cost per sample, measured after the tick's structural changes (a
        # probe forward of one sample, outside the tick: `esper report` plots it over time).
        metrics = {**outcome.metrics, "flops": float(_cost(self.env.model, self.task)[1])}
        ckpt = None
        if (t + 1) % self.cfg.checkpoint_every == 0 or outcome.done or t in self.checkpoint_also:
            ckpt = self.save_checkpoint(t)
        return metrics, ckpt

    def result(self, wall: float) -> GrowResult:
        params, flops = _cost(self.env.model, self.task)
        events = self.store.events()
        by = {
            k: [e.payload.get("blueprint") for e in events if e.kind == k]
            for k in ("germinate", "fossilize", "prune")
        }
        totals = self.episode.economy.ledger.totals()
        start, decay = self.episode.start_metric, self.episode.decay
        return GrowResult(
            run_dir=self.run_dir,
            metric_name=self.task.metric,
            start_metric=start if start is not None else float("nan"),
            final_metric=self.env.history[-1] if self.env.history else float("nan"),
            params_start=self.params_start,
            params_end=params,
            flops_start=self.flops_start,
            flops_end=flops,
            params_removed=decay.lysed_params if decay else 0,
            flops_removed=decay.lysed_flops if decay else 0,
            germinated=by["germinate"],
            committed=by["fossilize"],
            pruned=by["prune"],
            rent_paid=totals.rent,
            churn_paid=totals.churn,
            reward_total=totals.total,
            rollbacks=sum(e.kind == "governor_rollback" for e in events),
            wall_time=wall,
            seed_accounts=self.episode.seed_accounts(),
            zone_books=self.episode.zones.books_summary() if self.episode.zones else {},
            weights_hash=weights_hash(self.env.model),
            event_log_hash=self.store.event_log_hash(),
        )


# ---------------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------------


def checkpoint_before(store: RunStore, tick: int | None = None) -> CheckpointRecord | None:
    """The last checkpoint within the last complete tick (and before tick `tick`), or None."""
    last = store.last_complete_tick()
    if last is None:
        return None
    end = last if tick is None else min(last, tick - 1)
    ckpts = [c for c in store.checkpoints() if c.tick <= end]
    return ckpts[-1] if ckpts else None


def load_checkpoint(
    run_dir: Path, ck: CheckpointRecord, device: torch.device
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(metadata, tensors) of a run's checkpoint, its hash checked against the record."""
    path = run_dir / ck.path
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} is missing")
    if hashlib.sha256(path.read_bytes()).hexdigest() != ck.sha256:
        raise CheckpointError(f"checkpoint {path} does not match its recorded hash (corrupt)")
    with safe_open(str(path), framework="pt", device=str(device)) as f:
        info = json.loads(f.metadata()["esper_run"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)
    return info, tensors


def last_checkpoint(
    store: RunStore, run_dir: Path, device: torch.device
) -> tuple[int, dict[str, Any], dict[str, torch.Tensor]]:
    """(tick, metadata, tensors) of the last checkpoint within the last complete tick, its hash
    checked against the record."""
    ck = checkpoint_before(store)
    if ck is None:
        raise CheckpointError(f"run {run_dir} has no checkpoint")
    return ck.tick, *load_checkpoint(run_dir, ck, device)


def grown_model(run_dir: Path) -> tuple[nn.Module, TaskData]:
    """A recorded run's model as its last checkpoint holds it, and its task (the run is only
    read). Runs of `esper.grow` on a user's module cannot be rebuilt from their config."""
    with RunStore.open(run_dir) as store:
        cfg = config_from_dict(store.manifest()["config"])
        if cfg.task == "custom":
            raise ConfigError(
                f"{run_dir} grew a user's module (esper.grow): rebuild it in Python and call "
                "esper.export(model, example_input, out)"
            )
        episode = build_episode(cfg)
        _, info, tensors = last_checkpoint(store, run_dir, episode.env.device)
    episode.restore(info, tensors)
    return episode.env.model, episode.env.task


def new_run_dir(cfg: GrowConfig) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    base = Path(cfg.out) / f"{cfg.task}-{Path(cfg.policy).stem}-s{cfg.seed}-{stamp}"
    path, i = base, 1
    while path.exists():
        path, i = Path(f"{base}-{i}"), i + 1
    return path


def start_run(
    cfg: GrowConfig,
    *,
    model: nn.Module | None = None,
    task: TaskData | None = None,
    policy: Policy | ZonePolicies | None = None,
    run_dir: Path | None = None,
    callbacks: Iterable[Callback] = (),
    provenance: dict[str, Any] | None = None,
) -> GrowthRun:
    """Seed everything, build the episode (task and host unless given) and the policy (`cfg`'s
    unless given), create the run directory. `provenance`: more manifest entries (a fork's
    source, `esper.forensics`)."""
    device = pick_device(cfg.device)
    seed_everything(cfg.seed, device)
    episode = build_episode(cfg, model=model, task=task, callbacks=callbacks)
    if policy is None:
        policy = policy_for(cfg, episode)
    run_dir = Path(run_dir) if run_dir is not None else new_run_dir(cfg)
    manifest = build_manifest(config_to_dict(cfg), {"seed": cfg.seed}, str(device))
    manifest["task"] = episode.env.task.describe()
    manifest.update(provenance or {})
    store = RunStore.create(run_dir, manifest)
    return GrowthRun(cfg, episode, policy, run_dir, store=store)


def resume_run(run_dir: Path, callbacks: Iterable[Callback] = ()) -> GrowthRun:
    """Reopen `run_dir`, rebuild its episode and policy from the manifest, load its last
    checkpoint."""
    store = RunStore.open(run_dir)
    cfg = config_from_dict(store.manifest()["config"])
    seed_everything(cfg.seed, pick_device(cfg.device))
    episode = build_episode(cfg, callbacks=callbacks)
    policy = policy_for(cfg, episode)
    run = GrowthRun(cfg, episode, policy, run_dir, store=store)
    run.resume()
    return run
