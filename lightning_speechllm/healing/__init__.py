"""Healing of pruned SpeechLLMs: pluggable losses (CE, logit KL, hidden-state and replacement matching), the
HealingModule (LoRA and/or replacement modules, shared-weight teacher), iterative rounds, `heal` and `export`.
May import: `data`, `model`, `redundancy`, `pruning`, config and I/O helpers (never `evaluation`)."""
from lightning_speechllm.healing.losses import (
    HealingInputs,
    HealingLoss,
    HiddenStateCosine,
    HiddenStateMSE,
    KLDivergence,
    LossSpec,
    ReplacementMSE,
    TaskCrossEntropy,
    WeightedHealingLoss,
    build_losses,
    layer_map_for,
    load_loss,
    prediction_mask,
)
from lightning_speechllm.healing.module import (
    HealingConfig,
    HealingModule,
    NonFiniteLossError,
    PlanMismatchError,
    load_plan,
    receiving_layers,
)

__all__ = [
    "HealingConfig", "HealingInputs", "HealingLoss", "HealingModule", "HiddenStateCosine", "HiddenStateMSE", "ReplacementMSE",
    "KLDivergence", "LossSpec", "NonFiniteLossError", "PlanMismatchError", "TaskCrossEntropy",
    "WeightedHealingLoss", "build_losses", "layer_map_for", "load_loss", "load_plan", "prediction_mask",
    "receiving_layers",
]
