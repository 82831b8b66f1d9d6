"""Phage: the light wrapper for committed seeds and host infrastructure (paper §9.2–9.3, §9.7).

y = h + [sedation] · δ(h, m(h)). No α: a phage runs at effective α = 1. Emrakul gates it with a
sedation mask, over the wrapped module's hidden units (channels, heads, LoRA ranks) or over the
whole module, and the governor reclaims fully sedated units with `physical_lysis`, which deletes
their weights so parameters and FLOPs really drop while the function stays the sedated one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from esper.kasmina.blend import Blend
from esper.kasmina.lysis import UnitMask

Target = int | Sequence[int] | Literal["module"]

SEDATE = 0.0
"""Mask value of a sedated target; WEAKEN uses a factor in (0, 1)."""


class LysisError(ValueError):
    """A sedation or lysis request the phage cannot honour."""


@dataclass
class PhageROI:
    """Return on investment: filled by the engine (contribution) and Simic (rent)."""

    contribution: float | None = None
    rent: float | None = None

    @property
    def roi(self) -> float | None:
        if self.contribution is None or self.rent is None:
            return None
        return self.contribution - self.rent


class Phage(nn.Module):
    """Wraps `module` (a committed seed, or a host residual branch) as y = h + δ(h, module(h))."""

    def __init__(self, module: nn.Module, blend: Blend | None = None, name: str = "phage") -> None:
        super().__init__()
        self.name = name
        self.module: nn.Module | None = module
        self.blend = blend
        self.register_buffer("sedation", torch.ones(()))
        self.module_sedated = False
        self.roi = PhageROI()
        # (ticks elapsed, ticks total, starting sedation) of schedule_prune
        self.fade: tuple[int, int, float] | None = None

    # -- forward ---------------------------------------------------------------------------
    def forward(self, h: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
        """`scale`: optional per-sample (B,) multiplier on the contribution (fused ablation)."""
        if self.module is None:  # the whole module was lysed
            return h
        s = self.module(h)
        d = s if self.blend is None else self.blend.delta(h, s, h)
        if self.module_sedated:
            d = d * self.sedation
        if scale is not None:
            d = d * scale.view(-1, *([1] * (h.dim() - 1))).to(d.dtype)
        return h + d

    # -- inventory -------------------------------------------------------------------------
    @property
    def units(self) -> int:
        mask = _mask_of(self.module)
        return 0 if mask is None else mask.units

    def param_count(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def unit_mask_values(self) -> list[float]:
        mask = _mask_of(self.module)
        return [] if mask is None else mask.mask.tolist()

    # -- sedation (Emrakul; soft and reversible) -------------------------------------------
    def apply_sedation_mask(self, target: Target, value: float = SEDATE) -> None:
        """SEDATE (value 0) or WEAKEN (0 < value < 1) a set of units or the whole module."""
        if not 0.0 <= value <= 1.0:
            raise LysisError(f"phage {self.name!r}: sedation value must lie in [0, 1], got {value}")
        if target == "module":
            self.sedation.fill_(value)
            self.module_sedated = value != 1.0
            return
        self._lysable().unit_mask.set(self._units(target), value)

    def lift(self, target: Target) -> None:
        """Lift the sedation of `target` (the "wake up" interrupt)."""
        self.apply_sedation_mask(target, 1.0)

    # -- lysis (governor, at a safe boundary) ----------------------------------------------
    def physical_lysis(self, target: Target) -> int:
        """Delete fully sedated `target`; returns the number of parameters removed."""
        if target == "module":
            before = self.param_count()
            if not self.module_sedated or float(self.sedation) != 0.0:
                raise LysisError(f"phage {self.name!r}: sedate the module fully before lysis")
            self.module, self.blend, self.module_sedated = None, None, False
            return before
        return remove_sedated_units(self._lysable(), self._units(target), f"phage {self.name!r}")

    # -- controlled fade (§9.2 schedule_prune) ---------------------------------------------
    def schedule_prune(self, ticks: int) -> None:
        """Fade the whole module out linearly over `ticks` ticks (0: at once), from its current
        module sedation (a weakened module fades from there, so the output never jumps)."""
        start = float(self.sedation) if self.module_sedated else 1.0
        self.fade = (0, ticks, start)
        self.apply_sedation_mask("module", 0.0 if ticks == 0 else start)

    def tick(self) -> bool:
        """Advance a scheduled fade; True once the module is fully faded (or none is scheduled)."""
        if self.fade is None:
            return True
        done, total, start = self.fade
        done = min(done + 1, total)
        self.fade = (done, total, start)
        self.apply_sedation_mask("module", start * (1.0 - done / total) if total else 0.0)
        return done >= total

    # -- helpers ---------------------------------------------------------------------------
    def _lysable(self) -> nn.Module:
        m = self.module
        if _mask_of(m) is None:
            kind = "nothing (lysed)" if m is None else type(m).__name__
            raise LysisError(
                f"phage {self.name!r} wraps {kind}, which has no sedatable units; "
                "target 'module' instead"
            )
        return m

    def _units(self, target: int | Sequence[int]) -> list[int]:
        units = [target] if isinstance(target, int) else list(target)
        n = self._lysable().unit_mask.units
        bad = [u for u in units if not 0 <= u < n]
        if bad:
            raise LysisError(f"phage {self.name!r}: units {bad} out of range 0..{n - 1}")
        return units


def remove_sedated_units(module: nn.Module, units: Sequence[int], who: str) -> int:
    """Remove `units` of `module` (which has a `unit_mask` and `remove_units`), all of which must
    be sedated to 0: the function is unchanged. Returns the number of parameters removed."""
    values = module.unit_mask.mask.tolist()  # one read of the mask, not one per unit
    live = [u for u in units if values[u] != 0.0]
    if live:
        raise LysisError(
            f"{who}: units {live} are not fully sedated; only sedated units can be lysed"
        )
    before = sum(p.numel() for p in module.parameters())
    gone = set(units)
    keep = [u for u in range(len(values)) if u not in gone]
    module.remove_units(torch.tensor(keep, dtype=torch.long, device=module.unit_mask.mask.device))
    return before - sum(p.numel() for p in module.parameters())


def _mask_of(module: nn.Module | None) -> UnitMask | None:
    """The module's unit mask, if it has sedatable units."""
    return getattr(module, "unit_mask", None)
