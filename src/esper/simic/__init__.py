"""Simic, the economy: rent, churn, reward and credit."""

from esper.simic.economy import (
    HIGH_RENT,
    LOW_RENT,
    NO_CHURN,
    STRUCTURAL_OPS,
    ChurnBreakdown,
    ChurnMeter,
    Economy,
    EconomyConfig,
    Ledger,
    RewardBreakdown,
    RunTotals,
    SeedAccount,
    SlotEconomics,
    rent_alpha,
    reward,
    slot_rent,
    task_reward,
    tick_rent,
)

__all__ = [
    "HIGH_RENT",
    "LOW_RENT",
    "NO_CHURN",
    "STRUCTURAL_OPS",
    "ChurnBreakdown",
    "ChurnMeter",
    "Economy",
    "EconomyConfig",
    "Ledger",
    "RewardBreakdown",
    "RunTotals",
    "SeedAccount",
    "SlotEconomics",
    "rent_alpha",
    "reward",
    "slot_rent",
    "task_reward",
    "tick_rent",
]

# Credit (paper §5.3). The retrain audit lives in `esper.simic.audit`: it drives `esper.run`,
# which imports this package, so it is not re-exported here.
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
    "banzhaf",
    "exact_shapley",
    "interaction_index",
    "leave_one_out",
    "permutation_shapley",
]
