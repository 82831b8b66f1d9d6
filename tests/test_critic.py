"""The critic of exact φ: features that agree between a live observation and the flight recorder,
the dataset join of labelled germinations, folds by run, save/load, `esper train-critic`."""

from __future__ import annotations

import math
import random
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from _credit_helpers import fake_value, synthetic_run
from esper.audits.retrain import Audit, AuditProtocol
from esper.cli import app
from esper.config import GrowConfig, override
from esper.contracts import (
    AlphaCurve,
    Blueprint,
    Observation,
    SeedSpec,
    SlotTelemetry,
    Stage,
    obs_vector,
    slot_state,
)
from esper.recorder import RunStore
from esper.run import start_run
from esper.simic.critic import (
    CriticLoadError,
    CriticRow,
    critic_dataset,
    fit_critic,
    held_out,
    load_critic,
    observation_features,
    run_folds,
    snapshot_features,
)
from esper.tolaria.environment import EnvConfig


def telemetry(name: str, stage: Stage, contribution: float | None, blueprint=None) -> SlotTelemetry:
    return SlotTelemetry(
        name=name,
        stage=stage,
        ticks_in_stage=2,
        alpha=0.4,
        alpha_target=1.0,
        alpha_curve=AlphaCurve.LINEAR,
        alpha_ticks_left=3,
        seed_grad_norm=0.1,
        host_grad_norm=0.2,
        grad_ratio=0.5,
        param_count=40,
        spec=SeedSpec(blueprint) if blueprint else None,
        contribution=contribution,
        rent=0.02,
    )


def observation() -> Observation:
    slots = (
        telemetry("slots.b0", Stage.BLENDING, 0.07, Blueprint.CONV_LIGHT),
        telemetry("slots.b1", Stage.DORMANT, None),
    )
    return Observation(
        tick=6,
        max_ticks=12,
        metric=0.8,
        higher_is_better=True,
        val_loss=0.6,
        train_loss=0.5,
        history=(0.5, 0.8),
        host_params=300,
        seed_params=40,
        rent_paid=0.1,
        slots=slots,
        legal_blueprints=((), ()),
    )


def test_live_and_recorded_features_agree() -> None:
    obs = observation()
    for s in obs.slots:
        recorded = snapshot_features(
            obs_vector(obs), slot_state(s), s.spec.blueprint.name if s.spec else None, 0.8 - 0.5
        )
        assert observation_features(obs, s.name) == recorded
    live = observation_features(obs, "slots.b0")
    assert (live["contribution"], live["has_contribution"], live["stage"]) == (0.07, 1.0, 3.0)
    assert live["blueprint=CONV_LIGHT"] == 1.0 and live["progress"] == 0.5
    # gradient health, size and place: log10 of the telemetry, the seed's share of the host
    assert live["log_seed_grad"] == pytest.approx(-1.0)
    assert live["log_host_grad"] == pytest.approx(math.log10(0.2))
    assert live["log_grad_ratio"] == pytest.approx(math.log10(0.5))
    assert live["seed_param_frac"] == pytest.approx(40 / 300)
    assert live["topology=cnn"] == 1.0
    # the metric's gain over the last `lag` ticks (the history holds two: the gain is 0.3)
    assert live["metric_gain"] == pytest.approx(0.3)
    assert observation_features(obs, "slots.b0", lag=0)["metric_gain"] == 0.0
    assert observation_features(obs, "slots.b1", "NORM")["blueprint=NORM"] == 1.0
    with pytest.raises(ValueError, match="no slot"):
        observation_features(obs, "slots.b9")


# ---------------------------------------------------------------------------------------------
# The dataset
# ---------------------------------------------------------------------------------------------


def test_dataset_joins_a_labelled_germination_of_a_real_run(tmp_path: Path) -> None:
    cfg = override(
        GrowConfig(device="cpu", ticks=6, checkpoint_every=6, env=EnvConfig(batches_per_tick=2)),
        **{"heuristic.warmup_ticks": 0, "heuristic.plateau_patience": 0},
    )
    run = start_run(cfg, run_dir=tmp_path / "run")
    run.run()
    run.store.close()
    with RunStore.open(tmp_path / "run") as store:
        germ = store.events("germinate")[0]
        store.attach_label(germ.id, "shapley", {"phi": 0.25, "protocol_hash": "p"})
        decisions = {d.tick: d for d in store.decisions()}
    (row,) = critic_dataset([tmp_path / "run"], lag=2)  # only the labelled germination
    assert (row.event_id, row.slot, row.phi, row.protocol_hash) == (germ.id, germ.slot, 0.25, "p")
    assert row.blueprint == germ.payload["blueprint"]
    assert row.snapshot_tick == min(germ.tick + 2, cfg.ticks - 1)
    later = decisions[row.snapshot_tick]
    state = next(s for s in later.slot_states if s["name"] == germ.slot)
    first = decisions[max(0, row.snapshot_tick - 2)]
    gain = later.obs_before[1] - first.obs_before[1]
    assert row.features == snapshot_features(later.obs_before, state, row.blueprint, gain)
    assert row.features["log_seed_grad"] != 0.0  # gradient health is recorded
    assert row.features["log_grad_ratio"] == pytest.approx(math.log10(state["grad_ratio"]))
    assert row.features["stage"] == float(Stage[state["stage"]]) > 0
    assert row.decision_features["stage"] == 0.0  # the policy germinated into a DORMANT slot
    assert row.decision_features[f"blueprint={row.blueprint}"] == 1.0


def test_dataset_lag_stops_before_the_slot_is_germinated_again(tmp_path: Path) -> None:
    a, b, _ = synthetic_run(tmp_path / "run")
    with RunStore.open(tmp_path / "run") as store:
        store.attach_label(a.event_id, "shapley", {"phi": 1.0, "protocol_hash": "p"})
        store.attach_label(b.event_id, "shapley", {"phi": 2.0, "protocol_hash": "p"})
    row_a, row_b = critic_dataset([tmp_path / "run"], lag=3)
    assert (row_a.snapshot_tick, row_a.features["contribution"]) == (3, 0.3)
    assert (row_b.snapshot_tick, row_b.features["contribution"]) == (4, 0.05)
    row_a, row_b = critic_dataset([tmp_path / "run"], lag=10)
    assert row_a.snapshot_tick == 4  # b0 is germinated again at 5: that seed is not A
    assert row_a.features["has_contribution"] == 0.0  # pruned at 4
    assert row_b.snapshot_tick == 7  # the run's last tick


# ---------------------------------------------------------------------------------------------
# Folds, fitting, held-out score, save and load
# ---------------------------------------------------------------------------------------------


def fake_rows(runs: int = 6, per_run: int = 4, seed: int = 0) -> list[CriticRow]:
    """φ = 2·contribution + a blueprint effect + a little noise."""
    rng, rows = random.Random(seed), []
    for r in range(runs):
        for i in range(per_run):
            bp = ("CONV_LIGHT", "NORM")[i % 2]
            feats = {
                "contribution": rng.uniform(-0.1, 0.3),
                "has_contribution": 1.0,
                "alpha": rng.uniform(0, 1),
                "metric": rng.uniform(0.5, 0.9),
                f"blueprint={bp}": 1.0,
            }
            phi = 2 * feats["contribution"] + 0.1 * (bp == "CONV_LIGHT") + rng.gauss(0, 0.01)
            rows.append(CriticRow(f"run{r}", i, "slots.b0", bp, 0, 3, phi, "p", feats, {}))
    return rows


def test_folds_never_share_a_run() -> None:
    rows = fake_rows(runs=5)
    for k in (None, 2, 3):
        folds = run_folds(rows, k)
        assert len(folds) == (5 if k is None else k)
        tested = [i for _, test in folds for i in test]
        assert sorted(tested) == list(range(len(rows)))  # every row held out exactly once
        for train, test in folds:
            assert {rows[i].run for i in train}.isdisjoint({rows[i].run for i in test})
            assert sorted(train + test) == list(range(len(rows)))
    assert all(len({rows[i].run for i in test}) == 1 for _, test in run_folds(rows))
    with pytest.raises(ValueError, match="folds"):
        run_folds(rows, 6)


def test_critic_generalises_across_runs_and_round_trips(tmp_path: Path) -> None:
    rows = fake_rows()
    score = held_out(rows)
    assert score.n == len(rows) and score.folds == 6
    assert score.spearman > 0.9 and score.mae < 0.05
    critic = fit_critic(rows)
    assert critic.features[-2:] == ("blueprint=CONV_LIGHT", "blueprint=NORM")
    path = critic.save(tmp_path / "critic.safetensors")
    loaded = load_critic(path)
    features = [r.features for r in rows]
    assert np.array_equal(loaded.predict(features), critic.predict(features))
    assert (loaded.features, loaded.l2, loaded.lag, loaded.bias) == (
        critic.features,
        critic.l2,
        critic.lag,
        critic.bias,
    )
    assert loaded.meta["rows"] == len(rows) and loaded.meta["protocol_hashes"] == ["p"]
    obs = observation()
    assert loaded.predict_observation(obs, "slots.b0") == pytest.approx(
        loaded.predict(observation_features(obs, "slots.b0"))
    )
    (tmp_path / "junk.safetensors").write_bytes(b"not a critic")
    with pytest.raises(CriticLoadError):
        load_critic(tmp_path / "junk.safetensors")


# ---------------------------------------------------------------------------------------------
# esper train-critic
# ---------------------------------------------------------------------------------------------


def test_train_critic_on_the_command_line(tmp_path: Path) -> None:
    runs = []
    for i in range(3):
        run = tmp_path / f"run{i}"
        Audit(run / "audit", value_fn=fake_value).run(
            AuditProtocol(), synthetic_run(run), workers=1
        )
        runs.append(str(run))
    runner = CliRunner()
    out = tmp_path / "critic.safetensors"
    r = runner.invoke(app, ["train-critic", *runs, "--out", str(out)], env={"COLUMNS": "250"})
    assert r.exit_code == 0, r.output
    assert "held-out Spearman" in r.output and "3 folds by run" in r.output
    critic = load_critic(out)
    assert critic.meta["rows"] == 9 and "held_out" in critic.meta
    synthetic_run(tmp_path / "unaudited")
    bad = runner.invoke(app, ["train-critic", str(tmp_path / "unaudited"), "--out", str(out)])
    assert bad.exit_code == 2 and "esper audit" in bad.output and "Traceback" not in bad.output
