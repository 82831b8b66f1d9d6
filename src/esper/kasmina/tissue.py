"""Tissue: the phages Emrakul can act on, unit by unit (paper §9.1–9.3, §9.7).

Two kinds. A committed seed (its slot's `Phage`, custody passed to Emrakul at commit), and a host
block marked as a phage (`mark_phage`; `mark_host_phages` marks every residual block of a built-in
host, which `esper grow --decay` does at build time). A host `Residual` block already has the
phage's form, y = h + branch(h), with the branch's hidden units behind a `UnitMask`; marking it
(rather than rewrapping it in a `Phage` module) keeps its module path, which the residual
stream's sites and the checkpoints name.

Who may do what is the authority table's, with host tissue in stage COMMITTED from birth:
Emrakul SEDATEs, WEAKENs and LIFTs; the engine lifts on a panic, folds and lyses.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from esper.contracts import Actor, Op, Scope, Stage
from esper.contracts.lifecycle import check
from esper.kasmina.blueprints import CausalSelfAttention
from esper.kasmina.channels import readers_free, stream_groups
from esper.kasmina.hosts import Residual, slots_of
from esper.kasmina.lysis import UnitMask
from esper.kasmina.phage import LysisError, remove_sedated_units
from esper.kasmina.slot import SeedSlot

PHAGE_MARK = "esper_phage"
"""Attribute naming a module marked as host phage tissue."""

_UNIT_PARAMS: dict[tuple[int, int, int], int] = {}


def mark_phage(module: nn.Module, name: str) -> nn.Module:
    """Opt a block of any model into decay. The block (or, for a `Residual`, its branch) must
    have lysable units: a `unit_mask` (`esper.kasmina.UnitMask`) between the layer that makes its
    hidden units and the one layer that consumes them, and `remove_units(keep)`, as the built-in
    blueprints do (`HiddenUnits`, `CausalSelfAttention`)."""
    target = units_module(module)
    if target is None:
        raise LysisError(
            f"{name!r} ({type(module).__name__}) has no lysable units: give it a unit_mask "
            "(UnitMask) and remove_units(keep), e.g. build it from esper.kasmina.HiddenUnits"
        )
    setattr(module, PHAGE_MARK, name)
    return module


def mark_host_phages(model: nn.Module) -> list[str]:
    """Mark every `Residual` block of `model` whose branch has lysable units; their paths."""
    marked = []
    for path, module in model.named_modules():
        if isinstance(module, Residual) and units_module(module) is not None:
            mark_phage(module, path)
            marked.append(path)
    return marked


def units_module(module: nn.Module) -> nn.Module | None:
    target = module.branch if isinstance(module, Residual) else module
    ok = isinstance(getattr(target, "unit_mask", None), UnitMask)
    return target if ok and hasattr(target, "remove_units") else None


@dataclass(frozen=True)
class Tissue:
    """One phage, as Emrakul and the engine address it."""

    name: str
    kind: str
    """"host" or "seed"."""
    module: nn.Module
    """The module with the units (`unit_mask`, `remove_units`)."""
    slot: SeedSlot | None = None

    @property
    def scope(self) -> Scope:
        head = isinstance(self.module, CausalSelfAttention)
        return Scope.HEAD if head else Scope.CHANNEL_SLICE

    @property
    def mask(self) -> UnitMask:
        return self.module.unit_mask

    @property
    def units(self) -> int:
        return self.mask.units

    def values(self) -> list[float]:
        """Every unit's mask value (1 active, 0 sedated, between: weakened), read at once."""
        return self.mask.mask.tolist()

    def unit_params(self) -> int:
        """Parameters one unit's lysis removes (every unit of a phage costs the same)."""
        if self.units == 0:
            return 0
        if hasattr(self.module, "unit_params"):  # a stream group prices its own channel
            return self.module.unit_params()
        key = (id(self.module), self.units, sum(p.numel() for p in self.module.parameters()))
        if key not in _UNIT_PARAMS:
            probe = copy.deepcopy(self.module)
            before = sum(p.numel() for p in probe.parameters())
            probe.remove_units(torch.arange(1, self.units))
            _UNIT_PARAMS[key] = before - sum(p.numel() for p in probe.parameters())
        return _UNIT_PARAMS[key]

    # -- acts ----------------------------------------------------------------------------------
    def set(self, units: list[int], value: float, actor: Actor) -> None:
        """SEDATE (0), WEAKEN (0 < value < 1) or LIFT (1) `units`, as `actor` (checked)."""
        op = Op.LIFT if value == 1.0 else Op.SEDATE if value == 0.0 else Op.WEAKEN
        self._check(actor, op)
        self._check_units(units)
        self.mask.set(units, value)

    def fold(self, units: list[int], actor: Actor = Actor.TOLARIA) -> None:
        """Fold the (weakened) mask values of `units` into the weights and reset them to 1:
        the same function, no mask left to apply."""
        self._check(actor, Op.LYSE)
        self._check_units(units)
        values = self.values()
        for u in units:
            if values[u] != 1.0:
                self.module.fold_unit_scale_([u], values[u])
                self.mask.set([u], 1.0)

    def lyse(self, units: list[int], actor: Actor = Actor.TOLARIA) -> int:
        """Physically remove fully sedated `units` (the engine's only); parameters removed."""
        self._check(actor, Op.LYSE)
        self._check_units(units)
        return remove_sedated_units(self.module, units, repr(self.name))

    def _check(self, actor: Actor, op: Op) -> None:
        check(self.name, self.slot.stage if self.slot else Stage.COMMITTED, actor, op)

    def _check_units(self, units: list[int]) -> None:
        bad = [u for u in units if not 0 <= u < self.units]
        if bad:
            raise LysisError(f"{self.name!r}: units {bad} out of range 0..{self.units - 1}")


def group_name(index: int) -> str:
    """The phage name of committed widening `index`'s channels."""
    return f"stream.w{index}"


def marked_blocks(model: nn.Module) -> Iterator[tuple[str, str, nn.Module]]:
    """(module path, phage name, the module with the units) of every block marked as a phage."""
    for path, module in model.named_modules():
        name = getattr(module, PHAGE_MARK, None)
        target = units_module(module) if name else None
        if target is not None:
            yield path, name, target


def tissue_of(model: nn.Module, *, read_by_seeds: bool = False) -> dict[str, Tissue]:
    """Every phage of `model` with units left, by name: marked host blocks, the channels of
    committed widenings that no seed reads (`stream.w<i>`, `kasmina.channels`; those read too
    with `read_by_seeds`, for the engine to lift their masks), then committed seeds (not one
    being lysed)."""
    found = {
        name: Tissue(name, "host", target)
        for _, name, target in marked_blocks(model)
        if target.unit_mask.units
    }
    for group in stream_groups(model):
        if group.units and (read_by_seeds or readers_free(model, group)):
            found[group_name(group.index)] = Tissue(group_name(group.index), "host", group)
    for name, slot in slots_of(model).items():
        phage = slot.phage
        if slot.stage is not Stage.COMMITTED or phage is None or phage.fade is not None:
            continue
        target = units_module(phage.module) if phage.module is not None else None
        if target is not None and target.unit_mask.units:
            found[name] = Tissue(name, "seed", target, slot)
    return found
