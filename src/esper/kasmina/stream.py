"""Widening the host's residual stream: a seed that adds k channels from one block onwards.

A host with a residual stream (the built-in CNN, MLP and transformer) declares it as a `Stream`:
for each block, the layer that normalises the stream (`norm`), the layers that read it (`read`:
the branch's first layer, the head) and the layers that write it (`write`: the stem or the
embeddings, block −1, and each branch's last layer). A WIDEN seed germinated in the slot after
block b adds k channels z to the stream from block b's input on (the whole stream for the first
slot):

    z is born as k new output rows of the layer that writes block b's input (the stem or the
    embeddings for b = 0, block b − 1's last layer otherwise),
    from block b on every block normalises z as its own group (a grouped norm: the host's channels
    keep exactly the statistics they see without the seed), reads it through k new input columns
    of its read layers, and adds k new output rows to z with its write layer; the head reads z.

Until commit the new rows and columns live in the seed (`Widening`) and the stream layers are
wrapped (`_Read`, `_Write`, `_Norm`). Isolation is the slot's, as for any seed: z is computed from
detached host features; in TRAINING the read-outs are cancelled in the forward by the
straight-through estimator (r − r.detach()), so the host's outputs and gradients are bit-identical
to the host alone while the seed learns as if α = 1; in BLENDING α scales the read-outs. At commit
the widening is compacted by concatenation: every wrapped layer becomes a wider plain layer (α
folded into the read columns; grouped norms kept) and the new channels are host tissue.

Initialisation (alive at birth): the new rows and columns take PyTorch's default (Kaiming-uniform)
init. A zero on either side would kill the other's gradient (z's gradient comes through the read
columns, the read columns' through z); the forward is protected by the STE and α instead.

The structure of a host is a function of its committed widenings (`Stream.widenings`), so a
checkpoint or a governor snapshot rebuilds it (`Stream.rebuild`) before its weights are loaded.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F
from torch import nn

from esper.contracts import Topology
from esper.kasmina.layers import channel_dim
from esper.kasmina.lysis import UnitMask

if TYPE_CHECKING:
    from esper.kasmina.slot import SeedSlot

Role = Literal["norm", "read", "write"]


class StreamNorm(nn.Module):
    """Normalise each channel group on its own (a grouped norm): adding a group never changes
    how the others are normalised. One group computes exactly what the host's own norm does
    (`GroupNorm(1, C)` on maps, `LayerNorm(C)` on sequences and vectors)."""

    def __init__(
        self, groups: Sequence[int], topology: Topology, *, affine: bool, eps: float = 1e-5
    ) -> None:
        super().__init__()
        self.groups, self.topology, self.eps = [int(g) for g in groups], topology, eps
        c = sum(self.groups)
        self.weight = nn.Parameter(torch.ones(c)) if affine else None
        self.bias = nn.Parameter(torch.zeros(c)) if affine else None
        self.channel_masks: dict[int, UnitMask] = {}
        """Group index -> the mask of a committed widening's channels under decay
        (`kasmina.channels`); empty otherwise, and then the forward is the plain grouped norm."""

    @property
    def affine(self) -> bool:
        return self.weight is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dim = channel_dim(self.topology)
        parts = x.split(self.groups, dim) if len(self.groups) > 1 else (x,)
        ws = self.weight.split(self.groups) if self.affine else [None] * len(parts)
        bs = self.bias.split(self.groups) if self.affine else [None] * len(parts)
        out = []
        for i, (p, w, b) in enumerate(zip(parts, ws, bs, strict=True)):
            scale = _scale(self.channel_masks[i]) if i in self.channel_masks else None
            p = p.contiguous()
            out.append(self._one(p, w, b) if scale is None else self._masked(p, w, b, scale))
        return out[0] if len(out) == 1 else torch.cat(out, dim)

    def _one(self, x: torch.Tensor, w: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor:
        if self.topology is Topology.CNN:
            return F.group_norm(x, 1, w, b, self.eps)
        return F.layer_norm(x, (x.shape[-1],), w, b, self.eps)

    def _masked(
        self, x: torch.Tensor, w: torch.Tensor | None, b: torch.Tensor | None, s: torch.Tensor
    ) -> torch.Tensor:
        """The group's norm over its channels with a nonzero scale only (what the group
        computes once the others are lysed), each channel's output times its scale.
        `s`: (1 or batch, channels)."""
        dim = channel_dim(self.topology)
        view = [s.shape[0], *[1] * (x.dim() - 1)]
        view[dim] = s.shape[1]
        s = s.to(x.dtype).view(view)
        keep = (s != 0).to(x.dtype)
        axes = tuple(range(1, x.dim())) if self.topology is Topology.CNN else (-1,)
        n = (keep.expand_as(x)).sum(axes, keepdim=True).clamp(min=1)  # all sedated: no NaN
        mean = (x * keep).sum(axes, keepdim=True) / n
        var = ((x - mean).square() * keep).sum(axes, keepdim=True) / n
        y = (x - mean) * torch.rsqrt(var + self.eps)
        if w is not None:
            shape = [1] * x.dim()
            shape[dim] = -1
            y = y * w.view(shape) + b.view(shape)
        return y * s

    def extra_repr(self) -> str:
        return f"groups={self.groups}, topology={self.topology.value}, affine={self.affine}"


# ---------------------------------------------------------------------------------------------
# The stream a host declares
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Site:
    block: int
    """Index of the block the layer belongs to: −1 for the stem (or embeddings) that write the
    stream's input, the number of blocks for the head end."""
    role: Role
    path: str


@dataclass
class Stream:
    """A host's residual stream: its base width, its layers by block, where its slots sit, and
    the widenings committed so far (block, k), in order."""

    width: int
    topology: Topology
    sites: list[Site]
    slot_blocks: dict[str, int]
    """Slot name -> the block after which it sits."""
    widenings: list[tuple[int, int]] = field(default_factory=list)
    """(b, k): k channels added from block b's input on (k = 0 once decay lysed them all)."""
    channel_groups: list = field(default_factory=list, repr=False, compare=False)
    """The widenings' channels as decay tissue (`kasmina.channels.StreamGroup`), made on demand."""

    def groups_entering(self, block: int) -> list[int]:
        """Channel groups of the stream entering `block` (committed widenings only)."""
        return [self.width, *(k for b, k in self.widenings if b <= block and k)]

    def offset(self, i: int, block: int) -> int:
        """The first channel of widening `i` in the stream entering `block`."""
        return self.width + sum(k for b, k in self.widenings[:i] if b <= block)

    def position(self, i: int, block: int) -> int:
        """Widening `i`'s group index in the grouped norms of `block`."""
        return 1 + sum(1 for b, k in self.widenings[:i] if b <= block and k)

    def width_after(self, block: int) -> int:
        """Channels of the stream leaving `block` (−1: the stem)."""
        return sum(self.groups_entering(block + 1))

    def affected(self, block: int) -> list[Site]:
        """The layers a widening from `block`'s input on touches: the write before it, and every
        stream layer from it on."""
        return [
            s
            for s in self.sites
            if s.block >= block or (s.block == block - 1 and s.role == "write")
        ]

    def rebuild(self, host: nn.Module, widenings: Sequence[Sequence[int]]) -> None:
        """Give every stream layer the shape `widenings` imply (fresh, unloaded weights where the
        shape changes) and the dormant slots their stream width. No widening may be live."""
        self.widenings = [(int(b), int(k)) for b, k in widenings]
        for site in self.sites:
            layer = host.get_submodule(site.path)
            if isinstance(layer, _Wide):
                raise RuntimeError(f"{site.path}: a live widening must be cleared before rebuild")
            if site.role == "norm":
                groups = self.groups_entering(site.block)
                if _groups_of(layer) != groups:
                    _set(host, site.path, _norm_like(layer, groups, self.topology))
                continue
            c_in, c_out = _in_out(layer)
            if site.role == "read":
                c_in = sum(self.groups_entering(site.block))
            else:
                c_out = self.width_after(site.block)
            if (c_in, c_out) != _in_out(layer):
                _set(host, site.path, _like(layer, c_in, c_out, _has_bias(layer)))
        self.resize_empty_slots(host)

    def resize_empty_slots(self, host: nn.Module) -> None:
        """Slots holding nothing take the stream's width where they sit (a seed keeps the width
        it was born with and acts on those channels)."""
        for slot in _slots(host, self):
            if slot.seed is None and slot.phage is None:
                slot.channels = self.width_after(self.slot_blocks[slot.name])


@dataclass
class StreamSite:
    """What a slot knows of the stream it sits on (set by the host that declares it)."""

    host: nn.Module
    stream: Stream
    block: int


def declare_stream(host: nn.Module, stream: Stream) -> None:
    """Attach `stream` to `host` and tell each of its slots where it sits."""
    host.stream = stream
    for slot in _slots(host, stream):
        slot.site = StreamSite(host, stream, stream.slot_blocks[slot.name])


def _slots(host: nn.Module, stream: Stream) -> list[SeedSlot]:
    from esper.kasmina.slot import SeedSlot  # a cycle at import time otherwise

    return [m for m in host.modules() if isinstance(m, SeedSlot) and m.name in stream.slot_blocks]


# ---------------------------------------------------------------------------------------------
# Layers of the same kind, other shapes
# ---------------------------------------------------------------------------------------------


def _in_out(layer: nn.Module) -> tuple[int, int]:
    if isinstance(layer, nn.Linear):
        return layer.in_features, layer.out_features
    if isinstance(layer, nn.Conv2d):
        return layer.in_channels, layer.out_channels
    if isinstance(layer, nn.Embedding):  # writes only: ids in, `embedding_dim` channels out
        return layer.num_embeddings, layer.embedding_dim
    raise TypeError(
        f"a stream layer must be nn.Linear, nn.Conv2d or nn.Embedding, got {type(layer).__name__}"
    )


def _out_dim(layer: nn.Module) -> int:
    """The weight's output-channel dimension (an embedding stores (ids, channels))."""
    return 1 if isinstance(layer, nn.Embedding) else 0


def _has_bias(layer: nn.Module) -> bool:
    return getattr(layer, "bias", None) is not None


def _like(base: nn.Module, c_in: int, c_out: int, bias: bool) -> nn.Module:
    """A layer of `base`'s kind (kernel, stride, padding) with other channel counts."""
    if isinstance(base, nn.Linear):
        layer: nn.Module = nn.Linear(c_in, c_out, bias=bias)
    elif isinstance(base, nn.Embedding):
        layer = nn.Embedding(c_in, c_out)
    elif isinstance(base, nn.Conv2d) and base.groups == 1:
        layer = nn.Conv2d(
            c_in, c_out, base.kernel_size, base.stride, base.padding, base.dilation, bias=bias
        )
    else:
        raise TypeError(f"cannot widen a {type(base).__name__} (nn.Linear or nn.Conv2d only)")
    return layer.to(base.weight)


def _scale(mask: UnitMask) -> torch.Tensor | None:
    """A channel group's multipliers, (1 or batch, channels), or None while the mask is unset."""
    if mask.ablation is not None:
        return mask.mask[None, :] * mask.ablation
    return mask.mask[None, :] if mask.active else None


def _groups_of(norm: nn.Module) -> list[int]:
    if isinstance(norm, StreamNorm):
        return list(norm.groups)
    if isinstance(norm, nn.GroupNorm) and norm.num_groups == 1:
        return [norm.num_channels]
    if isinstance(norm, nn.LayerNorm) and len(norm.normalized_shape) == 1:
        return [norm.normalized_shape[0]]
    raise TypeError(f"a stream norm must be GroupNorm(1, C) or LayerNorm(C), got {norm}")


def _affine(norm: nn.Module) -> bool:
    return getattr(norm, "weight", None) is not None


def _norm_like(norm: nn.Module, groups: list[int], topology: Topology) -> StreamNorm:
    out = StreamNorm(groups, topology, affine=_affine(norm), eps=norm.eps)
    p = next(iter(norm.parameters()), None)
    return out if p is None else out.to(p)


def _set(host: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = host.get_submodule(parent_path) if parent_path else host
    parent._modules[name] = module  # attributes and ModuleList/Sequential indices alike


# ---------------------------------------------------------------------------------------------
# The seed and its wrappers
# ---------------------------------------------------------------------------------------------


class _Wide(nn.Module):
    """A stream layer wrapped while a widening is live: `base` is the host's layer (a child),
    `extra` the seed's new rows or columns (registered under the slot, not here)."""

    def __init__(self, base: nn.Module, extra: nn.Module, slot: SeedSlot, dim: int) -> None:
        super().__init__()
        self.base, self.dim = base, dim
        object.__setattr__(self, "extra", extra)
        object.__setattr__(self, "slot", slot)

    def _split(self, x: torch.Tensor, c: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        if x.shape[self.dim] == c:
            return x, None
        h, z = x.split([c, x.shape[self.dim] - c], self.dim)
        return h.contiguous(), z  # contiguous: the host's layer sees exactly what it saw alone


class _Read(_Wide):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, z = self._split(x, _in_out(self.base)[0])
        y = self.base(h)
        return y if z is None else y + self.slot.gate(self.extra(z))


class _Write(_Wide):
    def forward(self, u: torch.Tensor) -> torch.Tensor:
        y = self.base(u)
        if not self.slot.widening_live:
            return y
        return torch.cat([y, self.extra(u.detach())], self.dim)  # z sees detached host features


class _Norm(_Wide):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, z = self._split(x, sum(_groups_of(self.base)))
        y = self.base(h)
        return y if z is None else torch.cat([y, self.extra(z)], self.dim)


_WRAPPERS: dict[str, type[_Wide]] = {"read": _Read, "write": _Write, "norm": _Norm}


def _key(path: str) -> str:
    return path.replace(".", "__")


class Widening(nn.Module):
    """The seed of a WIDEN germination: k new channels from `block`'s input on, as the new rows
    and columns of every stream layer they touch (`extras`, by layer path)."""

    def __init__(self, site: StreamSite, k: int) -> None:
        super().__init__()
        if k < 1:
            raise ValueError(f"a widening needs k >= 1 new channels, got {k}")
        self.k, self.block = k, site.block
        stream, host = site.stream, site.host
        self.extras = nn.ModuleDict()
        for s in stream.affected(site.block):
            base = host.get_submodule(s.path)
            c_in, c_out = (0, 0) if s.role == "norm" else _in_out(base)
            if s.role == "norm":
                extra: nn.Module = _norm_like(base, [k], stream.topology)
            elif s.role == "read":
                extra = _like(base, k, c_out, bias=False)
            else:
                extra = _like(base, c_in, k, bias=_has_bias(base))
            self.extras[_key(s.path)] = extra

    @property
    def units(self) -> int:
        return self.k

    def install(self, slot: SeedSlot) -> None:
        """Wrap every stream layer this widening touches."""
        site = slot.site
        dim = channel_dim(site.stream.topology)
        for s in site.stream.affected(self.block):
            base = site.host.get_submodule(s.path)
            _set(site.host, s.path, _WRAPPERS[s.role](base, self.extras[_key(s.path)], slot, dim))

    def uninstall(self, slot: SeedSlot) -> None:
        """Put the host's own layers back (prune, rollback)."""
        site = slot.site
        for s in site.stream.affected(self.block):
            layer = site.host.get_submodule(s.path)
            if isinstance(layer, _Wide):
                _set(site.host, s.path, layer.base)

    @torch.no_grad()
    def compact(self, slot: SeedSlot, coef: float) -> Compaction:
        """Replace every wrapper by one wider plain layer (α folded into the read columns) and
        record the widening on the stream; returns which new parameter holds which old one."""
        site = slot.site
        moved: list[tuple[nn.Parameter, nn.Parameter, tuple[slice, ...]]] = []
        for s in site.stream.affected(self.block):
            wrapper = site.host.get_submodule(s.path)
            assert isinstance(wrapper, _Wide), s.path
            merged = _merge(s.role, wrapper.base, wrapper.extra, coef, site.stream.topology)
            for name, old in wrapper.base.named_parameters():
                new = getattr(merged, name)
                moved.append((new, old, tuple(slice(0, n) for n in old.shape)))
            _set(site.host, s.path, merged)
        site.stream.widenings.append((self.block, self.k))
        site.stream.resize_empty_slots(site.host)
        return Compaction(moved)


@dataclass
class Compaction:
    """What a committed widening replaced: (new parameter, the host parameter it contains, the
    slices of the new one that hold the old values). The optimizer carries moments across it."""

    moved: list[tuple[nn.Parameter, nn.Parameter, tuple[slice, ...]]]


def _merge(
    role: Role, base: nn.Module, extra: nn.Module, coef: float, topology: Topology
) -> nn.Module:
    if role == "norm":
        merged = _norm_like(base, [*_groups_of(base), *_groups_of(extra)], topology)
        if merged.affine:
            merged.weight.copy_(torch.cat([base.weight, extra.weight]))
            merged.bias.copy_(torch.cat([base.bias, extra.bias]))
        return merged
    c_in, c_out = _in_out(base)
    k_in, k_out = _in_out(extra)
    if role == "read":  # new input columns, scaled by the final blend coefficient
        merged = _like(base, c_in + k_in, c_out, _has_bias(base))
        merged.weight.copy_(torch.cat([base.weight, coef * extra.weight], dim=1))
        if _has_bias(base):
            merged.bias.copy_(base.bias)
        return merged
    merged = _like(base, c_in, c_out + k_out, _has_bias(base))  # new output rows
    merged.weight.copy_(torch.cat([base.weight, extra.weight], dim=_out_dim(base)))
    if _has_bias(base):
        merged.bias.copy_(torch.cat([base.bias, extra.bias]))
    return merged
