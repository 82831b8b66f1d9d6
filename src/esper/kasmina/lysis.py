"""Lysable units: the channels or heads a phage can sedate and later physically remove (§9.3, §9.7).

A lysable module computes some independent hidden units (channels, LoRA ranks, attention heads)
and consumes them with one output layer. A `UnitMask` sits exactly between the two, so that a
unit sedated to 0 contributes nothing downstream, and deleting that unit's producer rows and
consumer columns (`remove_units`) yields the same function with fewer parameters. Nothing between
the mask and the consumer may mix units (no norm over hidden channels there): that is what makes
physical lysis exact.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

Slice = tuple[nn.Parameter, nn.Parameter, tuple[slice | torch.Tensor, ...]]
"""(new, old, index): a parameter replaced by a slice of an old one, new = old[index]."""
_SLICES: list[list[Slice]] = []


@contextmanager
def recording_slices() -> Iterator[list[Slice]]:
    """Collect every parameter that lysis replaces by a slice of itself (so that the engine can
    slice the optimizer's moments the same way)."""
    found: list[Slice] = []
    _SLICES.append(found)
    try:
        yield found
    finally:
        _SLICES.pop()


def _replace(module: nn.Module, name: str, index: tuple[slice | torch.Tensor, ...]) -> None:
    old = getattr(module, name)
    new = nn.Parameter(old.detach()[index].clone(), requires_grad=old.requires_grad)
    setattr(module, name, new)
    for found in _SLICES:
        found.append((new, old, index))


class UnitMask(nn.Module):
    """Per-unit multiplicative mask over dim `dim` of its input. Free while unset (returns x).

    `group` > 1 means each unit spans `group` consecutive features (a head of `group` dims).
    """

    def __init__(self, units: int, dim: int = 1, group: int = 1) -> None:
        super().__init__()
        self.units, self.dim, self.group = units, dim, group
        self.register_buffer("mask", torch.ones(units))
        self.active = False
        self.ablation: torch.Tensor | None = None
        """(batch, units) per-sample multipliers on top of the mask (the engine's fused
        evaluation ablates one unit per replica with it); None outside that evaluation."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.ablation is not None:
            return x * self._per_sample(x)
        if not self.active:  # unset: no op at all in the forward (nothing to trace or export)
            return x
        m = self.mask.repeat_interleave(self.group) if self.group > 1 else self.mask
        shape = [1] * x.dim()
        shape[self.dim] = m.numel()
        return x * m.view(shape).to(x.dtype)

    def _per_sample(self, x: torch.Tensor) -> torch.Tensor:
        m = self.mask[None, :] * self.ablation  # (B, units)
        if self.group > 1:
            m = m.repeat_interleave(self.group, dim=1)
        shape = [1] * x.dim()
        shape[0], shape[self.dim] = m.shape[0], m.shape[1]
        return m.view(shape).to(x.dtype)

    def set(self, units: list[int], value: float) -> None:
        self.mask[units] = value
        self.active = bool((self.mask != 1).any())

    def keep(self, keep: torch.Tensor) -> None:
        self.mask = self.mask[keep].clone()
        self.units = int(keep.numel())
        self.active = bool((self.mask != 1).any())

    def _load_from_state_dict(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super()._load_from_state_dict(*args, **kwargs)
        self.active = bool((self.mask != 1).any())

    def extra_repr(self) -> str:
        return f"units={self.units}, dim={self.dim}, group={self.group}"


def _expand(keep: torch.Tensor, group: int) -> torch.Tensor:
    """Unit indices -> feature indices when each unit spans `group` features."""
    if group == 1:
        return keep
    return (keep[:, None] * group + torch.arange(group, device=keep.device)).reshape(-1)


def keep_out(layer: nn.Module, keep: torch.Tensor, group: int = 1) -> None:
    """Keep only output features `keep` (unit indices) of a Linear/Conv layer (or the channels
    of an Embedding), in place."""
    idx = _expand(keep, group).to(layer.weight.device)
    if isinstance(layer, nn.Embedding):  # (ids, channels): a channel is a column
        _replace(layer, "weight", (slice(None), idx))
        layer.embedding_dim = int(idx.numel())
        return
    _replace(layer, "weight", (idx,))
    if getattr(layer, "bias", None) is not None:
        _replace(layer, "bias", (idx,))
    if isinstance(layer, nn.Linear):
        layer.out_features = int(idx.numel())
    else:
        layer.out_channels = int(idx.numel())
        if layer.groups > 1:  # depthwise: each output channel owns one input channel
            layer.in_channels = layer.groups = int(idx.numel())


def keep_in(layer: nn.Module, keep: torch.Tensor, group: int = 1) -> None:
    """Keep only input features `keep` (unit indices) of a Linear/Conv layer, in place."""
    idx = _expand(keep, group).to(layer.weight.device)
    _replace(layer, "weight", (slice(None), idx))
    if isinstance(layer, nn.Linear):
        layer.in_features = int(idx.numel())
    else:
        layer.in_channels = int(idx.numel())


def keep_channels(affine: nn.Module, keep: torch.Tensor) -> None:
    """Keep channels `keep` of a per-channel module (norm affine params)."""
    idx = keep.to(next(affine.parameters()).device)
    for name in ("weight", "bias"):
        if getattr(affine, name, None) is not None:
            _replace(affine, name, (idx,))
    if isinstance(affine, nn.GroupNorm):
        affine.num_channels = affine.num_groups = int(idx.numel())
