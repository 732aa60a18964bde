"""Pruning plans (which decoder layers to remove) and the ``prune`` command."""
from lightning_speechllm.pruning.greedy import plan_greedy
from lightning_speechllm.pruning.plan import (
    PLAN_FORMAT_VERSION,
    PLAN_METHODS,
    PlanError,
    PlanMethod,
    PruningPlan,
    apply_plan,
    block_size,
    plan_angular,
    plan_block_influence,
    plan_explicit,
    plan_last,
    same_model_id,
)

__all__ = [
    "PLAN_FORMAT_VERSION",
    "PLAN_METHODS",
    "PlanError",
    "PlanMethod",
    "PruningPlan",
    "apply_plan",
    "block_size",
    "plan_angular",
    "plan_block_influence",
    "plan_explicit",
    "plan_greedy",
    "plan_last",
    "same_model_id",
]
