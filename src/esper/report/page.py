"""One self-contained HTML page for one run or several: plotly's JavaScript inline (the page
opens with no network), each figure's JSON in a `<script type="application/json" data-plot=ID>`
beside its `<div id=ID>`, drawn by a few lines at the end; tables as plain HTML."""

from __future__ import annotations

import html
import math
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

import plotly.graph_objects as go
from plotly.offline import get_plotlyjs

from esper.contracts.files import atomic_write
from esper.forensics import diff_runs
from esper.report import figures
from esper.report.data import (
    DECAY_EVENTS,
    GOVERNOR_EVENTS,
    ReportError,
    RunView,
    audit_rows,
    decision_rows,
    load_baseline,
    load_run,
)

SECTIONS = {  # id -> (title, what it shows)
    "curves": (
        "Metric and loss",
        "The task metric and the losses after each tick; the plain host alone dashed in grey when "
        "a baseline is recorded or given (--baseline); red crosses: governor triggers.",
    ),
    "morphology": (
        "Morphology",
        "Each slot's stage at every decision (the state the policy saw) with its ops and the "
        "engine's forced prunes; Emrakul's events per phage; α per slot below. Dashed red "
        "lines: governor rollbacks.",
    ),
    "cost": (
        "Parameters and FLOPs",
        "Parameters of the whole model and of its seeds, and FLOPs per sample, after each tick.",
    ),
    "economy": (
        "Rent and churn",
        "The weighted rent and churn terms of each tick's reward, the rent charged to each "
        "slot's seed, and what each seed paid over the run.",
    ),
    "decisions": (
        "Decisions",
        "Every decision of the growth policy, with the reason or rejection recorded with it.",
    ),
    "audit": (
        "Audit φ",
        "Each audited seed's Shapley value φ (esper audit) with its 95% interval over repeats: "
        "a label under the audit's protocol, not ground truth.",
    ),
    "governor": ("Governor", "Every trigger, rollback and forced prune of the safety governor."),
}

STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 0 auto; max-width: 1280px; padding: 0 24px;
       color: #222; }
h1 { font-size: 22px; margin: 20px 0 4px; } h2 { margin-top: 36px; border-bottom: 1px solid #ddd; }
nav a { margin-right: 14px; } .note { color: #666; }
table { border-collapse: collapse; font-size: 13px; margin: 8px 0; }
th, td { border-bottom: 1px solid #eee; padding: 3px 10px 3px 0; text-align: left;
         vertical-align: top; }
th { background: #fafafa; position: sticky; top: 0; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.scroll { max-height: 520px; overflow-y: auto; border: 1px solid #eee; }
tr.rejected td { color: #a50f15; } tr.wait td { color: #999; }
.plot { width: 100%; }
"""

DRAW = """
document.querySelectorAll('script[data-plot]').forEach(function (s) {
  var f = JSON.parse(s.textContent);
  Plotly.newPlot(s.dataset.plot, f.data, f.layout, {responsive: true, displaylogo: false});
});
"""


def write_report(
    run_dirs: Sequence[Path], out: Path | None = None, baseline: Path | None = None
) -> Path:
    """The report of `run_dirs` (compared when several) at `out`: by default `RUN/report.html`
    for one run, `esper-report.html` here for several. `baseline`: a plain-host run drawn beside
    them (otherwise each run's recorded baseline, if any)."""
    base = load_baseline(baseline) if baseline is not None else None
    views = [load_run(Path(d), base) for d in run_dirs]
    for v in views:
        if not v.series.ticks:
            raise ReportError(f"{v.path}: no complete tick recorded yet")
    if out is None:
        out = Path(run_dirs[0]) / "report.html" if len(run_dirs) == 1 else Path("esper-report.html")
    # two runs (e.g. a run and its fork, `esper replay`): mark where their records part
    divergence = diff_runs(*run_dirs).first_divergence if len(run_dirs) == 2 else None
    text = render(views, divergence)
    return atomic_write(out, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def render(views: Sequence[RunView], divergence: int | None = None) -> str:
    names = ", ".join(v.name for v in views)
    body = [
        f"<h1>Esper report: {html.escape(names)}</h1>",
        "<nav>" + "".join(f'<a href="#{k}">{t}</a>' for k, (t, _) in SECTIONS.items()) + "</nav>",
        _summary(views),
        *_sections(views, divergence),
    ]
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>Esper report: {html.escape(names)}</title><style>{STYLE}</style>"
        f"<script>{get_plotlyjs()}</script></head>\n<body>\n"
        + "\n".join(body)
        + f"\n<script>{DRAW}</script>\n</body></html>\n"
    )


def _sections(views: Sequence[RunView], divergence: int | None = None) -> Iterable[str]:
    yield _section("curves", _plot("fig-curves", figures.curves(views, divergence)))
    yield _section(
        "morphology",
        *(
            _decay_line(v) + _plot(f"fig-morphology-{i}", figures.morphology(v))
            for i, v in enumerate(views)
        ),
    )
    yield _section("cost", _plot("fig-cost", figures.cost(views)))
    yield _section(
        "economy", _plot("fig-economy", figures.economy(views)), *(_zones(v) for v in views)
    )
    yield _section("decisions", *(_decisions(v, len(views) > 1) for v in views))
    phi = figures.audit(views)
    audit = [_plot("fig-audit", phi), *(_audit_table(v) for v in views)] if phi else []
    yield _section(
        "audit",
        *(audit or [_note("No audit labels: run `esper audit RUN` to add them.")]),
        *_other_labels(views),
    )
    yield _section("governor", _governor(views))


def _section(key: str, *parts: str) -> str:
    title, blurb = SECTIONS[key]
    head = f'<section id="{key}"><h2>{title}</h2>\n{_note(blurb)}\n'
    return head + "\n".join(parts) + "\n</section>"


def _plot(div_id: str, fig: go.Figure) -> str:
    data = fig.to_json().replace("</", "<\\/")  # no `</script>` inside the script element
    return (
        f'<div class="plot" id="{div_id}"></div>\n'
        f'<script type="application/json" data-plot="{div_id}">{data}</script>'
    )


def _note(text: str) -> str:
    return f'<p class="note">{html.escape(text)}</p>'


def _table(
    headers: Sequence[str], rows: Iterable[Sequence[object]], classes: Sequence[str] = ()
) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = []
    for i, row in enumerate(rows):
        cls = f' class="{classes[i]}"' if i < len(classes) and classes[i] else ""
        cells = "".join(
            f'<td class="num">{_fmt(x)}</td>'
            if isinstance(x, int | float)
            else f"<td>{html.escape(str(x))}</td>"
            for x in row
        )
        body.append(f"<tr{cls}>{cells}</tr>")
    table = f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"
    return f'<div class="scroll">{table}</div>'


def _fmt(x: float | int | None) -> str:
    if x is None:
        return ""
    if isinstance(x, int):
        return f"{x:,}"
    return "NaN" if math.isnan(x) else f"{x:.4g}"


# ------------------------------------------------------------------------------------------------
# Tables
# ------------------------------------------------------------------------------------------------


def _summary(views: Sequence[RunView]) -> str:
    rows = []
    for v in views:
        cfg, s = v.config, v.series
        metric = s.get("metric") or (math.nan,)
        ops = Counter(e.kind for e in v.events)
        rows.append(
            (
                v.name,
                str(cfg.get("task", "")),
                str(cfg.get("policy", "")),
                str(cfg.get("decay", "")),
                cfg.get("seed", ""),
                f"{len(s.ticks)}/{cfg.get('ticks', '?')}",
                f"{_fmt(metric[0])} → {_fmt(metric[-1])}",
                _span(s.get("host_params"), s.get("seed_params")),
                _span(s.get("flops")),
                " / ".join(
                    str(ops[k]) for k in ("germinate", "fossilize", "prune", "governor_lobotomy")
                ),
                ops["governor_rollback"],
                sum(s.get("rent") or ()),
                sum(s.get("churn") or ()),
                str(v.manifest.get("code", {}).get("commit", ""))[:10],
            )
        )
    headers = (
        "run",
        "task",
        "policy",
        "decay",
        "seed",
        "ticks",
        f"{views[0].metric_label} first → last",
        "params first → last",
        "FLOPs first → last",
        "germinated / committed / pruned / engine prunes",
        "rollbacks",
        "rent paid",
        "churn paid",
        "commit",
    )
    task = "; ".join(sorted({str(v.manifest.get("task", "")) for v in views}))
    return _table(headers, rows) + _note(task)


def _span(*parts: tuple[float, ...] | None) -> str:
    if any(p is None for p in parts):
        return "not recorded"
    total = [sum(xs) for xs in zip(*parts, strict=True)]  # type: ignore[arg-type]
    return f"{int(total[0]):,} → {int(total[-1]):,}"


def _decisions(v: RunView, several: bool) -> str:
    rows = decision_rows(v)
    learned = any(r.prob is not None or r.value is not None for r in rows)
    zoned = any("@" in r.policy for r in rows)  # a policy per zone: group them by zone
    if zoned:
        rows = sorted(rows, key=lambda r: (r.policy.partition("@")[2], r.tick))
    headers = (
        (["zone"] if zoned else [])
        + ["tick", "op", "slot", "heads", "reason"]
        + (["p(action)", "H (nats)", "V"] if learned else [])
        + ["reward"]
    )
    cells = [
        ([r.policy.partition("@")[2]] if zoned else [])
        + [r.tick, r.op, r.slot, r.detail, r.reason]
        + ([r.prob, r.entropy, r.value] if learned else [])
        + [r.reward]
        for r in rows
    ]
    classes = ["rejected" if r.rejected else "wait" if r.op == "WAIT" else "" for r in rows]
    policies = ", ".join(sorted({r.policy for r in rows}))
    title = f"<h3>{html.escape(v.name)}</h3>" if several else ""
    how = (
        "p(action) is the product of the probabilities of the op's relevant heads, H the sum of "
        "their entropies"
        if learned
        else "reasons as the policy gave them (a WAIT's is not recorded)"
    )
    caption = _note(f"{len(rows)} decisions by {policies}; {how}")
    return title + caption + _table(headers, cells, classes)


def _zones(v: RunView) -> str:
    """With zones: each budget window, zone by zone (what Narset read and set), then the
    zones' books; nothing without zones."""
    windows = [e for e in v.events if e.kind == "narset_update"]
    books = [e.payload for e in v.events if e.kind == "zone_books"]
    if not windows and not books:
        return ""
    rows = [
        (
            e.tick,
            zone,
            z["budgets"]["price"],
            z["budgets"]["growth_budget"],
            z["budgets"]["rent_ceiling"],
            z["budgets"]["risk_share"],
            z["telemetry"]["rent"],
            z["telemetry"]["rent_utilisation"],
            z["telemetry"]["improvement_per_rent"],
            z["telemetry"]["germinations"],
            z["telemetry"]["loss_spikes"],
        )
        for e in windows
        for zone, z in e.payload["zones"].items()
    ]
    by = windows[0].payload["by"] if windows else "fixed"
    parts = [
        _note(f"{v.name}: zone budgets by window (set by {by}), and the telemetry they read"),
        _table(
            (
                "tick",
                "zone",
                "price λ",
                "growth budget",
                "rent ceiling",
                "risk share",
                "rent",
                "utilisation",
                "gain / rent",
                "germinations",
                "loss spikes",
            ),
            rows,
        ),
    ]
    if books:
        parts.append(
            _table(
                ("zone", "rent paid", "churn paid", "germinations", "transitions"),
                [
                    (z, b["rent_paid"], b["churn_paid"], b["germinations"], b["transitions"])
                    for z, b in books[-1].items()
                ],
            )
        )
    return "\n".join(parts)


def _audit_table(v: RunView) -> str:
    rows = audit_rows(v)
    if not rows:
        return ""
    headers = (
        "run",
        "slot",
        "seed",
        "blueprint",
        "germinated at",
        "φ",
        "95% CI",
        "Banzhaf",
        "repeats",
        "protocol",
    )
    return _table(
        headers,
        [
            (
                v.name,
                r.slot,
                r.seed_id,
                r.blueprint,
                r.tick,
                r.phi,
                f"[{_fmt(r.ci95[0])}, {_fmt(r.ci95[1])}]",
                r.banzhaf,
                r.repeats,
                r.protocol_hash[:10],
            )
            for r in rows
        ],
    )


def _other_labels(views: Sequence[RunView]) -> list[str]:
    return [
        _note(
            f"{v.name}: "
            + ", ".join(f"{name} labels on {n} events" for name, n in sorted(counts.items()))
        )
        for v in views
        if (counts := {k: n for k, n in v.label_counts.items() if k != "shapley"})
    ]


def _governor(views: Sequence[RunView]) -> str:
    rows = []
    for v in views:
        for e in v.of(*GOVERNOR_EVENTS):
            p = e.payload
            what = {
                "governor_rollback": f"restored the snapshot of tick {p.get('to_tick')}",
                "governor_lobotomy": f"force-pruned {p.get('blueprint')} ({p.get('seed_id')})",
            }.get(e.kind, str(p.get("detail", "")))
            rows.append((v.name, e.tick, e.kind, e.slot or p.get("offender") or "host", what))
    if not rows:
        return _note("No governor events: training never diverged.")
    return _table(("run", "tick", "event", "slot", "what"), rows)


def _decay_line(v: RunView) -> str:
    n = Counter(e.kind for e in v.of(*DECAY_EVENTS))
    if not n:
        return ""
    return _note(f"{v.name}, decay: " + ", ".join(f"{k} ×{n[k]}" for k in DECAY_EVENTS if n[k]))
