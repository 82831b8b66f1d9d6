"""Narset (paper §9.7): the slow allocator that sets each zone's budgets from telemetry alone."""

from esper.narset.allocator import Narset

__all__ = ["Narset"]
