"""One growth environment: a host with slots, its optimizer, its data, one control tick at a time.

The engine drives (paper §4.1): `train_tick` trains for one tick, `evaluate` measures the model and
every blended seed's α=0 ablation in one fused pass, `observe` builds what a policy sees,
`execute` performs a validated action, and `advance_clock` moves every slot's lifecycle clock
exactly once. The environment knows no policy and no reward.

Launch and finish. `train_tick` and `evaluate` each read one result back from the device (the
tick's loss, the replicas' metrics): that read is their only host sync. Each is split at that
point: `train_tick_async` / `evaluate_async` queue the work and return the device tensors
(`PendingTrain`, `PendingEvaluation`) without syncing, and `finish_train` / `finish_evaluate` do
the read. `train_tick()` is `finish_train(train_tick_async())`, the same ops in the same order, so
its results do not depend on which form is used; a vector of environments on CUDA launches all of
them first and syncs once (`esper.tolaria.vector`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from esper.contracts import (
    Actor,
    Blueprint,
    FactoredAction,
    Observation,
    Op,
    SeedSpec,
    Stage,
)
from esper.kasmina import (
    Compaction,
    SeedSlot,
    UnitMask,
    apply_model_state,
    blueprints_for,
    channel_dim,
    model_state,
    observe_gradients,
    probing,
    slot_depths,
    slots_of,
    tissue_of,
)
from esper.simic import SlotEconomics
from esper.tolaria.data import Batches, TaskData
from esper.tolaria.determinism import RunSeeds, rng_state, set_rng_state


@dataclass(frozen=True)
class EnvConfig:
    """How one environment trains and evaluates."""

    lr: float = 3e-3
    """Host learning rate (Adam); a seed's is lr × its blueprint's lr_multiplier."""
    weight_decay: float = 0.0
    batch_size: int = 64
    batches_per_tick: int = 0
    """Batches per control tick; 0 means one epoch."""
    eval_samples: int = 4096
    """At most this many validation samples are evaluated each tick (the first ones)."""
    eval_batch_size: int = 1024
    prune_fade_ticks: int = 0
    """Ticks a pruned seed's α takes to fade out."""
    widen_factor: float = 1.0
    """A WIDEN seed adds ceil(widen_factor × the stream's base width) channels."""

    def __post_init__(self) -> None:
        for name in ("lr", "batch_size", "eval_samples", "eval_batch_size"):
            if not getattr(self, name) > 0:
                raise ValueError(f"env.{name} must be > 0, got {getattr(self, name)}")
        if not self.widen_factor > 0:
            raise ValueError(f"env.widen_factor must be > 0, got {self.widen_factor}")
        if self.batches_per_tick < 0 or self.prune_fade_ticks < 0 or self.weight_decay < 0:
            raise ValueError("env.batches_per_tick, prune_fade_ticks, weight_decay must be >= 0")


@dataclass(frozen=True)
class TrainStats:
    loss: float
    """Mean training loss over the tick (NaN/Inf when training blew up)."""
    steps: int
    host_finite: bool = True
    """Every parameter outside the slots is finite after the tick."""
    nonfinite_slots: tuple[str, ...] = ()
    """Slots holding a non-finite parameter after the tick."""
    faults: tuple[str, ...] = ()
    """Slots whose seed turned a finite input into a non-finite output during the tick
    (`SeedSlot.fault`): the governor blames these first, as their output was the first thing to
    break (after a NaN loss, Adam writes NaN into every parameter that got a gradient)."""
    loss_variance: float = 0.0
    """Variance of the training loss across the tick's minibatches (zone telemetry)."""

    @property
    def finite(self) -> bool:
        return (
            math.isfinite(self.loss)
            and self.host_finite
            and not self.nonfinite_slots
            and not self.faults
        )


@dataclass(frozen=True)
class PendingTrain:
    """A training tick whose work is queued; its loss is still on the device."""

    total: torch.Tensor
    """Σ of the tick's batch losses, 0-d; reading it syncs the host with the device."""
    steps: int
    health: torch.Tensor
    """(1 + 2·len(slots),) float, 1 = true: the host parameters are all finite, then per slot
    its parameters are all finite, then per slot its fault flag (read with `total`)."""
    slots: tuple[str, ...]
    squares: torch.Tensor | None = None
    """Σ of the squared batch losses, 0-d (read with `total`): the minibatch variance."""


@dataclass(frozen=True)
class PendingEvaluation:
    """An evaluation whose work is queued; its per-replica results are still on the device."""

    means: torch.Tensor
    """(1 + len(ablated), 2): mean loss and accuracy of each replica; replica 0 is the model,
    replica i the model with `ablated[i - 1]` at α=0. Reading it syncs the host."""
    ablated: tuple[str, ...]
    """Names of the slots ablated, in replica order."""
    units: tuple[tuple[str, int], ...] = ()
    """(phage, unit) ablated (mask 0) in the replicas after the slots', in order."""
    groups: tuple[tuple[str, tuple[str, ...]], ...] = ()
    """(label, grown slots) of each group; those with slots are ablated together, one replica
    each, after the units', in order."""


@dataclass(frozen=True)
class BoundaryReading:
    """What crosses one slot's output on the probe batch (`GrowthEnv.boundary_probe`)."""

    mean: list[float]
    """Per channel."""
    std: list[float]
    grad_norm: float
    """‖∂ validation loss / ∂ output‖ (0 when nothing upstream of it trains)."""


@dataclass(frozen=True)
class Evaluation:
    metric: float
    loss: float
    contributions: dict[str, float] = field(default_factory=dict)
    """Slot name -> metric improvement the seed brings (metric with it − metric at α=0, sign
    flipped for lower-is-better metrics so that positive always means 'helps')."""
    units: dict[tuple[str, int], tuple[float, float]] = field(default_factory=dict)
    """(phage, unit) -> (contribution, loss rise) when that unit is ablated: the metric
    improvement it brings, signed as `contributions`, and val loss ablated − val loss."""
    groups: dict[str, float] = field(default_factory=dict)
    """Group label -> the metric improvement its slots bring together (all at α=0 in one
    replica; signed as `contributions`): a leave-one-zone-out probe."""


def _loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy for classification (B, K) or next-token prediction (B, T, V)."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


def germination_spec(action: FactoredAction, cfg: EnvConfig) -> SeedSpec:
    """The seed an environment of config `cfg` germinates for a GERMINATE `action` (a WIDEN's
    width is the environment's `widen_factor`): one rule for the engine and the audits' replay."""
    width = cfg.widen_factor if action.blueprint is Blueprint.WIDEN else 1.0
    return SeedSpec(action.blueprint, action.style, channel_width=width)


class GrowthEnv:
    """A host model with SeedSlots, trained on a task, one control tick at a time."""

    def __init__(
        self, model: nn.Module, task: TaskData, cfg: EnvConfig, *, device: torch.device, seed: int
    ) -> None:
        self.model = model.to(device)
        self.task, self.cfg, self.device = task, cfg, device
        self.slots: dict[str, SeedSlot] = dict(sorted(slots_of(model).items()))
        if not self.slots:
            raise ValueError("the model has no SeedSlot: nothing can grow (see insert_slots)")
        self.seeds = RunSeeds(seed)
        self.batches = Batches(
            task.train_x, task.train_y, cfg.batch_size, generator_seed=self.seeds.data
        )
        n = min(cfg.eval_samples, len(task.val_x))
        self.val_x, self.val_y = task.val_x[:n], task.val_y[:n]
        self.depths = slot_depths(self.model, self.val_x[:1])
        """Each slot's depth in the host (a property of the layout, measured once)."""
        self.clock = 0
        """The tick in progress: how many times the clock has advanced."""
        self.history: list[float] = []
        self.seeds_germinated = 0
        self.optimizer: torch.optim.Optimizer = self._make_optimizer()

    # ---------------------------------------------------------------------------------------
    # Training
    # ---------------------------------------------------------------------------------------
    def train_tick(self) -> TrainStats:
        return self.finish_train(self.train_tick_async())

    def train_tick_async(self, batches: int | None = None) -> PendingTrain:
        """Queue one tick of training (`batches`: that many instead of the configured tick); no
        host sync (the loss stays on the device). Gradient telemetry accumulates on the device
        too (`SeedSlot.observe_gradients`). One exception: the batch that starts an epoch
        copies its permutation to the device (`Batches`)."""
        n = batches or self.cfg.batches_per_tick or len(self.batches)
        self.model.train()
        total = torch.zeros((), device=self.device)
        squares = torch.zeros((), device=self.device)
        for xb, yb in self.batches.take(n):
            loss = _loss(self.model(xb), yb)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            observe_gradients(self.model, self.slots.values())
            self.optimizer.step()
            total += loss.detach()
            squares += loss.detach() ** 2
        return PendingTrain(total, n, self._health(), tuple(self.slots), squares)

    def _health(self) -> torch.Tensor:
        """What the governor checks, as one device tensor (no sync): see `PendingTrain.health`."""
        in_slots = {id(p) for s in self.slots.values() for p in s.parameters()}
        groups = [[p for p in self.model.parameters() if id(p) not in in_slots]]
        groups += [list(s.parameters()) for s in self.slots.values()]
        sizes = [sum(p.numel() for p in g) for g in groups]
        flat = torch.cat([p.detach().reshape(-1) for g in groups for p in g])
        ok = torch.isfinite(flat).split(sizes)
        no = torch.zeros((), dtype=torch.bool, device=self.device)
        faults = [no if s.fault is None else s.fault for s in self.slots.values()]
        return torch.stack([*(part.all() for part in ok), *faults]).float()

    @staticmethod
    def finish_train(pending: PendingTrain) -> TrainStats:
        """The tick's mean loss and health: the one host sync of a training tick."""
        health, names = pending.health.tolist(), pending.slots
        params_ok, faults = health[1 : 1 + len(names)], health[1 + len(names) :]
        total, squares = float(pending.total), 0.0
        if pending.squares is not None:
            total, squares = torch.stack([pending.total, pending.squares]).tolist()
        mean = total / pending.steps
        return TrainStats(
            mean,
            pending.steps,
            host_finite=bool(health[0]),
            nonfinite_slots=tuple(s for s, ok in zip(names, params_ok, strict=True) if not ok),
            faults=tuple(s for s, bad in zip(names, faults, strict=True) if bad),
            loss_variance=max(0.0, squares / pending.steps - mean**2),
        )

    # ---------------------------------------------------------------------------------------
    # Evaluation, with every blended seed's α=0 ablation in the same pass
    # ---------------------------------------------------------------------------------------
    def evaluate(
        self,
        units: Sequence[tuple[str, int]] = (),
        groups: Mapping[str, Sequence[str]] | None = None,
    ) -> Evaluation:
        """Replicate the validation batch K+1 times; replica i > 0 runs with seed i at α=0, then
        one replica per phage unit in `units` with that unit's mask at 0, then one per group in
        `groups` (label -> slot names) with all of its ablatable slots at α=0 together."""
        return self.finish_evaluate(self.evaluate_async(units, groups))

    def evaluate_async(
        self,
        units: Sequence[tuple[str, int]] = (),
        groups: Mapping[str, Sequence[str]] | None = None,
    ) -> PendingEvaluation:
        """Queue `evaluate`'s work; no host sync (the sums stay on the device). A probe: eval mode
        and `no_grad`, the model's modes and buffers left as they were (`probing`)."""
        active = [s for s in self.slots.values() if s.ablatable]
        masks = {n: t.mask for n, t in tissue_of(self.model).items()} if units else {}
        live = {s.name for s in active}
        # each group's grown slots; a group with none brings exactly 0 and gets no replica
        grouped = tuple(
            (label, tuple(n for n in names if n in live)) for label, names in (groups or {}).items()
        )
        fused = tuple(g for g in grouped if g[1])
        reps = len(active) + len(units) + len(fused) + 1
        sums = torch.zeros(reps, 2, device=self.device)  # per replica: Σ loss, Σ correct
        count = 0
        with probing(self.model):
            for start in range(0, len(self.val_x), self.cfg.eval_batch_size):
                x = self.val_x[start : start + self.cfg.eval_batch_size]
                y = self.val_y[start : start + self.cfg.eval_batch_size]
                self._evaluate_batch(x, y, active, units, fused, masks, sums)
                count += y.numel()
        return PendingEvaluation(sums / count, tuple(s.name for s in active), tuple(units), grouped)

    def _evaluate_batch(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        active: list[SeedSlot],
        units: Sequence[tuple[str, int]],
        groups: Sequence[tuple[str, tuple[str, ...]]],
        masks: dict[str, UnitMask],
        sums: torch.Tensor,
    ) -> None:
        """Add one validation batch's Σ loss and Σ correct, per replica, to `sums`."""
        reps, n = len(active) + len(units) + len(groups) + 1, len(x)
        first_group = len(active) + len(units) + 1
        for i, slot in enumerate(active, start=1):
            m = torch.ones(reps * n, device=self.device)
            m[i * n : (i + 1) * n] = 0.0
            for g, (_, names) in enumerate(groups, start=first_group):
                if slot.name in names:
                    m[g * n : (g + 1) * n] = 0.0
            slot.set_ablation(m)
        for i, (name, u) in enumerate(units, start=len(active) + 1):
            mask = masks[name]
            if mask.ablation is None:  # (batch, units): that unit at 0 in its replica only
                mask.ablation = torch.ones(reps * n, mask.units, device=self.device)
            mask.ablation[i * n : (i + 1) * n, u] = 0.0
        try:
            logits = self.model(torch.cat([x] * reps))
        finally:
            for slot in active:
                slot.set_ablation(None)
            for mask in masks.values():
                mask.ablation = None
        logits = logits.view(reps, n, *logits.shape[1:])
        for r in range(reps):
            sums[r, 0] += _loss(logits[r], y) * y.numel()
            sums[r, 1] += (logits[r].argmax(-1) == y).sum()

    def finish_evaluate(self, pending: PendingEvaluation) -> Evaluation:
        """Metrics and contributions: the one host sync of an evaluation."""
        loss, correct = pending.means.T.tolist()
        metrics = [self._metric(lo, c) for lo, c in zip(loss, correct, strict=True)]
        sign = 1.0 if self.task.higher_is_better else -1.0
        contributions = {
            name: sign * (metrics[0] - metrics[i])
            for i, name in enumerate(pending.ablated, start=1)
        }
        first = len(pending.ablated) + 1
        units = {
            key: (sign * (metrics[0] - metrics[i]), loss[i] - loss[0])
            for i, key in enumerate(pending.units, start=first)
        }
        replica = iter(range(first + len(pending.units), len(metrics)))
        groups = {
            label: sign * (metrics[0] - metrics[next(replica)]) if names else 0.0
            for label, names in pending.groups
        }
        return Evaluation(metrics[0], loss[0], contributions, units, groups)

    def boundary_probe(self, names: Sequence[str], samples: int) -> dict[str, BoundaryReading]:
        """What crosses each slot in `names` on the first `samples` validation samples: its
        output's per-channel mean and standard deviation, and the norm of the validation loss's
        gradient with respect to that output. Eval mode, buffers kept (`probing`); no
        parameter's `.grad` is touched (`torch.autograd.grad` on the outputs only)."""
        outs: dict[str, torch.Tensor] = {}
        hooks = [
            self.slots[n].register_forward_hook(lambda _m, _i, o, n=n: outs.__setitem__(n, o))
            for n in names
        ]
        try:
            with probing(self.model, grad=True):
                loss = _loss(self.model(self.val_x[:samples]), self.val_y[:samples])
                wanted = [n for n in names if outs[n].requires_grad]
                grads = torch.autograd.grad(loss, [outs[n] for n in wanted]) if wanted else ()
        finally:
            for h in hooks:
                h.remove()
        norms = dict.fromkeys(names, torch.zeros((), device=self.device))
        norms.update({n: g.float().norm() for n, g in zip(wanted, grads, strict=True)})
        out = {}
        for n in names:
            o = outs[n].detach().float()
            c = channel_dim(self.slots[n].topology)
            flat = o.movedim(c, 0).reshape(o.shape[c], -1)
            out[n] = (flat.mean(1), flat.std(1, correction=0), norms[n])
        host = {n: (m.tolist(), s.tolist(), float(g)) for n, (m, s, g) in out.items()}  # one sync
        return {n: BoundaryReading(*v) for n, v in host.items()}

    def _metric(self, loss: float, accuracy: float) -> float:
        if self.task.metric == "accuracy":
            return accuracy
        if self.task.metric in ("bits_per_char", "bits_per_token"):
            return loss / math.log(2)
        raise ValueError(f"unknown metric {self.task.metric!r}")

    # ---------------------------------------------------------------------------------------
    # What the policy sees
    # ---------------------------------------------------------------------------------------
    def host_params(self) -> int:
        """The host's own parameters: not a seed's, a phage's, nor a committed widening's
        (those are priced as seeds, `SeedSlot.absorbed`)."""
        in_slots = {id(p) for s in self.slots.values() for p in s.parameters()}
        own = sum(p.numel() for p in self.model.parameters() if id(p) not in in_slots)
        return own - sum(s.absorbed for s in self.slots.values())

    def observe(
        self,
        tick: int,
        max_ticks: int,
        ev: Evaluation,
        train: TrainStats,
        rents: dict[str, float],
        rent_paid: float,
    ) -> Observation:
        slots = []
        for name, slot in self.slots.items():
            slots.append(
                replace(slot.telemetry(), rent=rents.get(name, 0.0), depth=self.depths[name])
            )
        return Observation(
            tick=tick,
            max_ticks=max_ticks,
            metric=ev.metric,
            higher_is_better=self.task.higher_is_better,
            val_loss=ev.loss,
            train_loss=train.loss,
            history=tuple(self.history),
            host_params=self.host_params(),
            seed_params=sum(s.param_count for s in slots),
            rent_paid=rent_paid,
            slots=tuple(slots),
            legal_blueprints=self._legal_blueprints(),
        )

    def _legal_blueprints(self) -> tuple[tuple[Blueprint, ...], ...]:
        """What each slot can germinate: its topology's blueprints, and WIDEN on a host that
        declares its stream while no other widening of it is live (they would wrap the same
        layers)."""
        can_widen = not any(s.widening for s in self.slots.values())
        return tuple(
            (
                *blueprints_for(s.topology),
                *([Blueprint.WIDEN] if s.site is not None and can_widen else []),
            )
            for s in self.slots.values()
        )

    def slot_economics(self) -> list[SlotEconomics]:
        """Each slot as Simic prices it (after this tick's action)."""
        return [
            SlotEconomics(
                n, s.stage, min(1.0, max(0.0, s.effective_alpha)), s.seed_param_count(), s.seed_id
            )
            for n, s in self.slots.items()
        ]

    def record_evaluation(self, ev: Evaluation, tick: int) -> None:
        """Remember the metric and hand each seed its ablation contribution."""
        self.history.append(ev.metric)
        for name, value in ev.contributions.items():
            slot = self.slots[name]
            slot.contribution, slot.contribution_tick = value, tick
            if slot.phage is not None:  # a committed seed's ROI: its contribution (rent: Simic)
                slot.phage.roi.contribution = value

    def evaluate_gates(self) -> None:
        for slot in self.slots.values():
            if slot.stage is Stage.TRAINING:
                slot.evaluate_gate()

    # ---------------------------------------------------------------------------------------
    # Acting
    # ---------------------------------------------------------------------------------------
    def slot_at(self, index: int) -> SeedSlot:
        names = list(self.slots)
        if not 0 <= index < len(names):
            raise IndexError(f"slot index {index} out of range 0..{len(names) - 1}")
        return self.slots[names[index]]

    def execute(
        self, action: FactoredAction, actor: Actor = Actor.TAMIYO, spec: SeedSpec | None = None
    ) -> list[tuple[str, Op]]:
        """Perform `action`; raises IllegalTransition (state unchanged) if it is not legal.
        Returns the (slot, op) pairs done, for churn accounting."""
        op = action.op
        if op is Op.WAIT:
            return []
        slot = self.slot_at(action.slot)
        if op is Op.GERMINATE:
            spec = spec or germination_spec(action, self.cfg)
            self.seeds_germinated += 1
            slot.germinate(
                spec,
                actor=actor,
                alpha_target=action.alpha_target.alpha,
                tempo_ticks=action.tempo.ticks,
                alpha_curve=action.alpha_curve,
                seed_id=f"seed{self.seeds_germinated}",
                # Common random numbers: a seed's initial weights depend on the run's seed, its
                # slot and its tick only, never on which other seeds were germinated before it
                # (so an audit's coalition retrains start every seed from the same weights).
                init_seed=self.seeds.germination(slot.name, self.clock),
            )
        elif op is Op.ADVANCE:
            slot.advance(actor=actor)
        elif op is Op.SET_ALPHA_TARGET:
            slot.set_alpha_target(
                action.alpha_target.alpha, action.alpha_speed.ticks, action.alpha_curve, actor=actor
            )
        elif op is Op.PRUNE or op is Op.EMERGENCY_PRUNE:
            slot.prune(actor=actor, fade_ticks=self.cfg.prune_fade_ticks)
        elif op is Op.FOSSILIZE:
            done = slot.fossilize(actor=actor)
            if isinstance(done, Compaction):
                self._carry_moments(done)
        else:
            raise ValueError(f"op {op.name} is not executed by the growth environment")
        self.sync_optimizer()
        return [(slot.name, op)]

    def advance_clock(self, tick: int) -> None:
        for slot in self.slots.values():
            slot.tick(tick)
        self.clock = tick + 1
        self.sync_optimizer()

    # ---------------------------------------------------------------------------------------
    # Optimizer: one group for the host (committed phages included), one per live seed
    # ---------------------------------------------------------------------------------------
    def _param_layout(self) -> list[tuple[str, list[nn.Parameter], float]]:
        in_slots = {id(p) for s in self.slots.values() for p in s.parameters()}
        host = [p for p in self.model.parameters() if id(p) not in in_slots]
        groups = []
        for name, slot in self.slots.items():
            if slot.phage is not None:
                host += list(slot.phage.parameters())  # commit moves the seed to the host
            elif slot.seed is not None:
                params = [*slot.seed.parameters(), *slot.blend.parameters()]
                if params:
                    groups.append((name, params, self.cfg.lr * slot.spec.lr_multiplier))
        return [("host", host, self.cfg.lr), *groups]

    def _make_optimizer(self) -> torch.optim.Optimizer:
        groups = [{"params": ps, "lr": lr, "name": name} for name, ps, lr in self._param_layout()]
        return torch.optim.Adam(groups, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)

    def _carry_moments(self, compaction: Compaction) -> None:
        """A compacted widening replaced host layers by wider ones: each new tensor keeps the
        Adam moments of the weights it contains (in their slices) and starts fresh (zero) ones
        for its new rows and columns; the step count is the old weights'."""
        state = self.optimizer.state
        for new, old, where in compaction.moved:
            if old not in state:
                continue
            carried = {}
            for key, value in state[old].items():
                if torch.is_tensor(value) and value.shape == old.shape:
                    wide = torch.zeros_like(new)
                    wide[where] = value
                    carried[key] = wide
                else:
                    carried[key] = value
            state[new] = carried

    def sync_optimizer(self) -> None:
        """Rebuild the parameter groups from the model; keep the state of surviving params only,
        so a pruned seed leaves no tensor behind and a committed one keeps its moments."""
        old = self.optimizer.state
        self.optimizer = self._make_optimizer()
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                if p in old:
                    self.optimizer.state[p] = old[p]

    # ---------------------------------------------------------------------------------------
    # State: snapshots (governor) and checkpoints (resume)
    # ---------------------------------------------------------------------------------------
    def state_dict(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """(JSON-able metadata, tensors): model, optimizer, data order, RNGs, history."""
        meta, tensors = model_state(self.model)
        out = {f"model.{k}": v for k, v in tensors.items()}
        opt = self.optimizer.state_dict()
        for idx, st in opt["state"].items():
            for key, value in st.items():
                out[f"optim.{idx}.{key}"] = torch.as_tensor(value).detach().clone()
        batches = self.batches.state_dict()
        out["batches.generator"] = batches.pop("generator_state")
        out.update({f"rng.{k}": v for k, v in rng_state().items()})
        info = {
            "model": meta,
            "optim_groups": opt["param_groups"],
            "batches": batches,
            "history": self.history,
            "seeds_germinated": self.seeds_germinated,
            "clock": self.clock,
        }
        return json.loads(json.dumps(info)), out

    def load_state_dict(self, info: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        model = {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}
        apply_model_state(self.model, info["model"], model)
        self.optimizer = self._make_optimizer()
        state: dict[int, dict[str, torch.Tensor]] = {}
        for k, v in tensors.items():
            if k.startswith("optim."):
                _, idx, key = k.split(".", 2)
                # A copy: Adam updates its moments in place, and `tensors` may be a governor
                # snapshot that a second rollback of the same tick must find unchanged.
                state.setdefault(int(idx), {})[key] = v.clone()
        self.optimizer.load_state_dict({"state": state, "param_groups": info["optim_groups"]})
        self.batches.load_state_dict(
            {**info["batches"], "generator_state": tensors["batches.generator"]}
        )
        set_rng_state({k[4:]: v for k, v in tensors.items() if k.startswith("rng.")})
        for slot in self.slots.values():  # a failed attempt's gradients and probes must not count
            slot.reset_tick_telemetry()
        self.history = list(info["history"])
        self.seeds_germinated = info["seeds_germinated"]
        self.clock = info["clock"]
