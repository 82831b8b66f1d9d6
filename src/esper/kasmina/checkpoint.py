"""Weights-only checkpoints of a grown model (safetensors; no pickle, no code).

The file holds the model's state dict as tensors and, in its header metadata, a JSON description
of every slot (stage, clock, seed spec, α schedule, unit counts after lysis) and of host blocks
wrapped as phages. Loading into a freshly built host rebuilds each seed or phage from its spec,
then loads the weights: no manual re-germination.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from esper.contracts import AlphaCurve, SeedSpec, Stage
from esper.contracts.errors import EsperError
from esper.contracts.files import atomic_write
from esper.kasmina.alpha import AlphaSchedule
from esper.kasmina.channels import stream_groups
from esper.kasmina.hosts import slots_of, wrap_in_phage
from esper.kasmina.phage import Phage
from esper.kasmina.slot import GateReport, SeedSlot
from esper.kasmina.stream import Stream, Widening
from esper.kasmina.tissue import mark_phage, marked_blocks, units_module

FORMAT = "esper.kasmina.model"
VERSION = 1


class CheckpointError(EsperError, RuntimeError):
    """A checkpoint that is missing, corrupt, or does not fit the model it is loaded into."""


# -- slot state <-> JSON -------------------------------------------------------------------------


def _phage_state(phage: Phage) -> dict[str, Any]:
    return {
        "units": phage.units,
        "has_module": phage.module is not None,
        "has_blend": phage.blend is not None,
        "module_sedated": phage.module_sedated,
        "fade": list(phage.fade) if phage.fade else None,
    }


def slot_state(slot: SeedSlot) -> dict[str, Any]:
    gate = slot.last_gate
    target, tempo, curve = slot.pending
    return {
        "channels": slot.channels,
        "topology": slot.topology.value,
        "stage": slot.stage.name,
        "ticks_in_stage": slot.lifecycle.ticks_in_stage,
        "last_tick": slot.lifecycle.last_tick,
        "spec": slot.spec.to_dict() if slot.spec else None,
        "schedule": slot.schedule.to_dict(),
        "pending": [target, tempo, curve.name],
        "seed_units": slot.seed.units if slot.seed is not None else None,
        "phage": _phage_state(slot.phage) if slot.phage is not None else None,
        "gate": None if gate is None else [gate.passed, list(gate.reasons), gate.metrics],
        "seed_id": slot.seed_id,
        "absorbed": slot.absorbed,
        "contribution": slot.contribution,
        "contribution_tick": slot.contribution_tick,
    }


def _apply_phage_state(phage: Phage, st: dict[str, Any]) -> Phage:
    """Shape `phage` as `st` says (units left after lysis, what was removed); weights come later."""
    mask = getattr(phage.module, "unit_mask", None)
    if mask is not None and mask.units != st["units"]:
        phage.module.remove_units(torch.arange(st["units"]))
    if not st["has_module"]:
        phage.module = None
    if not st["has_blend"]:
        phage.blend = None
    phage.module_sedated = st["module_sedated"]
    phage.fade = tuple(st["fade"]) if st["fade"] else None
    return phage


def restore_slot(slot: SeedSlot, st: dict[str, Any]) -> None:
    """Make `slot` structurally what `st` describes (weights are loaded afterwards)."""
    if slot.site is not None and st["topology"] == slot.topology.value:
        slot.channels = st["channels"]  # on a stream that widens, a slot's width is its state's
    if (st["channels"], st["topology"]) != (slot.channels, slot.topology.value):
        raise CheckpointError(
            f"slot {slot.name!r}: checkpoint has {st['channels']} channels on {st['topology']}, "
            f"model has {slot.channels} on {slot.topology.value}"
        )
    slot._clear()
    lc = slot.lifecycle
    lc.stage, lc.ticks_in_stage, lc.last_tick = (
        Stage[st["stage"]],
        st["ticks_in_stage"],
        st["last_tick"],
    )
    compacted = st["stage"] == Stage.COMMITTED.name and st["phage"] is None
    if st["spec"] is not None and compacted:  # a committed widening lives in the host's layers
        slot.spec = SeedSpec.from_dict(st["spec"])
        slot.absorbed = st.get("absorbed", 0)
    elif st["spec"] is not None:
        spec = SeedSpec.from_dict(st["spec"])
        seed, blend = slot.build(spec)
        slot.spec = spec
        if st["phage"] is not None:
            slot.phage = _apply_phage_state(Phage(seed, blend, slot.name), st["phage"])
        else:
            if st["seed_units"] is not None and seed.units != st["seed_units"]:
                seed.remove_units(torch.arange(st["seed_units"]))
            if isinstance(seed, Widening):
                seed.install(slot)
            slot.seed, slot.blend = seed, blend
    slot.schedule = AlphaSchedule.from_dict(st["schedule"])
    target, tempo, curve = st["pending"]
    slot.pending = (target, tempo, AlphaCurve[curve])
    if st["gate"] is not None:
        passed, reasons, metrics = st["gate"]
        slot.last_gate = GateReport(passed, tuple(reasons), metrics)
    slot.seed_id, slot.contribution, slot.contribution_tick = (
        st["seed_id"],
        st["contribution"],
        st["contribution_tick"],
    )
    slot._refresh()


# -- model files ---------------------------------------------------------------------------------


def model_metadata(model: nn.Module) -> dict[str, Any]:
    in_slots = {id(s.phage) for s in slots_of(model).values()}
    host_phages = {
        path: _phage_state(m)
        for path, m in model.named_modules()
        if isinstance(m, Phage) and id(m) not in in_slots
    }
    return {
        "format": FORMAT,
        "version": VERSION,
        "slots": {name: slot_state(s) for name, s in slots_of(model).items()},
        "host_phages": host_phages,
        "host_tissue": _host_tissue_state(model),
        "stream": _stream_state(model),
    }


def _host_tissue_state(model: nn.Module) -> dict[str, Any]:
    """Host blocks marked as phages (`kasmina.tissue`): their name and units left after lysis."""
    return {
        path: {"name": name, "units": target.unit_mask.units}
        for path, name, target in marked_blocks(model)
    }


def _restore_host_tissue(model: nn.Module, st: dict[str, Any], source: str) -> None:
    """Mark the checkpoint's host phages and give them its unit counts (lysis is replayed by
    keeping the first units: their weights are loaded afterwards)."""
    for path, entry in st.items():
        module = mark_phage(model.get_submodule(path), entry["name"])
        target = units_module(module)
        if target.unit_mask.units < entry["units"]:
            raise CheckpointError(
                f"{source}: host phage {path!r} has {target.unit_mask.units} units left, "
                f"cannot restore {entry['units']} (lysis is irreversible)"
            )
        if target.unit_mask.units > entry["units"]:
            target.remove_units(torch.arange(entry["units"]))


def _stream_state(model: nn.Module) -> dict[str, Any] | None:
    stream = _stream_of(model)
    if stream is None:
        return None
    groups = stream_groups(model) if stream.channel_groups else []  # in step with widenings
    masks = [g.unit_mask.mask.tolist() for g in groups]
    return {"width": stream.width, "widenings": [list(w) for w in stream.widenings], "masks": masks}


def _restore_stream(model: nn.Module, st: dict[str, Any] | None, source: str) -> None:
    """Give the host's stream layers the shapes of the checkpoint's committed widenings."""
    stream = _stream_of(model)
    if stream is None or st is None:
        if st is not None and st["widenings"]:
            raise CheckpointError(f"{source} has a widened stream; this model declares none")
        return
    if st["width"] != stream.width:
        raise CheckpointError(
            f"{source} does not fit this model: it has {st['width']} channels in its residual "
            f"stream, the model has {stream.width}"
        )
    stream.rebuild(model, st["widenings"])
    masks = st.get("masks", [])
    if masks:  # decay's masks over widening channels (`kasmina.channels`)
        for group, values in zip(stream_groups(model), masks, strict=True):
            mask = group.unit_mask
            mask.mask.copy_(torch.tensor(values))
            mask.active = bool((mask.mask != 1).any())


def _stream_of(model: nn.Module) -> Stream | None:
    stream = getattr(model, "stream", None)
    return stream if isinstance(stream, Stream) else None


def save_model(model: nn.Module, path: str | Path, extra: dict[str, Any] | None = None) -> None:
    """Write `model` (host, slots, seeds, phages) to a safetensors file."""
    meta = model_metadata(model)
    if extra:
        meta["extra"] = extra
    tensors = {k: v.detach().clone() for k, v in model.state_dict().items()}
    save_tensors(path, tensors, {"esper": json.dumps(meta)})


def save_tensors(
    path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]
) -> Path:
    """Write a safetensors file atomically (`esper.contracts.files.atomic_write`): the one way
    Esper writes torch weights (models, run checkpoints, policies, training state)."""
    body = {k: v.detach().contiguous() for k, v in tensors.items()}
    return atomic_write(path, lambda tmp: save_file(body, str(tmp), metadata=metadata))


def read_checkpoint(
    path: str | Path, device: str | torch.device = "cpu"
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(metadata, tensors) of an Esper model file, validated."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            raw = (f.metadata() or {}).get("esper")
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(
            f"checkpoint {path} is corrupt or not a safetensors file: {e}"
        ) from None
    if raw is None:
        raise CheckpointError(f"checkpoint {path} has no Esper metadata (not an Esper model file)")
    try:
        meta = json.loads(raw)
    except ValueError as e:
        raise CheckpointError(f"checkpoint {path} has unreadable Esper metadata: {e}") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"checkpoint {path} has Esper metadata that is not an object")
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise CheckpointError(
            f"checkpoint {path} is format {meta.get('format')} "
            f"v{meta.get('version')}; expected {FORMAT} v{VERSION}"
        )
    return meta, tensors


def load_model(model: nn.Module, path: str | Path) -> dict[str, Any]:
    """Load a file written by `save_model` into a freshly built `model`; returns the metadata."""
    device = next(iter(model.state_dict().values())).device
    meta, tensors = read_checkpoint(path, device)
    apply_model_state(model, meta, tensors, source=f"checkpoint {path}")
    return meta


def model_state(model: nn.Module) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(metadata, cloned tensors): an in-memory snapshot, the same content as a model file."""
    tensors = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return model_metadata(model), tensors


def apply_model_state(
    model: nn.Module,
    meta: dict[str, Any],
    tensors: dict[str, torch.Tensor],
    source: str = "snapshot",
) -> None:
    """Rebuild `model`'s stream (its committed widenings), slots and phages as `meta`
    describes, then load `tensors`."""
    apply_model_structure(model, meta, source)
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        raise CheckpointError(
            f"{source} does not fit this model: {' '.join(x.strip() for x in first[:3])}"
        ) from None


def apply_model_structure(model: nn.Module, meta: dict[str, Any], source: str = "snapshot") -> None:
    """Give `model` the structure `meta` describes — stream widenings, host tissue and phages,
    slots — with the weights it has (a slot whose state is None is left dormant)."""
    slots = slots_of(model)
    unknown = sorted(set(meta["slots"]) - set(slots))
    missing = sorted(set(slots) - set(meta["slots"]))
    if unknown or missing:
        raise CheckpointError(
            f"{source} does not fit this model: slots only in the "
            f"file {unknown}, slots only in the model {missing}"
        )
    for slot in slots.values():  # live widenings unwrap the stream layers first
        slot._clear()
    _restore_stream(model, meta.get("stream"), source)
    _restore_host_tissue(model, meta.get("host_tissue", {}), source)
    for p, st in meta["host_phages"].items():
        current = model.get_submodule(p)
        phage = current if isinstance(current, Phage) else wrap_in_phage(model, p)
        if phage.units < st["units"]:
            raise CheckpointError(
                f"{source}: host phage {p!r} has {phage.units} units left, "
                f"cannot restore {st['units']} (lysis is irreversible)"
            )
        _apply_phage_state(phage, st)
    for name, st in meta["slots"].items():
        if st is not None:
            restore_slot(slots[name], st)
