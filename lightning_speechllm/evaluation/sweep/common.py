"""What the sweep and the method comparison share, so that neither imports the other's private names nor the other
back: the comparison's method names (the sweep checks its options against them) and the unpruned-model check both
run first. (Their resume keys are in :mod:`~lightning_speechllm.evaluation.resume_key`.)"""
from __future__ import annotations

from typing import Any

import torch

from lightning_speechllm.evaluation.sweep.table import SweepError
from lightning_speechllm.model.speechllm import SpeechLLM

__all__ = ["COMPARISON_METHODS", "SUBLAYER_METHODS", "require_unpruned", "trainer_device"]

COMPARISON_METHODS = ("angular", "block_influence", "last", "greedy", "attention", "budget", "budget_evo")
"""Pruning methods a method comparison (`sweep.compare_methods`) can put on one table."""
SUBLAYER_METHODS = ("attention", "budget", "budget_evo")
"""Methods whose plans may drop sublayers (attention always, the budget plans when they choose them): no replacement
module or linear patch stands in for a dropped sublayer."""


def require_unpruned(speechllm: SpeechLLM, what: str) -> None:
    """Raise :class:`SweepError` unless every layer and sublayer of ``speechllm`` is active (``what`` names the run
    that needs the unpruned model)."""
    sublayers = speechllm.sublayer_mask
    cut = {"layers": list(speechllm.layer_mask.removed_layers), "attention of layers": list(sublayers.dropped_attention),
           "MLP of layers": list(sublayers.dropped_mlp)}
    cut = {key: value for key, value in cut.items() if value}
    if cut:
        raise SweepError(f"{what} starts from the unpruned model; this one masks "
                         + ", ".join(f"{key} {value}" for key, value in cut.items()))


def trainer_device(trainer_kwargs: dict[str, Any] | None) -> torch.device:
    """The device of the trainer's accelerator, where a sweep's own passes (plans, maps, timings, linear patches) run.
    Lightning moves the model back to the CPU after each validate/fit, so the model is moved there before each."""
    accelerator = (trainer_kwargs or {}).get("accelerator", "auto")
    if accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")
