"""Runs in a terminal line: a metric's sparkline (`esper show`)."""

from __future__ import annotations

import math
from collections.abc import Sequence

BLOCKS = "▁▂▃▄▅▆▇█"


def sparkline(values: Sequence[float], width: int = 48) -> str:
    """`values` in at most `width` unicode blocks, lowest ▁ to highest █; a longer series is
    averaged over equal buckets of ticks; a NaN (or a bucket of them) is a space."""
    if not values:
        return ""
    n, k = len(values), min(len(values), width)
    buckets = [values[i * n // k : (i + 1) * n // k] for i in range(k)]
    means = [_mean(b) for b in buckets]
    finite = [m for m in means if math.isfinite(m)]
    if not finite:
        return " " * len(means)
    lo, hi = min(finite), max(finite)
    top = len(BLOCKS) - 1
    return "".join(
        " "
        if not math.isfinite(m)
        else BLOCKS[round((m - lo) / (hi - lo) * top) if hi > lo else top // 2]
        for m in means
    )


def _mean(xs: Sequence[float]) -> float:
    finite = [x for x in xs if math.isfinite(x)]
    return sum(finite) / len(finite) if finite else math.nan
