"""What the learned policy reads of an `Observation`: a global vector and one vector per slot.

    featurize(obs) -> g (GLOBAL_DIM,), s (S, SLOT_DIM)
    featurize_batch(observations) -> g (B, GLOBAL_DIM), s (B, S_max, SLOT_DIM), valid (B, S_max)

Layout-free: a slot is described by what it is (topology, channels, depth in the host, stage,
α, gradient health, contribution, rent), never by its name or its index, and the host by its
size; so one policy reads any host, with any number of slots (`TamiyoNet` treats them as a set).
A batch may mix hosts: `featurize_batch` pads it to its largest slot count and says which slots
are real (`FeatureBatch.valid`).

Every feature is a bounded or log-scaled number; `RunningNormalizer` then whitens each column
with running statistics that are saved with the policy. Changing any feature here changes the
observation spec: bump `OBS_SPEC` so old policies refuse to load.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch

from esper.contracts import Blueprint, Observation, SlotTelemetry, Stage, Topology

OBS_SPEC = "obs-v2"

HISTORY_DELTAS = 3  # metric deltas of the last ticks, most recent first
TREND_WINDOW = 5  # least-squares slope over this many last metrics
TICKS_IN_STAGE_CAP = 20
ALPHA_TICKS_SCALE = 8  # the slowest tempo / alpha speed, in ticks
STALENESS_CAP = 10  # ticks after which a contribution counts as fully stale
LOG_GRAD_RANGE = (-8.0, 4.0)  # log10 of a gradient norm
LOG_RATIO_RANGE = (-4.0, 4.0)  # log10 of seed/host gradient ratio
LOG_CHANNELS_SCALE = 10.0  # log2 of a slot's channels, 1 … 1024 -> 0 … 1
LOG_PARAMS_SCALE = 9.0  # log10 of the host's parameters, 1 … 1e9 -> 0 … 1

GLOBAL_FEATURES = (
    "progress",
    "metric",
    "val_loss",
    "train_loss",
    *(f"metric_delta_{i + 1}" for i in range(HISTORY_DELTAS)),
    "metric_trend",
    "log1p_rent_paid",
    "seed_param_frac",
    "higher_is_better",
    "log_host_params",
)
SLOT_FEATURES = (
    *(f"topology_{t.value}" for t in Topology),
    "log_channels",
    "depth",
    *(f"stage_{s.name.lower()}" for s in Stage),
    "alpha",
    "alpha_target",
    "alpha_ticks_left",
    "ticks_in_stage",
    "log_seed_grad",
    "log_host_grad",
    "log_grad_ratio",
    "gate_passed",
    "contribution",
    "contribution_staleness",
    "has_contribution",
    "param_frac",
    *(f"blueprint_{b.name.lower()}" for b in Blueprint),
    "blueprint_none",
    "rent",
)
GLOBAL_DIM = len(GLOBAL_FEATURES)
SLOT_DIM = len(SLOT_FEATURES)


# ---------------------------------------------------------------------------------------------
# Global features
# ---------------------------------------------------------------------------------------------


def slope(ys: Sequence[float]) -> float:
    """Least-squares slope of ys against 0, 1, …, n−1 (0 for fewer than two points)."""
    n = len(ys)
    if n < 2:
        return 0.0
    x_mean, y_mean = (n - 1) / 2, sum(ys) / n
    num = sum((i - x_mean) * (y - y_mean) for i, y in enumerate(ys))
    den = sum((i - x_mean) ** 2 for i in range(n))
    return num / den


def global_features(obs: Observation) -> list[float]:
    h = obs.history
    deltas = [h[-1 - i] - h[-2 - i] if len(h) >= i + 2 else 0.0 for i in range(HISTORY_DELTAS)]
    return [
        obs.tick / max(1, obs.max_ticks),
        obs.metric,
        obs.val_loss,
        obs.train_loss,
        *deltas,
        slope(h[-TREND_WINDOW:]),
        math.log1p(max(0.0, obs.rent_paid)),
        obs.seed_params / max(1, obs.host_params),
        1.0 if obs.higher_is_better else -1.0,  # the sign of "better" for the metric features
        math.log10(max(1, obs.host_params)) / LOG_PARAMS_SCALE,
    ]


# ---------------------------------------------------------------------------------------------
# Per-slot features
# ---------------------------------------------------------------------------------------------


def _log10(x: float, lo: float, hi: float) -> float:
    return min(hi, max(lo, math.log10(max(x, 10.0**lo))))


def slot_features(s: SlotTelemetry, tick: int, host_params: int) -> list[float]:
    topology = [float(s.topology is t) for t in Topology]
    stage = [0.0] * len(Stage)
    stage[s.stage] = 1.0
    blueprint = [0.0] * (len(Blueprint) + 1)  # the last one: no seed
    blueprint[s.spec.blueprint if s.spec is not None else len(Blueprint)] = 1.0
    gate = -1.0 if s.gate_passed is None else float(s.gate_passed)
    if s.contribution is None:
        contribution, staleness, has = 0.0, 1.0, 0.0
    else:
        age = tick - s.contribution_tick if s.contribution_tick is not None else STALENESS_CAP
        contribution, has = s.contribution, 1.0
        staleness = min(max(age, 0), STALENESS_CAP) / STALENESS_CAP
    return [
        *topology,
        math.log2(max(1, s.channels)) / LOG_CHANNELS_SCALE,
        s.depth,
        *stage,
        s.alpha,
        s.alpha_target,
        s.alpha_ticks_left / ALPHA_TICKS_SCALE,
        min(s.ticks_in_stage, TICKS_IN_STAGE_CAP) / TICKS_IN_STAGE_CAP,
        _log10(s.seed_grad_norm, *LOG_GRAD_RANGE),
        _log10(s.host_grad_norm, *LOG_GRAD_RANGE),
        _log10(s.grad_ratio, *LOG_RATIO_RANGE),
        gate,
        contribution,
        staleness,
        has,
        s.param_count / max(1, host_params),
        *blueprint,
        s.rent,
    ]


def featurize(obs: Observation) -> tuple[torch.Tensor, torch.Tensor]:
    """(GLOBAL_DIM,) and (S, SLOT_DIM) float32 tensors; NaN/inf become finite numbers."""
    g = torch.tensor(global_features(obs), dtype=torch.float32)
    s = torch.tensor(
        [slot_features(x, obs.tick, obs.host_params) for x in obs.slots], dtype=torch.float32
    ).reshape(len(obs.slots), SLOT_DIM)
    return torch.nan_to_num(g, posinf=1e6, neginf=-1e6), torch.nan_to_num(
        s, posinf=1e6, neginf=-1e6
    )


class FeatureBatch(NamedTuple):
    """A batch of observations featurised, padded to its largest slot count."""

    g: torch.Tensor
    """(B, GLOBAL_DIM)"""
    s: torch.Tensor
    """(B, S, SLOT_DIM), S the batch's largest slot count; rows past an observation's own slots
    are zeros."""
    valid: torch.Tensor
    """(B, S) bool: True for an observation's own slots (a prefix of each row), False for
    padding, which `TamiyoNet` leaves out of its pooling and never picks."""


def featurize_batch(observations: Sequence[Observation]) -> FeatureBatch:
    """Every observation featurised; hosts with fewer slots are padded to the batch's largest
    slot count (a curriculum steps hosts of different sizes in lockstep)."""
    pairs = [featurize(o) for o in observations]
    counts = torch.tensor([s.shape[0] for _, s in pairs])
    n = int(counts.max())
    s = torch.stack([pad_slots(s[None], n)[0] for _, s in pairs])
    valid = torch.arange(n) < counts[:, None]  # (B, S)
    return FeatureBatch(torch.stack([g for g, _ in pairs]), s, valid)


def pad_slots(x: torch.Tensor, n: int) -> torch.Tensor:
    """`x` (B, S, ...) padded along the slot dimension to n >= S with zeros (False for bool)."""
    if x.shape[1] == n:
        return x
    out = x.new_zeros((x.shape[0], n, *x.shape[2:]))
    out[:, : x.shape[1]] = x
    return out


def stack_padded(xs: Sequence[torch.Tensor]) -> torch.Tensor:
    """(B, S_i, ...) tensors stacked to (len, B, max S_i, ...), each padded by `pad_slots`."""
    n = max(x.shape[1] for x in xs)
    return torch.stack([pad_slots(x, n) for x in xs])


# ---------------------------------------------------------------------------------------------
# Running normalisation (saved with the policy)
# ---------------------------------------------------------------------------------------------


class RunningNormalizer:
    """Per-column running mean and variance, `(x − mean) / sqrt(var + eps)` clipped to ±clip.

    Batches are merged with Chan et al.'s parallel form of Welford's update, so the statistics
    equal the population mean and variance (ddof=0) of every row seen. Kept in float64.
    """

    def __init__(self, dim: int, clip: float = 5.0, eps: float = 1e-8) -> None:
        self.dim, self.clip, self.eps = dim, clip, eps
        self.mean = torch.zeros(dim, dtype=torch.float64)
        self.var = torch.ones(dim, dtype=torch.float64)
        self.count = torch.zeros((), dtype=torch.float64)

    def update(self, x: torch.Tensor) -> None:
        """Fold in the rows of `x` (..., dim)."""
        x = x.detach().reshape(-1, self.dim).to(torch.float64)
        n = x.shape[0]
        if n == 0:
            return
        batch_mean, batch_var = x.mean(0), x.var(0, unbiased=False)
        total = self.count + n
        delta = batch_mean - self.mean
        m2 = self.var * self.count + batch_var * n + delta.square() * self.count * n / total
        self.mean = self.mean + delta * n / total
        self.var = m2 / total
        self.count = total

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        z = (x.to(torch.float64) - self.mean) / torch.sqrt(self.var + self.eps)
        return z.clamp(-self.clip, self.clip).to(x.dtype)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"mean": self.mean.clone(), "var": self.var.clone(), "count": self.count.clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        mean = torch.as_tensor(state["mean"], dtype=torch.float64)
        if mean.shape != (self.dim,):
            raise ValueError(
                f"normalizer stats have shape {tuple(mean.shape)}, expected ({self.dim},)"
            )
        self.mean = mean.clone()
        self.var = torch.as_tensor(state["var"], dtype=torch.float64).clone()
        self.count = torch.as_tensor(state["count"], dtype=torch.float64).clone()
