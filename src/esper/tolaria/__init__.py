"""Tolaria, the engine: growth environments, governor, determinism, tasks."""
