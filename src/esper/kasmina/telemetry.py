"""Gradient telemetry across a model: host gradient RMS, fed to every active slot each step."""

from __future__ import annotations

import torch
from torch import nn

from esper.kasmina.hosts import slots_of


def host_grad_rms(model: nn.Module) -> torch.Tensor:
    """RMS of the gradients of the host's own parameters (everything outside slots)."""
    in_slots = {id(p) for s in slots_of(model).values() for p in s.parameters()}
    grads = [p.grad for p in model.parameters() if id(p) not in in_slots and p.grad is not None]
    if not grads:
        return torch.zeros(())
    total = torch.stack([g.float().pow(2).sum() for g in grads]).sum()
    return (total / sum(g.numel() for g in grads)).sqrt()


def observe_gradients(model: nn.Module) -> None:
    """Call after `backward()`: every slot with a live seed accumulates its gradient health."""
    slots = slots_of(model).values()
    if any(s.seed is not None for s in slots):
        rms = host_grad_rms(model)
        for s in slots:
            s.observe_gradients(rms)
