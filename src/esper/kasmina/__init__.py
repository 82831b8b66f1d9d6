"""Kasmina, the body: SeedSlots, seed lifecycle, blending, blueprints, phages and hosts."""

from esper.kasmina.alpha import AlphaSchedule, curve_value
from esper.kasmina.blend import Blend
from esper.kasmina.blueprints import (
    BlueprintError,
    HiddenUnits,
    SeedModule,
    blueprint_cost,
    blueprints_for,
    build_seed,
    parse_blueprint,
    supported_topologies,
)
from esper.kasmina.checkpoint import (
    CheckpointError,
    apply_model_state,
    apply_model_structure,
    load_model,
    model_state,
    read_checkpoint,
    save_model,
    save_tensors,
)
from esper.kasmina.hosts import (
    CNNHost,
    MLPHost,
    Residual,
    TransformerHost,
    slot_depths,
    slots_of,
    wrap_in_phage,
)
from esper.kasmina.insert import InsertionError, describe, insert_slots
from esper.kasmina.layers import channel_dim
from esper.kasmina.lysis import UnitMask
from esper.kasmina.phage import SEDATE, LysisError, Phage, PhageROI
from esper.kasmina.probe import Cost, module_cost, probing
from esper.kasmina.slot import GateConfig, GateReport, SeedSlot
from esper.kasmina.stream import Compaction, Stream, StreamNorm, Widening
from esper.kasmina.telemetry import host_grad_rms, observe_gradients
from esper.kasmina.tissue import (
    Tissue,
    mark_host_phages,
    mark_phage,
    marked_blocks,
    tissue_of,
)

__all__ = [
    "SEDATE",
    "AlphaSchedule",
    "Blend",
    "BlueprintError",
    "CNNHost",
    "CheckpointError",
    "Compaction",
    "Cost",
    "GateConfig",
    "GateReport",
    "HiddenUnits",
    "InsertionError",
    "LysisError",
    "MLPHost",
    "Phage",
    "PhageROI",
    "Residual",
    "SeedModule",
    "SeedSlot",
    "Stream",
    "StreamNorm",
    "Tissue",
    "TransformerHost",
    "UnitMask",
    "Widening",
    "apply_model_state",
    "apply_model_structure",
    "blueprint_cost",
    "blueprints_for",
    "build_seed",
    "channel_dim",
    "curve_value",
    "describe",
    "host_grad_rms",
    "insert_slots",
    "load_model",
    "mark_host_phages",
    "mark_phage",
    "marked_blocks",
    "model_state",
    "module_cost",
    "observe_gradients",
    "parse_blueprint",
    "probing",
    "read_checkpoint",
    "save_model",
    "save_tensors",
    "slot_depths",
    "slots_of",
    "supported_topologies",
    "tissue_of",
    "wrap_in_phage",
]
