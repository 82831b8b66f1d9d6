"""Every weights file is written one way (temporary file, then rename): an interrupted write
leaves the previous file whole and no temporary file behind."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

import esper.contracts.files as files
from _engine_helpers import small_config
from esper.contracts.files import atomic_write
from esper.kasmina import CNNHost, save_model
from esper.run import start_run
from esper.simic import Critic
from esper.tamiyo.learned import LearnedPolicy
from esper.tamiyo.ppo import RewardScaler
from esper.train_policy import _save_training_state


def test_atomic_write_replaces_whole_or_not_at_all(tmp_path: Path) -> None:
    path = tmp_path / "f.bin"
    atomic_write(path, lambda tmp: tmp.write_bytes(b"old"))

    def half_then_crash(tmp: Path) -> None:
        tmp.write_bytes(b"ne")
        raise KeyboardInterrupt  # even a kill-like interruption cleans up

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, half_then_crash)
    assert path.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.bin"]
    atomic_write(path, lambda tmp: tmp.write_bytes(b"new"))
    assert path.read_bytes() == b"new"


def _policy_writer(path: Path, version: int) -> None:
    LearnedPolicy(seed=version).save(path)


def _model_writer(path: Path, version: int) -> None:
    torch.manual_seed(version)
    save_model(CNNHost(2, 1, 1, 10, 8), path)


def _critic_writer(path: Path, version: int) -> None:
    w = np.full(2, float(version))
    Critic(("x", "y"), np.zeros(2), np.ones(2), w, 0.0, 1.0, 2).save(path)


def _training_state_writer(path: Path, version: int) -> None:
    policy = LearnedPolicy(seed=version)
    optimizer = torch.optim.Adam(policy.net.parameters())
    _save_training_state(path.parent, policy, optimizer, RewardScaler(1, 0.99), version)


WRITERS: dict[str, tuple[Callable[[Path, int], None], str]] = {
    "policy": (_policy_writer, "policy.safetensors"),
    "model": (_model_writer, "model.safetensors"),
    "critic": (_critic_writer, "critic.safetensors"),
    "training state": (_training_state_writer, "training.safetensors"),
}


@pytest.mark.parametrize("name", sorted(WRITERS))
def test_weights_writers_are_atomic(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write, filename = WRITERS[name]
    path = tmp_path / filename
    write(path, 1)
    before = path.read_bytes()
    names = sorted(p.name for p in tmp_path.iterdir())

    def crash(src: object, dst: object) -> None:
        raise OSError("disk full (simulated) at the rename")

    monkeypatch.setattr(files.os, "replace", crash)
    with pytest.raises(OSError, match="simulated"):
        write(path, 2)
    assert path.read_bytes() == before  # never half-written, never the new content
    assert sorted(p.name for p in tmp_path.iterdir()) == names  # no temporary file left


def test_run_checkpoints_are_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = start_run(small_config(2, policy="none"), run_dir=tmp_path / "run")
    path, _ = run.save_checkpoint(0)
    before = (run.run_dir / path).read_bytes()
    monkeypatch.setattr(files.os, "replace", lambda a, b: (_ for _ in ()).throw(OSError("boom")))
    run.step(0)  # the weights change; the rewrite of tick 0's file below must not land
    with pytest.raises(OSError, match="boom"):
        run.save_checkpoint(0)
    assert (run.run_dir / path).read_bytes() == before
    assert [p.name for p in (run.run_dir / "checkpoints").iterdir()] == [Path(path).name]
    run.store.close()
