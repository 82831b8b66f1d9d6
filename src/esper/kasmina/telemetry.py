"""Gradient telemetry across a model: host gradient RMS, fed to every active slot each step."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from esper.kasmina.hosts import slots_of
from esper.kasmina.slot import SeedSlot


def host_grad_rms(model: nn.Module, slots: Iterable[SeedSlot] | None = None) -> torch.Tensor:
    """RMS of the gradients of the host's own parameters (everything outside slots)."""
    slots = slots_of(model).values() if slots is None else slots
    in_slots = {id(p) for s in slots for p in s.parameters()}
    grads = [p.grad for p in model.parameters() if id(p) not in in_slots and p.grad is not None]
    if not grads:
        return torch.zeros(())
    total = torch.stack([g.float().pow(2).sum() for g in grads]).sum()
    return (total / sum(g.numel() for g in grads)).sqrt()


def observe_gradients(model: nn.Module, slots: Iterable[SeedSlot] | None = None) -> None:
    """Call after `backward()`: every slot with a live seed accumulates its gradient health.
    Pass the model's slots when you have them (this runs every step)."""
    slots = list(slots_of(model).values() if slots is None else slots)
    if any(s.seed is not None for s in slots):
        rms = host_grad_rms(model, slots)
        for s in slots:
            s.observe_gradients(rms)
