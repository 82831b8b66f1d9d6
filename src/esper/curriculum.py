"""A curriculum of environments for `esper train-policy`: families of hosts and tasks.

A policy trained on one host and one task learns that protocol, not growth (paper §10: diversity
is not optional). A curriculum is a list of families, each a task, a host (kind, widths, depths)
and an episode budget; every training episode draws a family in proportion to its `weight`,
then a width and a depth from the family's lists. In a TOML file it is an array of tables:

    [[curriculum]]
    name = "mlp-cancer"
    task = "breast_cancer"
    host = { kind = "mlp", width = 16 }
    depths = [2, 3]

Whatever a family leaves unset comes from the training job's `[episode]` (seed, economy,
governor, device, ...): see `Family.episode`.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from esper.config import GrowConfig, HostConfig
from esper.contracts.errors import ConfigError
from esper.tolaria.data import TASK_NAMES, VECTOR_TASKS
from esper.tolaria.environment import EnvConfig

# Host kinds each kind of task can be given (a CNN cannot read vectors, an MLP cannot read text).
_HOSTS_FOR = {"text": ("auto", "transformer"), **{t: ("auto", "mlp") for t in VECTOR_TASKS}}


@dataclass(frozen=True)
class Family:
    """One family of training episodes: a task, a host, a budget, and how often it is drawn."""

    name: str = ""
    """Names the family in errors and in the docs of the config file (required)."""
    weight: float = 1.0
    """Families are drawn in proportion to their weights (> 0)."""
    task: str = "digits"
    """A built-in task (`esper.tolaria.data.TASK_NAMES`)."""
    host: HostConfig = field(default_factory=HostConfig)
    """The host (kind auto: CNN for images, transformer for text, MLP for vectors)."""
    widths: tuple[int, ...] = ()
    """Host widths drawn uniformly per episode (empty: `host.width`)."""
    depths: tuple[int, ...] = ()
    """Host depths drawn uniformly per episode (empty: `host.depth`); the slot count follows."""
    ticks: int | None = None
    """Episode length in control ticks (None: the `[episode]`'s)."""
    env: EnvConfig | None = None
    """The environment, e.g. `env = { batches_per_tick = 4 }` to keep an episode cheap; keys
    left out take EnvConfig's defaults, not `[episode.env]`'s (None: `[episode.env]`)."""

    def __post_init__(self) -> None:
        if not self.name:
            raise ConfigError("every curriculum family needs a name")
        where = f"curriculum family {self.name!r}"
        if not (self.weight > 0 and math.isfinite(self.weight)):
            raise ConfigError(f"{where}: weight must be > 0, got {self.weight}")
        if self.task not in TASK_NAMES:
            raise ConfigError(
                f"{where}: unknown task {self.task!r}; valid tasks: {', '.join(TASK_NAMES)}"
            )
        kinds = _HOSTS_FOR.get(self.task, ("auto", "cnn", "mlp"))
        if self.host.kind not in kinds:
            raise ConfigError(
                f"{where}: host.kind {self.host.kind!r} cannot run task {self.task!r} "
                f"(valid: {', '.join(kinds)})"
            )
        for key in ("widths", "depths"):
            if min(getattr(self, key), default=1) < 1:
                raise ConfigError(f"{where}: {key} must be >= 1, got {list(getattr(self, key))}")
        if self.ticks is not None and self.ticks < 1:
            raise ConfigError(f"{where}: ticks must be >= 1, got {self.ticks}")

    def episode(self, base: GrowConfig, seed: int, rng: random.Random) -> GrowConfig:
        """`base` (the job's `[episode]`) made into one of this family's episodes, on `seed`,
        with a width and a depth drawn by `rng`."""
        width = rng.choice(self.widths) if self.widths else self.host.width
        depth = rng.choice(self.depths) if self.depths else self.host.depth
        return replace(
            base,
            task=self.task,
            seed=seed,
            host=replace(self.host, width=width, depth=depth),
            ticks=self.ticks if self.ticks is not None else base.ticks,
            env=self.env if self.env is not None else base.env,
        )


def check_curriculum(families: Sequence[Family]) -> None:
    names = [f.name for f in families]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ConfigError(f"curriculum family names must be unique; repeated: {repeated}")


def draw_family(families: Sequence[Family], rng: random.Random) -> Family:
    """A family, drawn in proportion to the weights."""
    return rng.choices(families, weights=[f.weight for f in families])[0]


def mean_ticks(families: Sequence[Family], base: GrowConfig) -> float:
    """The expected episode length (ticks) of a draw from `families` (`base.ticks` if none)."""
    if not families:
        return float(base.ticks)
    total = sum(f.weight for f in families)
    return sum(f.weight * (f.ticks or base.ticks) for f in families) / total
