"""One typed config per job. `GrowConfig` is the whole of `esper grow`; every default lives here
(and `TrainPolicyConfig`, in `esper.train_policy`, is `esper train-policy`, loaded the same way).

Config files are TOML whose tables mirror the nested dataclasses (`[env]`, `[economy]`,
`[governor]`, `[heuristic]`, `[lifecycle]`, `[host]`, `[lysis]`, `[emrakul]`, `[zones]` with its
`[[zones.zone]]` list); an unknown key is an error naming it. A zone file (`esper grow --zones`)
is the `[zones]` table on its own: `window`, `[narset]` and `[[zone]]` tables.
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from esper.contracts import LifecycleConfig
from esper.contracts.errors import ConfigError
from esper.contracts.zones import ZonesConfig
from esper.emrakul import DECAY_POLICIES, EmrakulConfig
from esper.simic import EconomyConfig
from esper.tamiyo.policies import HeuristicConfig
from esper.tolaria.environment import EnvConfig
from esper.tolaria.governor import GovernorConfig
from esper.tolaria.lysis import LysisConfig

HOST_KINDS = ("auto", "cnn", "mlp", "transformer")
C = TypeVar("C")


@dataclass(frozen=True)
class HostConfig:
    """The reference host built for a built-in task."""

    kind: str = "auto"
    """cnn, mlp or transformer; auto: cnn for images, transformer for text, mlp for vectors."""
    width: int = 2
    """Channels of the CNN (2 is the impaired host), hidden width of the MLP, d_model of the
    transformer (auto-raised to 64 for text when left at 2)."""
    depth: int = 3
    """Residual blocks (CNN, MLP) or layers (transformer)."""
    heads: int = 4
    """Attention heads of the transformer (its d_model must divide by them)."""
    hidden: int = 0
    """CNN: each residual branch's width (0: 2·width)."""
    narrow: tuple[int, ...] = ()
    """CNN: [first, last] blocks whose residual branch is 1 wide instead (a bottleneck in one
    part of the host, e.g. one zone: bench/zones.py)."""

    def __post_init__(self) -> None:
        if self.kind not in HOST_KINDS:
            raise ConfigError(
                f"host.kind must be one of {', '.join(HOST_KINDS)}, got {self.kind!r}"
            )
        if (self.hidden or self.narrow) and self.kind not in ("cnn", "auto"):
            raise ConfigError("host.hidden and host.narrow shape the CNN host only")
        if self.narrow and (
            len(self.narrow) != 2 or not 0 <= self.narrow[0] <= self.narrow[1] < self.depth
        ):
            raise ConfigError(
                f"host.narrow must be [first, last] blocks below depth {self.depth}, "
                f"got {list(self.narrow)}"
            )
        if self.hidden < 0:
            raise ConfigError(f"host.hidden must be >= 0, got {self.hidden}")
        if self.width < 1 or self.depth < 1 or self.heads < 1:
            raise ConfigError(
                "host.width, host.depth and host.heads must be >= 1, got "
                f"{self.width}, {self.depth}, {self.heads}"
            )


@dataclass(frozen=True)
class GrowConfig:
    """Everything one growth run needs."""

    task: str = "digits"
    """digits, text, cifar10, or a vector task: breast_cancer, wine, iris, synthetic-easy,
    synthetic-hard (`esper.tolaria.data`)."""
    policy: str = "heuristic"
    """heuristic, random, none, learned (the shipped PPO policy), or a trained policy file."""
    decay: str = "none"
    """The decay policy (Emrakul): none, or heuristic (host blocks become phages at build time;
    ROI telemetry, sedation, the LysisGovernor and lysis run in every tick). Off by default: on
    digits it reclaims a fifth of an over-provisioned host at no accuracy cost but triples a
    run's wall time (bench/RESULTS.md, "Decay")."""
    sample_actions: bool = False
    """A learned policy samples its actions (seeded by `seed`), as in training, instead of
    taking the most probable one of each head."""
    ticks: int = 40
    """Control ticks in the run."""
    seed: int = 0
    """Seeds the host init, data order, policy and every RNG."""
    device: str = "auto"
    """auto (CUDA when present), cpu, cuda, cuda:N."""
    out: str = "runs"
    """Directory under which run directories are created."""
    data_dir: str | None = None
    """Folder holding CIFAR-10 files (cifar10 only)."""
    checkpoint_every: int = 5
    """Write a resumable checkpoint every this many ticks (and at the end)."""
    host: HostConfig = field(default_factory=HostConfig)
    env: EnvConfig = field(default_factory=EnvConfig)
    economy: EconomyConfig = field(default_factory=EconomyConfig)
    governor: GovernorConfig = field(default_factory=GovernorConfig)
    heuristic: HeuristicConfig = field(default_factory=HeuristicConfig)
    lifecycle: LifecycleConfig = field(default_factory=LifecycleConfig)
    lysis: LysisConfig = field(default_factory=LysisConfig)
    emrakul: EmrakulConfig = field(default_factory=EmrakulConfig)
    zones: ZonesConfig = field(default_factory=ZonesConfig)
    """Zones (paper §9.6): a Tamiyo–Emrakul pair per zone under per-zone budgets, set by Narset
    every window. None by default: one global pair."""

    def __post_init__(self) -> None:
        if self.decay not in DECAY_POLICIES:
            raise ConfigError(
                f"decay must be one of {', '.join(DECAY_POLICIES)}, got {self.decay!r}"
            )
        if self.ticks < 1:
            raise ConfigError(f"ticks must be >= 1, got {self.ticks}")
        if self.checkpoint_every < 1:
            raise ConfigError(f"checkpoint_every must be >= 1, got {self.checkpoint_every}")


def _build(cls: type, data: dict[str, Any], where: str) -> Any:
    """Instantiate dataclass `cls` from `data`, strictly: unknown keys are errors."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        key = f"{where}.{unknown[0]}" if where else unknown[0]
        table = f" in [{where}]" if where else ""
        raise ConfigError(
            f"unknown config key {key!r}; valid keys{table}: {', '.join(sorted(names))}"
        )
    kwargs = {}
    for name, value in data.items():
        hint = hints[name]
        sub = f"{where}.{name}" if where else name
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                raise ConfigError(f"config key {sub!r} must be a table")
            kwargs[name] = _build(hint, value, sub)
        else:
            kwargs[name] = _typed(value, hint, sub)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"invalid config{' [' + where + ']' if where else ''}: {e}") from None


_SCALARS: dict[type, Any] = {
    bool: lambda v: isinstance(v, bool),
    int: lambda v: isinstance(v, int) and not isinstance(v, bool),
    float: lambda v: isinstance(v, int | float) and not isinstance(v, bool),
    str: lambda v: isinstance(v, str),
}


def _typed(value: Any, hint: Any, key: str) -> Any:
    """`value` checked against the field's type (int, float, bool, str, X | None, tuple[X, ...]);
    ints are accepted for floats (TOML writes `lr = 1`). Other hints pass through."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        rest = [a for a in args if a is not type(None)]
        if len(rest) != 1:
            return value
        hint, args = rest[0], typing.get_args(rest[0])
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(f"config key {key!r} must be a table")
        return _build(hint, value, key)  # type: ignore[arg-type]
    if typing.get_origin(hint) is tuple and len(args) == 2 and args[1] is Ellipsis:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"config key {key!r} must be a list, got {value!r}")
        return tuple(_typed(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
    check = _SCALARS.get(hint)
    if check is None:
        return value
    if not check(value):
        raise ConfigError(f"config key {key!r} must be {hint.__name__}, got {value!r}")
    return float(value) if hint is float else value


def config_from_dict(data: dict[str, Any], cls: type[C] = GrowConfig) -> C:  # type: ignore[assignment]
    """A `cls` (any job's config dataclass) from nested dicts, strictly."""
    return _build(cls, data, "")


def load_config(path: str | Path, cls: type[C] = GrowConfig) -> C:  # type: ignore[assignment]
    """A `cls` from a TOML file whose tables mirror its nested dataclasses."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except OSError as e:
        raise ConfigError(f"config file {path} cannot be read: {e}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path} is not valid TOML: {e}") from None
    return config_from_dict(data, cls)


def config_to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def override(cfg: C, **changes: Any) -> C:
    """`cfg` (any job's config) with the non-None `changes` applied (dotted keys reach into
    tables), checked as strictly as a config file."""
    data = config_to_dict(cfg)
    for key, value in changes.items():
        if value is None:
            continue
        *path, last = key.split(".")
        node = data
        for i, part in enumerate(path):
            if not isinstance(node.get(part), dict):
                raise ConfigError(
                    f"unknown config table {'.'.join(path[: i + 1])!r} in override {key!r}"
                )
            node = node[part]
        node[last] = value
    return config_from_dict(data, type(cfg))
