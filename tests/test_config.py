"""Strict config: unknown keys and bad values are ConfigErrors naming the key; TOML files and the
run manifest's JSON round-trip exactly; `override` reaches into tables."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import pytest

from esper.config import (
    ConfigError,
    GrowConfig,
    HostConfig,
    config_from_dict,
    config_to_dict,
    load_config,
    override,
)
from esper.contracts import LifecycleConfig
from esper.contracts.zones import NarsetConfig, ZonesConfig, ZoneSpec
from esper.simic import EconomyConfig
from esper.tamiyo.policies import HeuristicConfig
from esper.tolaria.environment import EnvConfig
from esper.tolaria.governor import GovernorConfig

CUSTOM = GrowConfig(
    task="text",
    policy="random",
    ticks=17,
    seed=3,
    device="cpu",
    out="elsewhere",
    data_dir="/data/cifar",
    checkpoint_every=4,
    host=HostConfig(kind="mlp", width=16, depth=2),
    env=EnvConfig(lr=1e-3, batch_size=32, batches_per_tick=5, prune_fade_ticks=2),
    economy=EconomyConfig(w_rent=0.25, max_rent=math.inf, higher_is_better=False),
    governor=GovernorConfig(divergence_factor=4.0, max_rollbacks=1),
    heuristic=HeuristicConfig(warmup_ticks=2, fossilize_margin=-0.5, rotation=("MLP", "NORM")),
    lifecycle=LifecycleConfig(embargo_ticks=0, reset_ticks=2),
    zones=ZonesConfig(
        zone=(
            ZoneSpec("a", blocks=(0, 0), slots=("slots.b1",), risk_share=0.3),
            ZoneSpec("b", phages=("blocks.1",), growth_budget=2, rent_ceiling=0.5),
        ),
        window=3,
        narset=NarsetConfig(step=0.25, enabled=False),
    ),
)


# ---------------------------------------------------------------------------------------------
# A minimal TOML writer, to test files independently of any TOML library's writer
# ---------------------------------------------------------------------------------------------


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float) and math.isinf(v):
        return "inf" if v > 0 else "-inf"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(v)


def to_toml(data: dict[str, Any], prefix: str = "") -> str:
    """TOML of nested dicts: tables, sub-tables and arrays of tables (`[[zones.zone]]`)."""
    tables = lambda v: isinstance(v, list | tuple) and v and all(isinstance(x, dict) for x in v)  # noqa: E731
    lines = [
        f"{k} = {_toml_value(v)}"
        for k, v in data.items()
        if v is not None and not isinstance(v, dict) and not tables(v)
    ]
    for key, values in data.items():
        name = f"{prefix}{key}"
        if isinstance(values, dict):
            lines += ["", f"[{name}]", to_toml(values, f"{name}.")]
        elif tables(values):
            for item in values:
                lines += ["", f"[[{name}]]", to_toml(item, f"{name}.")]
    return "\n".join(lines) + "\n"


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "grow.toml"
    path.write_text(text)
    return path


# ---------------------------------------------------------------------------------------------
# Round trips
# ---------------------------------------------------------------------------------------------


def test_toml_file_round_trip(tmp_path: Path) -> None:
    path = _write(tmp_path, to_toml(config_to_dict(CUSTOM)))
    assert load_config(path) == CUSTOM


def test_partial_toml_keeps_every_other_default(tmp_path: Path) -> None:
    path = _write(tmp_path, "ticks = 9\n\n[economy]\nw_rent = 0.01\n\n[env]\nlr = 1\n")
    cfg = load_config(path)
    assert cfg == GrowConfig(ticks=9, economy=EconomyConfig(w_rent=0.01), env=EnvConfig(lr=1.0))
    assert isinstance(cfg.env.lr, float)


def test_manifest_json_round_trip() -> None:
    # resume_run rebuilds the config from the manifest's JSON: tuples come back as lists.
    for cfg in (GrowConfig(), CUSTOM):
        assert config_from_dict(json.loads(json.dumps(config_to_dict(cfg)))) == cfg


def test_override_reaches_into_tables_and_skips_none() -> None:
    cfg = override(
        GrowConfig(), ticks=None, seed=5, **{"env.batches_per_tick": 4, "economy.w_churn": 0.0}
    )
    assert (cfg.seed, cfg.ticks) == (5, GrowConfig().ticks)
    assert cfg.env == EnvConfig(batches_per_tick=4)
    assert cfg.economy == EconomyConfig(w_churn=0.0)


# ---------------------------------------------------------------------------------------------
# Strictness
# ---------------------------------------------------------------------------------------------


def test_unknown_top_level_key_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="'tickz'") as err:
        load_config(_write(tmp_path, "tickz = 3\n"))
    assert "ticks" in str(err.value)  # the valid keys are listed


def test_unknown_nested_key_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"'env\.learning_rate'") as err:
        load_config(_write(tmp_path, "[env]\nlearning_rate = 0.1\n"))
    assert "lr" in str(err.value)
    with pytest.raises(ConfigError, match=r"'economy\.w_rnet'"):
        override(GrowConfig(), **{"economy.w_rnet": 0.1})
    with pytest.raises(ConfigError, match="'ecnomy'"):
        override(GrowConfig(), **{"ecnomy.w_rent": 0.1})


@pytest.mark.parametrize(
    ("data", "key"),
    [
        ({"ticks": "ten"}, "ticks"),
        ({"ticks": 2.5}, "ticks"),
        ({"ticks": True}, "ticks"),
        ({"seed": "0"}, "seed"),
        ({"policy": 3}, "policy"),
        ({"data_dir": 7}, "data_dir"),
        ({"env": 5}, "env"),
        ({"env": {"lr": "fast"}}, "env.lr"),
        ({"host": {"width": "wide"}}, "host.width"),
        ({"economy": {"higher_is_better": 1}}, "economy.higher_is_better"),
        ({"heuristic": {"rotation": "MLP"}}, "heuristic.rotation"),
        ({"heuristic": {"rotation": ["MLP", 3]}}, "heuristic.rotation[1]"),
    ],
)
def test_wrong_types_are_config_errors(data: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(f"'{key}'")):
        config_from_dict(data)


@pytest.mark.parametrize(
    "data",
    [
        {"ticks": 0},
        {"checkpoint_every": -1},
        {"env": {"lr": -0.1}},
        {"env": {"batches_per_tick": -1}},
        {"economy": {"w_rent": -0.05}},
        {"economy": {"churn_window": 0}},
        {"governor": {"window": 0}},
        {"governor": {"max_rollbacks": -1}},
        {"heuristic": {"warmup_ticks": -1}},
        {"heuristic": {"max_live_seeds": 0}},
        {"heuristic": {"rotation": ["NOT_A_BLUEPRINT"]}},
        {"lifecycle": {"embargo_ticks": -2}},
        {"host": {"width": 0}},
        {"host": {"kind": "rnn"}},
    ],
)
def test_out_of_range_values_are_config_errors(data: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        config_from_dict(data)


def test_bad_files_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.toml")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(_write(tmp_path, "ticks = = 3\n"))
