"""The report's plots (plotly), one function per section. Each takes `RunView`s (several to
compare runs) and returns a figure; trace names start with the run's name when there are several.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import plotly.graph_objects as go
from plotly.colors import qualitative
from plotly.subplots import make_subplots

from esper.report.data import (
    DECAY_EVENTS,
    RunView,
    audit_rows,
    phage_of,
    roi_phages,
    slot_rents,
    slot_timeline,
)

TEMPLATE = "plotly_white"
BASELINE_COLOUR = "#555555"
GOVERNOR_TRIGGERS = ("governor_nan", "governor_divergence", "governor_explosion")
STAGE_COLOURS = {
    "DORMANT": "#f0f0f0",
    "GERMINATED": "#c6dbef",
    "TRAINING": "#6baed6",
    "BLENDING": "#fdae6b",
    "HOLDING": "#e6550d",
    "COMMITTED": "#31a354",
    "PRUNED": "#de2d26",
    "EMBARGOED": "#fcbba1",
    "RESETTING": "#bdbdbd",
}
EVENT_MARKERS = {  # kind -> (plotly marker symbol, colour)
    "germinate": ("triangle-up", "#08519c"),
    "advance": ("circle-open", "#252525"),
    "set_alpha_target": ("diamond-open", "#252525"),
    "fossilize": ("star", "#006d2c"),
    "prune": ("x", "#a50f15"),
    "governor_lobotomy": ("x-thin-open", "#cb181d"),
}
DECAY_MARKERS = {
    "unit_roi": ("line-ns-open", "#bdbdbd"),
    "lysis_probation": ("triangle-down", "#756bb1"),
    "lysis_refused": ("circle-x-open", "#969696"),
    "lysis_lifted": ("triangle-up-open", "#3182bd"),
    "lysis_dropped": ("square-x-open", "#636363"),
    "lysis_panic": ("hexagram", "#e6550d"),
    "lysis_condemned": ("square", "#54278f"),
    "lysed": ("x", "#3f007d"),
    "decay_folded": ("diamond", "#9e9ac8"),
}


def _colour(i: int) -> str:
    return qualitative.Plotly[i % len(qualitative.Plotly)]


def _name(view: RunView, what: str, several: bool) -> str:
    return f"{view.name}: {what}" if several else what


def _line(
    ticks: Sequence[int], ys: Sequence[float], name: str, colour: str, dash: str = "solid"
) -> go.Scatter:
    return go.Scatter(
        x=list(ticks),
        y=list(ys),
        name=name,
        mode="lines+markers",
        marker={"size": 4},
        line={"color": colour, "dash": dash},
    )


def _layout(fig: go.Figure, height: int, title: str | None = None) -> go.Figure:
    fig.update_layout(
        template=TEMPLATE,
        height=height,
        title={"text": title, "x": 0.01} if title else None,
        margin={"l": 60, "r": 20, "t": 60 if title else 30, "b": 40},
        legend={"orientation": "h", "y": -0.12},
        hovermode="closest",
    )
    return fig


# ------------------------------------------------------------------------------------------------
# Metric and loss curves, with the plain host beside them
# ------------------------------------------------------------------------------------------------


def curves(views: Sequence[RunView], divergence: int | None = None) -> go.Figure:
    """Row 1 the task metric, row 2 the losses (validation solid, training dotted); the baseline
    dashed and grey; governor triggers as red crosses on the validation loss; two runs'
    first divergent tick (`esper diff`) as a vertical line."""
    label = views[0].metric_label
    fig = make_subplots(
        rows=2,
        cols=1,
        shared_xaxes=True,
        vertical_spacing=0.1,
        subplot_titles=(label, "loss: validation (solid), training (dotted)"),
    )
    several, drawn = len(views) > 1, set()
    for i, v in enumerate(views):
        t, c = v.series.ticks, _colour(i)
        for row, what, dash in ((1, "metric", "solid"), (2, "val_loss", "solid")):
            fig.add_trace(
                _line(t, v.series.get(what) or (), _name(v, what, several), c, dash), row, 1
            )
        fig.add_trace(
            _line(t, v.series.get("train_loss") or (), _name(v, "train_loss", several), c, "dot"),
            2,
            1,
        )
        if v.baseline is not None and v.baseline.label not in drawn:
            drawn.add(v.baseline.label)
            b = v.baseline.series
            for row, what in ((1, "metric"), (2, "val_loss"), (2, "train_loss")):
                if b.get(what) is not None:
                    name = f"{v.baseline.label}: {what}"
                    fig.add_trace(
                        _line(b.ticks, b.values[what], name, BASELINE_COLOUR, "dash"), row, 1
                    )
        triggers = v.of(*GOVERNOR_TRIGGERS)
        if triggers:
            loss = dict(zip(t, v.series.get("val_loss") or (), strict=False))
            fig.add_trace(
                go.Scatter(
                    x=[e.tick for e in triggers],
                    y=[loss.get(e.tick) for e in triggers],
                    name=_name(v, "governor", several),
                    mode="markers",
                    marker={"symbol": "x", "size": 12, "color": "#cb181d"},
                    hovertext=[f"{e.kind}: {e.payload.get('detail', '')}" for e in triggers],
                ),
                2,
                1,
            )
    if divergence is not None:
        fig.add_vline(
            x=divergence,
            line={"color": "#6a51a3", "dash": "dot", "width": 2},
            annotation_text=f"runs diverge at tick {divergence}",
        )
    fig.update_xaxes(title_text="tick", row=2, col=1)
    return _layout(fig, 560)


# ------------------------------------------------------------------------------------------------
# Morphology: swimlanes per slot (stage over ticks, events), decay lanes per phage, α curves
# ------------------------------------------------------------------------------------------------


def morphology(view: RunView) -> go.Figure:
    """Row 1: one lane per slot, coloured by stage at each decision, with the ops and the
    engine's prunes on it, then one lane per phage with Emrakul's events (a marker per kind and
    tick, sized by count); row 2: α per slot. Governor rollbacks are dashed red lines."""
    lanes = slot_timeline(view)
    fig = make_subplots(
        rows=2,
        cols=1,
        shared_xaxes=True,
        vertical_spacing=0.1,
        row_heights=[0.68, 0.32],
        subplot_titles=("stage per slot; events (decay: per phage)", "α per slot"),
    )
    for trace in _stage_bars(lanes):
        fig.add_trace(trace, 1, 1)
    for kind, (symbol, colour) in EVENT_MARKERS.items():
        found = [e for e in view.of(kind) if e.slot]
        if found:
            fig.add_trace(
                go.Scatter(
                    x=[e.tick for e in found],
                    y=[e.slot for e in found],
                    name=kind,
                    mode="markers",
                    marker={"symbol": symbol, "size": 13, "color": colour, "line": {"width": 2}},
                    hovertext=[_hover(e.payload) for e in found],
                ),
                1,
                1,
            )
    phages = _decay_traces(view)
    for trace in phages:
        fig.add_trace(trace, 1, 1)
    for i, (slot, rows) in enumerate(lanes.items()):
        fig.add_trace(
            _line([r[0] for r in rows], [r[2] for r in rows], f"α {slot}", _colour(i)), 2, 1
        )
    for e in view.of(*GOVERNOR_TRIGGERS):
        fig.add_vline(x=e.tick, line={"color": "#cb181d", "dash": "dash", "width": 1})
    order = list(lanes) + sorted({y for t in phages for y in t.y} - set(lanes))
    fig.update_yaxes(categoryorder="array", categoryarray=order[::-1], row=1, col=1)
    fig.update_yaxes(title_text="α", range=[-0.05, 1.05], row=2, col=1)
    fig.update_xaxes(title_text="tick", row=2, col=1)
    fig.update_layout(barmode="overlay")
    return _layout(fig, 380 + 34 * len(order), view.name)


def _stage_bars(lanes: dict[str, list[tuple[int, str, float, str | None]]]) -> list[go.Bar]:
    """One horizontal bar trace per stage; a bar per run of equal stage and blueprint in a lane,
    centred on its ticks."""
    segments: dict[str, list[tuple[str, int, int, str | None]]] = {}
    for slot, rows in lanes.items():
        start = 0
        for i in range(1, len(rows) + 1):
            tick0, stage, _, bp = rows[start]
            if i == len(rows) or (rows[i][1], rows[i][3]) != (stage, bp):
                segments.setdefault(stage, []).append((slot, tick0, rows[i - 1][0], bp))
                start = i
    return [
        go.Bar(
            y=[s[0] for s in segs],
            x=[s[2] - s[1] + 1 for s in segs],
            base=[s[1] - 0.5 for s in segs],
            orientation="h",
            name=stage,
            marker={"color": STAGE_COLOURS.get(stage, "#999999"), "line": {"width": 0}},
            width=0.6,
            hovertext=[f"{s[0]}: {stage} {s[3] or ''}, ticks {s[1]}–{s[2]}" for s in segs],
            hoverinfo="text",
        )
        for stage, segs in segments.items()
    ]


def _decay_traces(view: RunView) -> list[go.Scatter]:
    """One trace per decay kind, one marker per (tick, phage) sized by how many events."""
    traces = []
    for kind in DECAY_EVENTS:
        found = view.of(kind)
        if not found:
            continue
        if kind == "unit_roi":
            counts = Counter((e.tick, p) for e in found for p in roi_phages(e))
        else:
            counts = Counter((e.tick, phage_of(e)) for e in found)
        keys = sorted(counts)
        symbol, colour = DECAY_MARKERS[kind]
        traces.append(
            go.Scatter(
                x=[k[0] for k in keys],
                y=[k[1] for k in keys],
                name=kind,
                mode="markers",
                marker={
                    "symbol": symbol,
                    "color": colour,
                    "size": [min(8 + 2 * counts[k], 20) for k in keys],
                },
                hovertext=[f"{kind} ×{counts[k]} on {k[1]} at tick {k[0]}" for k in keys],
            )
        )
    return traces


def _hover(payload: dict) -> str:  # type: ignore[type-arg]
    return ", ".join(f"{k}={v}" for k, v in sorted(payload.items()) if k not in ("action", "spec"))


# ------------------------------------------------------------------------------------------------
# Cost: parameters and FLOPs over time
# ------------------------------------------------------------------------------------------------


def cost(views: Sequence[RunView]) -> go.Figure:
    """Row 1: parameters (the whole model solid, the seeds' dotted, removed by decay dashed);
    row 2: FLOPs per sample (`flops`, recorded by `esper grow`; older runs lack it)."""
    fig = make_subplots(
        rows=2,
        cols=1,
        shared_xaxes=True,
        vertical_spacing=0.1,
        subplot_titles=("parameters", "FLOPs per sample"),
    )
    several = len(views) > 1
    for i, v in enumerate(views):
        s, c = v.series, _colour(i)
        host, seed = s.get("host_params"), s.get("seed_params")
        if host is not None and seed is not None:
            total = [h + x for h, x in zip(host, seed, strict=True)]
            fig.add_trace(_line(s.ticks, total, _name(v, "params (model)", several), c), 1, 1)
            fig.add_trace(_line(s.ticks, seed, _name(v, "params (seeds)", several), c, "dot"), 1, 1)
        if s.get("lysed_params") is not None:
            name = _name(v, "params removed by decay", several)
            fig.add_trace(_line(s.ticks, s.values["lysed_params"], name, c, "dash"), 1, 1)
        if s.get("flops") is not None:
            fig.add_trace(_line(s.ticks, s.values["flops"], _name(v, "FLOPs", several), c), 2, 1)
    if not any(v.series.get("flops") for v in views):
        fig.add_annotation(
            text="FLOPs not recorded (a run recorded before Esper measured them)",
            showarrow=False,
            xref="x domain",
            yref="y domain",
            x=0.5,
            y=0.5,
            row=2,
            col=1,
        )
    fig.update_xaxes(title_text="tick", row=2, col=1)
    return _layout(fig, 520)


# ------------------------------------------------------------------------------------------------
# Economy: rent and churn per tick and per seed
# ------------------------------------------------------------------------------------------------


def economy(views: Sequence[RunView]) -> go.Figure:
    """Left: the weighted rent (solid) and churn (dotted) terms of each tick's reward, and the
    rent charged to each slot's seed (thin); right: what each seed paid over the run (the last
    tick's `seed_accounts`), rent and churn stacked."""
    fig = make_subplots(
        rows=1,
        cols=2,
        column_widths=[0.6, 0.4],
        subplot_titles=("rent (solid), churn (dotted), rent per slot (thin)", "paid per seed"),
    )
    several = len(views) > 1
    for i, v in enumerate(views):
        s, c = v.series, _colour(i)
        for what, dash in (("rent", "solid"), ("churn", "dot")):
            if s.get(what) is not None:
                fig.add_trace(
                    _line(s.ticks, s.values[what], _name(v, what, several), c, dash), 1, 1
                )
        for j, (slot, (ticks, rents)) in enumerate(slot_rents(v).items()):
            thin = _line(ticks, rents, _name(v, f"rent {slot}", several), _colour(i + j + 1))
            thin.update(line_width=1, marker_size=2, opacity=0.7)
            fig.add_trace(thin, 1, 1)
        accounts, seeds = v.seed_accounts(), v.seeds()
        labels = [
            f"{v.name} " * several + f"{seed} {seeds.get(seed, ('', ''))[1]}" for seed in accounts
        ]
        for what, opacity in (("rent_paid", 1.0), ("churn_paid", 0.45)):
            fig.add_trace(
                go.Bar(
                    x=labels,
                    y=[accounts[seed][what] for seed in accounts],
                    name=_name(v, what, several),
                    marker={"color": c, "opacity": opacity},
                    hovertext=[f"{seed} in {seeds.get(seed, ('?', ''))[0]}" for seed in accounts],
                ),
                1,
                2,
            )
    fig.update_layout(barmode="stack")
    fig.update_xaxes(title_text="tick", row=1, col=1)
    return _layout(fig, 420)


# ------------------------------------------------------------------------------------------------
# Audit: Shapley φ with its 95% interval
# ------------------------------------------------------------------------------------------------


def audit(views: Sequence[RunView]) -> go.Figure | None:
    """φ per audited seed, error bars from its CI (none with one repeat); None without labels."""
    fig, several, any_rows = go.Figure(), len(views) > 1, False
    for i, v in enumerate(views):
        rows = audit_rows(v)
        if not rows:
            continue
        any_rows = True
        fig.add_trace(
            go.Bar(
                x=[f"{v.name} " * several + f"{r.slot} {r.blueprint} ({r.seed_id})" for r in rows],
                y=[r.phi for r in rows],
                name=_name(v, "φ", several),
                marker={"color": _colour(i)},
                error_y={
                    "type": "data",
                    "symmetric": False,
                    "array": [r.ci95[1] - r.phi for r in rows],
                    "arrayminus": [r.phi - r.ci95[0] for r in rows],
                },
                hovertext=[f"banzhaf {r.banzhaf:.4g}, {r.repeats} repeats" for r in rows],
            )
        )
    if not any_rows:
        return None
    fig.update_yaxes(title_text="φ (Shapley)", zeroline=True)
    return _layout(fig, 380)
