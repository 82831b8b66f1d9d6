"""The command line: bad input gives one line, a non-zero exit, no traceback, and loses nothing."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from esper.audits.replay import candidates_from_run
from esper.cli import _detail, app
from esper.recorder import RunStore
from esper.report import decision_rows, load_run

runner = CliRunner()
TINY = """
ticks = 3
checkpoint_every = 1
[env]
batches_per_tick = 2
"""


def _invoke(*args: str):
    return runner.invoke(app, list(args), env={"COLUMNS": "250"})


def _assert_clean_failure(result, *words: str) -> None:
    assert result.exit_code != 0
    out = result.output
    assert "Traceback" not in out
    assert len([line for line in out.strip().splitlines() if line.strip()]) == 1, out
    for w in words:
        assert w in out, out


@pytest.fixture
def tiny_config(tmp_path: Path) -> Path:
    p = tmp_path / "tiny.toml"
    p.write_text(TINY)
    return p


def test_grow_runs_and_prints_summary(tmp_path: Path, tiny_config: Path) -> None:
    r = _invoke("grow", "--config", str(tiny_config), "--out", str(tmp_path / "runs"))
    assert r.exit_code == 0, r.output
    assert "accuracy, grown model at end" in r.output
    [run] = list((tmp_path / "runs").iterdir())
    with RunStore.open(run) as store:
        assert store.last_complete_tick() == 2
    # the matched host: no growth, same seed and ticks, recorded beside the run and compared
    with RunStore.open(run / "baseline") as store:
        cfg = store.manifest()["config"]
        alone = store.metrics()[-1][1]["metric"]
        assert (cfg["policy"], cfg["seed"], cfg["ticks"]) == ("none", 0, 3)
        assert not [e for e in store.events() if e.kind == "germinate"]
        hashed = store.event_log_hash()
    assert f"vs host alone {alone:.4f}" in r.output
    again = _invoke("grow", "--resume", str(run))  # finished: the baseline is read, not rerun
    assert again.exit_code == 0 and f"vs host alone {alone:.4f}" in again.output
    with RunStore.open(run / "baseline") as store:
        assert store.event_log_hash() == hashed
    quiet = _invoke(
        "grow", "--config", str(tiny_config), "--out", str(tmp_path / "q"), "--no-baseline"
    )
    assert quiet.exit_code == 0 and "host alone" not in quiet.output
    assert not (next((tmp_path / "q").iterdir()) / "baseline").exists()
    listed = _invoke("runs", "--root", str(tmp_path / "runs"))
    assert run.name in listed.output
    shown = _invoke("show", str(run))
    assert shown.exit_code == 0 and "task=digits" in shown.output


def test_grow_with_decay_reports_what_growth_added_and_decay_removed(tmp_path: Path) -> None:
    p = tmp_path / "decay.toml"
    p.write_text(
        "decay = 'heuristic'\n"
        + TINY
        + "[host]\nkind = 'mlp'\nwidth = 16\ndepth = 2\n"
        + "[lysis]\nprobation_checks = 1\nsedation_budget = 0.2\nunits_per_tick = 64\n"
        + "[emrakul]\nmin_samples = 1\nmax_loss_rise = 1.0\nmax_per_tick = 4\nz = 0.0\n"
    )
    r = _invoke("grow", "--config", str(p), "--ticks", "5", "--out", str(tmp_path / "runs"))
    assert r.exit_code == 0, r.output
    line = next(x for x in r.output.splitlines() if "parameters" in x)
    removed = int(re.search(r"decay −([\d,]+)", line).group(1).replace(",", ""))
    assert removed > 0 and "growth +" in line and "net " in line
    [run] = list((tmp_path / "runs").iterdir())
    shown = _invoke("show", str(run))
    assert "units lysed" in shown.output and "lysis_probation" in shown.output
    assert "units measured; lowest contribution" in shown.output  # not the whole table


@pytest.mark.parametrize(
    "args, words",
    [
        (["--decay", "random"], ["decay must be one of", "heuristic"]),
        (["--task", "mnist"], ["unknown task", "digits"]),
        (["--policy", "clever"], ["unknown policy", "heuristic"]),
        (["--task", "cifar10", "--data-dir", "/nonexistent/cifar"], ["cifar"]),
        (["--ticks", "0"], ["ticks"]),
    ],
)
def test_bad_flags(tmp_path: Path, args: list[str], words: list[str]) -> None:
    _assert_clean_failure(_invoke("grow", "--out", str(tmp_path), *args), *words)


def test_unknown_blueprint_in_config(tmp_path: Path) -> None:
    p = tmp_path / "c.toml"
    p.write_text('[heuristic]\nrotation = ["CONV_GIANT"]\n')
    _assert_clean_failure(_invoke("grow", "--config", str(p)), "CONV_GIANT", "CONV_LIGHT")


def test_unknown_config_key(tmp_path: Path) -> None:
    p = tmp_path / "c.toml"
    p.write_text("[economy]\nw_rnet = 0.1\n")
    _assert_clean_failure(_invoke("grow", "--config", str(p)), "economy.w_rnet")
    p.write_text("[host]\nwidht = 3\n")  # a table name in the message is text, not markup
    _assert_clean_failure(_invoke("grow", "--config", str(p)), "valid keys in [host]")


def test_unwritable_run_dir(tmp_path: Path, tiny_config: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    _assert_clean_failure(_invoke("grow", "--config", str(tiny_config), "--out", str(blocker)))


def test_corrupt_checkpoint_on_resume_loses_nothing(tmp_path: Path, tiny_config: Path) -> None:
    assert _invoke("grow", "--config", str(tiny_config), "--out", str(tmp_path)).exit_code == 0
    [run] = [p for p in tmp_path.iterdir() if p.is_dir()]
    with RunStore.open(run) as store:
        before = store.event_log_hash()
        ckpt = run / store.checkpoints()[-1].path
    ckpt.write_bytes(b"garbage" + ckpt.read_bytes()[7:])
    _assert_clean_failure(_invoke("grow", "--resume", str(run)), "checkpoint")
    with RunStore.open(run) as store:  # nothing recorded was lost
        assert store.event_log_hash() == before
        assert store.last_complete_tick() == 2


def test_resume_of_something_that_is_not_a_run(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    _assert_clean_failure(_invoke("grow", "--resume", str(tmp_path / "empty")))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "run.sqlite").write_bytes(b"not a database at all" * 10)
    _assert_clean_failure(_invoke("grow", "--resume", str(tmp_path / "bad")), "run.sqlite")
    _assert_clean_failure(_invoke("show", str(tmp_path / "empty")))


def test_audit_a_recorded_run(tmp_path: Path) -> None:
    cfg = tmp_path / "grow.toml"
    cfg.write_text(
        "ticks = 4\ncheckpoint_every = 4\n[env]\nbatches_per_tick = 2\n"
        "[heuristic]\nwarmup_ticks = 0\nplateau_patience = 0\nmax_live_seeds = 2\n"
    )
    assert _invoke("grow", "--config", str(cfg), "--out", str(tmp_path / "runs")).exit_code == 0
    [run] = list((tmp_path / "runs").iterdir())
    too_short = _invoke("audit", str(run), "--budget", "1")
    _assert_clean_failure(too_short, "budget")
    r = _invoke("audit", str(run), "--budget", "4", "--metric", "val_loss", "--workers", "1")
    assert r.exit_code == 0, r.output
    n = len(candidates_from_run(run))
    assert n >= 1 and "φ (Shapley)" in r.output and f"{2**n} retrained" in r.output
    again = _invoke("audit", str(run), "--budget", "4", "--metric", "val_loss", "--workers", "1")
    assert "0 retrained" in again.output  # every subset came from the audit cache
    shown = _invoke("show", str(run))  # the labels the audit wrote, in `show` and the report
    assert "audit labels (Shapley φ" in shown.output
    assert _invoke("report", str(run)).exit_code == 0
    assert 'data-plot="fig-audit"' in (run / "report.html").read_text()


def test_an_internal_bug_keeps_its_traceback(
    tmp_path: Path, tiny_config: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Only the project's own error types become one-line messages: a ValueError raised by our
    # code is a bug, and hiding its traceback would hide where it is.
    def broken(*args: object, **kw: object) -> None:
        raise ValueError("an internal inconsistency")

    monkeypatch.setattr("esper.cli.start_run", broken)
    r = _invoke("grow", "--config", str(tiny_config), "--out", str(tmp_path))
    assert r.exit_code == 1 and isinstance(r.exception, ValueError)
    assert "esper: error" not in r.output


def test_train_policy_reads_a_config_file(tmp_path: Path) -> None:
    cfg = tmp_path / "train.toml"
    cfg.write_text(
        f'num_envs = 2\nnum_steps = 2\nupdates = 1\neval_every = 0\nbackend = "inprocess"\n'
        f'out = "{tmp_path / "policy"}"\n'
        '[episode]\nticks = 2\ndevice = "cpu"\n[episode.env]\nbatches_per_tick = 1\n'
    )
    r = _invoke("train-policy", "--config", str(cfg), "--teacher", "none")
    assert r.exit_code == 0, r.output
    with RunStore.open(tmp_path / "policy" / "run") as store:
        recorded = store.manifest()["config"]
    assert (recorded["num_steps"], recorded["episode"]["ticks"]) == (2, 2)
    assert recorded["imitation"]["teacher"] is None
    cfg.write_text("num_envz = 2\n")
    _assert_clean_failure(_invoke("train-policy", "--config", str(cfg)), "num_envz")


def test_help_shows_the_configs_defaults() -> None:
    from esper.audits.retrain import AuditProtocol
    from esper.config import GrowConfig

    grow_help = _invoke("grow", "--help").output
    assert f"(default: {GrowConfig.ticks})" in grow_help
    audit_help = _invoke("audit", "--help").output
    assert f"[default: {AuditProtocol.ticks}]" in audit_help  # typer shows it


def test_grow_with_a_zone_file_and_show_groups_events_by_zone(tmp_path: Path) -> None:
    root = Path(__file__).resolve().parents[1] / "examples"
    p = tmp_path / "deep.toml"
    deep = (root / "deep_cnn.toml").read_text().replace("ticks = 40", "checkpoint_every = 2")
    p.write_text(deep + "[env]\nbatches_per_tick = 2\neval_samples = 256\n")
    r = _invoke(
        "grow",
        "--config",
        str(p),
        "--zones",
        str(root / "zones.toml"),
        "--ticks",
        "4",
        "--no-baseline",
        "--out",
        str(tmp_path / "runs"),
    )
    assert r.exit_code == 0, r.output
    assert "zone early" in r.output and "zone late" in r.output  # the summary's books
    [run] = list((tmp_path / "runs").iterdir())
    with RunStore.open(run) as store:
        zones = store.manifest()["config"]["zones"]
        assert [z["name"] for z in zones["zone"]] == ["early", "late"]
        assert {d.policy for d in store.decisions()} == {"heuristic@early", "heuristic@late"}
    shown = _invoke("show", str(run))
    assert shown.exit_code == 0, shown.output
    assert "zone early" in shown.output and "zone late" in shown.output
    assert "zone books" in shown.output and "narset_update" not in shown.output  # 4 < window
    assert _invoke("report", str(run)).exit_code == 0
    page = (run / "report.html").read_text()
    assert "zone budgets by window" in page and "<th>zone</th>" in page
    rows = [r for r in decision_rows(load_run(run)) if r.op != "WAIT"]
    assert rows and all(r.reason.startswith(f"{r.slot}:") for r in rows)  # its zone's reason
    bad = tmp_path / "bad.toml"
    bad.write_text(
        "[[zone]]\nname = 'a'\nblocks = [0, 3]\nrisk_share = 0.7\n"
        "[[zone]]\nname = 'b'\nblocks = [4, 7]\nrisk_share = 0.7\n"
    )
    _assert_clean_failure(
        _invoke("grow", "--config", str(p), "--zones", str(bad), "--out", str(tmp_path / "x")),
        "risk shares sum above",
    )


def test_show_summarises_a_narset_update_per_zone() -> None:
    payload = {
        "by": "narset",
        "zones": {
            "early": {
                "budgets": {
                    "growth_budget": 0,
                    "price": 1.5,
                    "rent_ceiling": 0.004,
                    "risk_share": 0.6,
                },
                "telemetry": {"improvement_per_rent": -2.0, "boundary_breaches": 3, "rent": 0.1},
            }
        },
    }
    line = _detail("narset_update", payload)
    assert line == (
        "by narset: early λ 1.500, growth 0, ceiling 0.004, risk 0.60 "
        "(improvement/rent -2, breaches 3)"
    )
