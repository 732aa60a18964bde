"""What the sweep and the method comparison share, so that neither imports the other's private names nor the other
back: the comparison's method names (the sweep checks its options against them) and the unpruned-model check both
run first. (Their resume keys are in :mod:`~lightning_speechllm.evaluation.resume_key`.)"""
from __future__ import annotations

from lightning_speechllm.evaluation.sweep.table import SweepError
from lightning_speechllm.model.speechllm import SpeechLLM

__all__ = ["COMPARISON_METHODS", "SUBLAYER_METHODS", "require_unpruned"]

COMPARISON_METHODS = ("angular", "block_influence", "last", "greedy", "attention", "budget")
"""Pruning methods a method comparison (`sweep.compare_methods`) can put on one table."""
SUBLAYER_METHODS = ("attention", "budget")
"""Methods whose plans drop sublayers: no replacement module or linear patch stands in for those."""


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
