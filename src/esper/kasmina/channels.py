"""A committed widening's channels as decay tissue (paper §9.1: "channels added by widening seeds
once compacted" are Emrakul's, at CHANNEL_SLICE granularity).

Widening i added k channels to the residual stream from block b on (`kasmina.stream`): rows of
every layer that writes the stream from block b − 1 on, a group of its own in every grouped norm
from block b on, and columns of every layer that reads the stream there. Channel j of the group is
one unit, and its lysis removes all three — so the function the rest computes must not depend on
it. The mask that makes sedation equal to lysis acts where the channel is *read*:

    in each grouped norm, the group's statistics are taken over its unsedated channels only (the
    norm the group computes once the sedated ones are gone), and each channel's output is scaled
    by its mask value;
    a read layer that sees the stream without a norm in front (the CNN and MLP heads, after
    pooling) gets its input scaled the same way, by a forward pre-hook.

The channel is still written (its rows stay until lysis), but nothing reads it while sedated. A
weakened channel (0 < m < 1) stays in the statistics and is scaled at its readers, so folding it
scales the readers' columns. Unset masks cost nothing in the grouped norms and one check in the
hooks; the groups and hooks exist only once decay asks for them (`stream_groups`).

A seed born after the widening, in a slot downstream, reads the stream including these channels;
its lysis there would change that seed's input, so a group read by any seed is not tissue while
that seed lives (`readers_free`), and the engine lifts its masks (`tolaria.decay`).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch
from torch import nn

from esper.kasmina.layers import channel_dim
from esper.kasmina.lysis import UnitMask, keep_channels, keep_in, keep_out
from esper.kasmina.stream import Stream, StreamNorm, _in_out, _scale, _slots

if TYPE_CHECKING:
    from esper.kasmina.slot import SeedSlot


class StreamGroup(nn.Module):
    """The channels of committed widening `index`, as lysable units (`unit_mask`,
    `remove_units`, `fold_unit_scale_`, `unit_params`) over the host's stream layers."""

    def __init__(self, host: nn.Module, stream: Stream, index: int) -> None:
        super().__init__()
        object.__setattr__(self, "host", host)  # not a child: the host owns its layers
        self.stream, self.index = stream, index
        self.block, k = stream.widenings[index]
        device = next(host.parameters()).device
        self.unit_mask = UnitMask(k, dim=channel_dim(stream.topology)).to(device)

    @property
    def units(self) -> int:
        return self.stream.widenings[self.index][1]

    def _sites(self) -> Iterator[tuple[str, nn.Module, int, int]]:
        """(role, layer, the group's first channel in it, the block whose input it is) for every
        layer the group lives in."""
        for s in self.stream.affected(self.block):
            at = s.block + 1 if s.role == "write" else s.block  # a write makes the next input
            yield s.role, self.host.get_submodule(s.path), self.stream.offset(self.index, at), at

    def parameters(self, recurse: bool = True) -> Iterator[nn.Parameter]:
        """The parameters of the stream layers the group lives in (lysis counts what it took)."""
        for _, layer, *_ in self._sites():
            yield from layer.parameters()

    def unit_params(self) -> int:
        """Parameters one channel holds: a row of each write, a column of each read, the norms'
        affine pair."""
        total = 0
        for role, layer, *_ in self._sites():
            if role == "norm":
                total += 2 if isinstance(layer, StreamNorm) and layer.affine else 0
                continue
            c_in, c_out = _in_out(layer)
            if role == "read":
                total += layer.weight.numel() // c_in
            elif isinstance(layer, nn.Embedding):
                total += c_in
            else:
                total += layer.weight.numel() // c_out + (layer.bias is not None)
        return total

    @torch.no_grad()
    def fold_unit_scale_(self, units: list[int], factor: float) -> None:
        """Scale the read columns of `units` by `factor` (their mask can then return to 1)."""
        for role, layer, off, _ in self._sites():
            if role == "read":
                for u in units:
                    layer.weight[:, off + u] *= factor

    def remove_units(self, keep: torch.Tensor) -> None:
        """Keep channels `keep` of the group in every stream layer; the widening's record, the
        dormant slots' width and the committing slot's absorbed count follow."""
        k, kept = self.units, int(keep.numel())
        before = sum(p.numel() for p in self.parameters())
        for role, layer, off, at in self._sites():
            if role == "norm":
                _keep_norm_group(layer, self.stream.position(self.index, at), off, k, keep)
                continue
            total = _in_out(layer)[0 if role == "read" else 1]
            idx = _around(keep, off, k, total)
            (keep_in if role == "read" else keep_out)(layer, idx)
        self.stream.widenings[self.index] = (self.block, kept)
        self.unit_mask.keep(keep)
        removed = before - sum(p.numel() for p in self.parameters())
        slot = self._slot()
        if slot is not None:
            slot.absorbed = max(0, slot.absorbed - removed)
        self.stream.resize_empty_slots(self.host)
        attach(self.host, self.stream)

    def _slot(self) -> SeedSlot | None:
        """The slot whose committed widening this is (its seed's count is priced as rent)."""
        blocks = self.stream.slot_blocks
        for slot in _slots(self.host, self.stream):
            if blocks[slot.name] == self.block and slot.absorbed:
                return slot
        return None

    def extra_repr(self) -> str:
        return f"widening={self.index}, block={self.block}, units={self.units}"


def _around(keep: torch.Tensor, off: int, k: int, total: int) -> torch.Tensor:
    """Feature indices that keep everything but the group's channels not in `keep`."""
    device = keep.device
    return torch.cat(
        [
            torch.arange(off, device=device),
            off + keep,
            torch.arange(off + k, total, device=device),
        ]
    )


def _keep_norm_group(norm: nn.Module, pos: int, off: int, k: int, keep: torch.Tensor) -> None:
    assert isinstance(norm, StreamNorm), norm
    if norm.affine:
        keep_channels(norm, _around(keep, off, k, sum(norm.groups)))
    if keep.numel():
        norm.groups[pos] = int(keep.numel())
    else:  # every channel lysed: the group is gone from the norm
        del norm.groups[pos]


class _ReadMask:
    """Forward pre-hook of a read layer with no grouped norm in front: scales the input's channel
    groups by their masks (a callable object, so that a deep copy of the model copies it)."""

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self.groups: list[tuple[int, int, UnitMask]] = []  # (first channel, k, mask)

    def __call__(self, module: nn.Module, args: tuple[torch.Tensor, ...]) -> tuple | None:
        scales = [(off, k, s) for off, k, m in self.groups if (s := _scale(m)) is not None]
        if not scales:
            return None
        (x,) = args
        m = torch.ones(max(s.shape[0] for *_, s in scales), x.shape[self.dim], device=x.device)
        for off, k, s in scales:
            m[:, off : off + k] = s
        view = [m.shape[0], *[1] * (x.dim() - 1)]
        view[self.dim] = m.shape[1]
        return (x * m.to(x.dtype).view(view),)


def _read_hook(layer: nn.Module) -> _ReadMask:
    for hook in layer._forward_pre_hooks.values():
        if isinstance(hook, _ReadMask):
            return hook
    hook = _ReadMask(1 if isinstance(layer, nn.Conv2d) else -1)
    layer.register_forward_pre_hook(hook)
    return hook


def attach(host: nn.Module, stream: Stream) -> None:
    """Put every group's mask where its channels are read (idempotent: the layers may have been
    replaced by a rebuild since)."""
    groups = stream.channel_groups
    normed = {s.block for s in stream.sites if s.role == "norm"}
    for site in stream.sites:
        live = [(i, g) for i, g in enumerate(groups) if g.block <= site.block and g.units]
        layer = host.get_submodule(site.path)
        if site.role == "norm" and isinstance(layer, StreamNorm):
            layer.channel_masks = {stream.position(i, site.block): g.unit_mask for i, g in live}
        elif site.role == "read" and site.block not in normed and live:
            _read_hook(layer).groups = [
                (stream.offset(i, site.block), g.units, g.unit_mask) for i, g in live
            ]


def stream_groups(host: nn.Module) -> list[StreamGroup]:
    """The committed widenings of `host`'s stream as groups of units (made on first use, kept
    in step with the stream's record), their masks attached."""
    stream = getattr(host, "stream", None)
    if not isinstance(stream, Stream) or not stream.widenings:
        return []
    groups = stream.channel_groups
    del groups[len(stream.widenings) :]
    for i, (_, k) in enumerate(stream.widenings):
        if i == len(groups):
            groups.append(StreamGroup(host, stream, i))
        elif groups[i].unit_mask.units != k:  # rebuilt from a record: a fresh, unset mask
            groups[i] = StreamGroup(host, stream, i)
    attach(host, stream)
    return list(groups)


def readers_free(host: nn.Module, group: StreamGroup) -> bool:
    """No seed or phage in a slot reads the group's channels (see the module doc)."""
    stream = group.stream
    for slot in _slots(host, stream):
        phage = slot.phage
        reads = slot.seed is not None or (phage is not None and phage.module is not None)
        at = stream.slot_blocks[slot.name] + 1  # a slot sees the stream its block writes
        if reads and group.block <= at and slot.channels > stream.offset(group.index, at):
            return False
    return True
