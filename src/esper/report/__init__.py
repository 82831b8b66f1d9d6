"""Seeing runs: `esper report` (one self-contained HTML page per run or comparing several, plotly
figures) and the text helpers of `esper show`. Reads the flight record through `RunStore` only."""

from esper.report.data import (
    AuditRow,
    Baseline,
    DecisionRow,
    ReportError,
    RunView,
    audit_rows,
    decision_rows,
    load_baseline,
    load_run,
)
from esper.report.page import render, write_report
from esper.report.text import sparkline

__all__ = [
    "AuditRow",
    "Baseline",
    "DecisionRow",
    "ReportError",
    "RunView",
    "audit_rows",
    "decision_rows",
    "load_baseline",
    "load_run",
    "render",
    "sparkline",
    "write_report",
]
