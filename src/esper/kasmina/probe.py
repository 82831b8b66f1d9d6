"""Measuring a model without changing it: every probe Esper runs on a user's model (FLOP counting,
shape discovery in `insert_slots`, the engine's evaluation) runs inside `probing`.

A probe must leave no trace. In training mode a forward pass updates BatchNorm's running
statistics and counters, draws dropout masks, and fails outright on a batch of one sample where a
BatchNorm sees a 1×1 map; so probes run in eval mode, under `no_grad`, with every module's mode
and every buffer put back exactly as they were (a module may write a buffer even in eval mode).
SeedSlots record training telemetry only when gradients are enabled, so a probe does not touch
theirs either.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


@contextmanager
def probing(model: nn.Module, *, grad: bool = False) -> Iterator[None]:
    """Run the block with `model` in eval mode under `no_grad` (`grad=True`: with autograd on,
    for a probe that differentiates); restore every module's mode and every buffer's value
    afterwards, even when the block raises."""
    modes = [(m, m.training) for m in model.modules()]
    saved = [(b, b.clone()) for b in model.buffers()]
    model.eval()
    try:
        with torch.set_grad_enabled(grad):
            yield
    finally:
        with torch.no_grad():
            for b, value in saved:
                b.copy_(value)
        for m, mode in modes:
            m.training = mode


@dataclass(frozen=True)
class Cost:
    params: int
    flops: int
    """Floating-point operations per sample counted by torch's FlopCounterMode (matmul/conv/
    attention; elementwise ops are not counted)."""


def module_cost(
    module: nn.Module,
    example: torch.Tensor | tuple[int, ...],
    dtype: torch.dtype = torch.float32,
) -> Cost:
    """Parameters, and FLOPs per sample of a probe forward on `example`: a batch the module
    accepts (a real one for a user's model), or the shape of one sample (no batch dim; a zero
    sample of `dtype` is used)."""
    if not isinstance(example, torch.Tensor):
        p = next(iter(module.parameters()), None)
        device = p.device if p is not None else "cpu"
        example = torch.zeros((1, *example), dtype=dtype, device=device)
    counter = FlopCounterMode(display=False)
    with probing(module), counter:
        module(example)
    flops = int(counter.get_total_flops()) // max(1, len(example))
    return Cost(sum(q.numel() for q in module.parameters()), flops)
