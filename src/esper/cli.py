"""The command line: `esper grow`, `runs`, `show`, `report`, `replay`, `diff`, `export`,
`evaluate`, `study`, `train-policy`, `audit`, `train-critic`.

Flags override the config file, which overrides the job's config dataclass (`GrowConfig`,
`TrainPolicyConfig`, `AuditProtocol`); each default is defined once, there, and the help text
reads it from there. A problem with the user's input (an `EsperError`) prints one line and exits
2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import math
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from esper.audits.backends import check_backend
from esper.audits.estimators import HEADERS as ESTIMATOR_HEADERS
from esper.audits.estimators import compare_audits
from esper.audits.estimators import format_rows as format_estimator_rows
from esper.audits.replay import candidates_from_run
from esper.audits.retrain import Audit, AuditProtocol, AuditResult
from esper.baselines import Finished, record_baseline
from esper.config import (
    ConfigError,
    GrowConfig,
    HostConfig,
    config_from_dict,
    load_config,
    override,
)
from esper.contracts.errors import EsperError
from esper.contracts.zones import ZonesConfig
from esper.evaluate import FIRST_HELD_OUT, HELD_OUT_SEEDS, evaluate, held_out_seeds
from esper.forensics import RunDiff, diff_runs, fork_run, play_fork
from esper.kasmina.export import export_model
from esper.recorder import RunStore, list_runs
from esper.report import RunView, audit_rows, decision_rows, load_run, sparkline, write_report
from esper.report.data import DECAY_EVENTS
from esper.run import GrowResult, GrowthRun, grown_model, resume_run, start_run
from esper.simic import EconomyConfig
from esper.simic.critic import DEFAULT_LAG, critic_dataset, fit_critic, held_out
from esper.study import RunSummary, load_study, run_study
from esper.study import to_markdown as study_markdown
from esper.study import write as write_study
from esper.tamiyo.imitation import ImitationConfig
from esper.tamiyo.policies import POLICIES
from esper.tolaria.data import TASK_NAMES
from esper.train_policy import TrainPolicyConfig, train_policy

app = typer.Typer(
    add_completion=False, no_args_is_help=True, help="Esper: grow neural networks while they train."
)


def _out() -> Console:
    return Console()  # made per call, so the terminal width is read when printing


KNOWN_ERRORS = (EsperError,)
"""What becomes a one-line error: the user's mistakes, never our bugs."""


def _fail(message: str) -> None:
    Console(stderr=True, soft_wrap=True).print(  # the message is text, not markup: "[host]"
        f"[red]esper: error:[/red] {escape(message)}", highlight=False
    )
    raise typer.Exit(2)


def _config(config: Path | None, zones: Path | None = None, **flags: object) -> GrowConfig:
    cfg = load_config(config) if config is not None else GrowConfig()
    cfg = override(cfg, **flags)
    if zones is not None:
        cfg = replace(cfg, zones=load_config(zones, ZonesConfig))
    if cfg.task not in TASK_NAMES:
        raise ConfigError(f"unknown task {cfg.task!r}; valid tasks: {', '.join(TASK_NAMES)}")
    if cfg.policy not in (*POLICIES, "learned") and not Path(cfg.policy).is_file():
        raise ConfigError(
            f"unknown policy {cfg.policy!r}; valid policies: {', '.join(POLICIES)}"
            ", or the path of a trained policy file"
        )
    return cfg


@app.command()
def grow(
    task: Annotated[
        str | None, typer.Option(help=f"digits, text or cifar10 (default: {GrowConfig.task})")
    ] = None,
    policy: Annotated[
        str | None,
        typer.Option(
            help="heuristic, random, none, learned (the shipped PPO policy) or a policy file "
            f"(default: {GrowConfig.policy})"
        ),
    ] = None,
    decay: Annotated[
        str | None,
        typer.Option(
            help="the decay policy (Emrakul): heuristic or none (growth only) "
            f"(default: {GrowConfig.decay})"
        ),
    ] = None,
    ticks: Annotated[
        int | None, typer.Option(help=f"control ticks (default: {GrowConfig.ticks})")
    ] = None,
    seed: Annotated[
        int | None, typer.Option(help=f"seed for every RNG (default: {GrowConfig.seed})")
    ] = None,
    w_rent: Annotated[
        float | None, typer.Option(help=f"rent weight W_rent [default: {EconomyConfig.w_rent}]")
    ] = None,
    w_churn: Annotated[
        float | None,
        typer.Option(help=f"churn weight W_churn [default: {EconomyConfig.w_churn}]"),
    ] = None,
    host_width: Annotated[
        int | None,
        typer.Option(help=f"host channels (2: impaired) (default: {HostConfig.width})"),
    ] = None,
    device: Annotated[
        str | None, typer.Option(help=f"auto, cpu or cuda (default: {GrowConfig.device})")
    ] = None,
    out: Annotated[
        str | None, typer.Option(help=f"directory for run directories (default: {GrowConfig.out})")
    ] = None,
    data_dir: Annotated[str | None, typer.Option(help="CIFAR-10 folder")] = None,
    config: Annotated[Path | None, typer.Option(help="TOML config file")] = None,
    zones: Annotated[
        Path | None,
        typer.Option(
            help="a zone file (TOML: window, [narset], [[zone]] tables): a Tamiyo–Emrakul pair "
            "per zone under per-zone budgets set by Narset (replaces the config's [zones])"
        ),
    ] = None,
    resume: Annotated[Path | None, typer.Option(help="resume this run directory")] = None,
    baseline: Annotated[
        bool,
        typer.Option(
            help="also train the same host with no growth (same seed and ticks), recorded in "
            "RUN/baseline, and compare"
        ),
    ] = True,
) -> None:
    """Grow a network on a task; record every decision; print a summary."""
    try:
        if resume is not None:
            run = resume_run(resume)
        else:
            cfg = _config(
                config,
                zones,
                task=task,
                policy=policy,
                decay=decay,
                ticks=ticks,
                seed=seed,
                device=device,
                out=out,
                data_dir=data_dir,
                **{"economy.w_rent": w_rent, "economy.w_churn": w_churn, "host.width": host_width},
            )
            run = start_run(cfg)
        result = _run_with_progress(run)
        alone = _baseline_with_progress(run) if baseline else None
    except KNOWN_ERRORS as e:
        _fail(str(e).splitlines()[0] if str(e) else type(e).__name__)
    except KeyboardInterrupt:
        _out().print(f"interrupted; resume with: esper grow --resume {run.run_dir}")
        raise typer.Exit(130) from None
    _print_summary(result, alone)


def _progress_bar() -> Progress:
    columns = (
        TextColumn("[bold]growing[/bold] {task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
    )
    return Progress(
        *columns,
        console=_out(),
        transient=True,
        disable=not sys.stderr.isatty() and not sys.stdout.isatty(),
    )


def _run_with_progress(
    run: GrowthRun,
    play: Callable[[Callable[[int, dict[str, float]], None]], GrowResult] | None = None,
) -> GrowResult:
    """`run` played by `play(progress)` (default: `run.run`) under a progress bar."""
    cfg = run.cfg
    with _progress_bar() as bar:
        job = bar.add_task(
            f"{cfg.task} ({cfg.policy})", total=cfg.ticks, completed=run.start_tick, status=""
        )

        def update(t: int, m: dict[str, float]) -> None:
            bar.update(
                job,
                completed=t + 1,
                status=f"metric {m['metric']:.4f}  seed params {int(m['seed_params'])}"
                + (f"  lysed {int(m['lysed_params'])}" if "lysed_params" in m else ""),
            )

        return (play or run.run)(update)


def _baseline_with_progress(run: GrowthRun) -> Finished:
    """The run's matched host (no growth, same seed and ticks), recorded in RUN/baseline."""
    with _progress_bar() as bar:
        job = bar.add_task("host alone (baseline)", total=run.cfg.ticks, status="")

        def update(t: int, m: dict[str, float]) -> None:
            bar.update(job, completed=t + 1, status=f"metric {m['metric']:.4f}")

        return record_baseline(run.run_dir, run.cfg, update)


def _change(start: int, end: int, removed: int) -> str:
    """start → end, with what growth added and decay removed."""
    return (
        f"{start:,} → {end:,} (growth +{end - start + removed:,}, decay −{removed:,}, "
        f"net {end - start:+,})"
    )


def _versus(r: GrowResult, alone: Finished | None) -> list[tuple[str, str]]:
    if alone is None:
        return []
    better = "higher" if r.metric_name == "accuracy" else "lower"
    return [
        (
            f"{r.metric_name}, host alone at end",
            f"{alone.final_metric:.4f} (no growth, same seed and ticks; {alone.params_end:,} "
            f"params) — grown {r.final_metric:.4f} vs host alone {alone.final_metric:.4f}, "
            f"{r.final_metric - alone.final_metric:+.4f} ({better} is better)",
        )
    ]


def _print_summary(r: GrowResult, alone: Finished | None = None) -> None:
    table = Table(title=f"Esper run {r.run_dir}", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    count = lambda xs: ", ".join(f"{k}×{v}" for k, v in Counter(xs).items()) or "none"  # noqa: E731
    rows = [
        (f"{r.metric_name}, host at first tick", f"{r.start_metric:.4f}"),
        (f"{r.metric_name}, grown model at end", f"{r.final_metric:.4f}"),
        *_versus(r, alone),
        ("parameters", _change(r.params_start, r.params_end, r.params_removed)),
        ("FLOPs per sample", _change(r.flops_start, r.flops_end, r.flops_removed)),
        ("germinated", count(r.germinated)),
        ("committed", count(r.committed)),
        ("pruned", count(r.pruned)),
        ("rent paid / churn paid", f"{r.rent_paid:.4f} / {r.churn_paid:.4f}"),
        ("governor rollbacks", str(r.rollbacks)),
        ("wall time", f"{r.wall_time:.1f} s"),
        ("weights sha256", r.weights_hash[:16]),
    ]
    for k, v in rows:
        table.add_row(k, v)
    for seed, acc in r.seed_accounts.items():
        table.add_row(
            f"  {seed}",
            f"rent {acc['rent_paid']:.4f}, churn {acc['churn_paid']:.4f}, "
            f"{int(acc['ticks_alive'])} ticks",
        )
    for zone, book in r.zone_books.items():
        table.add_row(
            f"  zone {zone}",
            f"rent {book['rent_paid']:.4f}, churn {book['churn_paid']:.4f}, "
            f"{int(book['germinations'])} germinations",
        )
    _out().print(table)


@app.command()
def runs(
    root: Annotated[Path, typer.Option(help="where run directories live")] = Path("runs"),
) -> None:
    """List recorded runs."""
    found = list_runs(root)
    if not found:
        _out().print(f"no runs under {root}")
        return
    table = Table("run", "created", "task", "policy", "last tick", "note")
    for r in found:
        table.add_row(
            r.id,
            str(r.created_at or ""),
            str(r.task or ""),
            str(r.policy or ""),
            "" if r.last_tick is None else str(r.last_tick),
            r.problem or "",
        )
    _out().print(table)


@app.command()
def show(
    run_dir: Annotated[Path, typer.Argument(help="a run directory")],
    all_decisions: Annotated[
        bool, typer.Option("--all", help="list every decision (WAITs included) with its reason")
    ] = False,
) -> None:
    """A run's summary: metric sparklines, the lifecycle events, audit labels; `--all` the
    decisions."""
    try:
        view = load_run(run_dir)
    except KNOWN_ERRORS as e:
        _fail(str(e))
    cfg, s = view.config, view.series
    _out().print(
        f"[bold]{run_dir}[/bold]  task={cfg['task']} policy={cfg['policy']} "
        f"seed={cfg['seed']} ticks={len(s.ticks)}/{cfg['ticks']}"
    )
    for name, label in (("metric", view.metric_label), ("val_loss", "val_loss")):
        _print_sparkline(view, name, label)
    if s.ticks and s.get("seed_params") is not None:
        _out().print(f"seed params {int(s.values['seed_params'][-1])} at tick {s.ticks[-1]}")
    _print_decay(list(view.events))
    _print_events(list(view.events))
    _print_audit_labels(view)
    if all_decisions:
        _print_decisions(view)
    else:
        acted = sum(d.action["op"] != "WAIT" for d in view.decisions)
        _out().print(f"{len(view.decisions)} decisions ({acted} acted): esper show {run_dir} --all")


def _print_sparkline(view: RunView, name: str, label: str) -> None:
    values = view.series.get(name)
    if not values:
        return
    t = view.series.ticks
    finite = [(v, tick) for v, tick in zip(values, t, strict=True) if math.isfinite(v)]
    best = ""
    if finite:
        lower = name.endswith("loss") or "lower is better" in view.manifest.get("task", "")
        value, tick = (min if lower else max)(finite)
        best = f", best {value:.4f} at tick {tick}"
    _out().print(
        f"{label} {sparkline(values, 32)} {values[0]:.4f} → {values[-1]:.4f}{best}",
        highlight=False,
    )


def _print_audit_labels(view: RunView) -> None:
    rows = audit_rows(view)
    if rows:
        table = Table(
            "slot",
            "seed",
            "blueprint",
            "germinated",
            "φ",
            "95% CI",
            "Banzhaf",
            "repeats",
            "protocol",
            title="audit labels (Shapley φ, esper audit)",
        )
        for r in rows:
            lo, hi = r.ci95
            table.add_row(
                r.slot,
                r.seed_id,
                r.blueprint,
                str(r.tick),
                f"{r.phi:+.4f}",
                f"[{lo:+.4f}, {hi:+.4f}]",
                f"{r.banzhaf:+.4f}",
                str(r.repeats),
                r.protocol_hash[:10],
            )
        _out().print(table)
    others = {k: n for k, n in view.label_counts.items() if k != "shapley"}
    if others:
        _out().print(
            "labels: " + ", ".join(f"{k} on {n} events" for k, n in sorted(others.items()))
        )


def _print_decisions(view: RunView) -> None:
    rows = decision_rows(view)
    learned = any(r.prob is not None or r.value is not None for r in rows)
    heads = ("p(action)", "H", "V") if learned else ()
    table = Table("tick", "op", "slot", "heads", "reason", *heads, "reward", title="decisions")
    number = lambda x: "" if x is None else f"{x:.4g}"  # noqa: E731
    for r in rows:
        extra = (number(r.prob), number(r.entropy), number(r.value)) if learned else ()
        style = "red" if r.rejected else "dim" if r.op == "WAIT" else None
        table.add_row(
            str(r.tick), r.op, r.slot, r.detail, r.reason, *extra, number(r.reward), style=style
        )
    _out().print(table)


def _detail(kind: str, payload: dict) -> str:  # type: ignore[type-arg]
    """An event's payload in one cell, less an op's heads and seed spec (`--all` lists the heads);
    a tick's unit ROI measurements are summarised (the whole table is in the record)."""
    if kind == "unit_roi" and payload.get("units"):
        units = payload["units"]
        low = min(units, key=lambda k: units[k][0])
        return f"{len(units)} units measured; lowest contribution {units[low][0]:+.4f} ({low})"
    if kind == "narset_update" and isinstance(payload.get("zones"), dict):
        return f"by {payload.get('by')}: " + "; ".join(
            _zone_budget(z, v) for z, v in payload["zones"].items()
        )
    shown = {k: v for k, v in payload.items() if v is not None and k not in ("action", "spec")}
    return ", ".join(f"{k}={v}" for k, v in sorted(shown.items()))


def _zone_budget(zone: str, entry: dict) -> str:  # type: ignore[type-arg]
    """One zone of a `narset_update` (the whole telemetry is in the record and the report)."""
    b, t = entry.get("budgets", {}), entry.get("telemetry", {})
    return (
        f"{zone} λ {b.get('price', 0.0):.3f}, growth {b.get('growth_budget')}, "
        f"ceiling {b.get('rent_ceiling', 0.0):.4g}, risk {b.get('risk_share', 0.0):.2f} "
        f"(improvement/rent {t.get('improvement_per_rent', 0.0):.3g}, "
        f"breaches {t.get('boundary_breaches', 0)})"
    )


def _print_events(events: list) -> None:  # type: ignore[type-arg]
    """The event table; with zones, one table per zone, then the run's own events, then the
    zones' books."""
    zones = list(dict.fromkeys(e.payload["zone"] for e in events if "zone" in e.payload))
    groups = [(f"zone {z}", [e for e in events if e.payload.get("zone") == z]) for z in zones]
    rest = [e for e in events if "zone" not in e.payload]
    for title, group in [*groups, ("the run" if zones else None, rest)]:
        table = Table("tick", "slot", "event", "detail", title=title)
        for e in group:
            table.add_row(str(e.tick), e.slot or "", e.kind, _detail(e.kind, e.payload))
        _out().print(table)
    books = [e.payload for e in events if e.kind == "zone_books"]
    if books:
        table = Table(
            "zone", "rent paid", "churn paid", "germinations", "transitions", title="zone books"
        )
        for z, b in books[-1].items():
            table.add_row(
                z,
                f"{b['rent_paid']:.4f}",
                f"{b['churn_paid']:.4f}",
                str(b["germinations"]),
                str(b["transitions"]),
            )
        _out().print(table)


def _print_decay(events: list) -> None:  # type: ignore[type-arg]
    """One line on the decay half, when the run had one."""
    n = Counter(e.kind for e in events if e.kind in DECAY_EVENTS and e.kind != "unit_roi")
    if not n:
        return
    params = sum(e.payload.get("params", 0) for e in events if e.kind == "lysed")
    _out().print(
        f"decay: {n['lysis_probation']} sedations, {n['lysis_panic']} woken by a loss spike, "
        f"{n['lysed']} units lysed ({params:,} parameters), {n['decay_folded']} folded"
    )


@app.command()
def replay(
    run_dir: Annotated[Path, typer.Argument(help="the run to fork (finished or not; only read)")],
    from_tick: Annotated[
        int, typer.Option("--from", help="the tick to fork at (its state before the tick)")
    ],
    inject: Annotated[
        str | None,
        typer.Option(
            help="the action at that tick instead of the policy's, e.g. op=PRUNE,slot=b1 or "
            "blueprint=CONV_LIGHT (heads not named keep the policy's choice)"
        ),
    ] = None,
    out: Annotated[
        Path | None, typer.Option(help="the new run directory (default: RUN-replay-tT)")
    ] = None,
) -> None:
    """Fork a recorded run at a tick (paper §8.2): reload its state there, optionally inject a
    different action, and play on under the same policy into a new run."""
    run: GrowthRun | None = None
    try:
        run = fork_run(run_dir, from_tick, inject, out)
        c = run.store.manifest()["fork"]["checkpoint_tick"]
        start = f"its checkpoint after tick {c}" if c >= 0 else "the start"
        checked = (
            f", ticks {c + 1}..{from_tick - 1} replayed and checked" if c + 1 < from_tick else ""
        )
        _out().print(
            f"forking {run_dir} at tick {from_tick} into {run.run_dir}: from {start}{checked}"
        )
        result = _run_with_progress(run, lambda progress: play_fork(run, progress))
        found = diff_runs(run_dir, result.run_dir)
    except KNOWN_ERRORS as e:
        _fail(str(e).splitlines()[0] if str(e) else type(e).__name__)
    except KeyboardInterrupt:
        kept = run is not None and run.run_dir.exists()
        _out().print(
            f"interrupted; resume with: esper grow --resume {run.run_dir}"
            if run is not None and kept
            else "interrupted before the fork's tick: nothing kept"
        )
        raise typer.Exit(130) from None
    _print_summary(result)
    _out().print(_headline(found))


@app.command()
def diff(
    run_a: Annotated[Path, typer.Argument(help="a run directory")],
    run_b: Annotated[Path, typer.Argument(help="another, e.g. a fork of the first")],
    all_ticks: Annotated[
        bool, typer.Option("--all", help="every tick, not only from the first divergence")
    ] = False,
) -> None:
    """Where two runs diverge: the first differing decision, events and metrics, then slots,
    metric and parameters of both, tick by tick."""
    try:
        found = diff_runs(run_a, run_b)
    except KNOWN_ERRORS as e:
        _fail(str(e).splitlines()[0] if str(e) else type(e).__name__)
    _out().print(f"A: {run_a}\nB: {run_b}")
    for who, fork in found.forks:
        inject = f", injecting {fork['inject']}" if fork["inject"] else ""
        _out().print(f"{who} is a fork of {fork['source']} at tick {fork['from_tick']}{inject}")
    for key, (a, b) in found.config.items():
        _out().print(f"config {key}: {a} (A) vs {b} (B)")
    _out().print(_headline(found))
    start = 0 if all_ticks else found.first_divergence
    if start is None:
        return
    table = Table(
        "tick",
        "decision A",
        "decision B",
        "slots that differ (A → B)",
        "metric A",
        "metric B",
        "Δ metric",
        "params A",
        "params B",
        "Δ params",
        caption="* an injected action; slots at decision time, params after the tick",
    )
    for row in (r for r in found.ticks if r.tick >= start):
        (ma, mb), (pa, pb) = row.metric, row.params
        table.add_row(
            str(row.tick),
            row.decisions[0] or "—",
            row.decisions[1] or "—",
            "; ".join(f"{n}: {a} → {b}" for n, a, b in row.slots),
            _num(ma, "{:.4f}"),
            _num(mb, "{:.4f}"),
            _num(None if ma is None or mb is None else mb - ma, "{:+.4f}"),
            _num(pa, "{:,}"),
            _num(pb, "{:,}"),
            _num(None if pa is None or pb is None else pb - pa, "{:+,}"),
        )
    _out().print(table)


def _num(x: float | None, fmt: str) -> str:
    return "—" if x is None else fmt.format(x)


def _headline(d: RunDiff) -> str:
    """Where the runs first differ, in one line."""
    if d.first_divergence is None:
        return "identical records: every tick's decision, events and metrics"
    parts = [
        f"{what} at tick {t}"
        for what, t in (
            ("decisions", d.first_decision),
            ("events", d.first_event),
            ("metrics", d.first_metric),
        )
        if t is not None
    ]
    same = f"identical up to tick {d.first_divergence - 1}; " if d.first_divergence else ""
    return f"{same}first differing " + ", ".join(parts)


@app.command()
def report(
    runs: Annotated[list[Path], typer.Argument(help="a run directory, or several to compare")],
    out: Annotated[
        Path | None,
        typer.Option(
            help="the HTML file (default: RUN/report.html, or esper-report.html here "
            "when comparing runs)"
        ),
    ] = None,
    baseline: Annotated[
        Path | None,
        typer.Option(
            help="a run of the plain host (e.g. esper grow --policy none, same seed and ticks) "
            "drawn beside the runs' curves"
        ),
    ] = None,
) -> None:
    """One self-contained HTML page (opens with no network) on a run, or comparing runs: curves,
    morphology, parameters and FLOPs, rent and churn, decisions, audit φ, governor events."""
    try:
        path = write_report(runs, out, baseline)
    except KNOWN_ERRORS as e:
        _fail(str(e))
    except OSError as e:  # an --out that cannot be written
        _fail(f"cannot write the report: {e}")
    _out().print(f"report written to {path}")


@app.command("export")
def export_cmd(
    run_dir: Annotated[Path, typer.Argument(help="a run directory")],
    out: Annotated[
        Path | None, typer.Option(help="the .pt2 file to write (default: RUN/model.pt2)")
    ] = None,
) -> None:
    """Write a run's grown model as plain PyTorch (a torch.export program and its weights as
    safetensors) that loads and runs without Esper installed."""
    try:
        model, task = grown_model(run_dir)
        program, weights = export_model(model, task.val_x[:2], out or run_dir / "model.pt2")
    except KNOWN_ERRORS as e:
        _fail(str(e))
    _out().print(f"wrote {program} and {weights}")
    _out().print(
        "load without Esper: torch.export.load(path).module()(x); weights: "
        "safetensors.torch.load_file"
    )


@app.command("evaluate")
def evaluate_cmd(
    policies: Annotated[list[str], typer.Argument(help="none, random, heuristic, policy files")],
    seeds: Annotated[int, typer.Option(help="held-out seeds")] = len(HELD_OUT_SEEDS),
    first_seed: Annotated[
        int,
        typer.Option(
            help=f"the first held-out seed (>= {FIRST_HELD_OUT}: training never draws those)"
        ),
    ] = FIRST_HELD_OUT,
    ticks: Annotated[int | None, typer.Option(help="control ticks per run")] = None,
    task: Annotated[str | None, typer.Option()] = None,
    host_width: Annotated[int | None, typer.Option()] = None,
    config: Annotated[Path | None, typer.Option(help="TOML config file")] = None,
    out: Annotated[Path, typer.Option(help="where runs and the table go")] = Path("evaluation"),
    sample: Annotated[
        bool, typer.Option(help="also run each learned policy sampling its actions, as in training")
    ] = False,
) -> None:
    """Run policies on held-out seeds at matched ticks; print and save the paper's §7 table."""
    try:
        cfg = _config(config, task=task, ticks=ticks, **{"host.width": host_width})
        for p in policies:
            _config(None, policy=p)  # validates each name or file
        chosen = held_out_seeds(seeds, first_seed)
        rows = evaluate(
            policies,
            chosen,
            cfg,
            out,
            sample=sample,
            progress=lambda p, s, r: _out().print(
                f"{Path(p).name:>12s} seed {s}: {r.metric_name} "
                f"{r.final_metric:.4f}, reward {r.reward_total:+.3f}"
            ),
        )
    except KNOWN_ERRORS as e:
        _fail(str(e).splitlines()[0] if str(e) else type(e).__name__)
    _out().print((out / "evaluation.md").read_text())
    _out().print(f"{len(rows)} policies × {len(chosen)} seeds; saved to {out}")


@app.command("train-policy")
def train_policy_cmd(
    updates: Annotated[int | None, typer.Option(help="PPO updates")] = None,
    envs: Annotated[int | None, typer.Option(help="environments in lockstep")] = None,
    backend: Annotated[
        str | None,
        typer.Option(
            help="where the environments run: auto (worker processes on a multi-core CPU, else "
            "in-process), inprocess, processes, or ray (Ray actors, the ray extra) "
            f"(default: {TrainPolicyConfig.backend})"
        ),
    ] = None,
    budget_minutes: Annotated[float | None, typer.Option(help="wall-clock budget")] = None,
    seed: Annotated[int | None, typer.Option()] = None,
    out: Annotated[str | None, typer.Option(help="policy and training-run directory")] = None,
    resume: Annotated[bool, typer.Option(help="continue the training in --out")] = False,
    critic: Annotated[
        str | None,
        typer.Option(
            help="critic file (esper train-critic): its predicted φ of each seed joins the reward"
        ),
    ] = None,
    critic_weight: Annotated[float | None, typer.Option(help="weight of the critic's φ")] = None,
    baseline: Annotated[
        str | None,
        typer.Option(
            help="none, or paired: each episode beside its host-alone twin, the reward their "
            f"difference (twice the environment work) (default: {TrainPolicyConfig.baseline})"
        ),
    ] = None,
    anchor: Annotated[
        float | None,
        typer.Option(
            help="weight of KL(clone ‖ policy) in PPO's loss, annealed to 0 over "
            f"anchor_updates (default: {TrainPolicyConfig.anchor}, off)"
        ),
    ] = None,
    teacher: Annotated[
        str | None,
        typer.Option(
            help="warm start: clone this policy's decisions before PPO ('none': no warm start) "
            f"(default: {ImitationConfig.teacher})"
        ),
    ] = None,
    demo_episodes: Annotated[
        int | None,
        typer.Option(
            help="teacher episodes recorded for the warm start "
            f"(default: {ImitationConfig.episodes})"
        ),
    ] = None,
    config: Annotated[
        Path | None,
        typer.Option(
            help="TOML config file (TrainPolicyConfig: [episode], [ppo], [imitation], "
            "[[curriculum]])"
        ),
    ] = None,
) -> None:
    """Phase 1: train a growth policy with PPO over vectorised environments."""
    changes = {
        "updates": updates,
        "num_envs": envs,
        "backend": backend,
        "budget_minutes": budget_minutes,
        "seed": seed,
        "out": out,
        "critic": critic,
        "critic_weight": critic_weight,
        "baseline": baseline,
        "anchor": anchor,
        "imitation.episodes": demo_episodes,
    }
    try:
        base = load_config(config, TrainPolicyConfig) if config else TrainPolicyConfig()
        # teacher "none": no warm start (cloning `none` would only teach WAIT)
        teach = {"imitation.teacher": teacher} if teacher != "none" else {}
        cfg = override(base, **changes, **teach)
        if teacher == "none":
            cfg = replace(cfg, imitation=replace(cfg.imitation, teacher=None))
    except KNOWN_ERRORS as e:
        _fail(str(e).splitlines()[0])
    columns = (
        TextColumn("[bold]training[/bold]"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
    )
    try:
        with Progress(*columns, console=_out()) as bar:
            job = bar.add_task("ppo", total=cfg.updates, status="")

            def log(update: int, info: dict) -> None:
                if "imitation" in info:  # the warm start, before the first PPO update
                    clone = info["imitation"]
                    bar.console.print(
                        f"warm start: cloned {clone['decisions']} {cfg.imitation.teacher} "
                        f"decisions in "
                        f"{info['minutes']:.1f} min; NLL {clone['nll']:.3f}, agreement "
                        + ", ".join(f"{op} {a:.0%}" for op, a in clone["op_accuracy_by_op"].items())
                    )
                    return
                metric = info["final_metric_mean"]
                bar.update(
                    job,
                    completed=update + 1,
                    status=(
                        f"return {info['return_mean']:+.3f}  kl {info['approx_kl']:.4f}  "
                        f"ev {info['explained_variance']:.2f}  H(op) {info['entropy_op']:.2f}"
                        + (f"  final acc {metric:.3f}" if metric is not None else "")
                    ),
                )
                if "heldout_metric" in info:
                    bar.console.print(
                        f"update {info['update']}: held-out return "
                        f"{info['heldout_return']:+.3f}, final metric "
                        f"{info['heldout_metric']:.4f}"
                    )
                for w in info["warnings"]:
                    bar.console.print(f"[yellow]health:[/yellow] {w}")

            path = train_policy(cfg, resume=resume, log=log)
    except KNOWN_ERRORS as e:
        _fail(str(e).splitlines()[0] if str(e) else type(e).__name__)
    _out().print(f"policy written to {path}")


@app.command()
def audit(
    run_dir: Annotated[Path, typer.Argument(help="a recorded run whose seeds to audit")],
    more_runs: Annotated[
        list[Path] | None,
        typer.Argument(help="with --compare: more audited runs, pooled", show_default=False),
    ] = None,
    repeats: Annotated[int, typer.Option(help="R: retrains per subset")] = AuditProtocol.repeats,
    budget: Annotated[
        int, typer.Option(help="ticks of training per retrain")
    ] = AuditProtocol.ticks,
    metric: Annotated[
        str, typer.Option(help="metric, val_loss or train_loss")
    ] = AuditProtocol.metric,
    workers: Annotated[int | None, typer.Option(help="processes (default: the cores)")] = None,
    backend: Annotated[
        str, typer.Option(help="where retrains run: local (a process pool) or ray (Ray tasks)")
    ] = "local",
    ray_address: Annotated[
        str | None,
        typer.Option(
            help="with --backend ray: the cluster to join (default: a local Ray instance)"
        ),
    ] = None,
    compare: Annotated[
        bool, typer.Option("--compare", help="compare cheaper estimators with the recorded exact φ")
    ] = False,
) -> None:
    """Exact Shapley credit of a run's germinated seeds (≤ 3) by full retrain of every subset.

    With --compare, audit nothing new: over the audits already recorded in RUN [RUN...] (each
    under its own protocol; --budget, --repeats and --metric are ignored), compare the cheaper
    estimators (α=0 ablation, leave-one-out, permutation Shapley, short rollout) with exact φ:
    retrains each needs, Spearman ρ and MAE pooled over every seed of every run.
    """
    if compare:
        _audit_compare([run_dir, *(more_runs or [])], workers, backend, ray_address)
        return
    if more_runs:
        _fail("several runs are only accepted with --compare")
    try:
        check_backend(backend, ray_address)
        with RunStore.open(run_dir) as store:
            cfg = config_from_dict(store.manifest()["config"])
        candidates = candidates_from_run(run_dir)
        if not candidates:
            raise ConfigError(f"run {run_dir} germinated no seed: nothing to audit")
        last = max(c.germinate_tick for c in candidates)
        if budget <= last:
            raise ConfigError(
                f"--budget {budget} must exceed the last germination tick ({last}),"
                " so that every seed can be trained in"
            )
        protocol = AuditProtocol(
            task=cfg.task,
            config=cfg,
            ticks=budget,
            metric=metric,
            repeats=repeats,
            base_seed=cfg.seed,
        )
        columns = (
            TextColumn(
                f"[bold]auditing[/bold] {len(candidates)} seeds, retrains of "
                f"{budget} ticks on {backend}"
            ),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
        )
        with Progress(*columns, console=_out(), transient=True) as bar:
            job = bar.add_task("audit", total=2 ** len(candidates) * repeats)
            result = Audit(run_dir / "audit").run(
                protocol,
                candidates,
                backend=backend,
                workers=workers,
                ray_address=ray_address,
                progress=lambda done, total: bar.update(job, completed=done, total=total),
            )
    except KNOWN_ERRORS as e:
        _fail(str(e).splitlines()[0] if str(e) else type(e).__name__)
    _print_audit(result, run_dir, metric)


def _print_audit(result: AuditResult, run_dir: Path, metric: str) -> None:
    """φ ± CI and Banzhaf per seed, the pairwise interactions, any failed retrain, and what
    of the seeds' recorded fate the retrains could not replay within the budget."""
    table = Table(
        "seed",
        "φ (Shapley)",
        "95% CI",
        "Banzhaf",
        title=f"audit of {run_dir} ({metric}, R={len(result.repeats_used)}, "
        f"{result.retrains} retrained, {result.cached} cached)",
    )
    for key in result.candidates:
        lo, hi = result.phi_ci95[key]
        ci = f"[{lo:+.4f}, {hi:+.4f}]" if lo == lo else "n/a (needs R ≥ 2)"  # NaN when R = 1
        table.add_row(key, f"{result.phi[key]:+.4f}", ci, f"{result.banzhaf[key]:+.4f}")
    _out().print(table)
    for (a, b), x in result.interactions.items():
        _out().print(f"interaction {a} × {b}: {x:+.4f}")
    for f in result.failures:
        _out().print(
            f"[red]failed[/red] subset {list(f.subset)} repeat {f.repeat} after "
            f"{f.attempts} attempts: {f.error.splitlines()[0]}"
        )
    for job, notes in result.unreached.items():
        _out().print(f"[yellow]not replayed[/yellow] in {job}: {'; '.join(notes)}")


def _audit_compare(
    run_dirs: list[Path], workers: int | None, backend: str, ray_address: str | None
) -> None:
    """`esper audit RUN [RUN...] --compare`: estimators against the recorded exact φ."""
    try:
        check_backend(backend, ray_address)
        with _out().status("estimating (cached retrains are reused)") as status:
            comparison = compare_audits(
                run_dirs,
                workers=workers,
                backend=backend,
                ray_address=ray_address,
                progress=lambda r: status.update(f"estimating {r} (cached retrains are reused)"),
            )
    except KNOWN_ERRORS as e:
        _fail(str(e).splitlines()[0] if str(e) else type(e).__name__)
    table = Table(
        *ESTIMATOR_HEADERS,
        title=f"credit estimators vs exact Shapley φ over {len(run_dirs)} audited run(s)",
    )
    for row in format_estimator_rows(comparison):
        table.add_row(*row)
    _out().print(table)
    _out().print(
        "retrains: what each estimator needs alone (exact: 2^n·R; cached ones were "
        "reused); tick-equivalent: retrains × their ticks / the audit budget; "
        "MAE — : credit in other units (ablation under a loss metric)"
    )


@app.command("study")
def study_cmd(
    study: Annotated[
        str,
        typer.Argument(help="a study file, or a name: NAME looks up studies/NAME-TASK.toml"),
    ],
    task: Annotated[str, typer.Option(help="with a study name: digits or text")] = "digits",
    seeds: Annotated[int | None, typer.Option(help="seeds (default: the study file's)")] = None,
    workers: Annotated[int | None, typer.Option(help="processes (default: the cores)")] = None,
    backend: Annotated[
        str, typer.Option(help="where runs go: local (a process pool) or ray (Ray tasks)")
    ] = "local",
    out: Annotated[Path | None, typer.Option(help="default: studies/out/<study file>")] = None,
) -> None:
    """Run a study (e.g. the paper's §7 table) over held-out seeds; print and write its table."""
    path = Path(study) if study.endswith(".toml") else Path("studies") / f"{study}-{task}.toml"
    try:
        spec = load_study(path, seeds=seeds)
        check_backend(backend, None)
        where = out if out is not None else Path("studies") / "out" / path.stem
        total = len(spec.rows) * spec.seeds
        with _progress_bar() as bar:
            job = bar.add_task(f"study {path.stem}", total=total, status="")

            def update(row: str, seed: int, r: RunSummary) -> None:
                bar.update(job, advance=1, status=f"{row} s{seed}: {r.metric:.4f}")

            result = run_study(spec, where, workers=workers, backend=backend, progress=update)
        write_study(result, where)
    except KNOWN_ERRORS as e:
        _fail(str(e).splitlines()[0] if str(e) else type(e).__name__)
    _out().print(study_markdown(result))
    _out().print(f"written: {where / 'study.md'}, {where / 'study.json'}")


@app.command("train-critic")
def train_critic_cmd(
    runs: Annotated[list[Path], typer.Argument(help="audited runs (labelled by `esper audit`)")],
    out: Annotated[Path, typer.Option(help="the critic file")] = Path("critic.safetensors"),
    lag: Annotated[
        int, typer.Option(help="ticks after germination to read telemetry")
    ] = DEFAULT_LAG,
    l2: Annotated[
        float | None,
        typer.Option(
            help="ridge strength (default: chosen by leave-one-run-out)", show_default=False
        ),
    ] = None,
    folds: Annotated[
        int | None,
        typer.Option(
            help="k folds of whole runs for the held-out score (default: leave one run out)",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Train a critic that predicts exact Shapley φ from cheap recorded telemetry (ridge)."""
    try:
        rows = critic_dataset(runs, lag=lag)
        if not rows:
            raise ConfigError("no audited germination in these runs: run `esper audit RUN` first")
        n_runs = len({r.run for r in rows})
        score = held_out(rows, folds, l2, lag) if n_runs >= 2 else None
        critic = fit_critic(rows, l2, lag)
        if score is not None:
            critic.meta["held_out"] = {
                "spearman": score.spearman,
                "mae": score.mae,
                "n": score.n,
                "folds": score.folds,
            }
        path = critic.save(out)
    except KNOWN_ERRORS as e:
        _fail(str(e).splitlines()[0] if str(e) else type(e).__name__)
    table = Table(
        "rows",
        "runs",
        "features",
        "L2",
        "held-out Spearman ρ",
        "held-out MAE",
        title=f"critic of exact φ, telemetry {lag} ticks after germination",
    )
    rho = (
        "n/a (needs 2 runs)"
        if score is None
        else "{} (n={}, {} folds by run)".format(
            "— (constant)" if score.spearman != score.spearman else f"{score.spearman:+.3f}",
            score.n,
            score.folds,
        )
    )  # NaN: φ or the predictions are all equal
    mae = "n/a" if score is None else f"{score.mae:.4f}"
    table.add_row(
        str(len(rows)), str(n_runs), str(len(critic.features)), f"{critic.l2:g}", rho, mae
    )
    _out().print(table)
    _out().print(f"critic written to {path}")


def main() -> None:
    app()
