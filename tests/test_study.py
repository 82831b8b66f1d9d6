"""Studies (paper §7): every row on every seed, the dependent rows, the table's figures against
the recorded runs, and clear errors for a bad study file."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest
from typer.testing import CliRunner

from esper.cli import app
from esper.contracts.errors import ConfigError
from esper.recorder import RunStore
from esper.study import load_study, quartile

TINY = """
title = "tiny"
seeds = 2
first_seed = 1000

[base]
ticks = 6
device = "cpu"
[base.env]
batches_per_tick = 2
[base.host]
width = 4
[base.heuristic]
warmup_ticks = 1
plateau_patience = 0
hold_ticks = 1

[[rows]]
name = "baseline host"
kind = "host"

[[rows]]
name = "Esper"

[[rows]]
name = "Esper (high rent)"
[rows.set]
"economy.w_rent" = 0.05

[[rows]]
name = "parameter-matched host"
kind = "parameter-matched"
of = "Esper"

[[rows]]
name = "grown architecture from scratch"
kind = "from-scratch"
of = "Esper"
"""


def _final_metric(run_dir: Path) -> float:
    with RunStore.open(run_dir) as store:
        return store.metrics()[-1][1]["metric"]


def test_a_study_runs_every_row_and_its_table_matches_the_records(tmp_path: Path) -> None:
    study = tmp_path / "tiny.toml"
    study.write_text(TINY)
    out = tmp_path / "out"
    r = CliRunner().invoke(
        app, ["study", str(study), "--workers", "1", "--out", str(out)], env={"COLUMNS": "250"}
    )
    assert r.exit_code == 0, r.output
    data = json.loads((out / "study.json").read_text())
    names = [row["name"] for row in data["rows"]]
    assert set(data["figures"]) == set(names)
    for name in names:
        runs = data["runs"][name]
        assert sorted(runs) == ["1000", "1001"]
        recorded = [_final_metric(Path(runs[s]["run_dir"])) for s in sorted(runs)]
        assert data["figures"][name]["metric_median"] == pytest.approx(statistics.median(recorded))
        assert f"| {name} | {statistics.median(recorded):.4f}" in (out / "study.md").read_text()
    with RunStore.open(Path(data["runs"]["baseline host"]["1000"]["run_dir"])) as store:
        assert store.manifest()["config"]["policy"] == "none"
    # the parameter-matched host is the widest host not far from the grown model's count
    grown = data["runs"]["Esper"]["1000"]["params"]
    matched = data["runs"]["parameter-matched host"]["1000"]
    with RunStore.open(Path(matched["run_dir"])) as store:
        width = store.manifest()["config"]["host"]["width"]
    assert width >= 4 and abs(matched["params"] - grown) <= grown
    assert "vs parameter-matched host" in r.output and "wins" in r.output
    # run again: every finished run is read, not played again, and the table is the same
    hashes = {}
    for runs in data["runs"].values():
        for x in runs.values():
            with RunStore.open(Path(x["run_dir"])) as store:
                hashes[x["run_dir"]] = store.event_log_hash()
    again = CliRunner().invoke(app, ["study", str(study), "--workers", "1", "--out", str(out)])
    assert again.exit_code == 0, again.output
    second = json.loads((out / "study.json").read_text())
    assert second["figures"] == data["figures"]
    for run_dir, h in hashes.items():
        with RunStore.open(Path(run_dir)) as store:
            assert store.event_log_hash() == h
    # a changed study never reads runs of the old one
    study.write_text(TINY.replace("ticks = 6", "ticks = 7"))
    changed = CliRunner().invoke(app, ["study", str(study), "--workers", "1", "--out", str(out)])
    assert changed.exit_code == 2 and "another --out" in changed.output


def test_the_worse_quartile_follows_the_metrics_sense() -> None:
    xs = [0.1, 0.2, 0.3, 0.4, 0.5]
    assert quartile(xs, True) == pytest.approx(0.2) and quartile(xs, False) == pytest.approx(0.4)


@pytest.mark.parametrize(
    "change, words",
    [
        (('kind = "host"', 'kind = "hots"'), "kind must be one of"),
        (('of = "Esper"', 'of = "Nobody"'), "not a grow row"),
        (("first_seed = 1000", "first_seed = 3"), "held-out"),
        (('"economy.w_rent"', '"economy.w_rnet"'), "w_rnet"),
        (("title", "titel"), "unknown keys"),
    ],
)
def test_a_bad_study_file_is_refused_clearly(
    tmp_path: Path, change: tuple[str, str], words: str
) -> None:
    p = tmp_path / "bad.toml"
    p.write_text(TINY.replace(*change, 1))
    with pytest.raises(ConfigError, match=words):
        load_study(p)
    r = CliRunner().invoke(app, ["study", str(p)])
    assert r.exit_code == 2 and "Traceback" not in r.output


def test_the_shipped_section7_studies_load() -> None:
    root = Path(__file__).parent.parent / "studies"
    for task in ("digits", "text"):
        s = load_study(root / f"section7-{task}.toml")
        assert s.base.task == task and len(s.rows) == 7 and s.first_seed >= 1000
