"""Reference hosts with named SeedSlots, and slot insertion into any user module.

Slots sit at structurally meaningful points: after each residual block (CNN, MLP), after the
attention and after the MLP sub-block of each transformer layer. Host residual blocks are
`Residual` modules whose branch has lysable units, so a phage can wrap host infrastructure too
(`wrap_in_phage`). Slots in a user's own module: `esper.kasmina.insert`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from esper.contracts import Topology
from esper.kasmina.blueprints import CausalSelfAttention, HiddenUnits
from esper.kasmina.layers import pointwise, prenorm, spatial
from esper.kasmina.phage import Phage
from esper.kasmina.probe import probing
from esper.kasmina.slot import SeedSlot
from esper.kasmina.stream import Site, Stream, declare_stream


class Residual(nn.Module):
    """y = x + branch(x). A branch that writes more channels than it reads (the block where a
    widening of the stream begins) adds them to zeros: y = [x, 0] + branch(x)."""

    def __init__(self, branch: nn.Module, dim: int = 1) -> None:
        super().__init__()
        self.branch, self.dim = branch, dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.branch(x)
        extra = y.shape[self.dim] - x.shape[self.dim]
        if extra > 0:
            pad = [0, 0] * (x.dim() - 1 - self.dim % x.dim()) + [0, extra]
            x = F.pad(x, pad)
        return x + y


def _block_sites(i: int, prefix: str) -> list[Site]:
    """A `_branch` block's stream layers: norm → first layer → ... → out."""
    return [
        Site(i, "norm", f"{prefix}.branch.body.0"),
        Site(i, "read", f"{prefix}.branch.body.1"),
        Site(i, "write", f"{prefix}.branch.out"),
    ]


def _branch(c: int, topology: Topology, width: int, first: str) -> HiddenUnits:
    """norm → conv3×3 or linear (C→W) → GELU → mask → linear (W→C)."""
    make = spatial if first == "spatial" else pointwise
    return HiddenUnits(
        [prenorm(c, topology), make(c, width, topology)],
        width,
        pointwise(width, c, topology),
        topology,
    )


def _branch_widths(depth: int, hidden: int, narrow: tuple[int, ...]) -> list[int]:
    """Each block's branch width: `hidden`, or 1 in the [first, last] range `narrow`."""
    if narrow and (len(narrow) != 2 or not 0 <= narrow[0] <= narrow[1] < depth):
        raise ValueError(f"narrow must be [first, last] blocks within {depth}, got {narrow}")
    lo, hi = narrow if narrow else (1, 0)
    return [1 if lo <= i <= hi else hidden for i in range(depth)]


class CNNHost(nn.Module):
    """A small residual CNN: stem → [block → slot → pool]×depth → global pool → linear.

    `width=2` is the "impaired" host: its 2-channel bottleneck leaves room to grow. Each block's
    residual branch is `hidden` wide (default 2·width); the blocks in `narrow` ([first, last])
    get a 1-wide branch instead: a bottleneck placed in one part of the host (zones).
    """

    def __init__(
        self,
        width: int = 8,
        depth: int = 3,
        in_channels: int = 1,
        num_classes: int = 10,
        image_size: int = 8,
        *,
        hidden: int = 0,
        narrow: tuple[int, ...] = (),
        **slot_kw: object,
    ) -> None:
        super().__init__()
        if width < 1 or depth < 1:
            raise ValueError(f"CNNHost needs width >= 1 and depth >= 1, got {width}, {depth}")
        self.width, self.depth = width, depth
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1), nn.GELU())
        widths = _branch_widths(depth, hidden or 2 * width, narrow)
        self.blocks = nn.ModuleList(
            Residual(_branch(width, Topology.CNN, w, "spatial")) for w in widths
        )
        self.slots = nn.ModuleDict(
            {
                f"b{i}": SeedSlot(width, Topology.CNN, f"slots.b{i}", **slot_kw)  # type: ignore[arg-type]
                for i in range(depth)
            }
        )
        size, pools = image_size, []
        for _ in range(depth):  # halve the map after each block while it is larger than 2×2
            pools.append(nn.AvgPool2d(2) if size > 2 else nn.Identity())
            size = size // 2 if size > 2 else size
        self.pools = nn.ModuleList(pools)
        self.head = nn.Linear(width, num_classes)
        sites = [s for i in range(depth) for s in _block_sites(i, f"blocks.{i}")]
        blocks = {f"slots.b{i}": i for i in range(depth)}
        ends = [Site(-1, "write", "stem.0"), Site(depth, "read", "head")]
        declare_stream(self, Stream(width, Topology.CNN, [*sites, *ends], blocks))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for block, slot, pool in zip(self.blocks, self.slots.values(), self.pools, strict=True):
            x = pool(slot(block(x)))
        return self.head(x.mean(dim=(2, 3)))


class MLPHost(nn.Module):
    """Vectors: flatten → linear → [residual MLP block → slot]×depth → linear."""

    def __init__(
        self,
        in_features: int = 64,
        width: int = 32,
        depth: int = 2,
        num_classes: int = 10,
        **slot_kw: object,
    ) -> None:
        super().__init__()
        self.inp = nn.Sequential(nn.Flatten(), nn.Linear(in_features, width), nn.GELU())
        self.blocks = nn.ModuleList(
            Residual(_branch(width, Topology.VEC, 2 * width, "point"), dim=-1) for _ in range(depth)
        )
        self.slots = nn.ModuleDict(
            {
                f"b{i}": SeedSlot(width, Topology.VEC, f"slots.b{i}", **slot_kw)  # type: ignore[arg-type]
                for i in range(depth)
            }
        )
        self.head = nn.Linear(width, num_classes)
        sites = [s for i in range(depth) for s in _block_sites(i, f"blocks.{i}")]
        blocks = {f"slots.b{i}": i for i in range(depth)}
        ends = [Site(-1, "write", "inp.1"), Site(depth, "read", "head")]
        declare_stream(self, Stream(width, Topology.VEC, [*sites, *ends], blocks))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.inp(x)
        for block, slot in zip(self.blocks, self.slots.values(), strict=True):
            x = slot(block(x))
        return self.head(x)


class TransformerHost(nn.Module):
    """A small causal character-level transformer (pre-norm, learned positions)."""

    def __init__(
        self,
        vocab_size: int = 256,
        d_model: int = 64,
        n_layers: int = 2,
        n_heads: int = 4,
        max_len: int = 64,
        **slot_kw: object,
    ) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model {d_model} must be divisible by n_heads {n_heads}")
        self.max_len = max_len
        self.tok = nn.Embedding(vocab_size, d_model)
        self.pos = nn.Embedding(max_len, d_model)
        layers, slots = [], {}
        for i in range(n_layers):
            layers += [
                Residual(CausalSelfAttention(d_model, n_heads, d_model // n_heads), dim=-1),
                Residual(_branch(d_model, Topology.SEQ, 4 * d_model, "point"), dim=-1),
            ]
            for part in ("attn", "mlp"):
                slots[f"l{i}_{part}"] = SeedSlot(
                    d_model, Topology.SEQ, f"slots.l{i}_{part}", **slot_kw
                )  # type: ignore[arg-type]
        self.layers = nn.ModuleList(layers)
        self.slots = nn.ModuleDict(slots)
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size, bias=False)
        declare_stream(self, _transformer_stream(d_model, n_layers))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        T = idx.shape[1]
        if T > self.max_len:
            raise ValueError(f"sequence length {T} exceeds max_len {self.max_len}")
        x = self.tok(idx) + self.pos(torch.arange(T, device=idx.device))  # (B, T, C)
        for layer, slot in zip(self.layers, self.slots.values(), strict=True):
            x = slot(layer(x))
        return self.head(self.norm(x))  # (B, T, vocab)


def _transformer_stream(d_model: int, n_layers: int) -> Stream:
    sites, blocks = [Site(-1, "write", "tok"), Site(-1, "write", "pos")], {}
    for i in range(n_layers):
        a, m = 2 * i, 2 * i + 1
        attn = f"layers.{a}.branch"
        sites += [Site(a, "norm", f"{attn}.norm")]
        sites += [Site(a, "read", f"{attn}.{p}") for p in ("q", "k", "v")]
        sites += [Site(a, "write", f"{attn}.out"), *_block_sites(m, f"layers.{m}")]
        blocks[f"slots.l{i}_attn"], blocks[f"slots.l{i}_mlp"] = a, m
    end = 2 * n_layers
    return Stream(
        d_model,
        Topology.SEQ,
        [*sites, Site(end, "norm", "norm"), Site(end, "read", "head")],
        blocks,
    )


# ---------------------------------------------------------------------------------------------
# Slots and phages in any module (a user's own: `esper.kasmina.insert`)
# ---------------------------------------------------------------------------------------------


def slots_of(model: nn.Module) -> dict[str, SeedSlot]:
    """Every SeedSlot in `model`, by module path (names unnamed slots after their path)."""
    found = {}
    for path, module in model.named_modules():
        if isinstance(module, SeedSlot):
            if module.name == "slot":
                module.name = path
            found[module.name] = module
    return found


def slot_depths(model: nn.Module, example: torch.Tensor) -> dict[str, float]:
    """Each slot's depth in the host, by slot name: the fraction of the host's parameters (those
    outside the slots) whose module runs before the slot in one probe forward of `example`.

    A layout-free description of where a slot is (the learned policy's `depth` feature): a
    slot after the stem of a deep network is near 0, one before the head near 1, whatever the
    slots are called or however many there are. A module's own parameters count at its first
    call; a slot the forward never reaches is at 1."""
    slots = slots_of(model)
    inside = {id(p) for s in slots.values() for p in s.parameters()}
    seen: set[int] = set()
    ran = [0]
    at: dict[str, int] = {}

    def run(m: nn.Module, args: object) -> None:
        for p in m.parameters(recurse=False):
            if id(p) not in inside and id(p) not in seen:
                seen.add(id(p))
                ran[0] += p.numel()

    def reach(name: str) -> Callable[[nn.Module, object], None]:
        def hook(m: nn.Module, args: object) -> None:
            at.setdefault(name, ran[0])

        return hook

    handles = [m.register_forward_pre_hook(run) for m in model.modules()]
    handles += [s.register_forward_pre_hook(reach(n)) for n, s in slots.items()]
    try:
        with probing(model):
            model(example)
    finally:
        for h in handles:
            h.remove()
    total = max(1, ran[0])
    return {n: at[n] / total if n in at else 1.0 for n in slots}


def wrap_in_phage(model: nn.Module, path: str) -> Phage:
    """Replace the host's `Residual` block at `path` with a Phage of the same function."""
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    block = parent.get_submodule(child)
    if not isinstance(block, Residual):
        raise TypeError(f"{path!r} is a {type(block).__name__}, not a Residual host block")
    phage = Phage(block.branch, name=path)
    parent._modules[child] = phage  # works for ModuleList indices and attributes alike
    return phage
