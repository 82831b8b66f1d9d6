"""Emrakul, the decay policy (paper §9): which phage units to sedate, weaken or lift."""

from esper.emrakul.policies import (
    DECAY_POLICIES,
    EmrakulConfig,
    EmrakulPolicy,
    HeuristicEmrakul,
    make_emrakul,
)

__all__ = ["DECAY_POLICIES", "EmrakulConfig", "EmrakulPolicy", "HeuristicEmrakul", "make_emrakul"]
