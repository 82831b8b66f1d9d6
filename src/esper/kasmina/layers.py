"""Topology-aware building blocks: the same blueprint written once for maps, sequences, vectors.

Channel dimension: CNN (B, C, H, W) -> dim 1; SEQ (B, T, C) and VEC (B, C) -> dim -1.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from esper.contracts import Topology


def channel_dim(topology: Topology) -> int:
    return 1 if topology is Topology.CNN else -1


class CausalConv1d(nn.Module):
    """Conv over time for (B, T, C) sequences, left-padded so position t sees only ≤ t."""

    def __init__(self, c_in: int, c_out: int, kernel: int, groups: int = 1) -> None:
        super().__init__()
        self.pad = kernel - 1
        self.conv = nn.Conv1d(c_in, c_out, kernel, groups=groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(F.pad(x.transpose(1, 2), (self.pad, 0)))  # (B, C, T)
        return y.transpose(1, 2)


def pointwise(c_in: int, c_out: int, topology: Topology) -> nn.Module:
    """Per-position channel mixing: 1×1 conv on maps, Linear on sequences and vectors."""
    if topology is Topology.CNN:
        return nn.Conv2d(c_in, c_out, 1)
    return nn.Linear(c_in, c_out)


def spatial(c_in: int, c_out: int, topology: Topology, groups: int = 1) -> nn.Module:
    """3×3 conv on maps; causal width-3 conv over time on sequences."""
    if topology is Topology.CNN:
        return nn.Conv2d(c_in, c_out, 3, padding=1, groups=groups)
    if topology is Topology.SEQ:
        return CausalConv1d(c_in, c_out, 3, groups=groups)
    raise ValueError("spatial layers need CNN or SEQ topology")


def conv_of(layer: nn.Module) -> nn.Module:
    """The parameterised layer inside a spatial/pointwise block (for lysis slicing)."""
    return layer.conv if isinstance(layer, CausalConv1d) else layer


def prenorm(channels: int, topology: Topology) -> nn.Module:
    """Normalise the slot input (host channels; never the hidden units, see lysis.py)."""
    if topology is Topology.CNN:
        return nn.GroupNorm(1, channels, affine=False)
    return nn.LayerNorm(channels, elementwise_affine=False)


class ChannelAffine(nn.Module):
    """y = w ⊙ x + b per channel: the output layer of the NORM blueprint."""

    def __init__(self, channels: int, topology: Topology, init_scale: float = 0.1) -> None:
        super().__init__()
        self.dim = channel_dim(topology)
        self.weight = nn.Parameter(torch.full((channels,), init_scale))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = [1] * x.dim()
        shape[self.dim] = -1
        return x * self.weight.view(shape) + self.bias.view(shape)
