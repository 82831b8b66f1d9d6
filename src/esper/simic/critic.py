"""Critics of audit credit (paper §5.4): predict a seed's exact Shapley φ from cheap telemetry.

    audited runs (germinate events labelled "shapley" by `esper audit`)
    → `critic_dataset`: one row per labelled germination, joined to the recorded telemetry of that
      slot `lag` ticks after it germinated (global features + the slot's features + blueprint)
    → `fit_critic`: ridge regression on standardised features (a few dozen rows: a linear model
      generalises where an MLP would memorise); the L2 strength picked by inner
      leave-one-run-out cross-validation on the training rows
    → `held_out`: rank correlation with exact φ on runs the critic never saw (folds by run)
    → `Critic.save` / `load_critic`: safetensors weights + JSON metadata (feature names, normaliser)

A deployed policy asks `Critic.predict_observation(obs, slot)` for the φ a live seed would earn
under the audit protocol the critic was trained on. The features are those the flight recorder
keeps (`esper.contracts.obs_vector` and `slot_state`, one function for both), so that recorded
rows and live observations map to the same numbers: the global state, the slot's stage, α,
contribution and rent, its gradient health (seed and host gradient norms, their ratio), where it
sits (depth, width, topology), the seed's size, and the metric's gain over the last `lag` ticks.
Runs recorded before gradient health was kept read 0 there.

This module needs numpy, safetensors and the recorder (to read runs), not torch.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from esper.contracts import Observation, Stage, obs_vector, slot_state
from esper.contracts.errors import ConfigError, EsperError
from esper.contracts.files import atomic_write
from esper.recorder import RunStore

LABEL = "shapley"
DEFAULT_LAG = 3
"""Ticks after germination at which a row's telemetry is read (a seed has usually started to
blend by then, so its α=0 ablation contribution exists)."""
GLOBAL_FEATURES = (
    "progress",
    "metric",
    "val_loss",
    "train_loss",
    "log_host_params",
    "log_seed_params",
    "rent_paid",
)
FIRST_SLOT_FEATURES = (
    "stage",
    "alpha",
    "ticks_in_stage",
    "contribution",
    "has_contribution",
    "slot_rent",
)
"""What the first critic read of the slot (RESULTS: held-out ρ 0.40)."""
GRADIENT_FEATURES = ("log_seed_grad", "log_host_grad", "log_grad_ratio")
PLACE_FEATURES = ("depth", "log_channels", "seed_param_frac")
TREND_FEATURES = ("metric_gain",)
SLOT_FEATURES = (*FIRST_SLOT_FEATURES, *GRADIENT_FEATURES, *PLACE_FEATURES, *TREND_FEATURES)
TOPOLOGY_PREFIX = "topology="
BLUEPRINT_PREFIX = "blueprint="
L2_GRID = (0.01, 0.1, 1.0, 10.0, 100.0)
FORMAT = "esper-critic-v1"


# ---------------------------------------------------------------------------------------------
# Rank statistics
# ---------------------------------------------------------------------------------------------


def average_ranks(xs: Sequence[float]) -> list[float]:
    """1-based ranks; tied values share the mean of the ranks they span."""
    order = sorted(range(len(xs)), key=lambda i: xs[i])
    ranks = [0.0] * len(xs)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and xs[order[j + 1]] == xs[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    """NaN when fewer than two points or either side is constant."""
    if len(x) != len(y):
        raise ValueError(f"need equal lengths, got {len(x)} and {len(y)}")
    n = len(x)
    if n < 2:
        return math.nan
    mx, my = sum(x) / n, sum(y) / n
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y, strict=True))
    sxx = sum((a - mx) ** 2 for a in x)
    syy = sum((b - my) ** 2 for b in y)
    if sxx == 0 or syy == 0:
        return math.nan
    return sxy / math.sqrt(sxx * syy)


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's ρ: Pearson's r of the average ranks (exact with ties)."""
    return pearson(average_ranks(list(x)), average_ranks(list(y)))


def mean_abs_error(x: Sequence[float], y: Sequence[float]) -> float:
    if len(x) != len(y):
        raise ValueError(f"need equal lengths, got {len(x)} and {len(y)}")
    return sum(abs(a - b) for a, b in zip(x, y, strict=True)) / len(x) if x else math.nan


# ---------------------------------------------------------------------------------------------
# Features: one snapshot of the global state and one slot
# ---------------------------------------------------------------------------------------------


def _finite(x: Any) -> float:
    x = 0.0 if x is None else float(x)
    return x if math.isfinite(x) else 0.0


def _log10(x: Any) -> float:
    """log10 of a non-negative telemetry number, clipped at 1e-8 (0 when missing)."""
    x = _finite(x)
    return math.log10(max(x, 1e-8)) if x > 0 else 0.0


def snapshot_features(
    obs_vec: Sequence[float],
    state: Mapping[str, Any],
    blueprint: str | None,
    metric_gain: float = 0.0,
) -> dict[str, float]:
    """Features of one recorded snapshot: the first seven entries of `esper.contracts.obs_vector`
    (progress, metric, val_loss, train_loss, host params, seed params, rent paid), one slot's
    `esper.contracts.slot_state`, the seed's blueprint and the slot's topology (one-hot, by
    name), and `metric_gain` (the metric now minus `lag` ticks ago)."""
    progress, metric, val_loss, train_loss, host, seed, rent_paid = obs_vec[:7]
    contribution = state.get("contribution")
    out = {
        "progress": _finite(progress),
        "metric": _finite(metric),
        "val_loss": _finite(val_loss),
        "train_loss": _finite(train_loss),
        "log_host_params": math.log1p(max(0.0, host)),
        "log_seed_params": math.log1p(max(0.0, seed)),
        "rent_paid": _finite(rent_paid),
        "stage": float(Stage[state["stage"]]),
        "alpha": _finite(state.get("alpha")),
        "ticks_in_stage": _finite(state.get("ticks_in_stage")),
        "contribution": _finite(contribution),
        "has_contribution": float(contribution is not None),
        "slot_rent": _finite(state.get("rent")),
        "log_seed_grad": _log10(state.get("seed_grad_norm")),
        "log_host_grad": _log10(state.get("host_grad_norm")),
        "log_grad_ratio": _log10(state.get("grad_ratio")),
        "seed_param_frac": _finite(state.get("param_count")) / max(1.0, _finite(host)),
        "depth": _finite(state.get("depth")),
        "log_channels": math.log2(max(1.0, _finite(state.get("channels")))),
        "metric_gain": _finite(metric_gain),
    }
    if state.get("topology") is not None:
        out[TOPOLOGY_PREFIX + str(state["topology"])] = 1.0
    if blueprint is not None:
        out[BLUEPRINT_PREFIX + blueprint] = 1.0
    return out


def observation_features(
    obs: Observation, slot: str, blueprint: str | None = None, lag: int = DEFAULT_LAG
) -> dict[str, float]:
    """The same features from a live `Observation` (what `esper.run` would have recorded).
    `blueprint` defaults to the slot's seed; give it to score a germination not yet made."""
    by_name = {s.name: s for s in obs.slots}
    if slot not in by_name:
        raise ValueError(f"no slot {slot!r} in the observation; slots: {', '.join(by_name)}")
    s = by_name[slot]
    if blueprint is None and s.spec is not None:
        blueprint = s.spec.blueprint.name
    h = obs.history
    gain = h[-1] - h[max(0, len(h) - 1 - lag)] if h else 0.0
    return snapshot_features(obs_vector(obs), slot_state(s), blueprint, gain)


# ---------------------------------------------------------------------------------------------
# The dataset: labelled germinations joined to recorded telemetry
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CriticRow:
    run: str
    event_id: int
    slot: str
    blueprint: str
    germinate_tick: int
    snapshot_tick: int
    """The tick whose telemetry `features` holds: germinate_tick + lag, or the seed's last
    recorded tick when the run ended or the slot was re-germinated before."""
    phi: float
    """The target: exact Shapley φ under the audit protocol."""
    protocol_hash: str
    features: dict[str, float]
    decision_features: dict[str, float]
    """What the policy saw when it germinated (the slot still DORMANT), with the blueprint."""


def _recorded(
    by_tick: Mapping[int, Any], tick: int, slot: str, blueprint: str, lag: int
) -> dict[str, float]:
    """Features of one slot in the `DecisionRecord` of `tick` (the metric gain read against
    the record `lag` ticks earlier, or the earliest one, as a live history would give it)."""
    d = by_tick[tick]
    if d.obs_before is None:
        raise ValueError(f"tick {d.tick}: the decision record holds no observation")
    state = next(s for s in d.slot_states if s["name"] == slot)
    earlier = [t for t in by_tick if tick - lag <= t <= tick and by_tick[t].obs_before]
    gain = d.obs_before[1] - by_tick[min(earlier)].obs_before[1]
    return snapshot_features(d.obs_before, state, blueprint, gain)


def critic_dataset(
    run_dirs: Iterable[str | Path], lag: int = DEFAULT_LAG, label: str = LABEL
) -> list[CriticRow]:
    """One row per germinate event that carries a `label` (Shapley) label, in run order."""
    if lag < 0:
        raise ConfigError(f"lag must be >= 0, got {lag}")
    rows: list[CriticRow] = []
    for run_dir in run_dirs:
        with RunStore.open(Path(run_dir)) as store:
            germs = store.events("germinate")
            labelled = [e for e in germs if label in e.labels and e.slot is not None]
            if not labelled:
                continue
            decisions = {}
            for d in store.decisions():
                decisions.setdefault(d.env, {})[d.tick] = d
        for e in labelled:
            lab = e.labels[label]
            phi = lab["phi"] if isinstance(lab, Mapping) else lab
            if phi is None or not math.isfinite(float(phi)):
                continue
            by_tick = decisions.get(e.env, {})
            later = [
                g.tick
                for g in germs
                if g.slot == e.slot and g.env == e.env and g.id != e.id and g.tick > e.tick
            ]
            end = min([e.tick + lag, *(t - 1 for t in later)])
            ticks = [t for t in by_tick if e.tick <= t <= end]
            if e.tick not in by_tick or not ticks:
                raise ValueError(f"{run_dir}: no decision recorded at germinate tick {e.tick}")
            blueprint = e.payload["blueprint"]
            rows.append(
                CriticRow(
                    run=str(run_dir),
                    event_id=e.id,
                    slot=e.slot,
                    blueprint=blueprint,
                    germinate_tick=e.tick,
                    snapshot_tick=max(ticks),
                    phi=float(phi),
                    protocol_hash=str(lab.get("protocol_hash", ""))
                    if isinstance(lab, Mapping)
                    else "",
                    features=_recorded(by_tick, max(ticks), e.slot, blueprint, lag),
                    decision_features=_recorded(by_tick, e.tick, e.slot, blueprint, lag),
                )
            )
    return rows


# ---------------------------------------------------------------------------------------------
# The critic: ridge regression on standardised features
# ---------------------------------------------------------------------------------------------


@dataclass
class Critic:
    features: tuple[str, ...]
    mean: np.ndarray
    scale: np.ndarray
    weights: np.ndarray
    bias: float
    """Mean target of the training rows (the prediction for an all-average input)."""
    l2: float
    lag: int
    """Rows were read `lag` ticks after germination: query seeds about that old."""
    meta: dict[str, Any] = field(default_factory=dict)

    def matrix(self, rows: Sequence[Mapping[str, float]]) -> np.ndarray:
        x = np.array(
            [[_finite(r.get(f, 0.0)) for f in self.features] for r in rows], dtype=np.float64
        ).reshape(len(rows), len(self.features))
        return (x - self.mean) / self.scale

    def predict(
        self, features: Mapping[str, float] | Sequence[Mapping[str, float]]
    ) -> float | np.ndarray:
        """Predicted φ for one feature dict (a float) or a list of them (an array). Features the
        critic does not know are ignored; those it knows but the input lacks count as 0."""
        if isinstance(features, Mapping):
            return float(self.predict([features])[0])
        return self.matrix(features) @ self.weights + self.bias

    def predict_observation(
        self, obs: Observation, slot: str, blueprint: str | None = None
    ) -> float:
        """Predicted φ of the seed in `slot` (or of germinating `blueprint` there)."""
        return float(self.predict(observation_features(obs, slot, blueprint, self.lag)))

    def save(self, path: str | Path) -> Path:
        meta = {
            "format": FORMAT,
            "features": list(self.features),
            "bias": self.bias,
            "l2": self.l2,
            "lag": self.lag,
            **self.meta,
        }
        tensors = {"weights": self.weights, "mean": self.mean, "scale": self.scale}
        arrays = {k: np.ascontiguousarray(v, dtype=np.float64) for k, v in tensors.items()}
        header = {"esper_critic": json.dumps(meta, sort_keys=True)}
        return atomic_write(path, lambda tmp: save_file(arrays, str(tmp), metadata=header))


class CriticLoadError(EsperError, ValueError):
    pass


def load_critic(path: str | Path) -> Critic:
    path = Path(path)
    try:
        with safe_open(str(path), framework="numpy") as f:
            raw = (f.metadata() or {}).get("esper_critic")
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)
    except Exception as err:  # OSError, or safetensors' own SafetensorError
        raise CriticLoadError(f"{path}: cannot read a critic ({err})") from err
    if raw is None:
        raise CriticLoadError(f"{path}: not an Esper critic (no esper_critic metadata)")
    meta = json.loads(raw)
    if meta.pop("format", None) != FORMAT:
        raise CriticLoadError(f"{path}: unknown critic format, expected {FORMAT}")
    features = tuple(meta.pop("features"))
    if any(tensors[k].shape != (len(features),) for k in ("weights", "mean", "scale")):
        raise CriticLoadError(f"{path}: tensor shapes do not match {len(features)} features")
    return Critic(
        features=features,
        mean=tensors["mean"],
        scale=tensors["scale"],
        weights=tensors["weights"],
        bias=float(meta.pop("bias")),
        l2=float(meta.pop("l2")),
        lag=int(meta.pop("lag")),
        meta=meta,
    )


def feature_names(rows: Sequence[CriticRow]) -> tuple[str, ...]:
    """The fixed features, then a one-hot per topology and per blueprint seen in `rows`."""
    blueprints = sorted({BLUEPRINT_PREFIX + r.blueprint for r in rows})
    topologies = sorted({f for r in rows for f in r.features if f.startswith(TOPOLOGY_PREFIX)})
    return (*GLOBAL_FEATURES, *SLOT_FEATURES, *topologies, *blueprints)


def _ridge(x: np.ndarray, y: np.ndarray, l2: float) -> np.ndarray:
    return np.linalg.solve(x.T @ x + l2 * np.eye(x.shape[1]), x.T @ y)


def _fit(rows: Sequence[CriticRow], l2: float, lag: int) -> Critic:
    names = feature_names(rows)
    raw = np.array(
        [[_finite(r.features.get(f, 0.0)) for f in names] for r in rows], dtype=np.float64
    ).reshape(len(rows), len(names))
    mean = raw.mean(axis=0)
    scale = raw.std(axis=0)
    scale[scale < 1e-12] = 1.0  # a constant feature stays 0 after centring
    y = np.array([r.phi for r in rows], dtype=np.float64)
    bias = float(y.mean())
    weights = _ridge((raw - mean) / scale, y - bias, l2)
    return Critic(names, mean, scale, weights, bias, l2, lag)


def run_folds(rows: Sequence[CriticRow], k: int | None = None) -> list[tuple[list[int], list[int]]]:
    """(train, test) row indices with every run wholly on one side. k None: leave one run out;
    otherwise k folds of whole runs (runs dealt round-robin in first-seen order)."""
    runs = list(dict.fromkeys(r.run for r in rows))
    if k is None:
        k = len(runs)
    if not 2 <= k <= len(runs):
        raise ConfigError(f"need 2 <= folds <= runs ({len(runs)}), got {k}")
    fold_of = {run: i % k for i, run in enumerate(runs)}
    out = []
    for f in range(k):
        test = [i for i, r in enumerate(rows) if fold_of[r.run] == f]
        train = [i for i, r in enumerate(rows) if fold_of[r.run] != f]
        out.append((train, test))
    return out


def choose_l2(
    rows: Sequence[CriticRow], lag: int = DEFAULT_LAG, grid: Sequence[float] = L2_GRID
) -> float:
    """The grid value with the least leave-one-run-out squared error on `rows` (1.0 when there
    are fewer than three runs to cross-validate on)."""
    if len({r.run for r in rows}) < 3:
        return 1.0
    folds = run_folds(rows)

    def sse(l2: float) -> float:
        total = 0.0
        for train, test in folds:
            critic = _fit([rows[i] for i in train], l2, lag)
            pred = critic.predict([rows[i].features for i in test])
            total += float(sum((p - rows[i].phi) ** 2 for p, i in zip(pred, test, strict=True)))
        return total

    return min(grid, key=sse)


def fit_critic(
    rows: Sequence[CriticRow], l2: float | None = None, lag: int = DEFAULT_LAG
) -> Critic:
    """Ridge regression of φ on the rows' features; `l2` None: `choose_l2`."""
    if not rows:
        raise ConfigError("no labelled germinations to train on: audit some runs first")
    critic = _fit(rows, choose_l2(rows, lag) if l2 is None else l2, lag)
    critic.meta = {
        "rows": len(rows),
        "runs": len({r.run for r in rows}),
        "protocol_hashes": sorted({r.protocol_hash for r in rows}),
        "target": "exact Shapley phi (label 'shapley')",
    }
    return critic


@dataclass(frozen=True)
class HeldOut:
    spearman: float
    mae: float
    n: int
    folds: int
    predictions: tuple[float, ...]
    """Held-out prediction of every row, in row order."""


def held_out(
    rows: Sequence[CriticRow], k: int | None = None, l2: float | None = None, lag: int = DEFAULT_LAG
) -> HeldOut:
    """Pooled out-of-run predictions: each fold's critic (its L2 chosen on its own training
    rows) predicts the runs it never saw."""
    folds = run_folds(rows, k)
    pred = [math.nan] * len(rows)
    for train, test in folds:
        critic = fit_critic([rows[i] for i in train], l2, lag)
        for i, p in zip(test, critic.predict([rows[i].features for i in test]), strict=True):
            pred[i] = float(p)
    phi = [r.phi for r in rows]
    return HeldOut(
        spearman(pred, phi), mean_abs_error(pred, phi), len(rows), len(folds), tuple(pred)
    )
