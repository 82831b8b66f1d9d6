"""`esper report` and `esper show` on real runs: one with every kind of event (germinate, advance,
fossilize, prune, a governor rollback and lobotomy, audit labels), one with decay, one of a learned
policy, and the plain host as a baseline. The HTML is read back figure by figure, and drawn in
headless Chromium when one is installed."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from _engine_helpers import FAST_HEURISTIC, small_config
from esper.audits.replay import candidates_from_run
from esper.audits.retrain import Audit, AuditProtocol
from esper.cli import app
from esper.forensics import diff_runs
from esper.recorder import RunStore
from esper.recorder.records import DecisionRecord
from esper.report import decision_rows, load_run, sparkline
from esper.run import start_run
from esper.tamiyo.learned import LearnedPolicy
from esper.tolaria.environment import EnvConfig, GrowthEnv

pytestmark = pytest.mark.xdist_group("report")  # the module's runs are made once, in one worker

runner = CliRunner()
TICKS, POISONED_AT = 14, 8
STORY = small_config(
    TICKS,
    env=EnvConfig(batches_per_tick=2, eval_samples=512),
    heuristic=replace(FAST_HEURISTIC, max_widenings=0),
    checkpoint_every=7,
)
DECAY = """
decay = 'heuristic'
ticks = 5
checkpoint_every = 5
device = 'cpu'
[env]
batches_per_tick = 2
eval_samples = 512
[host]
kind = 'mlp'
width = 16
depth = 2
[lysis]
probation_checks = 1
sedation_budget = 0.2
units_per_tick = 64
[emrakul]
min_samples = 1
max_loss_rise = 1.0
max_per_tick = 4
z = 0.0
"""


def _invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args], env={"COLUMNS": "250"})


def _assert_clean_failure(result, *words: str) -> None:
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1, result.output
    for w in words:
        assert w in result.output, result.output


def plots(page: str) -> dict[str, dict]:
    """Each figure of a report (div id -> plotly JSON), as the page's script will draw it."""
    found = re.findall(r'<script type="application/json" data-plot="([^"]+)">(.*?)</script>', page)
    divs = re.findall(r'<div class="plot" id="([^"]+)"></div>', page)
    assert [i for i, _ in found] == divs  # every figure has its div
    return {i: json.loads(text) for i, text in found}


def traces(fig: dict) -> dict[str, dict]:
    return {t["name"]: t for t in fig["data"]}


# ---------------------------------------------------------------------------------------------
# The runs
# ---------------------------------------------------------------------------------------------


def fake_value(protocol, candidates, subset: frozenset, repeat: int) -> float:
    """v(S) of an audit without retrains: additive worth by slot, noise across repeats."""
    return sum(0.1 * (1 + int(c.slot[-1])) for c in subset) + 0.01 * repeat * len(subset)


@pytest.fixture(scope="module")
def story(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A heuristic run on digits with every kind of event: seeds germinated, advanced, one pruned
    by the policy and one committed; a seed's weights poisoned at tick 8, so the governor rolls
    back and force-prunes it; then audited (the real labelling path, on a value function that
    needs no retrains), which labels its germinations with φ."""
    root = tmp_path_factory.mktemp("story")

    def poison(t: int, env: GrowthEnv) -> None:
        if t == POISONED_AT:
            youngest = [s for s in env.slots.values() if s.seed is not None][-1]
            with torch.no_grad():
                next(youngest.seed.parameters()).fill_(math.nan)

    start_run(STORY, run_dir=root / "grown", callbacks=[poison]).run()
    audit = Audit(root / "audit", value_fn=fake_value)
    audit.run(AuditProtocol(ticks=TICKS, repeats=2), candidates_from_run(root / "grown"), workers=1)
    with RunStore.open(root / "grown") as store:
        kinds = {e.kind for e in store.events()}
        labelled = [e for e in store.events("germinate") if "shapley" in e.labels]
    wanted = {"germinate", "advance", "fossilize", "prune", "governor_nan", "governor_lobotomy"}
    assert wanted <= kinds, f"the story run lacks {wanted - kinds}: has the heuristic changed?"
    assert len(labelled) == 3
    return root / "grown"


@pytest.fixture(scope="module")
def host(story: Path) -> Path:
    """The plain host: the story's config and seed, no growth (the baseline)."""
    run_dir = story.parent / "host"
    start_run(replace(STORY, policy="none"), run_dir=run_dir).run()
    return run_dir


@pytest.fixture(scope="module")
def decayed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("decay")
    (root / "decay.toml").write_text(DECAY)
    r = _invoke("grow", "--config", root / "decay.toml", "--out", root / "runs")
    assert r.exit_code == 0, r.output
    [run_dir] = (root / "runs").iterdir()
    return run_dir


@pytest.fixture(scope="module")
def learned(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run deployed with a (untrained) learned policy: its decisions carry probabilities,
    entropies and V."""
    root = tmp_path_factory.mktemp("learned")
    LearnedPolicy(seed=3).save(root / "policy.safetensors")
    (root / "c.toml").write_text("ticks = 4\ndevice = 'cpu'\n[env]\nbatches_per_tick = 1\n")
    args = ("--config", root / "c.toml", "--policy", root / "policy.safetensors")
    r = _invoke("grow", *args, "--out", root / "runs")
    assert r.exit_code == 0, r.output
    [run_dir] = (root / "runs").iterdir()
    return run_dir


# ---------------------------------------------------------------------------------------------
# esper report
# ---------------------------------------------------------------------------------------------


def test_report_of_a_run_with_every_kind_of_event(story: Path, tmp_path: Path) -> None:
    r = _invoke("report", story, "--out", tmp_path / "r.html")
    assert r.exit_code == 0, r.output
    page = (tmp_path / "r.html").read_text()
    assert "<script src" not in page and "<link" not in page  # self-contained
    figs = plots(page)
    assert set(figs) == {"fig-curves", "fig-morphology-0", "fig-cost", "fig-economy", "fig-audit"}
    with RunStore.open(story) as store:
        metrics, events = store.metrics(), store.events()
        decisions = store.decisions()
    ticks = [t for t, _ in metrics]

    curves = traces(figs["fig-curves"])
    for name in ("metric", "val_loss", "train_loss"):
        assert curves[name]["x"] == ticks
        assert curves[name]["y"] == pytest.approx([m[name] for _, m in metrics])
    assert curves["governor"]["x"] == [POISONED_AT]
    assert not any(name.startswith("host alone") for name in curves)  # no baseline recorded

    morph = traces(figs["fig-morphology-0"])
    for kind in ("germinate", "advance", "fossilize", "prune", "governor_lobotomy"):
        want = [(e.tick, e.slot) for e in events if e.kind == kind]
        assert list(zip(morph[kind]["x"], morph[kind]["y"], strict=True)) == want, kind
    slots = [s["name"] for s in decisions[0].slot_states]
    for i, slot in enumerate(slots):  # α per slot, at every decision
        alpha = [d.slot_states[i]["alpha"] for d in decisions]
        assert morph[f"α {slot}"]["y"] == pytest.approx(alpha)
    for stage in ("DORMANT", "TRAINING", "BLENDING", "HOLDING", "COMMITTED", "EMBARGOED"):
        bars = morph[stage]
        assert set(bars["y"]) <= set(slots) and all(w >= 1 for w in bars["x"])
    lane_ticks = {s: 0 for s in slots}  # every slot's lane covers every tick exactly once
    for t in figs["fig-morphology-0"]["data"]:
        if t["type"] == "bar":
            for slot, width in zip(t["y"], t["x"], strict=True):
                lane_ticks[slot] += width
    assert lane_ticks == {s: TICKS for s in slots}

    cost = traces(figs["fig-cost"])
    model = [m["host_params"] + m["seed_params"] for _, m in metrics]
    assert cost["params (model)"]["y"] == pytest.approx(model)
    assert cost["FLOPs"]["y"] == pytest.approx([m["flops"] for _, m in metrics])

    economy = traces(figs["fig-economy"])
    assert economy["rent"]["y"] == pytest.approx([m["rent"] for _, m in metrics])
    for t in range(TICKS - 1):  # the tick's rent is what its slots were charged
        per_slot = [economy[f"rent {slot}"]["y"][t] for slot in slots]
        assert economy[f"rent {slots[0]}"]["x"][t] == t
        assert sum(per_slot) == pytest.approx(metrics[t][1]["rent"], abs=1e-12)
    accounts = next(e for e in events if e.kind == "seed_accounts").payload
    assert economy["rent_paid"]["y"] == pytest.approx([a["rent_paid"] for a in accounts.values()])
    assert [x.split()[0] for x in economy["churn_paid"]["x"]] == list(accounts)

    phi = traces(figs["fig-audit"])["φ"]
    labels = [e.labels["shapley"] for e in events if "shapley" in e.labels]
    assert phi["y"] == pytest.approx([lab["phi"] for lab in labels])
    assert phi["error_y"]["array"] == pytest.approx([lab["ci95"][1] - lab["phi"] for lab in labels])

    decision_table = page[page.index('id="decisions"') : page.index('id="audit"')]
    assert decision_table.count("<tr") == 1 + TICKS  # the header and one row per decision
    assert "contribution" in decision_table and "plateau, germinate" in decision_table
    governor = page[page.index('id="governor"') :]
    assert "governor_nan" in governor and "restored the snapshot of tick 7" in governor


def test_the_baseline_is_drawn_when_given_and_the_default_output_is_in_the_run(
    story: Path, host: Path
) -> None:
    r = _invoke("report", story, "--baseline", host)
    assert r.exit_code == 0, r.output
    curves = traces(plots((story / "report.html").read_text())["fig-curves"])
    with RunStore.open(host) as store:
        host_metric = [m["metric"] for _, m in store.metrics()]
    base = curves[f"host alone ({host.name}): metric"]
    assert base["y"] == pytest.approx(host_metric) and base["line"]["dash"] == "dash"
    assert f"host alone ({host.name}): val_loss" in curves


def test_the_matched_host_recorded_in_the_run_is_its_baseline(tmp_path: Path) -> None:
    for where, start in ((tmp_path / "r", 0.5), (tmp_path / "r" / "baseline", 0.4)):
        store = RunStore.create(where, {"config": {"task": "digits"}})
        for t in range(3):
            with store.tick(t) as tx:
                tx.metrics({"metric": start + t, "val_loss": 1.0})
        store.close()
    view = load_run(tmp_path / "r")
    assert view.series.values["metric"] == pytest.approx((0.5, 1.5, 2.5))
    assert view.baseline is not None and view.baseline.series.values["metric"] == pytest.approx(
        (0.4, 1.4, 2.4)
    )


def test_comparing_runs(story: Path, host: Path, tmp_path: Path) -> None:
    r = _invoke("report", story, host, "--out", tmp_path / "both.html")
    assert r.exit_code == 0, r.output
    figs = plots((tmp_path / "both.html").read_text())
    assert {"fig-morphology-0", "fig-morphology-1"} <= set(figs)
    curves = traces(figs["fig-curves"])
    assert {f"{story.name}: metric", f"{host.name}: metric"} <= set(curves)
    assert (
        curves[f"{story.name}: metric"]["line"]["color"]
        != curves[f"{host.name}: metric"]["line"]["color"]
    )
    assert "fig-audit" in figs  # the story's labels; the host has none
    # the overlay marks where the two records part, as `esper diff` finds it
    first = diff_runs(story, host).first_divergence
    lines = [s for s in figs["fig-curves"]["layout"]["shapes"] if s.get("x0") == first]
    assert first is not None and lines and all(s["line"]["dash"] == "dot" for s in lines)


def test_report_of_a_decay_run_has_its_lanes(decayed: Path, tmp_path: Path) -> None:
    r = _invoke("report", decayed, "--out", tmp_path / "d.html")
    assert r.exit_code == 0, r.output
    page = (tmp_path / "d.html").read_text()
    figs = plots(page)
    morph = traces(figs["fig-morphology-0"])
    with RunStore.open(decayed) as store:
        lysed = store.events("lysed")
        roi = store.events("unit_roi")
    assert lysed and roi
    assert sum(int(h.split("×")[1].split()[0]) for h in morph["lysed"]["hovertext"]) == len(lysed)
    phages = {e.payload["unit"].split("#")[0] for e in lysed}
    assert phages <= set(morph["lysed"]["y"]) and phages <= set(morph["unit_roi"]["y"])
    assert len(morph["unit_roi"]["x"]) >= len(roi)  # one marker per tick and phage measured
    assert "params removed by decay" in traces(figs["fig-cost"])
    assert "No audit labels" in page and "No governor events" in page


def test_report_of_a_learned_policy_shows_probabilities_and_values(
    learned: Path, tmp_path: Path
) -> None:
    r = _invoke("report", learned, "--out", tmp_path / "l.html")
    assert r.exit_code == 0, r.output
    page = (tmp_path / "l.html").read_text()
    assert "<th>p(action)</th><th>H (nats)</th><th>V</th>" in page
    rows = decision_rows(load_run(learned))
    with RunStore.open(learned) as store:
        decisions = store.decisions()
    assert [r.value for r in rows] == [d.value for d in decisions]
    assert all(0 < r.prob <= 1 and r.entropy >= 0 for r in rows)


def test_decision_rows_price_the_action_on_its_relevant_heads() -> None:
    """p(action) = the product over the op's relevant heads, H = the sum of their entropies."""
    probs = {h: [0.25, 0.75, 0.0, 0.0] for h in ("style", "tempo", "alpha_target", "alpha_curve")}
    probs |= {"op": [0.1, 0.6, 0.1, 0.1, 0.1, 0.0], "slot": [0.5, 0.5, 0.0]}
    probs |= {"blueprint": [0.0, 0.2, *[0.8 / 12] * 12], "alpha_speed": [0.9, 0.1, 0.0, 0.0]}
    action = {"op": "GERMINATE", "slot": "1", "blueprint": "NORM", "style": "VALVE"}
    action |= {"tempo": "STANDARD", "alpha_target": "MOST", "alpha_speed": "FAST"}
    action |= {"alpha_curve": "COSINE"}
    entropy = {h: 1.0 for h in probs}
    record = DecisionRecord(
        env=0, tick=3, policy="learned", action=action,
        slot_states=[{"name": "a"}, {"name": "b"}, {"name": "c"}], obs_before=None,
        obs_after=None, mask={}, probs=probs, entropy=entropy, value=0.5, reward=None,
        spec_versions={},
    )  # fmt: skip
    view = replace(_empty_view(), decisions=(record,))
    [row] = decision_rows(view)
    # op 0.6 · slot 0.5 · NORM 0.2 · four heads at 0.75 (alpha_speed is not relevant to GERMINATE)
    assert row.prob == pytest.approx(0.6 * 0.5 * 0.2 * 0.75**4)
    assert row.entropy == pytest.approx(7.0)
    assert (row.op, row.slot, row.value) == ("GERMINATE", "b", 0.5)
    assert row.detail == "NORM VALVE STANDARD MOST COSINE"


def _empty_view():
    from esper.report.data import RunView, Series

    return RunView("r", Path("r"), {}, Series((), {}), (), (), None, {})


def test_report_errors_are_one_line(story: Path, tmp_path: Path) -> None:
    _assert_clean_failure(_invoke("report", tmp_path / "nowhere"), "no Esper run here")
    RunStore.create(tmp_path / "empty", {"config": {}}).close()
    _assert_clean_failure(_invoke("report", tmp_path / "empty"), "no complete tick")
    (tmp_path / "file").write_text("")
    out = tmp_path / "file" / "r.html"
    _assert_clean_failure(_invoke("report", story, "--out", out), "cannot write the report")


# ---------------------------------------------------------------------------------------------
# esper show
# ---------------------------------------------------------------------------------------------


def test_show_has_a_sparkline_the_audit_labels_and_every_decision_on_request(story: Path) -> None:
    shown = _invoke("show", story)
    assert shown.exit_code == 0, shown.output
    line = next(x for x in shown.output.splitlines() if x.startswith("accuracy "))
    assert len(line.split()[1]) == TICKS and set(line.split()[1]) <= set("▁▂▃▄▅▆▇█")
    assert "audit labels (Shapley φ" in shown.output and "seed1" in shown.output
    assert f"{TICKS} decisions" in shown.output and "WAIT" not in shown.output
    every = _invoke("show", story, "--all")
    table = every.output[every.output.index("decisions") :]
    rows = [x for x in table.splitlines() if re.match(r"^│ \d+ ", x)]
    assert [int(x.split()[1]) for x in rows] == list(range(TICKS))
    assert "WAIT" in table and "G2 passed: blend" in table


def test_sparkline_known_answers() -> None:
    assert sparkline([0, 1, 2, 3, 4, 5, 6, 7]) == "▁▂▃▄▅▆▇█"
    assert sparkline([7, 0]) == "█▁"
    assert sparkline([2.0, 2.0, 2.0]) == "▄▄▄"
    assert sparkline([0.0, math.nan, 1.0]) == "▁ █"
    assert sparkline([]) == ""
    long = sparkline(list(range(100)), width=10)  # ten buckets of ten ticks, averaged
    assert long == "▁▂▃▃▄▅▆▆▇█"


# ---------------------------------------------------------------------------------------------
# In a real browser
# ---------------------------------------------------------------------------------------------


def _chromium() -> str | None:
    return (
        os.environ.get("ESPER_CHROMIUM")
        or shutil.which("chromium")
        or shutil.which("chromium-browser")
    )


def test_the_report_draws_in_headless_chromium(story: Path, host: Path, tmp_path: Path) -> None:
    """The page loads from a file with every network request refused, logs no console error,
    and draws every figure with every trace. CI sets ESPER_REQUIRE_BROWSER=1: there a missing
    browser fails instead of skipping."""
    required = os.environ.get("ESPER_REQUIRE_BROWSER") == "1"
    chromium = _chromium()
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        if required:
            raise
        pytest.skip("playwright is not installed (pip install -e '.[dev]')")
    if chromium is None:
        if required:
            pytest.fail("ESPER_REQUIRE_BROWSER=1 but no chromium on PATH")
        pytest.skip("no Chromium installed (apt-get install chromium)")
    out = tmp_path / "r.html"
    assert _invoke("report", story, "--baseline", host, "--out", out).exit_code == 0
    figs = plots(out.read_text())
    problems: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.on("console", lambda m: m.type == "error" and problems.append(m.text))
        page.on("pageerror", lambda e: problems.append(str(e)))
        page.route(
            re.compile(r"^(?!file:).*"),
            lambda route: (problems.append(route.request.url), route.abort()),
        )
        page.goto(out.as_uri())
        page.wait_for_function("document.querySelectorAll('.js-plotly-plot').length > 0")
        drawn = page.evaluate(
            """() => Array.from(document.querySelectorAll('div.plot')).map(d => [
                d.id, (d.data || []).length, d.querySelectorAll('svg.main-svg').length])"""
        )
        browser.close()
    assert problems == []
    assert [(i, n) for i, n, _ in drawn] == [(i, len(f["data"])) for i, f in figs.items()]
    assert all(svgs > 0 for _, _, svgs in drawn)
