"""Writing files one way: into a temporary file beside the target, then an atomic rename.

A reader (or a resumed run) therefore sees the old file or the new one, never half of one, even
when the writer is killed mid-write. Every weights file Esper writes (model, checkpoint, policy,
critic, training state) goes through `atomic_write`. Pure Python: no torch.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path


def atomic_write(path: str | Path, write: Callable[[Path], object]) -> Path:
    """Call `write(tmp)` to write the whole file at a temporary path in `path`'s folder, flush it
    to disk, then rename it over `path` (atomic on POSIX and Windows). On any error the temporary
    file is removed and `path` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb") as f:  # the rename must not overtake the data on a power loss
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
