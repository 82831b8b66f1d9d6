"""The blueprint library (paper §6): what a seed can become, on each topology where it makes sense.

Every seed module maps slot features to a same-shaped update s(h). Contracts (tested for every
blueprint × topology):
- shape preserving;
- function preserving at α=0 (the slot's blend guarantees it; nothing here relies on zero init);
- alive at birth: no zero-initialised layers, smooth activations (GELU/SiLU) and norms only on the
  slot input, so every parameter gets a non-zero gradient on the first step (an earlier
  implementation zero-initialised last layers behind GroupNorm+ReLU and grew dead seeds);
- the last layer is linear (`out`), so a committed seed can absorb its final α (`scale_output_`);
- hidden units sit behind a `UnitMask` right before `out`, so a phage can sedate and lyse them.

GATED_MLP is our thirteenth type: a SwiGLU feed-forward (Shazeer 2020, "GLU Variants Improve
Transformer"), which beats a plain MLP of equal parameter count in transformers and is cheap on
every topology, giving the policy a capacity option that is better per unit of rent.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from esper.contracts import Blueprint, SeedSpec, Topology
from esper.contracts.errors import EsperError
from esper.kasmina.layers import ChannelAffine, channel_dim, conv_of, pointwise, prenorm, spatial
from esper.kasmina.lysis import UnitMask, keep_in, keep_out
from esper.kasmina.probe import Cost, module_cost


class BlueprintError(EsperError, ValueError):
    """Unknown blueprint, or a blueprint asked for on a topology it does not support."""


class SeedModule(nn.Module):
    """Base of every blueprint module: an `out` layer and, optionally, lysable hidden units
    (`unit_mask`). Both are plain submodules, absent on NOOP; class attributes of the same name
    would shadow them, so they are looked up with getattr."""

    @property
    def units(self) -> int:
        mask = getattr(self, "unit_mask", None)
        return 0 if mask is None else mask.units

    @torch.no_grad()
    def scale_output_(self, factor: float) -> None:
        """Multiply the module's output by `factor`, exactly, by scaling the last linear layer."""
        out = getattr(self, "out", None)
        if out is None:
            return
        layer = conv_of(out)
        layer.weight.mul_(factor)
        if layer.bias is not None:
            layer.bias.mul_(factor)

    def remove_units(self, keep: torch.Tensor) -> None:
        raise BlueprintError(f"{type(self).__name__} has no lysable units")

    def masked(self, h: torch.Tensor) -> torch.Tensor:
        """The hidden units through their mask, or untouched while no unit is sedated, weakened
        or ablated: a compacted phage does no mask work at all (not even the module call)."""
        m = self.unit_mask
        return m(h) if m.active or m.ablation is not None else h

    def consumer(self) -> tuple[nn.Module, int]:
        """The layer that reads the unit mask's output, and the features per unit: the columns
        that `fold_unit_scale_` scales."""
        return conv_of(self.out), 1

    @torch.no_grad()
    def fold_unit_scale_(self, units: list[int], factor: float) -> None:
        """Fold a mask value into the weights: the consumer's input columns of `units` are
        scaled by `factor`, so the unit's mask can return to 1 with the same function."""
        layer, group = self.consumer()
        for u in units:
            layer.weight[:, u * group : (u + 1) * group].mul_(factor)


class Noop(SeedModule):
    """Contributes nothing: a rent-paying probe of the slot."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(x)


class NormSeed(SeedModule):
    """s = w ⊙ norm(h) + b: re-normalises the features on the residual path."""

    def __init__(self, channels: int, topology: Topology) -> None:
        super().__init__()
        self.norm = prenorm(channels, topology)
        self.out = ChannelAffine(channels, topology)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.norm(x))


class ConvSmall(SeedModule):
    """A single 3×3 (or causal width-3) convolution, C → C."""

    def __init__(self, channels: int, topology: Topology) -> None:
        super().__init__()
        self.out = spatial(channels, channels, topology)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(x)


class HiddenUnits(SeedModule):
    """s = out(mask(act(body(h)))): the shape of most blueprints; body's last layer makes units."""

    def __init__(
        self,
        body: list[nn.Module],
        units: int,
        out: nn.Module,
        topology: Topology,
        act: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.body = nn.Sequential(*body)
        self.act = act if act is not None else nn.GELU()
        self.unit_mask = UnitMask(units, dim=channel_dim(topology))
        self.out = out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.units:
            return self.bias_only(x)
        return self.out(self.masked(self.act(self.body(x))))

    def bias_only(self, x: torch.Tensor) -> torch.Tensor:
        """Every unit lysed: only the output bias is left, at every position (a conv cannot
        run with 0 output channels, so the body is skipped)."""
        bias, dim = conv_of(self.out).bias, self.unit_mask.dim
        shape, size = [1] * x.dim(), list(x.shape)
        shape[dim], size[dim] = -1, bias.numel()
        # a new tensor, not a view of the parameter: a view made under no_grad would still
        # require grad with no grad_fn, which module hooks (FLOP counting) cannot handle
        return x.new_zeros(size) + bias.view(shape)

    def remove_units(self, keep: torch.Tensor) -> None:
        keep_out(conv_of(self.body[-1]), keep)
        keep_in(conv_of(self.out), keep)
        self.unit_mask.keep(keep)


class Depthwise(HiddenUnits):
    """Depthwise 3×3 then pointwise 1×1 (MobileNet). Unit k is input channel k's filter."""

    def __init__(self, channels: int, topology: Topology) -> None:
        dw = spatial(channels, channels, topology, groups=channels)
        super().__init__([dw], channels, pointwise(channels, channels, topology), topology)
        self.dim = channel_dim(topology)
        self.register_buffer("in_index", torch.arange(channels))
        self.lysed = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.units:
            return self.bias_only(x)
        if self.lysed:  # removed filters take their input channels with them
            x = x.index_select(self.dim % x.dim(), self.in_index)
        return super().forward(x)

    def remove_units(self, keep: torch.Tensor) -> None:
        super().remove_units(keep)
        self.in_index = self.in_index[keep.to(self.in_index.device)].clone()
        self.lysed = True


class GatedMLP(HiddenUnits):
    """SwiGLU: s = W_down(silu(W_gate·n) ⊙ W_up·n), n = norm(h)."""

    def __init__(self, channels: int, width: int, topology: Topology) -> None:
        super().__init__(
            [prenorm(channels, topology), pointwise(channels, width, topology)],
            width,
            pointwise(width, channels, topology),
            topology,
            act=nn.SiLU(),
        )
        self.up = pointwise(channels, width, topology)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.units:
            return self.bias_only(x)
        n = self.body[0](x)
        return self.out(self.masked(self.act(self.body[1](n)) * self.up(n)))

    def remove_units(self, keep: torch.Tensor) -> None:
        keep_out(self.up, keep)
        super().remove_units(keep)


class SqueezeExcite(SeedModule):
    """Channel attention on maps: s = out(h ⊙ σ(fc2(gelu(fc1(pool h))))). Units: fc1's outputs."""

    def __init__(self, channels: int, width: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(channels, width)
        self.unit_mask = UnitMask(width, dim=-1)
        self.fc2 = nn.Linear(width, channels)
        self.out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.masked(F.gelu(self.fc1(x.mean(dim=(2, 3)))))  # (B, width)
        return self.out(x * torch.sigmoid(self.fc2(z))[:, :, None, None])

    def remove_units(self, keep: torch.Tensor) -> None:
        keep_out(self.fc1, keep)
        keep_in(self.fc2, keep)
        self.unit_mask.keep(keep)

    def consumer(self) -> tuple[nn.Module, int]:
        return self.fc2, 1


class CausalSelfAttention(SeedModule):
    """Multi-head causal attention on (B, T, C) sequences. Units: heads."""

    def __init__(self, channels: int, heads: int, head_dim: int) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.norm = prenorm(channels, Topology.SEQ)
        self.q, self.k, self.v = (nn.Linear(channels, heads * head_dim) for _ in range(3))
        self.unit_mask = UnitMask(heads, dim=-1, group=head_dim)
        self.out = nn.Linear(heads * head_dim, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        if self.heads == 0:  # every head lysed: only the output bias is left
            return self.out(x.new_zeros(B, T, 0))
        n = self.norm(x)
        q, k, v = (
            p(n).view(B, T, self.heads, self.head_dim).transpose(1, 2)
            for p in (self.q, self.k, self.v)
        )  # (B, nh, T, hs)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        y = y.transpose(1, 2).reshape(B, T, self.heads * self.head_dim)
        return self.out(self.masked(y))

    def remove_units(self, keep: torch.Tensor) -> None:
        for p in (self.q, self.k, self.v):
            keep_out(p, keep, group=self.head_dim)
        keep_in(self.out, keep, group=self.head_dim)
        self.unit_mask.keep(keep)
        self.heads = int(keep.numel())

    def consumer(self) -> tuple[nn.Module, int]:
        return self.out, self.head_dim


# ---------------------------------------------------------------------------------------------
# Registry: one builder per blueprint, with the topologies it supports.
# ---------------------------------------------------------------------------------------------

_ALL = frozenset(Topology)
_SPATIAL = frozenset({Topology.CNN, Topology.SEQ})


def _width(channels: int, factor: float, spec: SeedSpec) -> int:
    return max(1, math.ceil(channels * factor * spec.channel_width))


def _hidden(
    c: int, t: Topology, w: int, *, norm: bool, first: str, extra: str = "", act: bool = True
) -> HiddenUnits:
    """[norm] → first(C→W) → [GELU → extra(W→W)] → act → mask → out(W→C)."""
    make = {"point": pointwise, "spatial": spatial}
    layers: list[nn.Module] = [prenorm(c, t)] if norm else []
    layers.append(make[first](c, w, t))
    if extra:
        layers += [nn.GELU(), make[extra](w, w, t)]
    return HiddenUnits(layers, w, pointwise(w, c, t), t, act=None if act else nn.Identity())


def _attention(c: int, t: Topology, s: SeedSpec) -> SeedModule:
    if t is Topology.CNN:
        return SqueezeExcite(c, _width(c, 0.25, s))
    head_dim = max(1, math.ceil(c * s.channel_width / s.head_count))
    return CausalSelfAttention(c, s.head_count, head_dim)


def _lora(rank: int) -> Callable[[int, Topology, SeedSpec], SeedModule]:
    # Low-rank update B·A·h (no norm, no activation); B is small random, not zero, so A trains.
    return lambda c, t, s: _hidden(
        c, t, max(1, round(rank * s.channel_width)), norm=False, first="point", act=False
    )


Builder = Callable[[int, Topology, SeedSpec], SeedModule]
_BUILDERS: dict[Blueprint, tuple[frozenset[Topology], Builder]] = {
    Blueprint.NOOP: (_ALL, lambda c, t, s: Noop()),
    Blueprint.NORM: (_ALL, lambda c, t, s: NormSeed(c, t)),
    Blueprint.CONV_SMALL: (_SPATIAL, lambda c, t, s: ConvSmall(c, t)),
    Blueprint.CONV_LIGHT: (
        _SPATIAL,
        lambda c, t, s: _hidden(c, t, _width(c, 1.0, s), norm=True, first="spatial"),
    ),
    Blueprint.CONV_HEAVY: (
        _SPATIAL,
        lambda c, t, s: _hidden(
            c, t, _width(c, 2.0, s), norm=True, first="spatial", extra="spatial"
        ),
    ),
    Blueprint.DEPTHWISE: (_SPATIAL, lambda c, t, s: Depthwise(c, t)),
    Blueprint.BOTTLENECK: (
        _SPATIAL,
        lambda c, t, s: _hidden(
            c, t, max(2, _width(c, 0.25, s)), norm=True, first="point", extra="spatial"
        ),
    ),
    Blueprint.ATTENTION: (_SPATIAL, _attention),
    Blueprint.LORA: (_ALL, _lora(4)),
    Blueprint.LORA_LARGE: (_ALL, _lora(16)),
    Blueprint.MLP_SMALL: (
        _ALL,
        lambda c, t, s: _hidden(c, t, _width(c, 1.0, s), norm=True, first="point"),
    ),
    Blueprint.MLP: (
        _ALL,
        lambda c, t, s: _hidden(c, t, _width(c, 4.0, s), norm=True, first="point"),
    ),
    Blueprint.GATED_MLP: (_ALL, lambda c, t, s: GatedMLP(c, _width(c, 8 / 3, s), t)),
}


def supported_topologies(blueprint: Blueprint) -> frozenset[Topology]:
    """Where a slot seed of `blueprint` can grow (WIDEN is not a slot seed: none)."""
    return _BUILDERS[blueprint][0] if blueprint in _BUILDERS else frozenset()


def blueprints_for(topology: Topology) -> tuple[Blueprint, ...]:
    return tuple(b for b, (tops, _) in _BUILDERS.items() if topology in tops)


def parse_blueprint(name: str | Blueprint) -> Blueprint:
    if isinstance(name, Blueprint):
        return name
    try:
        return Blueprint[name.upper()]
    except KeyError:
        valid = ", ".join(b.name for b in Blueprint)
        raise BlueprintError(f"unknown blueprint {name!r}; valid blueprints: {valid}") from None


def build_seed(spec: SeedSpec, topology: Topology, channels: int) -> SeedModule:
    """Instantiate `spec`'s blueprint for features of `channels` channels on `topology`."""
    if not isinstance(topology, Topology):
        valid = ", ".join(t.value for t in Topology)
        raise BlueprintError(f"unknown topology {topology!r}; valid topologies: {valid}")
    if parse_blueprint(spec.blueprint) not in _BUILDERS:
        raise BlueprintError(
            f"{spec.blueprint.name} is not a slot seed: a slot on a host that declares its "
            "residual stream germinates it (esper.kasmina.stream)"
        )
    tops, build = _BUILDERS[parse_blueprint(spec.blueprint)]
    if topology not in tops:
        valid = ", ".join(b.name for b in blueprints_for(topology))
        raise BlueprintError(
            f"blueprint {spec.blueprint.name} does not support topology {topology.value}; "
            f"valid blueprints on {topology.value}: {valid}"
        )
    if channels < 1:
        raise BlueprintError(f"a slot needs >= 1 channel, got {channels}")
    return build(channels, topology, spec)


def blueprint_cost(spec: SeedSpec, topology: Topology, sample_shape: tuple[int, ...]) -> Cost:
    """Cost of a fresh seed for features of per-sample shape `sample_shape`."""
    channels = sample_shape[0] if topology is Topology.CNN else sample_shape[-1]
    return module_cost(build_seed(spec, topology, channels), sample_shape)
