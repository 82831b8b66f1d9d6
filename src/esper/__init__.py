"""Esper: morphogenetic neural networks that grow and prune their own structure while training."""

__version__ = "0.1.0"
