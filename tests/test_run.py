"""Whole growth runs: a seed's life on digits recorded tick by tick, determinism, resume after
`kill -9`, the economy's prices in the reward, and the text and cifar10 tasks."""

from __future__ import annotations

import json
import math
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from _engine_helpers import FAST_HEURISTIC, finite_params, small_config, text_config, tiny_text
from esper.config import HostConfig, config_to_dict
from esper.contracts import Stage
from esper.kasmina import CheckpointError
from esper.run import GrowthRun, resume_run, start_run
from esper.simic import EconomyConfig
from esper.tamiyo.policies import HeuristicConfig
from esper.tolaria.environment import EnvConfig, GrowthEnv

# Commits whatever reaches HOLDING: the margin makes any contribution beat the rent.
COMMITTING = HeuristicConfig(
    warmup_ticks=1, plateau_patience=0, hold_ticks=1, fossilize_margin=-10.0, max_widenings=0
)  # residual seeds (phages); a committed widening: tests/test_widening.py
ROOT = Path(__file__).resolve().parents[1]


def _metrics(run: GrowthRun) -> list[dict[str, float]]:
    rows = run.store.metrics()
    assert [t for t, _ in rows] == list(range(run.cfg.ticks))
    return [m for _, m in rows]


# ---------------------------------------------------------------------------------------------
# A seed's whole life, recorded
# ---------------------------------------------------------------------------------------------


def test_a_run_germinates_blends_and_commits_a_seed(tmp_path: Path) -> None:
    ticks = 12
    run = start_run(small_config(ticks, heuristic=COMMITTING), run_dir=tmp_path / "r")
    result = run.run()
    store = run.store
    events = store.events()

    fossil = next(e for e in events if e.kind == "fossilize")
    seed_id = fossil.payload["seed_id"]
    life = [e for e in events if e.payload.get("seed_id") == seed_id and e.kind != "decision"]
    assert [e.kind for e in life] == ["germinate", "advance", "advance", "advance", "fossilize"]
    assert len({e.slot for e in life}) == 1
    assert [e.tick for e in life] == sorted(e.tick for e in life)
    slot = run.env.slots[fossil.slot]
    assert slot.stage is Stage.COMMITTED and slot.phage is not None and slot.seed_id == seed_id

    decisions = store.decisions()
    assert [d.tick for d in decisions] == list(range(ticks))
    assert {d.policy for d in decisions} == {"heuristic"}
    by_tick = {d.tick: d for d in decisions}
    for e in life:  # each lifecycle event is the decision of its tick
        assert by_tick[e.tick].action["op"] == e.kind.upper()
    assert not [e for e in events if e.kind == "rejected_action"]

    metrics = _metrics(run)
    assert all(math.isfinite(v) for m in metrics for v in m.values())
    assert [d.reward for d in decisions] == [m["reward"] for m in metrics]
    assert result.committed == [fossil.payload["blueprint"]]
    assert fossil.payload["blueprint"] in result.germinated
    assert result.params_end > result.params_start and result.flops_end > result.flops_start
    flops = [m["flops"] for m in metrics]  # the model's cost after each tick
    assert flops[life[0].tick - 1] == result.flops_start < flops[-1] == result.flops_end
    assert result.final_metric == pytest.approx(metrics[-1]["metric"])
    assert result.rent_paid == pytest.approx(sum(m["rent"] for m in metrics))
    assert result.churn_paid == pytest.approx(sum(m["churn"] for m in metrics))
    assert result.reward_total == pytest.approx(sum(m["reward"] for m in metrics))
    assert [c.tick for c in store.checkpoints()] == [4, 9, 11]
    assert result.event_log_hash == store.event_log_hash()


# ---------------------------------------------------------------------------------------------
# Determinism
# ---------------------------------------------------------------------------------------------


def test_same_seed_same_run_other_seed_other_weights(tmp_path: Path) -> None:
    cfg = small_config(6)
    a = start_run(cfg, run_dir=tmp_path / "a").run()
    b = start_run(cfg, run_dir=tmp_path / "b").run()
    assert a.germinated, "nothing grew: the comparison would not cover seeds"
    assert (a.weights_hash, a.event_log_hash) == (b.weights_hash, b.event_log_hash)
    c = start_run(small_config(6, seed=1), run_dir=tmp_path / "c").run()
    assert c.weights_hash != a.weights_hash


# ---------------------------------------------------------------------------------------------
# kill -9, then resume
# ---------------------------------------------------------------------------------------------

_CHILD = """
import json, sys, time
from pathlib import Path
import torch
torch.set_num_threads(1)  # as in the test process: float reductions depend on thread count
from esper.config import config_from_dict
from esper.run import start_run
cfg = config_from_dict(json.loads(sys.argv[1]))
hang_at = int(sys.argv[3])
def hang(t, env):  # blocks inside tick `hang_at` until killed; changes no number
    if t == hang_at:
        time.sleep(3600)
start_run(cfg, run_dir=Path(sys.argv[2]), callbacks=[hang]).run()
raise SystemExit("the run finished: it was meant to be killed")
"""


def _complete_ticks(db: Path) -> int:
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1) as conn:
            last = conn.execute("SELECT max(tick) FROM ticks").fetchone()[0]
    except sqlite3.Error:
        return 0
    return 0 if last is None else last + 1


def test_resume_after_sigkill_matches_an_uninterrupted_run(tmp_path: Path) -> None:
    ticks, hang_at = 12, 7  # checkpoints after ticks 2 and 5; killed inside tick 7
    cfg = small_config(ticks, checkpoint_every=3)
    run_dir = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, json.dumps(config_to_dict(cfg)), str(run_dir), str(hang_at)],
        env=env,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 120
    while child.poll() is None and time.monotonic() < deadline:
        if _complete_ticks(run_dir / "run.sqlite") >= hang_at:
            break
        time.sleep(0.02)
    child.send_signal(signal.SIGKILL)
    _, err = child.communicate(timeout=30)
    assert child.returncode == -signal.SIGKILL, err.decode()[-2000:]
    assert _complete_ticks(run_dir / "run.sqlite") == hang_at  # ticks 0..6 are whole

    reference = start_run(cfg, run_dir=tmp_path / "whole").run()
    run = resume_run(run_dir)
    assert run.start_tick == 6  # the checkpoint after tick 5; tick 6 is replayed
    assert run.store.last_complete_tick() == 5  # later ticks truncated
    result = run.run()
    assert result.weights_hash == reference.weights_hash
    assert result.event_log_hash == reference.event_log_hash
    assert [d.tick for d in run.store.decisions()] == list(range(ticks))
    assert [t for t, _ in run.store.metrics()] == list(range(ticks))


def test_resume_rejects_a_corrupt_checkpoint(tmp_path: Path) -> None:
    run = start_run(small_config(3, checkpoint_every=2), run_dir=tmp_path / "r")
    run.run()
    (ck,) = [c for c in run.store.checkpoints() if c.tick == 2]
    path = tmp_path / "r" / ck.path
    path.write_bytes(path.read_bytes()[:-8] + b"corrupt!")
    with pytest.raises(CheckpointError, match="corrupt"):
        resume_run(tmp_path / "r")


# ---------------------------------------------------------------------------------------------
# Rent and churn in the reward
# ---------------------------------------------------------------------------------------------

ECON = EconomyConfig(base_rent_fraction=0.01, w_rent=0.2, w_churn=0.03, churn_window=5)
STRUCTURAL = ("germinate", "prune", "fossilize")


def _rent_by_hand(slots: list[tuple[Stage, float, int]], p_host: int) -> float:
    """W_rent · Σ log(1 + (base·P_host + α·P_seed) / P_host) with α by stage (paper §5.1)."""
    total = 0.0
    for stage, alpha, p_seed in slots:
        if stage in (Stage.GERMINATED, Stage.TRAINING):
            alpha = 0.0
        elif stage is Stage.COMMITTED:
            alpha = 1.0
        elif not (
            stage in (Stage.BLENDING, Stage.HOLDING) or (stage is Stage.PRUNED and alpha > 0)
        ):
            continue
        total += math.log(1 + (ECON.base_rent_fraction * p_host + alpha * p_seed) / p_host)
    return ECON.w_rent * total


def test_reward_is_task_minus_rent_minus_churn(tmp_path: Path) -> None:
    ticks = 12
    seen: list[tuple[list[tuple[Stage, float, int]], int]] = []

    def look(env: GrowthEnv) -> None:
        in_slots = {id(p) for s in env.slots.values() for p in s.parameters()}
        absorbed = sum(s.absorbed for s in env.slots.values())  # committed widenings: seeds
        p_host = sum(p.numel() for p in env.model.parameters() if id(p) not in in_slots)
        slots = [
            (
                s.stage,
                1.0 if s.phage is not None or s.absorbed else s.alpha,
                sum(p.numel() for p in s.parameters()) + s.absorbed,
            )
            for s in env.slots.values()
        ]
        p_host -= absorbed
        seen.append((slots, p_host))

    def at_tick_start(t: int, env: GrowthEnv) -> None:
        if t > 0:  # the slots as the economy priced them at the end of tick t − 1
            look(env)

    cfg = small_config(ticks, heuristic=COMMITTING, economy=ECON)
    run = start_run(cfg, run_dir=tmp_path / "r", callbacks=[at_tick_start])
    run.run()
    look(run.env)  # and as it priced the last tick
    metrics, events = _metrics(run), run.store.events()
    assert {s for slots, _ in seen for s, _, _ in slots} >= {Stage.BLENDING, Stage.COMMITTED}
    assert any(s is Stage.BLENDING and 0 < a < 1 for slots, _ in seen for s, a, _ in slots)
    assert not any(d.action["op"] == "SET_ALPHA_TARGET" for d in run.store.decisions())

    last_edit: dict[str, int] = {}
    for t, m in enumerate(metrics):
        slots, p_host = seen[t]
        assert m["rent"] == pytest.approx(_rent_by_hand(slots, p_host), rel=1e-9, abs=1e-12)
        edits = [e.slot for e in events if e.tick == t and e.kind in STRUCTURAL]
        flips = sum(1 for s in edits if s in last_edit and t - last_edit[s] <= ECON.churn_window)
        last_edit.update({s: t for s in edits})
        assert m["churn"] == pytest.approx(ECON.w_churn * (len(edits) + flips), abs=1e-12)
        task = m["metric"]  # the default `level` task reward
        assert m["reward_task"] == pytest.approx(task, abs=1e-12)
        assert m["reward"] == pytest.approx(task - m["rent"] - m["churn"], abs=1e-12)
    assert sum(m["churn"] > 0 for m in metrics) >= 2  # a germinate and a fossilize at least


# ---------------------------------------------------------------------------------------------
# The other tasks
# ---------------------------------------------------------------------------------------------


def test_text_task_runs_and_rewards_a_falling_bits_per_char(tmp_path: Path) -> None:
    cfg = text_config(ticks=4)
    run = start_run(cfg, task=tiny_text(), run_dir=tmp_path / "r")
    result = run.run()
    assert result.metric_name == "bits_per_char"
    metrics = _metrics(run)
    assert all(math.isfinite(v) for m in metrics for v in m.values())
    for m in metrics:  # lower is better: the level reward is −bits per char
        assert m["reward_task"] == pytest.approx(-m["metric"], abs=1e-9)
    assert metrics[-1]["metric"] < metrics[0]["metric"]  # it learns at all
    assert result.germinated and finite_params(run.env.model)
    assert "text" in run.store.manifest()["task"]


def _fake_cifar(folder: Path, records: int = 20) -> None:
    rng = np.random.default_rng(0)
    names = [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]
    for name in names:
        rows = np.zeros((records, 1 + 3072), dtype=np.uint8)
        rows[:, 0] = rng.integers(0, 10, records)
        rows[:, 1:] = rng.integers(0, 256, (records, 3072))
        (folder / name).write_bytes(rows.tobytes())


def test_cifar10_task_from_a_binary_folder(tmp_path: Path) -> None:
    data = tmp_path / "cifar"
    data.mkdir()
    _fake_cifar(data)
    cfg = small_config(
        3,
        task="cifar10",
        data_dir=str(data),
        host=HostConfig(width=4, depth=2),
        heuristic=FAST_HEURISTIC,
        env=EnvConfig(batches_per_tick=2, batch_size=16),
    )
    run = start_run(cfg, run_dir=tmp_path / "r")
    result = run.run()
    assert run.task.name == "cifar10" and len(run.task.train_x) == 100
    assert tuple(run.task.input_shape) == (3, 32, 32) and len(run.task.val_x) == 20
    metrics = _metrics(run)
    assert all(math.isfinite(v) for m in metrics for v in m.values())
    assert 0.0 <= result.final_metric <= 1.0
    assert result.germinated and finite_params(run.env.model)
    assert torch.isfinite(run.env.task.train_x).all()
