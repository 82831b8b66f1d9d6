"""One learned policy, any host: a policy cloned from the heuristic on the digits CNN, saved and
loaded, acts legally on the three built-in hosts and on users' modules with 1, 2 and 5 slots of
mixed topologies (feature maps, sequences, vectors) that it never saw; `esper.grow` and
`esper grow --policy FILE` deploy it there."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from typer.testing import CliRunner

import esper
from _engine_helpers import digits, small_config, text_config, tiny_text
from esper.cli import app
from esper.config import GrowConfig, HostConfig
from esper.contracts import HEADS, Op, Topology
from esper.kasmina import insert_slots, slot_depths, slots_of
from esper.recorder import RunStore
from esper.run import build_episode, load_policy
from esper.tamiyo.imitation import (
    Demonstrations,
    ImitationConfig,
    action_indices,
    agreement,
    imitation_update,
)
from esper.tamiyo.learned import LearnedPolicy
from esper.tamiyo.masks import action_masks, illegal_reason
from esper.tolaria.environment import EnvConfig

TRAIN_HOST = HostConfig(kind="cnn", width=2, depth=3)  # where the policy is cloned: 3 CNN slots


@pytest.fixture(scope="module")
def policy_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The heuristic's decisions on one digits-CNN episode, cloned (a quick behaviour clone, as
    `train-policy`'s warm start), saved."""
    cfg = small_config(ticks=12, policy="heuristic", host=TRAIN_HOST)
    episode, teacher = build_episode(cfg), load_policy(cfg)
    observations, decisions = [], []
    for _ in range(cfg.ticks):
        obs = episode.observe()
        d = teacher.act(obs)
        episode.act(d.action, d.reason)
        observations.append(obs)
        decisions.append(d)
    policy = LearnedPolicy(hidden=32, seed=0)
    g, s = policy.features(observations, update=True)
    demos = Demonstrations(
        g,
        s,
        action_indices([d.action for d in decisions]),
        {h: torch.tensor([d.mask[h] for d in decisions]) for h in HEADS},
        torch.zeros(len(decisions)),
    )
    optimizer = torch.optim.Adam(policy.net.parameters(), eps=1e-5)
    cfg_bc = ImitationConfig(epochs=40, minibatch_size=64, lr=3e-3)
    imitation_update(policy.net, optimizer, demos, cfg_bc, torch.Generator().manual_seed(0))
    assert {d.action.op for d in decisions} > {Op.WAIT}  # the teacher grew something
    assert agreement(policy.net, demos)[0]["op"] > 0.5  # the clone learned something
    path = tmp_path_factory.mktemp("policy") / "cloned.safetensors"
    policy.save(path)
    return path


def play_legally(cfg: GrowConfig, **kw: object) -> tuple[list[Op], list[int]]:
    """Play `cfg` (its policy loaded from its file) and check every decision against the masks;
    the ops taken, and the slot count of every observation."""
    episode, policy = build_episode(cfg, **kw), load_policy(cfg)
    ops, counts = [], []
    for _ in range(cfg.ticks):
        obs = episode.observe()
        d = policy.act(obs)
        assert illegal_reason(d.action, obs) is None
        assert d.mask == action_masks(
            obs, d.action.op, None if d.action.op is Op.WAIT else d.action.slot
        )
        assert len(d.probs["slot"]) == len(obs.slots)
        outcome = episode.act(d.action, d.reason)
        assert not [e for e in outcome.events if e.kind == "rejected_action"]
        ops.append(d.action.op)
        counts.append(len(obs.slots))
    return ops, counts


# ---------------------------------------------------------------------------------------------
# The built-in hosts
# ---------------------------------------------------------------------------------------------

BUILT_IN = {
    "cnn-deeper": lambda path: small_config(
        ticks=8, policy=str(path), host=HostConfig(kind="cnn", width=4, depth=5)
    ),
    "mlp": lambda path: small_config(
        ticks=8, policy=str(path), host=HostConfig(kind="mlp", width=16, depth=2)
    ),
    "transformer": lambda path: text_config(ticks=6, policy=str(path)),
}


@pytest.mark.parametrize("host", list(BUILT_IN))
def test_the_same_policy_acts_legally_on_every_built_in_host(policy_file: Path, host: str) -> None:
    cfg = replace(BUILT_IN[host](policy_file), sample_actions=True)
    task = tiny_text() if host == "transformer" else None
    ops, counts = play_legally(cfg, task=task)
    assert counts[0] == {"cnn-deeper": 5, "mlp": 2, "transformer": 2}[host]
    assert set(ops) - {Op.WAIT}  # it acts, not only waits


def test_observations_describe_the_slots_layout_free() -> None:
    cfg = text_config(ticks=1)
    obs = build_episode(cfg, task=tiny_text()).observe()
    assert [s.topology for s in obs.slots] == [Topology.SEQ, Topology.SEQ]
    assert [s.channels for s in obs.slots] == [32, 32]  # d_model = host.width
    depths = [s.depth for s in obs.slots]
    assert 0.0 < depths[0] < depths[1] < 1.0  # attention before the MLP of the same layer


# ---------------------------------------------------------------------------------------------
# Users' modules: 1, 2 and 5 slots of mixed topologies
# ---------------------------------------------------------------------------------------------


class Mixed(nn.Module):
    """Digits (1, 8, 8) through feature maps, a token sequence and vectors."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)  # (B, 4, 8, 8)
        self.conv2 = nn.Conv2d(4, 8, 3, padding=1, stride=2)  # (B, 8, 4, 4)
        self.proj = nn.Linear(8, 12)  # (B, 16, 12): one token per position
        self.fc1 = nn.Linear(12, 16)  # (B, 16)
        self.fc2 = nn.Linear(16, 16)
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.conv2(F.relu(self.conv1(x))))
        tokens = F.relu(self.proj(h.flatten(2).transpose(1, 2)))
        v = F.relu(self.fc1(tokens.mean(1)))
        return self.head(F.relu(self.fc2(v)))


POINTS = {
    1: ["fc1"],
    2: ["conv2", "proj"],
    5: ["conv1", "conv2", "proj", "fc1", "fc2"],
}
TOPOLOGIES = {"conv1": "cnn", "conv2": "cnn", "proj": "seq", "fc1": "vec", "fc2": "vec"}


def mixed(points: list[str]) -> nn.Module:
    torch.manual_seed(0)
    model = Mixed()
    insert_slots(model, points, example_input=digits().train_x[:2])
    return model


def test_depth_is_the_share_of_the_host_that_runs_before_the_slot() -> None:
    model = mixed(POINTS[5])
    layers = ["conv1", "conv2", "proj", "fc1", "fc2", "head"]  # in forward order
    host = [sum(p.numel() for p in getattr(model, n).parameters()) for n in layers]
    total = sum(host)
    depths = slot_depths(model, digits().train_x[:1])
    by_point = {name.removesuffix("_slot"): d for name, d in depths.items()}
    expected = {p: sum(host[: i + 1]) / total for i, p in enumerate(POINTS[5])}
    assert by_point == pytest.approx(expected)


@pytest.mark.parametrize("n", list(POINTS))
def test_a_learned_policy_acts_legally_on_a_users_module(policy_file: Path, n: int) -> None:
    model = mixed(POINTS[n])
    assert sorted(s.topology.value for s in slots_of(model).values()) == sorted(
        TOPOLOGIES[p] for p in POINTS[n]
    )
    cfg = replace(
        small_config(ticks=8, policy=str(policy_file), sample_actions=True), task="custom"
    )
    ops, counts = play_legally(cfg, model=model, task=digits())
    assert counts == [n] * cfg.ticks
    assert set(ops) - {Op.WAIT}


def test_esper_grow_deploys_a_policy_file_or_object_on_a_users_module(
    policy_file: Path, tmp_path: Path
) -> None:
    task = digits()
    train, val = (task.train_x, task.train_y), (task.val_x, task.val_y)
    cfg = GrowConfig(ticks=4, device="cpu", sample_actions=True, env=EnvConfig(batches_per_tick=2))
    _, by_file = esper.grow(
        mixed(POINTS[5]), train, val, config=cfg, policy=str(policy_file), run_dir=tmp_path / "f"
    )
    loaded = LearnedPolicy.load(policy_file, seed=3)
    _, by_object = esper.grow(
        mixed(POINTS[2]), train, val, config=cfg, policy=loaded, run_dir=tmp_path / "o"
    )
    for run_dir, slots in ((by_file.run_dir, 5), (by_object.run_dir, 2)):
        with RunStore.open(run_dir) as store:
            decisions, events = store.decisions(), store.events()
            config = store.manifest()["config"]
        assert config["policy"] == str(policy_file)  # the object names the file it came from
        assert len(decisions) == 4 and {d.policy for d in decisions} == {"learned"}
        assert all(len(d.mask["slot"]) == slots for d in decisions)
        assert not [e for e in events if e.kind == "rejected_action"]


def test_esper_grow_cli_deploys_a_policy_file_on_another_host(
    policy_file: Path, tmp_path: Path
) -> None:
    config = tmp_path / "mlp.toml"
    config.write_text(
        'ticks = 3\ndevice = "cpu"\n[host]\nkind = "mlp"\nwidth = 16\n[env]\nbatches_per_tick = 2\n'
    )
    args = ["grow", "--config", str(config), "--policy", str(policy_file)]
    result = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "runs"), "--no-baseline"])
    assert result.exit_code == 0, result.output
    (run_dir,) = list((tmp_path / "runs").iterdir())
    with RunStore.open(run_dir) as store:
        assert {d.policy for d in store.decisions()} == {"learned"}
        assert not [e for e in store.events() if e.kind == "rejected_action"]
