"""SeedSlots in a user's own module: `insert_slots` puts one on the output of named submodules.

A point is safe when it runs exactly once per forward and its output (or the element of it a
selector names) is a feature tensor of 2, 3 or 4 dims. Both are checked on one traced probe
forward of the user's example input (`probing`: eval mode, no gradients, buffers untouched):

- a module the forward calls twice (a torchvision block's one `nn.ReLU` applied after both
  convolutions, a shared layer) is refused, naming the calls: one seed fed two different tensors
  would learn neither;
- a tuple, list or dict output (a Hugging Face attention block returns `(hidden, weights)`, a
  model returns a `ModelOutput`) needs a selector, `select={point: index_or_key}`; without one it
  is refused with the output's structure and the nearby points whose output is a tensor.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from esper.contracts import LifecycleConfig, Topology
from esper.contracts.errors import EsperError
from esper.kasmina.probe import probing
from esper.kasmina.slot import GateConfig, SeedSlot

Selector = int | str
"""Which element of a point's output a slot acts on: a tuple/list index or a mapping key."""


class InsertionError(EsperError, ValueError):
    """A point cannot hold a slot: it runs more than once per forward, never runs, or its output
    is not a feature tensor (and no valid selector says which part of it is)."""


_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
_NEARBY = 8  # points suggested in an error message


@dataclass(frozen=True)
class _Call:
    caller: str
    """The innermost module running when the point was called ('' for the model itself)."""
    output: Any


def _trace(model: nn.Module, example_input: torch.Tensor) -> dict[str, list[_Call]]:
    """Every module's calls in one probe forward of `example_input`, by path."""
    names = {m: n for n, m in model.named_modules()}
    calls: dict[str, list[_Call]] = defaultdict(list)
    stack: list[str] = []

    def enter(m: nn.Module, args: Any) -> None:
        stack.append(names[m])

    def leave(m: nn.Module, args: Any, out: Any) -> None:
        stack.pop()
        calls[names[m]].append(_Call(stack[-1] if stack else "", out))

    handles = [m.register_forward_pre_hook(enter) for m in names]
    handles += [m.register_forward_hook(leave, always_call=True) for m in names]
    try:
        with probing(model):
            model(example_input)
    finally:
        for h in handles:
            h.remove()
    return calls


def describe(value: Any, depth: int = 2) -> str:
    """A short structural description of a module output: tensors by shape, containers by
    their elements (index or key), anything else by type."""
    if isinstance(value, torch.Tensor):
        return f"Tensor{tuple(value.shape)}"
    if value is None:
        return "None"
    if isinstance(value, Mapping | tuple | list) and depth > 0:
        items = value.items() if isinstance(value, Mapping) else enumerate(value)
        inner = ", ".join(f"{k!r}: {describe(v, depth - 1)}" for k, v in items)
        return f"{type(value).__name__}({inner})"
    return type(value).__name__


def _is_feature(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.dim() in (2, 3, 4)


def _nearby(point: str, calls: dict[str, list[_Call]]) -> list[str]:
    """Points around `point` (its layers, its siblings, its ancestors) that run once and output
    a feature tensor: what an error message can suggest instead."""
    parent = point.rpartition(".")[0]

    def rank(name: str) -> int | None:
        if name.startswith(point + "."):
            return 0  # inside the point
        if name.rpartition(".")[0] == parent and name != point:
            return 1  # a sibling
        if point.startswith(name + ".") and name:
            return 2  # an ancestor
        return None

    good = [
        (r, n)
        for n, c in calls.items()
        if (r := rank(n)) is not None and len(c) == 1 and _is_feature(c[0].output)
    ]
    return [n for _, n in sorted(good)][:_NEARBY]


def _suggest(point: str, calls: dict[str, list[_Call]]) -> str:
    near = _nearby(point, calls)
    return f"; nearby points that run once with a tensor output: {near}" if near else ""


def _select(point: str, out: Any, select: Selector | None, calls: dict[str, list[_Call]]) -> Any:
    """The feature tensor the slot at `point` acts on, or an InsertionError saying why not."""
    if select is None:
        if _is_feature(out):
            return out
        if isinstance(out, torch.Tensor):
            raise InsertionError(
                f"cannot place a slot on {point!r}: its output is {describe(out)}, a slot needs "
                f"a 2-, 3- or 4-d feature tensor{_suggest(point, calls)}"
            )
        raise InsertionError(
            f"the output of {point!r} is {describe(out)}, not a tensor: say which element the "
            f"slot acts on with select={{{point!r}: <index or key>}}{_suggest(point, calls)}"
        )
    try:
        chosen = _get(out, select)
    except (KeyError, IndexError, TypeError):
        raise InsertionError(
            f"select={select!r} for {point!r} does not name an element of its output "
            f"{describe(out)}"
        ) from None
    if not _is_feature(chosen):
        raise InsertionError(
            f"select={select!r} for {point!r} picks {describe(chosen)} from {describe(out)}; a "
            "slot needs a 2-, 3- or 4-d feature tensor"
        )
    return chosen


def _get(out: Any, select: Selector) -> Any:
    if isinstance(select, int) and isinstance(out, tuple | list):
        return out[select]
    if isinstance(select, str) and isinstance(out, Mapping):
        return out[select]
    raise TypeError(select)


def _replace(out: Any, select: Selector, value: torch.Tensor) -> Any:
    """`out` with its element `select` replaced by `value` (a mapping is updated in place: a
    module's output is a fresh object per call)."""
    if isinstance(out, tuple):
        k = select if select >= 0 else len(out) + select  # type: ignore[operator]
        items = (*out[:k], value, *out[k + 1 :])
        return type(out)(*items) if hasattr(out, "_fields") else items  # a namedtuple stays one
    if isinstance(out, list):
        out = list(out)
        out[select] = value  # type: ignore[index]
        return out
    assert isinstance(out, MutableMapping)
    out[select] = value
    return out


def _hook(slot: SeedSlot, select: Selector | None) -> Callable[[nn.Module, Any, Any], Any]:
    if select is None:
        return lambda m, i, out: slot(out)
    return lambda m, i, out: _replace(out, select, slot(_get(out, select)))


def _topology_of(t: torch.Tensor) -> tuple[Topology, int]:
    if t.dim() == 4:
        return Topology.CNN, t.shape[1]
    if t.dim() == 3:
        return Topology.SEQ, t.shape[2]
    return Topology.VEC, t.shape[1]


def _slot_home(modules: dict[str, nn.Module], point: str) -> nn.Module:
    """A module that can own the slot of `point` without its forward ever calling the slot."""
    parent = point.rpartition(".")[0]
    ancestors = [parent, point]
    while parent:
        parent = parent.rpartition(".")[0]
        ancestors.append(parent)
    inside = list(modules[point].modules())
    for m in [*(modules[a] for a in ancestors), *inside]:
        if not isinstance(m, _CONTAINERS):
            return m
    raise InsertionError(
        f"cannot hold a slot for {point!r}: it, its ancestors and its layers are all "
        "containers (nn.Sequential/ModuleList/ModuleDict)"
    )


def _check_once(point: str, calls: dict[str, list[_Call]]) -> Any:
    """The point's one output; an InsertionError naming the calls when it runs 0 or > 1 times."""
    mine = calls.get(point, [])
    if not mine:
        raise InsertionError(
            f"{point!r} never runs in a forward of the example input: a slot on it would never "
            "see a tensor"
        )
    if len(mine) > 1:
        listed = "; ".join(
            f"call {i} from {c.caller or '<model>'!r} returns {describe(c.output)}"
            for i, c in enumerate(mine, start=1)
        )
        raise InsertionError(
            f"{point!r} runs {len(mine)} times in one forward ({listed}): one slot there would "
            f"put every call's tensor through one seed. Choose a point that runs once"
            f"{_suggest(point, calls)}"
        )
    return mine[0].output


def insert_slots(
    model: nn.Module,
    points: Sequence[str],
    example_input: torch.Tensor,
    *,
    select: Mapping[str, Selector] | None = None,
    lifecycle: LifecycleConfig | None = None,
    gate: GateConfig | None = None,
) -> dict[str, SeedSlot]:
    """Put a SeedSlot on the output of each named submodule of a user's model.

    The slot is applied by a forward hook on the point and stored as a child `<point>_slot`
    (dots as underscores) of the point's parent, so the user's own state-dict keys do not change.
    A container parent (nn.Sequential runs every child; a user's loop over an nn.ModuleList
    would too) cannot hold it: then the point itself, a further ancestor or, last, a layer inside
    the point does. Channels and topology are read off one probe forward of `example_input` (a
    batch the model accepts), which also checks that each point runs once and outputs a feature
    tensor. `select` maps a point whose output is a tuple/list (index) or a dict/`ModelOutput`
    (key) to the element its slot acts on; the rest of the output passes through unchanged.
    """
    modules = dict(model.named_modules())
    missing = [p for p in points if p not in modules or not p]
    if missing:
        raise KeyError(
            f"no submodule named {missing}; some valid points: {[n for n in modules if n][:12]}"
        )
    select = dict(select or {})
    unknown = sorted(set(select) - set(points))
    if unknown:
        raise InsertionError(f"select names {unknown}, which are not among the points {points}")
    calls = _trace(model, example_input)
    features = {p: _select(p, _check_once(p, calls), select.get(p), calls) for p in points}
    slots = {}
    for p in points:
        topology, channels = _topology_of(features[p])
        slot = SeedSlot(channels, topology, p, lifecycle=lifecycle, gate=gate)
        slot.to(features[p].device)
        _slot_home(modules, p).add_module(f"{p.replace('.', '_')}_slot", slot)
        modules[p].register_forward_hook(_hook(slot, select.get(p)))
        slots[p] = slot
    return slots
