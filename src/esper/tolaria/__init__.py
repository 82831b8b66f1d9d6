"""Tolaria, the engine: the one control tick (`Episode`), vectorised episodes, the growth
environment, the governor, determinism and seeds, tasks."""
