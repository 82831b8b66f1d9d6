"""The flight recorder on real SQLite files: round trips, atomic ticks, immutability, kill -9."""

from __future__ import annotations

import math
import signal
import sqlite3
import subprocess
import sys
import time
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from esper.recorder import (
    DB_NAME,
    CheckpointRecord,
    DecisionRecord,
    RecorderError,
    RunStore,
    build_manifest,
    list_runs,
)

DIGEST = "ab" * 32


def make_decision(tick: int, env: int = 0, value: float | None = 0.25) -> DecisionRecord:
    return DecisionRecord(
        env=env,
        tick=tick,
        policy="heuristic",
        action={"slot": "r0c1", "blueprint": "NORM", "op": "GERMINATE"},
        slot_states=[{"stage": "DORMANT", "alpha": 0.0}, {"stage": "TRAINING", "alpha": 0.0}],
        obs_before=[0.1, -2.5, 3.0],
        obs_after=[0.1, -2.5, 4.0],
        mask={"op": [True, True, False], "slot": [False, True]},
        probs={"op": [0.7, 0.3, 0.0], "slot": [0.0, 1.0]},
        entropy={"op": 0.6108643020548935, "slot": 0.0},
        value=value,
        reward=-0.125,
        spec_versions={"obs": "obs-1", "reward": "rent-churn-1", "blueprints": "13", "host": "h"},
    )


@pytest.fixture
def store(tmp_path: Path):
    with RunStore.create(tmp_path / "run", {"config": {"task": "digits"}}) as store:
        yield store


def write_ticks(store: RunStore, ticks: range) -> None:
    """Each tick: two metrics, an event per env, a label on the first, a checkpoint."""
    for t in ticks:
        with store.tick(t) as tx:
            tx.metrics({"loss": 1.0 / (t + 1), "time/tick_s": 0.5})
            first = tx.event("step", {"t": t}, env=0)
            tx.event("step", {"t": t}, env=1, slot="r0c0")
            tx.checkpoint(f"ckpt/{t}.safetensors", DIGEST)
        store.attach_label(first, "advantage", float(t))


# ------------------------------------------------------------------------------------------------
# Round trips
# ------------------------------------------------------------------------------------------------


def test_manifest_describes_the_run_and_round_trips(tmp_path: Path) -> None:
    config = {"task": "digits", "policy": {"name": "heuristic", "lr": 3e-4}}
    manifest = build_manifest(config, {"torch": 7, "numpy": 7}, "cpu")
    assert manifest["config"] == config and manifest["device"] == "cpu"
    assert set(manifest["libraries"]) >= {"python", "torch", "numpy", "sqlite", "sklearn"}
    assert manifest["libraries"]["sqlite"] == sqlite3.sqlite_version
    assert isinstance(manifest["code"]["commit"], str) and manifest["code"]["commit"]
    created = datetime.fromisoformat(manifest["created_at"])
    assert created.utcoffset() == timedelta(0)

    RunStore.create(tmp_path / "run", manifest).close()
    with RunStore.open(tmp_path / "run") as store:
        assert store.manifest() == manifest
        assert store.last_complete_tick() is None


def test_metrics_events_and_checkpoints_round_trip(tmp_path: Path) -> None:
    with RunStore.create(tmp_path / "run", {}) as store:
        with store.tick(0) as tx:
            tx.metrics({"loss": 2.5, "diverged": math.nan, "grad_norm": math.inf})
            event_id = tx.event("germinate", {"blueprint": "NORM", "alpha": [0.0, 0.5]}, slot="r0")
            tx.event("governor_nan", {"loss": math.nan}, env=3)
            tx.checkpoint("ckpt/0.safetensors", DIGEST)
        with store.tick(1) as tx:
            tx.metrics({"loss": 1.5})
    with RunStore.open(tmp_path / "run") as store:
        (t0, m0), (t1, m1) = store.metrics()
        assert (t0, t1) == (0, 1) and m1 == {"loss": 1.5}
        assert m0["loss"] == 2.5 and math.isnan(m0["diverged"]) and m0["grad_norm"] == math.inf
        germinate, nan_event = store.events()
        assert germinate.id == event_id
        assert (germinate.tick, germinate.env, germinate.slot) == (0, 0, "r0")
        assert germinate.payload == {"blueprint": "NORM", "alpha": [0.0, 0.5]}
        assert germinate.labels == {}
        assert nan_event.env == 3 and math.isnan(nan_event.payload["loss"])
        assert store.checkpoints() == [CheckpointRecord(0, "ckpt/0.safetensors", DIGEST)]
        assert store.last_complete_tick() == 1


def test_decisions_round_trip_exactly(tmp_path: Path) -> None:
    records = [make_decision(0, env=0), make_decision(0, env=1, value=None), make_decision(1)]
    with RunStore.create(tmp_path / "run", {}) as store:
        with store.tick(0) as tx:
            ids = [tx.decision(records[0]), tx.decision(records[1])]
        with store.tick(1) as tx:
            ids.append(tx.decision(records[2]))
    with RunStore.open(tmp_path / "run") as store:
        assert store.decisions() == records
        assert store.decisions(env=1) == [records[1]]
        assert [e.id for e in store.events(kind="decision")] == ids


def test_events_filter_by_kind_env_and_since_tick(store: RunStore) -> None:
    write_ticks(store, range(4))
    with store.tick(4) as tx:
        tx.event("prune", {"why": "rent"}, env=1, slot="r0c0")
    assert [e.tick for e in store.events(kind="step", env=1)] == [0, 1, 2, 3]
    assert [(e.tick, e.env) for e in store.events(since_tick=3)] == [(3, 0), (3, 1), (4, 1)]
    assert [e.kind for e in store.events(env=1, since_tick=4)] == ["prune"]


# ------------------------------------------------------------------------------------------------
# Atomic ticks
# ------------------------------------------------------------------------------------------------


def test_failing_tick_leaves_nothing(store: RunStore) -> None:
    write_ticks(store, range(1))
    before = (store.events(), store.metrics(), store.checkpoints(), store.event_log_hash())
    first_id = store.events()[0].id
    with pytest.raises(ZeroDivisionError), store.tick(1) as tx:
        tx.metrics({"loss": 0.5})
        tx.event("step", {"t": 1})
        tx.checkpoint("ckpt/1.safetensors", DIGEST)
        store.attach_label(first_id, "shapley", 9.0)  # joins the open tick, so it rolls back too
        _ = 1 / 0
    assert store.last_complete_tick() == 0
    assert (store.events(), store.metrics(), store.checkpoints(), store.event_log_hash()) == before
    with pytest.raises(RecorderError, match="closed"):
        tx.event("late", {})
    with store.tick(1) as tx:  # the failed tick can be written again
        tx.event("step", {"t": 1})
    assert store.last_complete_tick() == 1


def test_ticks_must_increase_and_not_nest(store: RunStore) -> None:
    write_ticks(store, range(3))
    with pytest.raises(RecorderError, match="tick 2"), store.tick(2):
        pass
    with pytest.raises(RecorderError, match="still open"), store.tick(3), store.tick(4):
        pass
    with pytest.raises(RecorderError, match="still open"), store.tick(3):
        store.truncate_after(0)
    assert store.last_complete_tick() == 2


def test_bad_input_raises_and_rolls_back(store: RunStore) -> None:
    with pytest.raises(RecorderError, match="not JSON-serialisable"), store.tick(0) as tx:
        tx.event("ok", {"x": 1})
        tx.event("bad", {"x": object()})
    with pytest.raises(RecorderError, match="'loss'"), store.tick(0) as tx:
        tx.metrics({"loss": "high"})
    with pytest.raises(RecorderError, match="sha256"), store.tick(0) as tx:
        tx.checkpoint("ckpt/0.safetensors", "not-a-digest")
    with pytest.raises(RecorderError, match="tick 3"), store.tick(0) as tx:
        tx.decision(make_decision(3))
    assert store.events() == [] and store.last_complete_tick() is None


# ------------------------------------------------------------------------------------------------
# Immutability and the resume path
# ------------------------------------------------------------------------------------------------


def test_events_refuse_update_and_delete(store: RunStore) -> None:
    write_ticks(store, range(2))
    raw = sqlite3.connect(store.path)
    try:
        with pytest.raises(sqlite3.DatabaseError, match="immutable"):
            raw.execute("UPDATE events SET payload = '{}' WHERE tick = 0")
        with pytest.raises(sqlite3.DatabaseError, match="immutable"):
            raw.execute("DELETE FROM events WHERE tick = 1")
        with pytest.raises(sqlite3.DatabaseError, match="immutable"):
            raw.execute("UPDATE manifest SET json = '{}'")
    finally:
        raw.close()
    assert [e.payload for e in store.events()] == [{"t": 0}, {"t": 0}, {"t": 1}, {"t": 1}]


def test_truncate_after_removes_exactly_the_later_ticks(store: RunStore) -> None:
    write_ticks(store, range(5))
    kept_events = [e for e in store.events() if e.tick <= 2]
    kept_metrics = store.metrics()[:3]
    kept_checkpoints = store.checkpoints()[:3]

    store.truncate_after(2)

    assert store.last_complete_tick() == 2
    assert store.events() == kept_events  # labels of kept events survive
    assert store.metrics() == kept_metrics
    assert store.checkpoints() == kept_checkpoints
    raw = sqlite3.connect(store.path)
    try:
        assert raw.execute("SELECT count(*) FROM labels").fetchone()[0] == 3
        assert raw.execute("SELECT tick FROM ticks").fetchall() == [(0,), (1,), (2,)]
        with pytest.raises(sqlite3.DatabaseError, match="immutable"):  # the guard is re-armed
            raw.execute("DELETE FROM events")
    finally:
        raw.close()

    # Resuming numbers events as an uninterrupted run would.
    write_ticks(store, range(3, 5))
    with RunStore.create(store.run_dir.parent / "straight", {}) as straight:
        write_ticks(straight, range(5))
        assert [e.id for e in store.events()] == [e.id for e in straight.events()]
        assert store.event_log_hash() == straight.event_log_hash()


# ------------------------------------------------------------------------------------------------
# Creating and opening
# ------------------------------------------------------------------------------------------------


def test_create_refuses_an_existing_run(tmp_path: Path) -> None:
    RunStore.create(tmp_path / "run", {"config": {"seed": 1}}).close()
    with pytest.raises(RecorderError, match=r"run\.sqlite.*already exists"):
        RunStore.create(tmp_path / "run", {"config": {"seed": 2}})
    with RunStore.open(tmp_path / "run") as store:
        assert store.manifest() == {"config": {"seed": 1}}


def test_create_in_an_unwritable_place_raises(tmp_path: Path) -> None:
    # Tests run as root, which ignores permission bits; a path under a regular file always fails.
    (tmp_path / "plain_file").write_text("not a directory")
    with pytest.raises(RecorderError, match="plain_file"):
        RunStore.create(tmp_path / "plain_file" / "run", {})
    with pytest.raises(RecorderError, match="plain_file"):
        RunStore.create(tmp_path / "plain_file", {})


def test_create_with_unserialisable_manifest_writes_nothing(tmp_path: Path) -> None:
    with pytest.raises(RecorderError, match="manifest"):
        RunStore.create(tmp_path / "run", {"config": object()})
    assert not (tmp_path / "run").exists()


def test_open_rejects_other_schema_versions(tmp_path: Path) -> None:
    RunStore.create(tmp_path / "run", {}).close()
    raw = sqlite3.connect(tmp_path / "run" / DB_NAME)
    raw.execute("PRAGMA user_version = 99")
    raw.close()
    with pytest.raises(RecorderError, match=r"run\.sqlite: schema version 99") as info:
        RunStore.open(tmp_path / "run")
    assert "\n" not in str(info.value)


def test_open_rejects_garbage_foreign_and_missing_files(tmp_path: Path) -> None:
    (tmp_path / "garbage").mkdir()
    (tmp_path / "garbage" / DB_NAME).write_bytes(b"\x00\x13 not SQLite at all " * 100)
    with pytest.raises(RecorderError, match=r"garbage/run\.sqlite: not an SQLite database"):
        RunStore.open(tmp_path / "garbage")

    (tmp_path / "foreign").mkdir()
    raw = sqlite3.connect(tmp_path / "foreign" / DB_NAME)
    raw.execute("CREATE TABLE t (x)")
    raw.close()
    with pytest.raises(RecorderError, match=r"foreign/run\.sqlite: not an Esper run"):
        RunStore.open(tmp_path / "foreign")

    with pytest.raises(RecorderError, match=r"missing/run\.sqlite: no Esper run"):
        RunStore.open(tmp_path / "missing")
    assert not (tmp_path / "missing").exists()


# ------------------------------------------------------------------------------------------------
# Crash safety
# ------------------------------------------------------------------------------------------------

# Writes ticks forever; in each tick it prints the tick number after half the tick's rows are in,
# then waits inside the open transaction, so the parent's SIGKILL lands mid-tick.
WRITER = """
import sys, time
from esper.recorder import RunStore

store = RunStore.open(sys.argv[1])
t = 0
while True:
    with store.tick(t) as tx:
        for i in range(6):
            tx.event("step", {"t": t, "i": i}, env=i % 2)
            if i == 3:
                print(t, flush=True)
                time.sleep(0.01 if t < 5 else 60)
        tx.metrics({"loss": 1.0 / (t + 1)})
    t += 1
"""


def test_sigkill_mid_tick_loses_only_that_tick(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    RunStore.create(run_dir, {}).close()
    child = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(run_dir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while (line := child.stdout.readline()) != "5\n":
            assert line and time.monotonic() < deadline, child.stderr.read()
        child.send_signal(signal.SIGKILL)
        assert child.wait(timeout=10) == -signal.SIGKILL
    finally:
        child.kill()
        child.wait()
        child.stdout.close()
        child.stderr.close()

    with RunStore.open(run_dir) as store:
        assert store.last_complete_tick() == 4
        events = store.events()
        assert [(e.tick, e.payload["i"]) for e in events] == [
            (t, i) for t in range(5) for i in range(6)
        ]
        assert [tick for tick, _ in store.metrics()] == list(range(5))
        with store.tick(5) as tx:  # the dead writer's lock is gone: the run resumes
            tx.event("step", {"t": 5, "i": 0})
        assert store.last_complete_tick() == 5


# ------------------------------------------------------------------------------------------------
# Hash, labels, listing
# ------------------------------------------------------------------------------------------------


def fill(store: RunStore, loss_at_3: float, wall_time: float) -> None:
    for t in range(5):
        with store.tick(t) as tx:
            tx.event("step", {"loss": loss_at_3 if t == 3 else 1.0, "nan": math.nan}, env=t % 2)
            tx.decision(make_decision(t))
            tx.metrics({"time/tick_s": wall_time})


def test_event_log_hash_tracks_event_content_only(tmp_path: Path) -> None:
    stores = [RunStore.create(tmp_path / name, {"created_at": name}) for name in "abc"]
    try:
        fill(stores[0], loss_at_3=0.5, wall_time=1.0)
        fill(stores[1], loss_at_3=0.5, wall_time=2.0)  # other wall times, same events
        fill(stores[2], loss_at_3=0.5000001, wall_time=1.0)
        stores[1].attach_label(1, "shapley", 0.3)  # labels come later and are not the log
        hashes = [s.event_log_hash() for s in stores]
        assert hashes[0] == hashes[1] != hashes[2]
        assert len(hashes[0]) == 64
    finally:
        for s in stores:
            s.close()


def test_labels_attach_and_join_without_touching_events(store: RunStore) -> None:
    with store.tick(0) as tx:
        decision_id = tx.decision(make_decision(0))
        other_id = tx.event("advance", {"slot": "r0c1"})
    before = store.event_log_hash()
    store.attach_label(decision_id, "advantage", 0.75)
    store.attach_label(decision_id, "shapley", {"r0c1": 0.2, "r0c2": -0.1})
    store.attach_label(decision_id, "advantage", 0.5)  # recomputed: last write wins
    assert store.labels(decision_id) == {"advantage": 0.5, "shapley": {"r0c1": 0.2, "r0c2": -0.1}}
    assert store.labels(other_id) == {}
    decision_event, other_event = store.events()
    assert decision_event.labels == store.labels(decision_id) and other_event.labels == {}
    assert store.decisions() == [make_decision(0)]
    assert store.event_log_hash() == before
    with pytest.raises(RecorderError, match="no event 999"):
        store.attach_label(999, "advantage", 1.0)
    with pytest.raises(RecorderError, match="neither a number nor a dict"):
        store.attach_label(decision_id, "advantage", "big")


def test_list_runs_summarises_every_run(tmp_path: Path) -> None:
    manifest = {"created_at": "2026-01-02T03:04:05+00:00"}
    with RunStore.create(tmp_path / "a", {**manifest, "config": {"task": "digits"}}) as a:
        write_ticks(a, range(3))
    config = {"task": {"name": "text"}, "policy": "ppo"}
    RunStore.create(tmp_path / "b", {**manifest, "config": config}).close()
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / DB_NAME).write_bytes(b"garbage" * 200)
    (tmp_path / "not_a_run").mkdir()

    a_run, b_run, c_run = list_runs(tmp_path)
    assert (a_run.id, a_run.task, a_run.policy, a_run.last_tick) == ("a", "digits", None, 2)
    assert a_run.created_at == manifest["created_at"] and a_run.problem is None
    assert (b_run.id, b_run.task, b_run.policy, b_run.last_tick) == ("b", "text", "ppo", None)
    assert c_run.id == "c" and "not an SQLite database" in c_run.problem
    assert list_runs(tmp_path / "nowhere") == []
