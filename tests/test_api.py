"""The Python API end to end: `esper.grow` on a user's own module and data, honouring its config."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import esper
from _engine_helpers import digits
from esper.config import GrowConfig
from esper.contracts.errors import ConfigError
from esper.kasmina import SeedSlot, insert_slots, slots_of
from esper.recorder import RunStore
from esper.tolaria.environment import EnvConfig


def user_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 10),
    )
    x = digits().train_x[:2]
    insert_slots(model, ["1", "3"], example_input=x)
    return model


def data() -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    task = digits()
    return (task.train_x, task.train_y), (task.val_x, task.val_y)


CFG = GrowConfig(ticks=3, device="cpu", env=EnvConfig(batches_per_tick=2))


def manifest_config(run_dir: Path) -> dict:
    with RunStore.open(run_dir) as store:
        return store.manifest()["config"]


def test_the_config_passed_is_the_config_run(tmp_path: Path) -> None:
    train, val = data()
    cfg = replace(CFG, seed=5, policy="random")
    _, result = esper.grow(user_model(), train, val, config=cfg, run_dir=tmp_path / "a")
    recorded = manifest_config(tmp_path / "a")
    assert (recorded["seed"], recorded["policy"], recorded["ticks"]) == (5, "random", 3)
    with RunStore.open(tmp_path / "a") as store:
        assert {d.policy for d in store.decisions()} == {"random"}
    assert result.run_dir == tmp_path / "a"


def test_keywords_given_override_the_config_and_only_those(tmp_path: Path) -> None:
    train, val = data()
    cfg = replace(CFG, seed=5, policy="random")
    esper.grow(
        user_model(),
        train,
        val,
        config=cfg,
        seed=7,
        run_dir=tmp_path / "b",
        **{"economy.w_rent": 0.5},
    )
    recorded = manifest_config(tmp_path / "b")
    assert (recorded["seed"], recorded["policy"]) == (7, "random")
    assert recorded["economy"]["w_rent"] == 0.5 and recorded["env"]["batches_per_tick"] == 2


def test_grown_model_is_the_users_module_and_its_metric_is_true(tmp_path: Path) -> None:
    # DataLoaders in; the returned module is the user's, with its SeedSlots, and the reported
    # metric is what an independent evaluation of the returned model measures (policy none:
    # nothing changes the function after the last evaluation).
    (tx, ty), (vx, vy) = data()
    model = user_model()
    train = DataLoader(TensorDataset(tx, ty), batch_size=256)
    val = DataLoader(TensorDataset(vx, vy), batch_size=256)
    grown, result = esper.grow(model, train, val, config=CFG, policy="none", run_dir=tmp_path / "c")
    assert grown is model and isinstance(slots_of(grown)["1"], SeedSlot)
    grown.eval()
    with torch.no_grad():
        accuracy = (grown(vx).argmax(-1) == vy).float().mean().item()
    assert result.final_metric == pytest.approx(accuracy, abs=1e-6)
    assert result.metric_name == "accuracy" and result.params_end == result.params_start


def test_a_built_in_task_by_name(tmp_path: Path) -> None:
    _, result = esper.grow(user_model(), task="digits", config=CFG, run_dir=tmp_path / "d")
    assert manifest_config(tmp_path / "d")["task"] == "digits"
    assert result.metric_name == "accuracy" and 0.0 <= result.final_metric <= 1.0
    # the run's store is closed on return: its files no longer change behind the caller's back
    assert not (tmp_path / "d" / "run.sqlite-wal").exists()


def test_data_and_output_are_checked_before_the_run(tmp_path: Path) -> None:
    train, val = data()
    with pytest.raises(ConfigError, match="not both"):
        esper.grow(user_model(), train, val, task="digits", config=CFG, run_dir=tmp_path / "x")
    with pytest.raises(ConfigError, match="give train and val data"):
        esper.grow(user_model(), train, config=CFG, run_dir=tmp_path / "x")
    with pytest.raises(ConfigError, match=r"logits are \(2, 3\) for input \(2, 1, 8, 8\)"):
        esper.grow(
            user_model(),
            train,
            val,
            output=lambda out: out[:, :3],
            config=CFG,
            run_dir=tmp_path / "x",
        )
    with pytest.raises(ConfigError, match=r"returns dict\('logits': Tensor\(2, 10\)\)"):
        esper.grow(
            user_model(),
            train,
            val,
            output=lambda out: {"logits": out},
            config=CFG,
            run_dir=tmp_path / "x",
        )
    assert not (tmp_path / "x").exists()  # no run was started
    # `output` is applied in training and evaluation alike
    model = user_model()
    _, result = esper.grow(
        model,
        train,
        val,
        output=lambda out: 2 * out,
        policy="none",
        config=CFG,
        run_dir=tmp_path / "e",
    )
    model.eval()
    with torch.no_grad():
        accuracy = (model(val[0]).argmax(-1) == val[1]).float().mean().item()
    assert result.final_metric == pytest.approx(accuracy, abs=1e-6)


def test_a_users_model_grows_in_zones_named_by_their_slots(tmp_path: Path) -> None:
    train, val = data()
    zone_file = tmp_path / "zones.toml"
    zone_file.write_text(
        "window = 2\n[[zone]]\nname = 'first'\nslots = ['1']\n"
        "[[zone]]\nname = 'second'\nslots = ['3']\n"
    )
    cfg = replace(CFG, policy="random")
    _, result = esper.grow(
        user_model(), train, val, config=cfg, zones=zone_file, run_dir=tmp_path / "z"
    )
    assert set(result.zone_books) == {"first", "second"}
    with RunStore.open(tmp_path / "z") as store:
        assert {d.policy for d in store.decisions()} == {"random@first", "random@second"}
        assert [d.slot_states[0]["name"] for d in store.decisions()[:2]] == ["1", "3"]
    assert manifest_config(tmp_path / "z")["zones"]["zone"][1]["slots"] == ["3"]
