"""Simic, the economy: rent, churn, reward and credit."""

from esper.simic.economy import (
    HIGH_RENT,
    LOW_RENT,
    NO_CHURN,
    STRUCTURAL_OPS,
    TASK_REWARDS,
    ChurnBreakdown,
    ChurnMeter,
    Economy,
    EconomyConfig,
    Ledger,
    RewardBreakdown,
    RunTotals,
    SeedAccount,
    SlotEconomics,
    level_reward,
    rent_alpha,
    reward,
    slot_rent,
    task_reward,
    tick_rent,
    unit_rent,
)

__all__ = [
    "HIGH_RENT",
    "LOW_RENT",
    "NO_CHURN",
    "STRUCTURAL_OPS",
    "TASK_REWARDS",
    "ChurnBreakdown",
    "ChurnMeter",
    "Economy",
    "EconomyConfig",
    "Ledger",
    "RewardBreakdown",
    "RunTotals",
    "SeedAccount",
    "SlotEconomics",
    "level_reward",
    "rent_alpha",
    "reward",
    "slot_rent",
    "task_reward",
    "tick_rent",
    "unit_rent",
]

# Credit (paper §5.3). The retrain audit lives in `esper.audits.retrain`: it drives `esper.run`,
# which imports this package, so it is not re-exported here; nor are the cheaper estimators
# priced against it (`esper.audits.estimators`), which build on the audit. The critics of audit
# credit (paper §5.4, `critic.py`) need numpy and safetensors only, so the policy may use them.
from esper.simic.critic import (
    Critic,
    CriticLoadError,
    load_critic,
    observation_features,
    spearman,
)
from esper.simic.shapley import (
    CountingValue,
    Credit,
    banzhaf,
    exact_shapley,
    interaction_index,
    leave_one_out,
    permutation_shapley,
)

__all__ += [
    "CountingValue",
    "Credit",
    "Critic",
    "CriticLoadError",
    "banzhaf",
    "exact_shapley",
    "interaction_index",
    "leave_one_out",
    "load_critic",
    "observation_features",
    "permutation_shapley",
    "spearman",
]
