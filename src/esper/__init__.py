"""Esper: morphogenetic neural networks that grow and prune their own structure while training."""

__version__ = "0.1.0"

from esper.api import grow  # after __version__: submodules read it

__all__ = ["__version__", "grow"]
