"""The governor: its triggers, and what a run does on one — roll back (model, optimizer moments,
data order), force-prune the offending seed, retry, and lose no tick of the record."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from _engine_helpers import cnn_driver, finite_params, small_config
from esper.contracts import Stage
from esper.run import start_run
from esper.tolaria.environment import GrowthEnv, TrainStats
from esper.tolaria.governor import Governor, GovernorConfig, GovernorError

NAN = float("nan")

# ---------------------------------------------------------------------------------------------
# Triggers
# ---------------------------------------------------------------------------------------------


def stats(loss: float, **kw: object) -> TrainStats:
    return TrainStats(loss, 1, **kw)


def test_triggers_nan_explosion_and_divergence_after_warmup() -> None:
    gov = Governor(
        GovernorConfig(divergence_factor=3.0, explosion_loss=100.0, window=3, warmup_ticks=2)
    )
    assert gov.check(stats(9.0), {}) is None  # no baseline yet: only nan/explosion count
    gov.accept(2.0)
    assert gov.check(stats(9.0), {}) is None  # still warming up
    gov.accept(2.0)
    assert gov.check(stats(5.9), {}) is None
    v = gov.check(stats(6.1), {})
    assert v is not None and v.kind == "divergence" and v.offender is None
    assert gov.check(stats(101.0), {}).kind == "explosion"
    assert gov.check(stats(NAN), {}).kind == "nan"
    assert gov.check(stats(math.inf), {}).kind == "nan"
    v = gov.check(stats(1.0, host_finite=False), {})
    assert v.kind == "nan" and "parameters" in v.detail
    for loss in (1.0, 1.0, 1.0):  # the baseline is a rolling median over `window` ticks
        gov.accept(loss)
    assert gov.check(stats(3.5), {}).kind == "divergence"


def test_divergence_needs_more_than_noise_near_zero_loss() -> None:
    """A well-fit model's loss of 0.05 rising to 0.17 in one tick is noise, not divergence
    (this rolled a CNN of width 16 on digits back three times and ended its run)."""
    gov = Governor(GovernorConfig(window=3, warmup_ticks=0))
    for loss in (0.05, 0.05, 0.05):
        gov.accept(loss)
    assert gov.check(stats(0.17), {}) is None
    assert gov.check(stats(1.6), {}).kind == "divergence"  # 3 × the floor of 0.5
    off = Governor(GovernorConfig(window=3, warmup_ticks=0, divergence_floor=0.0))
    for loss in (0.05, 0.05, 0.05):
        off.accept(loss)
    assert off.check(stats(0.17), {}).kind == "divergence"


def test_blame_goes_to_what_broke_first() -> None:
    d = cnn_driver()
    d.grow(1, Stage.BLENDING)
    d.grow(0, Stage.TRAINING)  # germinated second: the youngest
    b0, b1 = d.slot(0).name, d.slot(1).name
    gov, slots = Governor(GovernorConfig()), d.env.slots
    assert gov.check(stats(1e9), slots).offender == b0  # the host blew up: the youngest seed
    # A seed whose output went non-finite is blamed even when others hold NaN weights too.
    v = gov.check(stats(NAN, host_finite=False, nonfinite_slots=(b0, b1), faults=(b1,)), slots)
    assert (v.kind, v.offender) == ("nan", b1) and b1 in v.detail
    # Non-finite weights in a slot count only while the host is finite ...
    assert gov.check(stats(1.0, nonfinite_slots=(b1,)), slots).offender == b1
    # ... once the host is NaN every slot that got a gradient is NaN: fall back to the youngest.
    v = gov.check(stats(NAN, host_finite=False, nonfinite_slots=(b0, b1)), slots)
    assert v.offender == b0
    # A fault alone (the screened output kept loss and weights finite) still triggers.
    assert gov.check(stats(1.0, faults=(b1,)), slots).offender == b1


def test_a_tick_reports_the_seed_whose_weights_went_bad() -> None:
    # Two live seeds; b1's weights are poisoned. Its output is screened, so the loss, the host
    # and b0 stay finite; the tick's health names b1 (a fault, and non-finite weights) only.
    d = cnn_driver()
    d.grow(0, Stage.BLENDING)
    d.grow(1, Stage.BLENDING)
    with torch.no_grad():
        next(d.slot(1).seed.parameters()).fill_(NAN)
    train = d.env.train_tick()
    b1 = d.slot(1).name
    assert math.isfinite(train.loss) and train.host_finite
    assert (train.faults, train.nonfinite_slots) == ((b1,), (b1,))
    assert all(torch.isfinite(p).all() for p in d.slot(0).parameters())
    assert Governor(GovernorConfig()).check(train, d.env.slots).offender == b1


def test_rollback_needs_a_snapshot_and_gives_up_after_max_rollbacks() -> None:
    gov = Governor(GovernorConfig(max_rollbacks=2))
    with pytest.raises(GovernorError, match="known-good"):
        gov.rollback()
    gov.keep(4, "state")
    assert gov.rollback() == (4, "state")
    assert gov.rollback() == (4, "state")
    with pytest.raises(GovernorError, match="giving up"):
        gov.rollback()
    gov.accept(1.0)  # a healthy tick resets the count
    assert gov.rollback() == (4, "state")


# ---------------------------------------------------------------------------------------------
# Fault injection in a run
# ---------------------------------------------------------------------------------------------


def _kinds(events: list, tick: int) -> list[str]:
    return [e.kind for e in events if e.tick == tick and e.kind != "decision"]


def test_nan_in_a_live_seed_rolls_back_and_lobotomises_it(tmp_path: Path) -> None:
    ticks, bad_tick = 8, 4
    poisoned: dict[str, str] = {}

    def poison(t: int, env: GrowthEnv) -> None:
        if t != bad_tick:
            return
        live = [s for s in env.slots.values() if s.seed is not None]
        assert live, "the heuristic should have germinated by now"
        slot = live[0]
        poisoned.update(slot=slot.name, seed_id=slot.seed_id)
        with torch.no_grad():
            next(slot.seed.parameters()).fill_(NAN)

    run = start_run(small_config(ticks), run_dir=tmp_path / "r", callbacks=[poison])
    result = run.run()
    store = run.store
    events = store.events()

    assert _kinds(events, bad_tick)[:3] == [
        "governor_nan",
        "governor_rollback",
        "governor_lobotomy",
    ]
    nan = next(e for e in events if e.kind == "governor_nan")
    assert nan.payload["offender"] == poisoned["slot"]
    rollback = next(e for e in events if e.kind == "governor_rollback")
    assert rollback.payload["to_tick"] == bad_tick - 1
    lobotomy = next(e for e in events if e.kind == "governor_lobotomy")
    assert lobotomy.slot == poisoned["slot"]
    assert lobotomy.payload["seed_id"] == poisoned["seed_id"]
    assert any(
        e.kind == "lifecycle" and e.slot == poisoned["slot"] and e.payload["from"] == "PRUNED"
        for e in events
        if e.tick == bad_tick
    )
    assert result.rollbacks == 1

    slot = run.env.slots[poisoned["slot"]]
    assert slot.seed_id != poisoned["seed_id"]
    assert finite_params(run.env.model)
    assert [r.tick for r in store.decisions()] == list(range(ticks))
    metrics = store.metrics()
    assert [t for t, _ in metrics] == list(range(ticks))
    assert all(math.isfinite(v) for _, m in metrics for v in m.values())


def test_exploding_host_weights_trigger_the_governor_and_the_run_goes_on(tmp_path: Path) -> None:
    ticks, bad_tick = 8, 5

    def blow_up(t: int, env: GrowthEnv) -> None:
        if t == bad_tick:
            in_slots = {id(p) for s in env.slots.values() for p in s.parameters()}
            with torch.no_grad():
                for p in env.model.parameters():
                    if id(p) not in in_slots:
                        p.mul_(1e6)

    run = start_run(small_config(ticks), run_dir=tmp_path / "r", callbacks=[blow_up])
    result = run.run()
    events = run.store.events()
    kinds = _kinds(events, bad_tick)
    assert kinds[0] in ("governor_nan", "governor_divergence", "governor_explosion")
    assert kinds[1] == "governor_rollback"
    assert result.rollbacks >= 1
    assert finite_params(run.env.model)
    assert max(float(p.detach().abs().max()) for p in run.env.model.parameters()) < 1e4
    assert [r.tick for r in run.store.decisions()] == list(range(ticks))
    assert all(math.isfinite(m["train_loss"]) for _, m in run.store.metrics())


def test_training_that_keeps_failing_abandons_the_run(tmp_path: Path) -> None:
    cfg = small_config(4, policy="none")
    run = start_run(cfg, run_dir=tmp_path / "r")
    env = run.env
    original = env.train_tick_async

    def always_nan() -> object:
        with torch.no_grad():
            next(env.model.parameters()).fill_(NAN)
        return original()

    run.step(0)
    env.train_tick_async = always_nan
    with pytest.raises(GovernorError, match="giving up"):
        run.step(1)


# ---------------------------------------------------------------------------------------------
# Rollback restores the optimizer: momentum from a failed tick must not survive
# ---------------------------------------------------------------------------------------------


def test_rollback_restores_adam_moments_each_time(tmp_path: Path) -> None:
    ticks, bad_tick, failures = 5, 3, 2
    run = start_run(small_config(ticks, policy="none"), run_dir=tmp_path / "r")
    env = run.env
    original = env.train_tick_async
    snapshot: dict[str, list[torch.Tensor]] = {}
    entries: list[list[torch.Tensor]] = []  # host exp_avg at each training attempt of bad_tick
    poisoned_moments: list[bool] = []
    clock = {"t": -1}

    def host_moments(key: str) -> list[torch.Tensor]:
        opt = env.optimizer  # rebuilt by every rollback: read it afresh
        return [opt.state[p][key].clone() for p in opt.param_groups[0]["params"]]

    def remember(t: int, _env: GrowthEnv) -> None:
        clock["t"] = t
        if t == bad_tick:
            snap_tick, (_, tensors) = run.episode.governor.snapshot
            assert snap_tick == bad_tick - 1
            n = len(env.optimizer.param_groups[0]["params"])
            snapshot["exp_avg"] = [tensors[f"optim.{i}.exp_avg"].clone() for i in range(n)]
            snapshot["step"] = [tensors[f"optim.{i}.step"].clone() for i in range(n)]

    def train_tick() -> object:
        if clock["t"] != bad_tick:
            return original()
        entries.append(host_moments("exp_avg"))
        if len(entries) <= failures:
            with torch.no_grad():
                next(env.model.parameters()).fill_(NAN)
        out = original()
        poisoned_moments.append(not all(torch.isfinite(m).all() for m in host_moments("exp_avg")))
        return out

    env.train_tick_async = train_tick
    run.episode.callbacks.append(remember)
    run.run()

    events = run.store.events()
    assert _kinds(events, bad_tick) == ["governor_nan", "governor_rollback"] * failures
    assert poisoned_moments == [True] * failures + [False]  # failed steps did poison Adam
    assert len(entries) == failures + 1
    for moments in entries[1:]:  # after each rollback: exactly the snapshot's moments
        assert len(moments) == len(snapshot["exp_avg"])
        for m, s in zip(moments, snapshot["exp_avg"], strict=True):
            assert torch.equal(m, s)
    steps = [int(env.optimizer.state[p]["step"]) for p in env.optimizer.param_groups[0]["params"]]
    per_tick = env.cfg.batches_per_tick
    assert steps == [int(s) + per_tick * (ticks - bad_tick) for s in snapshot["step"]]
    assert finite_params(env.model)


def test_a_rollback_forgets_the_failed_attempts_gradients_and_probe() -> None:
    # The failed attempt's NaN gradients and NaN activation probe must not survive into the
    # retried tick: the G2 gate then judges the retry alone (it used to fail with "rms nan").
    d = cnn_driver()
    slot = d.grow(0, Stage.TRAINING)
    d.tick()
    snapshot = d.env.state_dict()
    with torch.no_grad():
        next(d.env.model.parameters()).fill_(NAN)  # the host blows up mid-tick
    assert not d.env.train_tick().finite
    d.env.load_state_dict(*snapshot)
    d.env.train_tick()
    report = slot.evaluate_gate()
    assert report.passed, str(report)
    assert all(math.isfinite(v) for v in report.metrics.values())
    assert slot.fault is not None and not bool(slot.fault)


def test_the_run_prunes_the_poisoned_seed_and_keeps_the_healthy_one(tmp_path: Path) -> None:
    # Two live seeds; b1's weights go NaN. Only b1 is pruned; b0's seed lives on untouched
    # (before, Adam spread the NaN to b0 and the first slot by name, b0, was blamed).
    poisoned: dict[str, str] = {}

    def poison(t: int, env: GrowthEnv) -> None:
        b0, b1 = env.slots["slots.b0"], env.slots["slots.b1"]
        if poisoned or b0.seed is None or b1.seed is None:
            return
        poisoned.update(tick=str(t), b0=str(b0.seed_id), b1=str(b1.seed_id))
        with torch.no_grad():
            next(b1.seed.parameters()).fill_(NAN)

    run = start_run(small_config(10), run_dir=tmp_path / "r", callbacks=[poison])
    for t in range(10):
        run.step(t)
        if poisoned:
            break  # the poisoned tick is played: judge it
    assert poisoned, "the heuristic should have grown b0 and b1"
    events = run.store.events()
    (lobotomy,) = [e for e in events if e.kind == "governor_lobotomy"]
    assert (lobotomy.slot, lobotomy.payload["seed_id"]) == ("slots.b1", poisoned["b1"])
    assert lobotomy.tick == int(poisoned["tick"])
    b0 = run.env.slots["slots.b0"]
    assert b0.seed_id == poisoned["b0"] and b0.seed is not None
    assert finite_params(run.env.model)
