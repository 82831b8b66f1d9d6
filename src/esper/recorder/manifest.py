"""The run manifest, a run's first record: config, seeds, code and library versions, machine."""

from __future__ import annotations

import contextlib
import importlib.metadata
import platform
import socket
import sqlite3
import subprocess
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy
import torch

_PACKAGE_DIR = Path(__file__).resolve().parents[1]  # src/esper


def build_manifest(config: dict[str, Any], seeds: dict[str, Any], device: str) -> dict[str, Any]:
    """Everything needed to say what produced a run: its inputs, its code and its machine."""
    commit, dirty = code_version()
    return {
        "config": config,
        "seeds": seeds,
        "device": device,
        "esper_version": version("esper"),
        "code": {"commit": commit, "dirty": dirty},
        "libraries": library_versions(),
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def code_version() -> tuple[str, bool | None]:
    """The git commit of Esper's source tree and whether the tree has uncommitted changes.

    ("unknown", None) when Esper does not run from a git checkout (an installed wheel), or when the
    checkout around it does not track Esper's own files (a venv inside another project's repo).
    """
    if _git("ls-files", "--error-unmatch", "__init__.py") is None:
        return "unknown", None
    commit = _git("rev-parse", "HEAD")
    if commit is None:
        return "unknown", None
    status = _git("status", "--porcelain")
    return commit, None if status is None else bool(status)


def library_versions() -> dict[str, str]:
    """Versions of the libraries that decide a run's numbers, as imported by this process."""
    versions = {
        "python": platform.python_version(),
        "torch": str(torch.__version__),
        "numpy": numpy.__version__,
        "sqlite": sqlite3.sqlite_version,
    }
    # CUDA and cuDNN pick the kernels, hence the bits of a GPU run; both are None on CPU builds.
    if torch.version.cuda is not None:
        versions["cuda"] = torch.version.cuda
    if torch.backends.cudnn.version() is not None:
        versions["cudnn"] = str(torch.backends.cudnn.version())
    # Read from package metadata: importing sklearn only for its version costs a second.
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):
        versions["sklearn"] = importlib.metadata.version("scikit-learn")
    return versions


def _git(*args: str) -> str | None:
    """Output of a git command run in Esper's package directory, or None if it fails."""
    try:
        done = subprocess.run(
            ["git", *args], cwd=_PACKAGE_DIR, capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip()
