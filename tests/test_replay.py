"""Forensic replay (paper §8.2): a fork of a finished run at a middle tick reproduces it bit for
bit and leaves it untouched; an injected action changes what follows and `diff` finds the tick;
bad requests fail clearly and leave nothing behind."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from typer.testing import CliRunner

import esper
from _engine_helpers import small_config
from esper.cli import app
from esper.contracts import Blueprint, FactoredAction, Op, Tempo
from esper.forensics import (
    INJECTED,
    ReplayError,
    diff_runs,
    format_action,
    overrule,
    parse_action,
    replay,
)
from esper.recorder import RunStore
from esper.recorder.records import to_json
from esper.run import GrowResult, GrowthRun, grown_model, resume_run, start_run
from esper.tamiyo.policies import Decision, HeuristicPolicy
from esper.tolaria.episode import weights_hash

pytestmark = pytest.mark.xdist_group("replay")  # one worker builds the source run once
TICKS, EVERY = 10, 3  # checkpoints after ticks 2, 5, 8 and 9
SLOTS = ["slots.b0", "slots.b1", "slots.b2"]
runner = CliRunner()


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, GrowResult]:
    """A finished run: WIDEN in b0 at tick 1, CONV_HEAVY in b1 at tick 4 (GERMINATED at 5,
    TRAINING at 6), CONV_LIGHT in b2 at tick 7."""
    run_dir = tmp_path_factory.mktemp("replay") / "source"
    run = start_run(small_config(TICKS, checkpoint_every=EVERY), run_dir=run_dir)
    result = run.run()
    run.store.close()  # finished: its WAL folded into run.sqlite, no -wal or -shm file left
    assert sorted(p.name for p in run_dir.iterdir()) == ["checkpoints", "run.sqlite"]
    return run_dir, result


def _files(run_dir: Path) -> dict[str, str]:
    """sha256 of every file under `run_dir`, by relative path."""
    return {
        p.relative_to(run_dir).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(run_dir.rglob("*"))
        if p.is_file()
    }


def _record(run_dir: Path) -> tuple[list[tuple], list[tuple[int, str]]]:
    """(events as kind, tick, env, slot, payload; metrics per tick as canonical JSON)."""
    with RunStore.open(run_dir) as store:
        events = [(e.kind, e.tick, e.env, e.slot, e.payload) for e in store.events()]
        metrics = [(t, to_json(m)) for t, m in store.metrics()]
    return events, metrics


def _invoke(*args: str):
    return runner.invoke(app, list(args), env={"COLUMNS": "250"})


def _clean_failure(result, *words: str) -> None:
    """Exit 2, no traceback, the error in one line (the last; a fork that failed at its tick
    said before what it was forking)."""
    out = result.output
    assert result.exit_code == 2 and "Traceback" not in out, out
    error = out.strip().splitlines()[-1]
    assert error.startswith("esper: error:") and out.count("esper: error:") == 1, out
    for w in words:
        assert w in error, out


# ---------------------------------------------------------------------------------------------
# Without injection: the source, bit for bit
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "from_tick, checkpoint",
    [(5, 2), (1, -1)],  # from the checkpoint after tick 2 (3 and 4 replayed); from the start
)
def test_a_fork_of_a_finished_run_reproduces_it_and_leaves_it_untouched(
    source: tuple[Path, GrowResult], tmp_path: Path, from_tick: int, checkpoint: int
) -> None:
    src, src_result = source
    before = _files(src)
    fork = replay(src, from_tick, out=tmp_path / "fork")
    assert _files(src) == before

    assert fork.run_dir == tmp_path / "fork"
    assert _record(fork.run_dir) == _record(src)  # every event and metric of every tick
    assert fork.event_log_hash == src_result.event_log_hash
    assert fork.weights_hash == src_result.weights_hash
    assert weights_hash(grown_model(fork.run_dir)[0]) == src_result.weights_hash
    assert (fork.params_end, fork.final_metric) == (src_result.params_end, src_result.final_metric)

    with RunStore.open(fork.run_dir) as store:
        manifest, checkpoints = store.manifest(), [c.tick for c in store.checkpoints()]
    with RunStore.open(src) as store:
        assert manifest["config"] == store.manifest()["config"]
    assert manifest["fork"]["source"] == str(src.resolve())
    assert (manifest["fork"]["from_tick"], manifest["fork"]["checkpoint_tick"]) == (
        from_tick,
        checkpoint,
    )
    assert manifest["fork"]["inject"] is None
    # the source's checkpoints, copied, and one at the fork's tick
    assert checkpoints == sorted({2, 5, 8, 9, from_tick})
    assert all(
        (fork.run_dir / f"checkpoints/tick_{t:05d}.safetensors").is_file() for t in checkpoints
    )
    assert diff_runs(src, fork.run_dir).first_divergence is None


# ---------------------------------------------------------------------------------------------
# With injection: a different continuation, and where it starts
# ---------------------------------------------------------------------------------------------


def test_an_injected_prune_changes_the_continuation_and_diff_reports_the_tick(
    source: tuple[Path, GrowResult], tmp_path: Path
) -> None:
    src, src_result = source
    before = _files(src)
    out = tmp_path / "pruned"
    r = _invoke(
        "replay", str(src), "--from", "6", "--inject", "op=PRUNE,slot=b1", "--out", str(out)
    )
    assert r.exit_code == 0, r.output
    assert "first differing decisions at tick 6" in r.output
    assert _files(src) == before

    src_events, src_metrics = _record(src)
    events, metrics = _record(out)
    assert [e for e in events if e[1] < 6] == [e for e in src_events if e[1] < 6]
    assert metrics[:6] == src_metrics[:6]
    with RunStore.open(out) as store:
        decisions = {d.tick: d for d in store.decisions()}
        pruned = store.events("prune")
    assert decisions[6].policy == INJECTED
    assert (decisions[6].action["op"], decisions[6].action["slot"]) == ("PRUNE", "1")
    assert {d.policy for t, d in decisions.items() if t != 6} == {"heuristic"}  # plays on
    assert pruned[0].tick == 6 and pruned[0].slot == "slots.b1"
    assert pruned[0].payload["blueprint"] == "CONV_HEAVY"
    assert (
        pruned[0]
        .payload["reason"]
        .startswith("injected; the heuristic policy chose op=ADVANCE,slot=b1")
    )
    assert weights_hash(grown_model(out)[0]) != src_result.weights_hash

    found = diff_runs(src, out)
    assert (found.first_decision, found.first_event, found.first_divergence) == (6, 6, 6)
    assert found.config == {} and found.forks[0][1]["inject"] == "op=PRUNE,slot=b1"
    seven = next(row for row in found.ticks if row.tick == 7)
    assert seven.slots == [("b1", "BLENDING CONV_HEAVY", "EMBARGOED")]
    assert seven.params[1] < seven.params[0]  # the pruned seed's parameters are gone
    shown = _invoke("diff", str(src), str(out))
    assert shown.exit_code == 0, shown.output
    assert "identical up to tick 5; first differing decisions at tick 6" in shown.output
    assert "B is a fork of" in shown.output and "op=PRUNE,slot=b1 *" in shown.output


def test_an_injected_blueprint_keeps_the_rest_of_the_policys_germination(
    source: tuple[Path, GrowResult], tmp_path: Path
) -> None:
    src, _ = source
    fork = esper.replay(src, 4, inject="blueprint=conv_light", out=tmp_path / "light")
    with RunStore.open(fork.run_dir) as store:
        germinated = {e.tick: (e.slot, e.payload["blueprint"]) for e in store.events("germinate")}
    assert germinated[4] == ("slots.b1", "CONV_LIGHT")  # the heuristic's slot, our blueprint
    assert esper.diff(src, fork.run_dir).first_decision == 4


def test_a_fork_interrupted_after_its_injection_resumes_with_it(
    source: tuple[Path, GrowResult], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fork checkpoints its injected tick, so `--resume` never replays the policy's choice
    there; a fork interrupted before that tick leaves nothing."""
    src, _ = source
    whole = replay(src, 6, inject="op=PRUNE,slot=b1", out=tmp_path / "whole")
    step = GrowthRun.step

    def interrupted_at(tick: int):  # type: ignore[no-untyped-def]
        def step_until(self: GrowthRun, t: int) -> dict[str, float]:
            if t == tick:
                raise KeyboardInterrupt
            return step(self, t)

        return step_until

    monkeypatch.setattr(GrowthRun, "step", interrupted_at(6))  # in the injected tick
    with pytest.raises(KeyboardInterrupt):
        replay(src, 6, inject="op=PRUNE,slot=b1", out=tmp_path / "early")
    assert not (tmp_path / "early").exists()

    monkeypatch.setattr(GrowthRun, "step", interrupted_at(7))  # after 6, before the checkpoint at 8
    with pytest.raises(KeyboardInterrupt):
        replay(src, 6, inject="op=PRUNE,slot=b1", out=tmp_path / "late")
    monkeypatch.setattr(GrowthRun, "step", step)
    resumed = resume_run(tmp_path / "late")
    assert resumed.start_tick == 7
    result = resumed.run()
    assert (result.event_log_hash, result.weights_hash) == (
        whole.event_log_hash,
        whole.weights_hash,
    )


# ---------------------------------------------------------------------------------------------
# Clear errors, and nothing left behind
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, words",
    [
        (["--from", "10"], ["--from 10 is out of range", "ticks 0..9"]),
        (["--from", "-1"], ["--from -1 is out of range"]),
        (["--from", "5", "--inject", "op"], ["expected head=value"]),
        (["--from", "5", "--inject", "op=EXPLODE"], ["op=EXPLODE is not one of", "PRUNE"]),
        (["--from", "5", "--inject", "op=PRUNE,slot=b7"], ["no slot 'b7'", "b0, b1, b2"]),
        (["--from", "5", "--inject", "colour=red"], ["unknown head 'colour'"]),
        (["--from", "5", "--inject", "op=PRUNE,op=WAIT"], ["head 'op' given twice"]),
        (  # a seed just germinated cannot be pruned by the policy
            ["--from", "5", "--inject", "op=PRUNE,slot=b1"],
            ["op=PRUNE,slot=b1 is illegal at tick 5", "GERMINATED"],
        ),
    ],
)
def test_bad_replays_fail_in_one_line_and_leave_nothing(
    source: tuple[Path, GrowResult], tmp_path: Path, args: list[str], words: list[str]
) -> None:
    src, _ = source
    before = _files(src)
    _clean_failure(_invoke("replay", str(src), *args, "--out", str(tmp_path / "f")), *words)
    assert not (tmp_path / "f").exists()
    assert _files(src) == before


def test_an_existing_out_or_one_inside_the_source_is_refused(
    source: tuple[Path, GrowResult], tmp_path: Path
) -> None:
    src, _ = source
    before = _files(src)
    (tmp_path / "taken").mkdir()
    with pytest.raises(ReplayError, match="already exists"):
        replay(src, 5, out=tmp_path / "taken")
    with pytest.raises(ReplayError, match="inside the source run"):
        replay(src, 5, out=src / "fork")
    assert _files(src) == before


def test_a_replay_that_departs_from_the_record_names_the_tick(
    source: tuple[Path, GrowResult], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A policy that chooses otherwise on replay (as a policy whose state the checkpoint missed
    would) stops the replay at that tick; the fork is removed."""
    act = HeuristicPolicy.act

    def forgetful(self: HeuristicPolicy, obs) -> Decision:  # type: ignore[no-untyped-def]
        d = act(self, obs)
        return Decision(FactoredAction(), d.mask) if obs.tick == 4 else d

    monkeypatch.setattr(HeuristicPolicy, "act", forgetful)
    with pytest.raises(ReplayError, match="tick 4: the heuristic policy chose op=WAIT on replay"):
        replay(source[0], 5, out=tmp_path / "f")
    assert not (tmp_path / "f").exists()


# ---------------------------------------------------------------------------------------------
# The --inject syntax
# ---------------------------------------------------------------------------------------------


def test_parse_action_names_heads_as_the_record_does() -> None:
    assert parse_action("op=prune, slot=b1", SLOTS) == {"op": "PRUNE", "slot": "1"}
    assert parse_action("slot=slots.b2", SLOTS) == {"slot": "2"}
    assert parse_action("slot=0,blueprint=LORA,tempo=fast", SLOTS) == {
        "slot": "0",
        "blueprint": "LORA",
        "tempo": "FAST",
    }


def test_overrule_keeps_unnamed_heads_and_resets_those_the_op_ignores() -> None:
    chosen = FactoredAction(op=Op.GERMINATE, slot=2, blueprint=Blueprint.MLP, tempo=Tempo.FAST)
    swapped = overrule(chosen, {"blueprint": "LORA"})
    assert swapped == FactoredAction(
        op=Op.GERMINATE, slot=2, blueprint=Blueprint.LORA, tempo=Tempo.FAST
    )
    assert overrule(chosen, {"op": "PRUNE", "slot": "1"}) == FactoredAction(op=Op.PRUNE, slot=1)
    assert overrule(chosen, {"op": "WAIT"}) == FactoredAction()
    assert format_action(swapped.names(), SLOTS) == "op=GERMINATE,slot=b2,blueprint=LORA,tempo=FAST"
