"""Lysable units: the channels or heads a phage can sedate and later physically remove (§9.3, §9.7).

A lysable module computes some independent hidden units (channels, LoRA ranks, attention heads)
and consumes them with one output layer. A `UnitMask` sits exactly between the two, so that a
unit sedated to 0 contributes nothing downstream, and deleting that unit's producer rows and
consumer columns (`remove_units`) yields the same function with fewer parameters. Nothing between
the mask and the consumer may mix units (no norm over hidden channels there): that is what makes
physical lysis exact.
"""

from __future__ import annotations

import torch
from torch import nn


class UnitMask(nn.Module):
    """Per-unit multiplicative mask over dim `dim` of its input. Free while unset (returns x).

    `group` > 1 means each unit spans `group` consecutive features (a head of `group` dims).
    """

    def __init__(self, units: int, dim: int = 1, group: int = 1) -> None:
        super().__init__()
        self.units, self.dim, self.group = units, dim, group
        self.register_buffer("mask", torch.ones(units))
        self.active = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.active:
            return x
        m = self.mask.repeat_interleave(self.group) if self.group > 1 else self.mask
        shape = [1] * x.dim()
        shape[self.dim] = m.numel()
        return x * m.view(shape).to(x.dtype)

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
    """Keep only output features `keep` (unit indices) of a Linear/Conv layer, in place."""
    idx = _expand(keep, group).to(layer.weight.device)
    layer.weight = nn.Parameter(layer.weight.detach()[idx].clone())
    if getattr(layer, "bias", None) is not None:
        layer.bias = nn.Parameter(layer.bias.detach()[idx].clone())
    if isinstance(layer, nn.Linear):
        layer.out_features = int(idx.numel())
    else:
        layer.out_channels = int(idx.numel())
        if layer.groups > 1:  # depthwise: each output channel owns one input channel
            layer.in_channels = layer.groups = int(idx.numel())


def keep_in(layer: nn.Module, keep: torch.Tensor, group: int = 1) -> None:
    """Keep only input features `keep` (unit indices) of a Linear/Conv layer, in place."""
    idx = _expand(keep, group).to(layer.weight.device)
    layer.weight = nn.Parameter(layer.weight.detach()[:, idx].clone())
    if isinstance(layer, nn.Linear):
        layer.in_features = int(idx.numel())
    else:
        layer.in_channels = int(idx.numel())


def keep_channels(affine: nn.Module, keep: torch.Tensor) -> None:
    """Keep channels `keep` of a per-channel module (norm affine params)."""
    idx = keep.to(next(affine.parameters()).device)
    for name in ("weight", "bias"):
        p = getattr(affine, name, None)
        if p is not None:
            setattr(affine, name, nn.Parameter(p.detach()[idx].clone()))
    if isinstance(affine, nn.GroupNorm):
        affine.num_channels = affine.num_groups = int(idx.numel())
