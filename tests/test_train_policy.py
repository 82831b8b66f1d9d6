"""Phase 1 → Phase 2: a smoke PPO training writes a policy that `esper grow` can deploy."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from typer.testing import CliRunner

from esper.cli import app
from esper.config import GrowConfig, HostConfig
from esper.contracts.zones import ZonesConfig, ZoneSpec
from esper.recorder import RunStore
from esper.run import start_run
from esper.tamiyo.imitation import ImitationConfig
from esper.tamiyo.learned import LearnedPolicy, PolicyLoadError
from esper.tolaria.environment import EnvConfig
from esper.train_policy import TrainPolicyConfig, train_policy


def _cfg(out: Path, updates: int) -> TrainPolicyConfig:
    """Tiny, with the default warm start: 2 heuristic episodes (one rollout), cloned."""
    return TrainPolicyConfig(
        episode=GrowConfig(ticks=3, device="cpu", env=EnvConfig(batches_per_tick=2)),
        num_envs=2,
        num_steps=3,
        updates=updates,
        out=str(out),
        backend="inprocess",
        imitation=ImitationConfig(episodes=2, epochs=5),
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    out = tmp_path_factory.mktemp("policy")
    logs: list[dict] = []
    path = train_policy(_cfg(out, 2), log=lambda u, info: logs.append(info))
    return path, logs


def test_smoke_training_writes_a_loadable_policy(trained: tuple[Path, list[dict]]) -> None:
    path, logs = trained
    assert [info["update"] for info in logs] == [0, 1, 2]  # 0: the warm start
    assert all(0.0 <= info["clipfrac"] <= 1.0 for info in logs[1:])
    # The ratio moves off 1 after the first epoch (an update over an anchored reference with
    # one epoch would leave it at 1, approx_kl exactly 0, and clipping inert).
    assert all(info["approx_kl"] > 0 for info in logs[1:])
    policy = LearnedPolicy.load(path)
    assert policy.name == "learned"
    with RunStore.open(path.parent / "run") as store:  # every decision of every env recorded
        decisions = store.decisions()
    assert len(decisions) == 2 * 3 * 2  # updates × steps × envs
    assert {d.env for d in decisions} == {0, 1}


def test_resume_continues_at_the_update_boundary(tmp_path: Path) -> None:
    logs: list[int] = []
    train_policy(_cfg(tmp_path, 1), log=lambda u, info: logs.append(info["update"]))
    train_policy(_cfg(tmp_path, 3), resume=True, log=lambda u, info: logs.append(info["update"]))
    assert logs == [0, 1, 2, 3]  # no second warm start on resume
    with RunStore.open(tmp_path / "run") as store:
        assert store.last_complete_tick() == 3 * 3 - 1


def test_deployed_policy_grows_and_acts_legally(
    trained: tuple[Path, list[dict]], tmp_path: Path
) -> None:
    path, _ = trained
    cfg = GrowConfig(policy=str(path), ticks=3, env=EnvConfig(batches_per_tick=2))
    run = start_run(cfg, run_dir=tmp_path / "run")
    result = run.run()
    assert result.final_metric == result.final_metric  # finite, ran to the end
    assert not [e for e in run.store.events() if e.kind == "rejected_action"]
    for d in run.store.decisions():
        assert d.policy == "learned" and d.value is not None


def test_a_trained_policy_grows_a_host_it_never_saw(
    trained: tuple[Path, list[dict]], tmp_path: Path
) -> None:
    path, _ = trained  # trained on the 3-slot digits CNN
    host = HostConfig(kind="mlp", width=16, depth=2)
    cfg = GrowConfig(policy=str(path), ticks=3, host=host, env=EnvConfig(batches_per_tick=2))
    run = start_run(cfg, run_dir=tmp_path / "run")
    run.run()
    assert len(run.env.slots) == 2
    assert not [e for e in run.store.events() if e.kind == "rejected_action"]
    assert {d.policy for d in run.store.decisions()} == {"learned"}


def test_a_trained_policy_acts_in_each_zone_of_a_deeper_host(
    trained: tuple[Path, list[dict]], tmp_path: Path
) -> None:
    path, _ = trained  # trained on the 3-slot digits CNN; here one copy per 4-slot zone
    zones = ZonesConfig(zone=(ZoneSpec("early", blocks=(0, 3)), ZoneSpec("late", blocks=(4, 7))))
    host = HostConfig(kind="cnn", width=2, depth=8)
    env = EnvConfig(batches_per_tick=2, eval_samples=256)
    cfg = GrowConfig(policy=str(path), ticks=3, host=host, env=env, zones=zones)
    run = start_run(cfg, run_dir=tmp_path / "run")
    run.run()
    assert not [e for e in run.store.events() if e.kind == "rejected_action"]
    decisions = run.store.decisions()
    assert {d.policy for d in decisions} == {"learned@early", "learned@late"}
    assert len(decisions) == 2 * 3


def test_a_policy_of_another_spec_is_refused(
    trained: tuple[Path, list[dict]], tmp_path: Path
) -> None:
    path, _ = trained
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        meta = dict(f.metadata())
    other = tmp_path / "other.safetensors"
    save_file(tensors, str(other), metadata={**meta, "obs_spec": json.dumps("obs-v1")})
    with pytest.raises(PolicyLoadError, match="obs_spec = 'obs-v1'"):
        start_run(GrowConfig(policy=str(other), ticks=2), run_dir=tmp_path / "run")
    r = CliRunner().invoke(app, ["grow", "--policy", str(other), "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and "Traceback" not in r.output and "obs_spec" in r.output


def _write(tmp: Path, text: str) -> Path:
    p = tmp / "c.toml"
    p.write_text(text)
    return p


def test_periodic_held_out_evaluation(tmp_path: Path) -> None:
    logs: list[dict] = []
    cfg = TrainPolicyConfig(
        episode=GrowConfig(ticks=2, device="cpu", env=EnvConfig(batches_per_tick=1)),
        num_envs=2,
        num_steps=2,
        updates=2,
        eval_every=1,
        eval_seeds=2,
        out=str(tmp_path),
        backend="inprocess",
        imitation=ImitationConfig(teacher=None),
    )
    train_policy(cfg, log=lambda u, info: logs.append(info))
    assert all("heldout_metric" in info for info in logs)
    assert all(0.0 <= info["heldout_metric"] <= 1.0 for info in logs)
    # The evaluator is `esper evaluate`'s: recorded runs on seeds 1000 and 1001, one per update.
    for update in (1, 2):
        runs = sorted(
            p.name for p in (tmp_path / "heldout" / f"update-{update:04d}" / "runs").iterdir()
        )
        assert runs == ["learned-s1000", "learned-s1001"]
        with RunStore.open(tmp_path / "heldout" / f"update-{update:04d}" / "runs" / runs[0]) as s:
            assert s.manifest()["config"]["seed"] == 1000
    # the held-out episodes must not move the training stream: a run without them logs the
    # same training returns
    plain: list[dict] = []
    train_policy(
        replace(cfg, eval_every=0, out=str(tmp_path / "b")),
        log=lambda u, info: plain.append(info),
    )
    assert [i["return_mean"] for i in logs] == [i["return_mean"] for i in plain]
    # ... nor the updates (their minibatch shuffles draw from torch's global stream)
    a = LearnedPolicy.load(tmp_path / "policy.safetensors").net.state_dict()
    b = LearnedPolicy.load(tmp_path / "b" / "policy.safetensors").net.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------------------------
# The critic as a reward term
# ---------------------------------------------------------------------------------------------


class _FakeCritic:
    lag = 2

    def __init__(self) -> None:
        self.asked: list[tuple[int, str]] = []

    def predict_observation(self, obs: object, slot: str) -> float:
        self.asked.append((obs.tick, slot))  # type: ignore[attr-defined]
        return 0.5


def test_critic_bonus_is_paid_once_per_seed_lag_ticks_after_germination() -> None:
    from types import SimpleNamespace as NS

    import torch

    from esper.contracts import Op
    from esper.train_policy import CriticBonus

    critic = _FakeCritic()
    bonus = CriticBonus(critic, weight=2.0, num_envs=2)  # type: ignore[arg-type]
    obs = lambda *ticks: [NS(tick=t) for t in ticks]  # noqa: E731
    # tick 3: env 0 germinates slots.b1; env 1 waits.
    bonus.germinated([NS(tick=3, ops=(("slots.b1", Op.GERMINATE),)), NS(tick=3, ops=())])
    bonus.reset(torch.tensor([False, False]))
    assert bonus(obs(4, 4)).tolist() == [0.0, 0.0]  # 1 tick old: too young
    assert bonus(obs(5, 5)).tolist() == [1.0, 0.0]  # lag 2 reached: weight × 0.5, env 0 only
    assert bonus(obs(6, 6)).tolist() == [0.0, 0.0]  # paid once
    assert critic.asked == [(5, "slots.b1")]
    # A germination in an episode that ends is forgotten with it.
    bonus.germinated([NS(tick=39, ops=()), NS(tick=39, ops=(("slots.b0", Op.GERMINATE),))])
    bonus.reset(torch.tensor([False, True]))
    assert bonus(obs(41, 41)).tolist() == [0.0, 0.0]


def test_sample_actions_deploys_the_stochastic_policy(trained: tuple[Path, list[dict]]) -> None:
    from esper.run import load_policy

    path, _ = trained
    argmax = load_policy(GrowConfig(policy=str(path)))
    sampled = load_policy(GrowConfig(policy=str(path), sample_actions=True))
    assert argmax.deterministic and not sampled.deterministic  # type: ignore[attr-defined]


# ---------------------------------------------------------------------------------------------
# The warm start: the heuristic's episodes, recorded and cloned
# ---------------------------------------------------------------------------------------------


def test_warm_start_records_the_teacher_and_saves_the_clone(
    trained: tuple[Path, list[dict]],
) -> None:
    import json

    path, logs = trained
    clone = logs[0]["imitation"]
    assert clone["decisions"] == 2 * 3  # one rollout: 3 ticks × 2 envs
    assert math.isfinite(clone["nll"])  # the teacher acts legally: no action of probability 0
    with RunStore.open(path.parent / "demos") as store:
        demos = store.decisions()
    assert len(demos) == 6 and {d.policy for d in demos} == {"heuristic"}
    warm = LearnedPolicy.load(path.parent / "warm_start.safetensors")
    # The clone's normaliser has seen the demonstrations; PPO's later rollouts add to it.
    assert int(warm.global_norm.count) == 6
    assert int(LearnedPolicy.load(path).global_norm.count) == 6 + 2 * 3 * 2
    assert json.loads((path.parent / "warm_start.json").read_text())["epochs"] == 5


def test_cli_rejects_an_unknown_teacher(tmp_path: Path) -> None:
    r = CliRunner().invoke(app, ["train-policy", "--teacher", "oracle", "--out", str(tmp_path)])
    assert r.exit_code == 2 and "unknown teacher" in r.output and "Traceback" not in r.output


def test_backend_is_checked_and_ray_accepted(tmp_path: Path) -> None:
    assert TrainPolicyConfig(backend="ray").backend == "ray"  # VectorEnv's Ray actors
    args = ["train-policy", "--backend", "dask", "--out", str(tmp_path)]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert "backend must be one of auto, inprocess, processes, ray, got 'dask'" in r.output
