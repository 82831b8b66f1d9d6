"""One episode: a growth environment, its economy and its governor, one control tick at a time.

The control tick of paper §2.1, written once. Every driver calls it: a recorded run
(`esper.run.GrowthRun`), K episodes in lockstep (`VectorEnv`), evaluation, audits, benchmarks and
tests.

    obs = episode.observe()     # callbacks → train one tick → governor (on a trigger: roll back,
                                #   force-prune the culprit, train again; recorded) → evaluate
                                #   (fused α=0 ablations) → G2 gates → the observation
    out = episode.act(action)   # validate (an illegal action is recorded and executes nothing)
                                #   → execute → every slot's clock → Simic prices the tick
                                #   → snapshot for the governor              → `Outcome`

With zones (paper §9.6, `esper.tolaria.zones`), `act_zones({zone: (action, reason)})` replaces
`act`: each zone's pair acts on its own view (`zone_views()`), within its budgets, in this same
tick.

`observe()` is `collect(launch())`: `launch` queues the tick's training and evaluation on the
device and `collect` reads them back (its one host sync, which also carries the governor's health
checks), so that a vector of episodes on CUDA can queue all of them before reading any.

An episode owns a torch CPU RNG stream (seeded by the run's seed, see `RunSeeds`), swapped in
whenever it runs, so its trajectory never depends on other episodes in the same process. It knows
no policy: `act` takes the action and, for the record, the policy's reason.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any, NamedTuple

import torch
from torch import nn

from esper.contracts import (
    Actor,
    DecayAction,
    DecayObservation,
    FactoredAction,
    Observation,
    Op,
    Stage,
)
from esper.contracts.zones import ZonesConfig, layout_of
from esper.simic.economy import Economy, EconomyConfig, RewardBreakdown
from esper.tolaria.decay import Decay
from esper.tolaria.environment import (
    Evaluation,
    GrowthEnv,
    PendingEvaluation,
    PendingTrain,
    TrainStats,
)
from esper.tolaria.governor import Governor, GovernorConfig, Verdict
from esper.tolaria.lysis import LysisConfig, LysisEvent
from esper.tolaria.zones import Allocator, Zones, ZoneView

Validator = Callable[[FactoredAction, Observation], str | None]
"""Why an action is illegal in an observation, or None: `esper.tamiyo.masks.illegal_reason`
(passed in: the engine imports no policy code)."""
Callback = Callable[[int, GrowthEnv], None]
"""Called as `callback(tick, env)` when a tick begins, before training (fault injection, tests)."""
DecayPolicy = Callable[[DecayObservation], Sequence[DecayAction]]
"""Emrakul: the decay actions for a tick's `DecayObservation` (`esper.emrakul`; passed in)."""
Ops = tuple[tuple[str, Op], ...]
ZoneActions = Mapping[str, tuple[FactoredAction, str]]
"""Zone -> (its pair's action, in the zone's slot indices; the reason, for the record)."""

# Stages a governor may force-prune (a seed or a committed phage is there to remove).
_PRUNABLE = (Stage.GERMINATED, Stage.TRAINING, Stage.BLENDING, Stage.HOLDING, Stage.COMMITTED)


class TickEvent(NamedTuple):
    """Something that happened in a tick, as the flight recorder stores it."""

    kind: str
    payload: dict[str, Any]
    slot: str | None = None


@dataclass(frozen=True)
class Outcome:
    """What one tick did, after `act`."""

    tick: int
    metric: float
    """The validation metric measured this tick (before the action)."""
    reward: RewardBreakdown
    ops: Ops
    """(slot, op) pairs executed, as the economy charged them."""
    rejected: str | None
    """Why the action was illegal (recorded; nothing was executed), or None."""
    events: tuple[TickEvent, ...]
    """In order: governor events, the action's event, lifecycle changes, and at the last tick
    the per-seed accounts."""
    metrics: dict[str, float]
    """train_loss, val_loss, metric, reward, reward_task, rent, churn, seed_params,
    host_params: the tick's scalars for the recorder."""
    observation: Observation
    """The observation after the action and the clock (the record's `obs_after`)."""
    done: bool
    """This was the episode's last tick."""
    weights_hash: str | None = None
    """sha256 of the final weights (`weights_hash`), when done."""


@dataclass(frozen=True)
class Launched:
    """A tick's training and evaluation, queued on the device and not yet read back."""

    train: PendingTrain
    evaluation: PendingEvaluation


@dataclass
class _Tick:
    """The half-played tick between `observe` and `act`."""

    observation: Observation
    train: TrainStats
    evaluation: Evaluation
    events: list[TickEvent]
    views: dict[str, ZoneView]


def _decay_events(events: Iterable[LysisEvent]) -> list[TickEvent]:
    return [TickEvent(e.kind, {"unit": e.unit, **e.payload}) for e in events]


def weights_hash(model: nn.Module) -> str:
    """sha256 over the state dict (names and bytes, sorted): equal iff the weights are equal."""
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


class Episode:
    """A growth environment, its economy and governor, played one tick at a time for `ticks`."""

    def __init__(
        self,
        env: GrowthEnv,
        *,
        ticks: int,
        economy: EconomyConfig,
        governor: GovernorConfig | None,
        validator: Validator,
        callbacks: Iterable[Callback] = (),
        rng: torch.Tensor | None = None,
        decay: LysisConfig | None = None,
        emrakul: DecayPolicy | None = None,
        zones: ZonesConfig | None = None,
        allocator: Allocator | None = None,
        zone_emrakuls: Mapping[str, DecayPolicy] | None = None,
    ) -> None:
        """`governor` None runs without safety checks. `rng`: the torch CPU RNG state the
        episode starts from (default: the global state now). `decay`: the LysisGovernor's
        settings, to run the decay half with `emrakul` choosing its actions (None: growth
        only). `zones`: a zone layout (paper §9.6; off when it has no zones): then `act_zones`
        takes one action per zone, `zone_emrakuls` decay each zone, and `allocator` (Narset)
        sets the zones' budgets every window (None: the configured budgets stay)."""
        if ticks < 1:
            raise ValueError(f"an episode needs ticks >= 1, got {ticks}")
        self.env, self.ticks, self.validator = env, ticks, validator
        self.economy = Economy(replace(economy, higher_is_better=env.task.higher_is_better))
        self.governor = Governor(governor) if governor is not None else None
        self.callbacks = list(callbacks)
        self.rng = rng.clone() if rng is not None else torch.get_rng_state()
        self.t = 0
        """The tick in progress (or the next one)."""
        self.start_metric: float | None = None
        """The metric after the first tick: the host before any seed could matter."""
        self._tick: _Tick | None = None
        self.emrakul = emrakul
        self.decay = (
            Decay(env.model, env.slots, decay, self.economy.cfg) if decay is not None else None
        )
        self.zones: Zones | None = None
        self.zone_emrakuls = dict(zone_emrakuls or {})
        if zones is not None and zones.enabled:
            stream = getattr(env.model, "stream", None)
            blocks = stream.slot_blocks if stream is not None else {}
            layout = layout_of(zones, blocks, env.slots)
            self.zones = Zones(
                layout,
                zones,
                allocator,
                higher_is_better=env.task.higher_is_better,
                depths=env.depths,
            )
        if self.governor is not None:
            self.governor.keep(-1, self.state())

    @contextmanager
    def own_rng(self) -> Iterator[None]:
        """Run with this episode's CPU RNG stream as torch's global one."""
        outer = torch.get_rng_state()
        torch.set_rng_state(self.rng)
        try:
            yield
        finally:
            self.rng = torch.get_rng_state()
            torch.set_rng_state(outer)

    @property
    def done(self) -> bool:
        return self.t >= self.ticks

    # -----------------------------------------------------------------------------------------
    # First half: train, govern, evaluate, observe
    # -----------------------------------------------------------------------------------------
    def observe(self) -> Observation:
        """Play the first half of the tick; the observation a policy acts on."""
        return self.collect(self.launch())

    def launch(self) -> Launched:
        """Run the tick's callbacks, then queue its training and evaluation (no host sync)."""
        if self._tick is not None:
            raise RuntimeError(f"tick {self.t} was already observed: act on it first")
        if self.done:
            raise RuntimeError(f"the episode ended after {self.ticks} ticks")
        for callback in self.callbacks:
            callback(self.t, self.env)
        units = self.decay.plan() if self.decay is not None else []
        groups = self.zones.probe_groups(self.t) if self.zones is not None else None
        with self.own_rng():
            return Launched(self.env.train_tick_async(), self.env.evaluate_async(units, groups))

    def collect(self, launched: Launched) -> Observation:
        """Read the launched tick back (one sync), govern it, record it, observe."""
        env, events = self.env, []
        train = env.finish_train(launched.train)
        verdict = self.governor.check(train, env.slots) if self.governor else None
        if verdict is None:
            ev = env.finish_evaluate(launched.evaluation)
        else:  # the queued evaluation measured a broken model: recover, then measure again
            train = self._recover(verdict, events)
            pending = launched.evaluation
            ev = env.evaluate(pending.units, {k: v for k, v in pending.groups} or None)
        if self.governor is not None:
            self.governor.accept(train.loss)
        env.record_evaluation(ev, self.t)
        if self.decay is not None:
            if ev.units:  # the flight record of this tick's unit ROI measurements
                events.append(TickEvent("unit_roi", self.decay.roi_record(ev.units)))
            events += _decay_events(self.decay.after_evaluation(ev.units, ev.loss, self.t))
        env.evaluate_gates()
        if self.start_metric is None:
            self.start_metric = ev.metric
        obs = self._observation(ev, train)
        views = {}
        if self.zones is not None:
            events += self._measure_zones(train, ev)
            views = self.zones.views(obs)
        self._tick = _Tick(obs, train, ev, events, views)
        return obs

    def _measure_zones(self, train: TrainStats, ev: Evaluation) -> list[TickEvent]:
        """Each zone's gradient norm, boundary contracts, probe (ablate) and growth mask."""
        zones, env = self.zones, self.env
        assert zones is not None
        zones.measure(env.model, train.loss_variance)
        readings = env.boundary_probe(zones.boundary_slots, zones.cfg.boundary_samples)
        found = zones.cross(readings)
        if ev.groups:
            found.append(zones.probed(self.t, ev.groups))
        found += zones.refresh(self.economy.last_rents)
        return [TickEvent(k, p) for k, p in found]

    def _freeze_probe(self, t: int) -> list[TickEvent]:
        """A leave-one-zone-out probe of kind freeze (`ProbeConfig`): from this state, each
        zone alone trains a short window (every parameter outside it frozen) and its metric
        gain is its contribution; then the state is restored exactly (weights, optimizer, data
        order, RNG, books), as if the probe never ran."""
        zones, env = self.zones, self.env
        if zones is None or not zones.probe_due(t, "freeze"):
            return []
        snapshot = self.state()
        sign = 1.0 if env.task.higher_is_better else -1.0
        flags = {n: p.requires_grad for n, p in env.model.named_parameters()}
        gains = {}
        try:
            with self.own_rng():
                base = env.evaluate().metric
            for z in zones.names:
                self.load_state(*snapshot)
                for n, p in env.model.named_parameters():
                    p.requires_grad_(flags[n] and zones.param_owner(n) == z)
                with self.own_rng():
                    env.finish_train(env.train_tick_async(zones.cfg.probe.steps))
                    gains[z] = sign * (env.evaluate().metric - base)
        finally:
            self.load_state(*snapshot)
            for n, p in env.model.named_parameters():
                p.requires_grad_(flags.get(n, p.requires_grad))
        return [TickEvent(*zones.probed(t, gains))]

    def zone_views(self) -> dict[str, ZoneView]:
        """Each zone's view of the observed tick (its pair acts on its `observation`)."""
        if self._tick is None or self.zones is None:
            raise RuntimeError("zone views exist between observe and act, with zones on")
        return self._tick.views

    def _recover(self, verdict: Verdict | None, events: list[TickEvent]) -> TrainStats:
        """Roll back to the last known-good state, force-prune the culprit, train again; until
        a tick passes (the governor gives up after `max_rollbacks`: GovernorError)."""
        assert self.governor is not None
        env = self.env
        while verdict is not None:
            payload = {"detail": verdict.detail, "offender": verdict.offender}
            events.append(TickEvent(f"governor_{verdict.kind}", payload))
            snap_tick, state = self.governor.rollback()
            self.load_state(*state)
            events.append(TickEvent("governor_rollback", {"to_tick": snap_tick}))
            slot = env.slots.get(verdict.offender) if verdict.offender else None
            if slot is not None and slot.stage in _PRUNABLE:
                blueprint = slot.spec.blueprint.name if slot.spec else None
                seed_id = slot.seed_id
                slot.prune(actor=Actor.TOLARIA)
                env.sync_optimizer()
                events.append(
                    TickEvent(
                        "governor_lobotomy", {"blueprint": blueprint, "seed_id": seed_id}, slot.name
                    )
                )
            with self.own_rng():
                train = env.train_tick()
            verdict = self.governor.check(train, env.slots)
        return train

    def _observation(self, ev: Evaluation, train: TrainStats) -> Observation:
        economy = self.economy
        rent_paid = economy.ledger.totals().rent
        return self.env.observe(self.t, self.ticks, ev, train, economy.last_rents, rent_paid)

    # -----------------------------------------------------------------------------------------
    # Second half: validate, execute, clock, price
    # -----------------------------------------------------------------------------------------
    def act(self, action: FactoredAction, reason: str = "") -> Outcome:
        """Finish the tick with `action` (`reason`: the policy's, for the record)."""
        if self.zones is not None:
            raise RuntimeError("an episode with zones takes one action per zone: act_zones")
        return self._finish([(None, action, reason)])

    def act_zones(self, actions: ZoneActions) -> Outcome:
        """Finish the tick with each zone's action, in its own slot indices (a zone left out
        waits); each is checked against its zone's view, then executed, in layout order."""
        if self.zones is None:
            raise RuntimeError("act_zones needs an episode with zones")
        unknown = sorted(set(actions) - set(self.zones.names))
        if unknown:
            raise ValueError(f"no zones {unknown}; the zones are {', '.join(self.zones.names)}")
        return self._finish([(z, *actions[z]) for z in self.zones.names if z in actions])

    def _vet(
        self, zone: str | None, action: FactoredAction, tick: _Tick
    ) -> tuple[str | None, FactoredAction]:
        """Why the action is illegal (or None), and the action in the episode's slot indices."""
        if zone is None or self.zones is None:
            return self.validator(action, tick.observation), action
        view = tick.views[zone]
        why = self.zones.authorize(view, action) or self.validator(action, view.observation)
        if why is not None or action.op is Op.WAIT:
            return why, action
        return None, replace(action, slot=view.index[action.slot])

    def _finish(self, acts: Sequence[tuple[str | None, FactoredAction, str]]) -> Outcome:
        tick = self._tick
        if tick is None:
            raise RuntimeError(f"act before observe in tick {self.t}")
        env, t, events = self.env, self.t, tick.events
        ops: Ops = ()
        rejections = []
        for zone, asked, reason in acts:
            rejected, action = self._vet(zone, asked, tick)
            if rejected is not None:
                rejections.append(rejected)
                where = {"zone": zone} if zone is not None else {}
                events.append(
                    TickEvent("rejected_action", {"reason": rejected, **asked.names(), **where})
                )
            elif action.op is not Op.WAIT:
                slot = env.slot_at(action.slot)
                with self.own_rng():
                    ops = (*ops, *env.execute(action))
                events.append(self._action_event(action, reason, slot.name))
        events += self._emrakul_acts(t, tick.evaluation.loss)
        before = {n: s.stage for n, s in env.slots.items()}
        env.advance_clock(t)
        events += [
            TickEvent("lifecycle", {"stage": s.stage.name, "from": before[n].name}, n)
            for n, s in env.slots.items()
            if s.stage is not before[n]
        ]
        ev = tick.evaluation
        prev = env.history[-2] if len(env.history) > 1 else None
        r = self.economy.step(
            t, env.slot_economics(), list(ops), env.host_params(), prev, ev.metric
        )
        events += self._safe_boundary()
        events += self._freeze_probe(t)
        after = self._observation(ev, tick.train)
        events += self._account_zones(t, events, after, ops, ev)
        metrics = {
            "train_loss": tick.train.loss,
            "val_loss": ev.loss,
            "metric": ev.metric,
            "reward": r.total,
            "reward_task": r.task,
            "rent": r.rent,
            "churn": r.churn,
            "seed_params": after.seed_params,
            "host_params": after.host_params,
        }
        if self.decay is not None:
            metrics.update(self.decay.metrics())
        if self.zones is not None:
            metrics.update(self.zones.metrics())
        done = t + 1 == self.ticks
        if done:  # the episode's books, per seed (and per zone), as its last events
            events.append(TickEvent("seed_accounts", self.seed_accounts()))
            if self.zones is not None:
                events.append(TickEvent("zone_books", self.zones.books_summary()))
        if self.zones is not None:
            events = self._tag_zones(events)
        self.t, self._tick = t + 1, None
        if self.governor is not None:
            self.governor.keep(t, self.state())
        return Outcome(
            tick=t,
            metric=ev.metric,
            reward=r,
            ops=ops,
            rejected="; ".join(rejections) or None,
            events=tuple(events),
            metrics=metrics,
            observation=after,
            done=done,
            weights_hash=weights_hash(env.model) if done else None,
        )

    def _account_zones(
        self, t: int, events: list[TickEvent], after: Observation, ops: Ops, ev: Evaluation
    ) -> list[TickEvent]:
        """The zones' books for tick `t`, after the economy priced it (at a window's end, the
        allocator's update)."""
        if self.zones is None:
            return []
        moved = [e.slot for e in events if e.kind == "lifecycle" and e.slot is not None]
        rents, churn = self.economy.last_rents, self.economy.last_churn
        booked = self.zones.account(t, after, rents, churn, ops, moved, ev.metric, ev.loss)
        return [TickEvent(k, p) for k, p in booked]

    def _tag_zones(self, events: list[TickEvent]) -> list[TickEvent]:
        """Each event of a slot or unit carries its zone (`esper show` groups by it)."""
        assert self.zones is not None
        out = []
        for e in events:
            zone = None if "zone" in e.payload else self.zones.zone_of_event(e.slot, e.payload)
            out.append(e if zone is None else e._replace(payload={**e.payload, "zone": zone}))
        return out

    def _emrakul_acts(self, t: int, loss: float) -> list[TickEvent]:
        """Emrakul's actions on the tick's unit ROI, each granted or refused by the governor
        (with zones: each zone's Emrakul on its units, within its risk share)."""
        if self.decay is not None and self.zones is not None and self.zone_emrakuls:
            seen, out = self.decay.observe(t, loss), []
            for zone, emrakul in self.zone_emrakuls.items():
                view = self.zones.decay_view(zone, seen, self.decay.governor)
                granted, refused = self.zones.vet_decay(zone, emrakul(view), view)
                out += _decay_events(refused)
                out += _decay_events(self.decay.execute(granted, t, loss))
            return out
        if self.decay is None or self.emrakul is None:
            return []
        decisions = self.emrakul(self.decay.observe(t, loss))
        return _decay_events(self.decay.execute(decisions, t, loss))

    def _safe_boundary(self) -> list[TickEvent]:
        """After the economy priced the tick, before the snapshot: committed phages learn their
        rent; condemned units are lysed (the optimizer's groups rebuilt around them)."""
        env = self.env
        for name, slot in env.slots.items():
            if slot.phage is not None:
                slot.phage.roi.rent = self.economy.last_rents.get(name, 0.0)
        if self.decay is None:
            return []
        events = _decay_events(self.decay.safe_boundary(env.optimizer, env.val_x[:1]))
        env.sync_optimizer()
        return events

    def _action_event(self, action: FactoredAction, reason: str, name: str) -> TickEvent:
        """The executed op, with every head of the action (and, for a germination, the seed's
        whole spec): enough to replay it exactly (audits)."""
        slot = self.env.slots[name]
        payload: dict[str, Any] = {
            "reason": reason,
            "seed_id": slot.seed_id,
            "blueprint": slot.spec.blueprint.name if slot.spec else None,
            "action": action.names(),
        }
        if action.op is Op.GERMINATE and slot.spec is not None:
            payload["spec"] = slot.spec.to_dict()
        return TickEvent(action.op.name.lower(), payload, name)

    def seed_accounts(self) -> dict[str, dict[str, float]]:
        """seed_id -> rent_paid, churn_paid, ticks_alive (reward units)."""
        return {
            k: {"rent_paid": a.rent_paid, "churn_paid": a.churn_paid, "ticks_alive": a.ticks_alive}
            for k, a in sorted(self.economy.ledger.per_seed().items())
        }

    # -----------------------------------------------------------------------------------------
    # State: the governor's snapshots and a run's checkpoints
    # -----------------------------------------------------------------------------------------
    def state(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """(JSON-able metadata, tensors): environment (model, optimizer, data order, this
        episode's RNG stream), economy, governor, clock."""
        with self.own_rng():  # the environment saves the global RNG: make it this episode's
            info, tensors = self.env.state_dict()
        info.update(
            economy=self.economy.state_dict(),
            governor=self.governor.state_dict() if self.governor else None,
            decay=self.decay.state_dict() if self.decay else None,
            tick=self.t,
            start_metric=self.start_metric,
        )
        if self.zones is not None:
            info["zones"] = self.zones.state_dict()
        return info, tensors

    def restore(self, info: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        """Continue from a saved `state()` (a resumed run): load it and keep it as the
        governor's last known-good snapshot."""
        self.load_state(info, tensors)
        if self.governor is not None:
            self.governor.keep(self.t - 1, (info, tensors))

    def load_state(self, info: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        with self.own_rng():  # ... and on restoring, this episode's stream is restored
            self.env.load_state_dict(info, tensors)
        self.economy.load_state_dict(info["economy"])
        if self.governor is not None and info["governor"] is not None:
            self.governor.load_state_dict(info["governor"])
        if self.decay is not None and info.get("decay") is not None:
            self.decay.load_state_dict(info["decay"])
        if self.zones is not None:
            self.zones.load_state_dict(info["zones"])
        self.t, self.start_metric, self._tick = info["tick"], info["start_metric"], None
