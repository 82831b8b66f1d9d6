"""Flight recorder: the run directory, its manifest and an immutable event store (paper §8)."""

from esper.recorder.manifest import build_manifest, code_version, library_versions
from esper.recorder.records import (
    DECISION,
    CheckpointRecord,
    DecisionRecord,
    EventRecord,
)
from esper.recorder.store import (
    DB_NAME,
    SCHEMA_VERSION,
    RecorderError,
    RunStore,
    RunSummary,
    TickWriter,
    list_runs,
)

__all__ = [
    "DB_NAME",
    "DECISION",
    "SCHEMA_VERSION",
    "CheckpointRecord",
    "DecisionRecord",
    "EventRecord",
    "RecorderError",
    "RunStore",
    "RunSummary",
    "TickWriter",
    "build_manifest",
    "code_version",
    "library_versions",
    "list_runs",
]
