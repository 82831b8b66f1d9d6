"""Blend operators: how a seed's output s joins the host features h under α (paper §6 `style`).

Every style is written as  y = h + c(α) · δ(h, s)  so that α = 0 (c = 0) is an exact identity:
h + 0·δ == h bit for bit for finite δ.

| style        | δ(h, s)    | c(α)                       |
|--------------|------------|----------------------------|
| RESIDUAL     | s          | α                          |
| VALVE        | h ⊙ s      | α        (y = h ⊙ (1 + α s)) |
| SIGMOID_RAMP | s          | normalised logistic of α   |
| GATE         | g(h) ⊙ s   | α, g a learned per-sample gate in (0, 1) |

During TRAINING the slot uses δ at full strength through a straight-through estimator, so the seed
learns what it will contribute once blended.
"""

from __future__ import annotations

import torch
from torch import nn

from esper.contracts import AlphaCurve, Style, Topology
from esper.kasmina.alpha import curve_value
from esper.kasmina.layers import pointwise


class Blend(nn.Module):
    """The blend operator of one style; holds the learned gate for Style.GATE."""

    def __init__(
        self, style: Style, channels: int, topology: Topology, learned: bool = True
    ) -> None:
        super().__init__()
        self.style, self.topology = style, topology
        # The gate reads pooled maps on CNN, each position on SEQ (pooling over time would leak
        # the future into a causal model), the vector itself on VEC. A seed with no parameters
        # (NOOP) outputs 0, so a gate on it could never learn: it gets none (`learned=False`).
        gated = style is Style.GATE and learned
        self.gate = pointwise(channels, 1, Topology.VEC) if gated else None

    def coefficient(self, alpha: float) -> float:
        if self.style is Style.SIGMOID_RAMP:
            return curve_value(AlphaCurve.SIGMOID, alpha)
        return alpha

    def gate_value(self, h: torch.Tensor) -> torch.Tensor:
        assert self.gate is not None
        if self.topology is Topology.CNN:
            return torch.sigmoid(self.gate(h.mean(dim=(2, 3))))[:, :, None, None]  # (B, 1, 1, 1)
        return torch.sigmoid(self.gate(h))  # (B, [T,] 1)

    def delta(self, h: torch.Tensor, s: torch.Tensor, gate_input: torch.Tensor) -> torch.Tensor:
        """δ(h, s); `gate_input` is h as the seed path sees it (detached before commit)."""
        if self.style is Style.VALVE:
            return h * s
        if self.gate is not None:
            return self.gate_value(gate_input) * s
        return s
