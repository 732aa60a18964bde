"""One way to rebuild a trained model from a checkpoint, shared by ``measure``, ``prune``, ``sweep`` and ``export``.

A checkpoint of a :class:`~lightning_speechllm.model.module.SpeechLLMModule` (or of a
:class:`~lightning_speechllm.healing.module.HealingModule`) holds only the trainable weights plus, in its
hyper-parameters, the model settings (base model paths, projector, LoRA, prompt ...); a healing checkpoint also holds
its final pruning plan. :func:`load_module` rebuilds the module from those, so the model always matches the weights:
the checkpoint's settings win over any settings a command was given (the ones it ignores are logged).

It lives above both floors it builds from: ``model`` (the SpeechLLMModule, and the safe reading of the file in
:mod:`lightning_speechllm.model.checkpoint`) and ``healing`` (the HealingModule, imported only for a healing
checkpoint), so ``model`` never imports ``healing``.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

from lightning_speechllm.config_utils import from_dict
from lightning_speechllm.model.checkpoint import (
    CheckpointError,
    dropped_sublayers_of,
    read_checkpoint,
    removed_layers_of,
)
from lightning_speechllm.model.module import DecodingConfig, OptimConfig, SpeechLLMModule
from lightning_speechllm.model.speechllm import SpeechLLMConfig

__all__ = ["ignored_settings", "load_module"]

log = logging.getLogger(__name__)


def ignored_settings(requested: SpeechLLMConfig, saved: SpeechLLMConfig) -> dict[str, tuple[Any, Any]]:
    """``{field: (given, checkpoint's)}`` for the model settings a command set away from their defaults to a value
    other than the checkpoint's (settings left at their defaults are not reported)."""
    given, theirs, default = asdict(requested), asdict(saved), asdict(SpeechLLMConfig())
    return {item.name: (given[item.name], theirs[item.name]) for item in fields(SpeechLLMConfig)
            if given[item.name] != theirs[item.name] and given[item.name] != default[item.name]}


def load_module(ckpt_path: str | Path, requested: SpeechLLMConfig | None = None,
                allow_pruned: bool = True) -> SpeechLLMModule:
    """Rebuild the module of a checkpoint from its hyper-parameters, trained weights loaded, in eval mode.

    A checkpoint with a 'healing' entry gives a :class:`HealingModule` carrying its final plan (layers masked, LoRA
    on the receiving layers), any other a :class:`SpeechLLMModule`. ``requested`` is the model configuration the
    command was given: the checkpoint's settings win, and the ones ``requested`` set differently are logged as
    ignored. ``allow_pruned=False`` refuses, before loading any weight, a checkpoint whose model has removed layers.
    """
    checkpoint = read_checkpoint(ckpt_path)
    removed = removed_layers_of(checkpoint)
    sublayers = dropped_sublayers_of(checkpoint)
    if (removed or sublayers) and not allow_pruned:
        what = f"removed decoder layers {removed}" if removed else f"dropped sublayers {sublayers}"
        raise CheckpointError(f"checkpoint {ckpt_path} holds a pruned model ({what}); give the checkpoint of the "
                              "unpruned model")
    hp = checkpoint["hyper_parameters"]
    model = from_dict(SpeechLLMConfig, dict(hp["model"]))
    if requested is not None:
        ignored = ignored_settings(requested, model)
        if ignored:
            log.warning("%s: the model is built from the checkpoint's settings; ignoring the given %s", ckpt_path,
                        "; ".join(f"{k}={given!r} (checkpoint: {theirs!r})" for k, (given, theirs) in ignored.items()))
    common = {"optim": from_dict(OptimConfig, hp.get("optim")), "decoding": from_dict(DecodingConfig, hp.get("decoding"))}
    if "healing" in checkpoint:
        # Imported here, as before the move: a command reading a fit checkpoint (``measure``, ``prune``) never
        # imports the healing room.
        from lightning_speechllm.healing.module import HealingConfig, HealingModule

        healing = from_dict(HealingConfig, dict(hp["healing"]))
        # The checkpoint's plan is the truth: a run healed from a plan_path has its cut there only (its healing
        # settings keep their defaults), and without the plan file the dropped sublayers would be lost.
        healing.removed_layers, healing.plan_path, healing.teacher_checkpoint = removed, None, None
        healing.removed_attention = sublayers.get("removed_attention", [])
        healing.removed_mlp = sublayers.get("removed_mlp", [])
        model.removed_layers = removed
        model.removed_attention, model.removed_mlp = list(healing.removed_attention), list(healing.removed_mlp)
        module: SpeechLLMModule = HealingModule(model=model, healing=healing, **common)
    else:
        module = SpeechLLMModule(model=model, **common)
    module.on_load_checkpoint(checkpoint)
    module.load_state_dict(checkpoint["state_dict"])
    log.info("loaded %s: %s, removed decoder layers %s", ckpt_path, type(module).__name__, removed or "none")
    return module.eval()
