"""One growth run, top to bottom: the paper's control tick with the governor, the economy, the
policy and the flight recorder around it. `esper grow` and `esper.grow()` both end up here.

    train tick → governor check (rollback + force-prune on a trigger) → evaluate (fused α=0
    ablations) → observe → policy acts → validate + execute → slots' clocks advance → Simic prices
    the tick → snapshot, record, checkpoint
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from esper.config import GrowConfig, config_from_dict, config_to_dict
from esper.contracts import Actor, FactoredAction, Op, Stage
from esper.kasmina import CNNHost, MLPHost, TransformerHost, module_cost, save_tensors
from esper.recorder import DecisionRecord, RunStore, build_manifest
from esper.simic import Economy
from esper.tamiyo.learned import LearnedPolicy
from esper.tamiyo.masks import illegal_reason
from esper.tamiyo.policies import POLICIES, Decision, Policy, make_policy
from esper.tolaria.data import TaskData, load_task
from esper.tolaria.determinism import pick_device, seed_everything
from esper.tolaria.environment import GrowthEnv
from esper.tolaria.governor import Governor

SPEC_VERSIONS = {
    "obs": "obs-v1",
    "reward": "simic-v2",
    "blueprints": "kasmina-13-v1",
    "actions": "factored-8-v1",
}
Callback = Callable[[int, GrowthEnv], None]
SHIPPED_POLICY = Path(__file__).parent / "tamiyo" / "trained" / "digits.safetensors"
"""The PPO policy trained on digits (`make policy`); `--policy learned` deploys it."""


# ---------------------------------------------------------------------------------------------
# Hosts for the built-in tasks
# ---------------------------------------------------------------------------------------------


def build_host(cfg: GrowConfig, task: TaskData) -> nn.Module:
    h, kind = cfg.host, cfg.host.kind
    if kind == "auto":
        kind = "transformer" if task.name == "text" else "cnn"
    slot_kw = {"lifecycle": cfg.lifecycle}
    if kind == "cnn":
        c, size = task.input_shape[0], task.input_shape[-1]
        return CNNHost(h.width, h.depth, c, task.num_outputs, size, **slot_kw)
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
        return TransformerHost(task.num_outputs, d, h.depth, 4, task.train_x.shape[1], **slot_kw)
    raise ValueError(f"unknown host kind {kind!r}; valid: auto, cnn, mlp, transformer")


def load_policy(cfg: GrowConfig, slot_names: list[str]) -> Policy:
    """A built-in policy by name, or a trained one from a `.safetensors` file (deployed
    deterministically, the most probable action, unless `cfg.sample_actions`)."""
    if cfg.policy in POLICIES:
        return make_policy(cfg.policy, cfg.seed, cfg.heuristic)
    path = SHIPPED_POLICY if cfg.policy == "learned" else Path(cfg.policy)
    if path.suffix == ".safetensors" or path.is_file():
        return LearnedPolicy.load(
            path, expect_slots=slot_names, seed=cfg.seed, deterministic=not cfg.sample_actions
        )
    raise ValueError(
        f"unknown policy {cfg.policy!r}; valid: {', '.join(POLICIES)}, learned, "
        "or the path of a trained policy (.safetensors)"
    )


def weights_hash(model: nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _cost(model: nn.Module, task: TaskData) -> tuple[int, int]:
    """Parameters and FLOPs per sample of the whole model."""
    c = module_cost(model, tuple(task.input_shape), dtype=task.train_x.dtype)
    return c.params, c.flops


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
    germinated: list[str] = field(default_factory=list)
    committed: list[str] = field(default_factory=list)
    pruned: list[str] = field(default_factory=list)
    rent_paid: float = 0.0
    churn_paid: float = 0.0
    reward_total: float = 0.0
    rollbacks: int = 0
    seed_accounts: dict[str, dict[str, float]] = field(default_factory=dict)
    """seed_id -> rent_paid, churn_paid, ticks_alive (reward units)."""
    wall_time: float = 0.0
    weights_hash: str = ""
    event_log_hash: str = ""


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------


class GrowthRun:
    """Owns every moving part of one run; `run()` loops the control tick."""

    def __init__(
        self,
        cfg: GrowConfig,
        model: nn.Module,
        task: TaskData,
        run_dir: Path,
        *,
        store: RunStore,
        callbacks: Iterable[Callback] = (),
    ) -> None:
        self.cfg, self.task, self.run_dir, self.store = cfg, task, run_dir, store
        self.device = pick_device(cfg.device)
        self.env = GrowthEnv(model, task, cfg.env, device=self.device, seed=cfg.seed)
        self.policy: Policy = load_policy(cfg, list(self.env.slots))
        econ = replace(cfg.economy, higher_is_better=task.higher_is_better)
        self.economy = Economy(econ)
        self.governor = Governor(cfg.governor)
        self.callbacks = list(callbacks)
        self.start_tick = 0
        self.rollbacks = 0
        self.start_metric: float | None = None
        self.params_start, self.flops_start = _cost(model, task)

    # -- state: everything a resumed run needs --------------------------------------------------
    def state(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        info, tensors = self.env.state_dict()
        info.update(
            policy=self.policy.state_dict(),
            economy=self.economy.state_dict(),
            governor=self.governor.state_dict(),
            start_metric=self.start_metric,
            params_start=self.params_start,
            flops_start=self.flops_start,
        )
        return info, tensors

    def load_state(self, info: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        self.env.load_state_dict(info, tensors)
        self.policy.load_state_dict(info["policy"])
        self.economy.load_state_dict(info["economy"])
        self.governor.load_state_dict(info["governor"])
        self.start_metric = info["start_metric"]
        self.params_start, self.flops_start = info["params_start"], info["flops_start"]

    def save_checkpoint(self, tick: int) -> tuple[str, str]:
        info, tensors = self.state()
        path = self.run_dir / "checkpoints" / f"tick_{tick:05d}.safetensors"
        save_tensors(path, tensors, {"esper_run": json.dumps({**info, "tick": tick})})
        return str(path.relative_to(self.run_dir)), hashlib.sha256(path.read_bytes()).hexdigest()

    def resume(self) -> int:
        """Load the last checkpoint within the last complete tick; drop what came after."""
        last = self.store.last_complete_tick()
        ckpts = [c for c in self.store.checkpoints() if last is not None and c.tick <= last]
        if not ckpts:
            raise ValueError(f"run {self.run_dir} has no checkpoint to resume from")
        ck = ckpts[-1]
        path = self.run_dir / ck.path
        if hashlib.sha256(path.read_bytes()).hexdigest() != ck.sha256:
            raise ValueError(f"checkpoint {path} does not match its recorded hash (corrupt)")
        with safe_open(str(path), framework="pt", device=str(self.device)) as f:
            info = json.loads(f.metadata()["esper_run"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)
        self.load_state(info, tensors)
        self.store.truncate_after(ck.tick)
        self.start_tick = ck.tick + 1
        return ck.tick

    # -- the control tick -----------------------------------------------------------------------
    def run(self, progress: Callable[[int, dict[str, float]], None] | None = None) -> GrowResult:
        t0 = time.perf_counter()
        if self.start_tick == 0:
            self.governor.keep(-1, self.state())
        else:
            self.governor.keep(self.start_tick - 1, self.state())
        for t in range(self.start_tick, self.cfg.ticks):
            metrics = self.step(t)
            if progress is not None:
                progress(t, metrics)
        return self.result(time.perf_counter() - t0)

    def step(self, t: int) -> dict[str, float]:
        env, events = self.env, []
        for cb in self.callbacks:
            cb(t, env)
        train = self._train_safely(t, events)
        ev = env.evaluate()
        env.record_evaluation(ev, t)
        env.evaluate_gates()
        if self.start_metric is None:
            self.start_metric = ev.metric
        rent_paid = self.economy.ledger.totals().rent
        obs = env.observe(t, self.cfg.ticks, ev, train, self.economy.last_rents, rent_paid)
        decision = self.policy.act(obs)
        ops = self._execute(decision, obs, events)
        before = {n: s.stage for n, s in env.slots.items()}
        env.advance_clock(t)
        events += [
            ("lifecycle", {"stage": s.stage.name, "from": before[n].name}, n)
            for n, s in env.slots.items()
            if s.stage is not before[n]
        ]
        r = self.economy.step(
            t,
            env.slot_economics(),
            ops,
            env.host_params(),
            env.history[-2] if len(env.history) > 1 else None,
            ev.metric,
        )
        obs_after = env.observe(
            t, self.cfg.ticks, ev, train, self.economy.last_rents, self.economy.ledger.totals().rent
        )
        self.governor.keep(t, self.state())
        metrics = {
            "train_loss": train.loss,
            "val_loss": ev.loss,
            "metric": ev.metric,
            "reward": r.total,
            "reward_task": r.task,
            "rent": r.rent,
            "churn": r.churn,
            "seed_params": obs_after.seed_params,
            "host_params": obs_after.host_params,
        }
        if t == self.cfg.ticks - 1:  # the run's books, per seed, as its last event
            events.append(("seed_accounts", self._seed_accounts(), None))
        self._record(t, decision, obs, obs_after, r.total, metrics, events)
        return metrics

    def _train_safely(self, t: int, events: list[tuple[str, dict[str, Any], str | None]]) -> Any:
        """Train one tick; on a governor trigger roll back, force-prune the offender, retry."""
        env = self.env
        train = env.train_tick()
        verdict = self.governor.check(train, env.slots)
        while verdict is not None:
            events.append(
                (
                    f"governor_{verdict.kind}",
                    {"detail": verdict.detail, "offender": verdict.offender},
                    None,
                )
            )
            snap_tick, state = self.governor.rollback()  # raises GovernorError when hopeless
            self.load_state(*state)
            self.rollbacks += 1
            events.append(("governor_rollback", {"to_tick": snap_tick}, None))
            slot = env.slots.get(verdict.offender) if verdict.offender else None
            if slot is not None and slot.stage in (
                Stage.GERMINATED,
                Stage.TRAINING,
                Stage.BLENDING,
                Stage.HOLDING,
                Stage.COMMITTED,
            ):
                blueprint = slot.spec.blueprint.name if slot.spec else None
                slot.prune(actor=Actor.TOLARIA)
                env.sync_optimizer()
                events.append(
                    (
                        "governor_lobotomy",
                        {"blueprint": blueprint, "seed_id": slot.seed_id},
                        slot.name,
                    )
                )
            train = env.train_tick()
            verdict = self.governor.check(train, env.slots)
        self.governor.accept(train.loss)
        return train

    def _execute(self, decision: Decision, obs: Any, events: list) -> list[tuple[str, Op]]:
        action: FactoredAction = decision.action
        reason = illegal_reason(action, obs)
        if reason is not None:
            events.append(("rejected_action", {"reason": reason, **action_names(action)}, None))
            return []
        if action.op is Op.WAIT:
            return []
        slot = self.env.slot_at(action.slot)
        ops = self.env.execute(action)
        payload = {
            "reason": decision.reason,
            "seed_id": slot.seed_id,
            "blueprint": slot.spec.blueprint.name if slot.spec else None,
        }
        events.append((action.op.name.lower(), payload, slot.name))
        return ops

    def _seed_accounts(self) -> dict[str, dict[str, float]]:
        return {
            k: {"rent_paid": a.rent_paid, "churn_paid": a.churn_paid, "ticks_alive": a.ticks_alive}
            for k, a in sorted(self.economy.ledger.per_seed().items())
        }

    def _record(
        self,
        t: int,
        decision: Decision,
        obs: Any,
        obs_after: Any,
        reward: float,
        metrics: dict[str, float],
        events: list,
    ) -> None:
        rec = DecisionRecord(
            env=0,
            tick=t,
            policy=self.policy.name,
            action=action_names(decision.action),
            slot_states=[slot_state(s) for s in obs.slots],
            obs_before=obs_vector(obs),
            obs_after=obs_vector(obs_after),
            mask=decision.mask,
            probs=decision.probs,
            entropy=decision.entropy,
            value=decision.value,
            reward=reward,
            spec_versions=SPEC_VERSIONS,
        )
        ckpt = None
        if (t + 1) % self.cfg.checkpoint_every == 0 or t == self.cfg.ticks - 1:
            ckpt = self.save_checkpoint(t)
        with self.store.tick(t) as tx:
            tx.metrics(metrics)
            tx.decision(rec)
            for kind, payload, slot in events:
                tx.event(kind, payload, slot=slot)
            if ckpt is not None:
                tx.checkpoint(*ckpt)

    def result(self, wall: float) -> GrowResult:
        params, flops = _cost(self.env.model, self.task)
        events = self.store.events()
        by = {
            k: [e.payload.get("blueprint") for e in events if e.kind == k]
            for k in ("germinate", "fossilize", "prune")
        }
        totals = self.economy.ledger.totals()
        return GrowResult(
            run_dir=self.run_dir,
            metric_name=self.task.metric,
            start_metric=self.start_metric if self.start_metric is not None else float("nan"),
            final_metric=self.env.history[-1] if self.env.history else float("nan"),
            params_start=self.params_start,
            params_end=params,
            flops_start=self.flops_start,
            flops_end=flops,
            germinated=by["germinate"],
            committed=by["fossilize"],
            pruned=by["prune"],
            rent_paid=totals.rent,
            churn_paid=totals.churn,
            reward_total=totals.total,
            rollbacks=sum(e.kind == "governor_rollback" for e in events),
            wall_time=wall,
            seed_accounts=self._seed_accounts(),
            weights_hash=weights_hash(self.env.model),
            event_log_hash=self.store.event_log_hash(),
        )


def action_names(a: FactoredAction) -> dict[str, str]:
    return {
        "op": a.op.name,
        "slot": str(a.slot),
        "blueprint": a.blueprint.name,
        "style": a.style.name,
        "tempo": a.tempo.name,
        "alpha_target": a.alpha_target.name,
        "alpha_speed": a.alpha_speed.name,
        "alpha_curve": a.alpha_curve.name,
    }


def slot_state(s: Any) -> dict[str, Any]:
    return {
        "name": s.name,
        "stage": s.stage.name,
        "alpha": s.alpha,
        "blueprint": s.spec.blueprint.name if s.spec else None,
        "ticks_in_stage": s.ticks_in_stage,
        "contribution": s.contribution,
        "rent": s.rent,
    }


def obs_vector(obs: Any) -> list[float]:
    """A flat numeric view of the observation (the learned policy defines its own features)."""
    v = [
        obs.tick / obs.max_ticks,
        obs.metric,
        obs.val_loss,
        obs.train_loss,
        float(obs.host_params),
        float(obs.seed_params),
        obs.rent_paid,
    ]
    for s in obs.slots:
        v += [float(s.stage), s.alpha, float(s.ticks_in_stage), s.contribution or 0.0, s.rent]
    return v


# ---------------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------------


def new_run_dir(cfg: GrowConfig) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    base = Path(cfg.out) / f"{cfg.task}-{cfg.policy}-s{cfg.seed}-{stamp}"
    path, i = base, 1
    while path.exists():
        path, i = Path(f"{base}-{i}"), i + 1
    return path


def start_run(
    cfg: GrowConfig,
    *,
    model: nn.Module | None = None,
    task: TaskData | None = None,
    run_dir: Path | None = None,
    callbacks: Iterable[Callback] = (),
) -> GrowthRun:
    """Seed everything, build task and host (unless given), create the run directory."""
    device = pick_device(cfg.device)
    seed_everything(cfg.seed, device)
    if task is None:
        task = load_task(
            cfg.task,
            seed=cfg.seed,
            device=device,
            data_dir=Path(cfg.data_dir) if cfg.data_dir else None,
        )
    if model is None:
        model = build_host(cfg, task)
    run_dir = Path(run_dir) if run_dir is not None else new_run_dir(cfg)
    manifest = build_manifest(config_to_dict(cfg), {"seed": cfg.seed}, str(device))
    manifest["task"] = task.describe()
    store = RunStore.create(run_dir, manifest)
    return GrowthRun(cfg, model, task, run_dir, store=store, callbacks=callbacks)


def resume_run(run_dir: Path, callbacks: Iterable[Callback] = ()) -> GrowthRun:
    """Reopen `run_dir`, rebuild its task and host from the manifest, load its last checkpoint."""
    store = RunStore.open(run_dir)
    cfg = config_from_dict(store.manifest()["config"])
    device = pick_device(cfg.device)
    seed_everything(cfg.seed, device)
    task = load_task(
        cfg.task,
        seed=cfg.seed,
        device=device,
        data_dir=Path(cfg.data_dir) if cfg.data_dir else None,
    )
    run = GrowthRun(cfg, build_host(cfg, task), task, run_dir, store=store, callbacks=callbacks)
    run.resume()
    return run
