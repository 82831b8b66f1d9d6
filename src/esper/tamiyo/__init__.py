"""Tamiyo, the growth policy: masks, rule policies, the learned policy and PPO."""

from esper.tamiyo.features import GLOBAL_DIM, OBS_SPEC, SLOT_DIM, RunningNormalizer, featurize
from esper.tamiyo.learned import LearnedPolicy, PolicyLoadError, PolicyStep
from esper.tamiyo.masks import action_masks, illegal_reason, slot_allows
from esper.tamiyo.network import ActOut, EvalOut, TamiyoNet
from esper.tamiyo.policies import Decision, Policy, make_policy
from esper.tamiyo.ppo import (
    HealthMonitor,
    PPOConfig,
    RolloutBuffer,
    UpdateStats,
    compute_gae,
    ppo_update,
)

__all__ = [
    "GLOBAL_DIM",
    "OBS_SPEC",
    "SLOT_DIM",
    "ActOut",
    "Decision",
    "EvalOut",
    "HealthMonitor",
    "LearnedPolicy",
    "PPOConfig",
    "Policy",
    "PolicyLoadError",
    "PolicyStep",
    "RolloutBuffer",
    "RunningNormalizer",
    "TamiyoNet",
    "UpdateStats",
    "action_masks",
    "compute_gae",
    "featurize",
    "illegal_reason",
    "make_policy",
    "ppo_update",
    "slot_allows",
]
