"""Pruning plans: which decoder layers (or attention sublayers) to remove, from a map, a rule or a greedy re-measured
search; plan JSON files, applying a plan to a model, and the ``prune`` command.
May import: `data`, `model`, `redundancy`, config and I/O helpers (never `healing` or `evaluation`)."""
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
