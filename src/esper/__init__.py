"""Esper: morphogenetic neural networks that grow and prune their own structure while training."""

from __future__ import annotations

from importlib.metadata import version
from typing import Any

__version__ = version("esper")  # one source: pyproject.toml

__all__ = ["__version__", "diff", "export", "grow", "replay"]


def __getattr__(name: str) -> Any:
    # `esper.grow` is the Python API at the top layer. Importing it here eagerly would make every
    # `import esper.<package>` import torch and the whole engine; resolved on first use instead.
    if name in ("grow", "export", "replay", "diff"):
        from esper import api

        return getattr(api, name)
    raise AttributeError(f"module 'esper' has no attribute {name!r}")
