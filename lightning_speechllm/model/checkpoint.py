"""One way to rebuild a trained model from a checkpoint, shared by ``measure``, ``sweep`` and ``export``.

A checkpoint of a :class:`~lightning_speechllm.model.module.SpeechLLMModule` (or of a
:class:`~lightning_speechllm.healing.module.HealingModule`) holds only the trainable weights plus, in its
hyper-parameters, the model settings (base model paths, projector, LoRA, prompt ...); a healing checkpoint also holds
its final pruning plan. :func:`load_module` rebuilds the module from those, so the model always matches the weights:
the checkpoint's settings win over any settings a command was given (the ones it ignores are logged).

Checkpoints travel between people, and unpickling can run code: :func:`load_checkpoint_file` (used for every
checkpoint we read ourselves) loads them as data only (``torch.load(weights_only=True)``) and turns a refusal into a
:class:`CheckpointError` naming the file and the offending object.
"""
from __future__ import annotations

import logging
import pickle
import re
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import torch

from lightning_speechllm.config_utils import from_dict
from lightning_speechllm.model.module import DecodingConfig, OptimConfig, SpeechLLMModule
from lightning_speechllm.model.speechllm import SpeechLLMConfig

__all__ = ["CheckpointError", "SAFE_GLOBALS", "check_checkpoint_file", "ignored_settings", "load_checkpoint_file",
           "dropped_sublayers_of", "load_module", "read_checkpoint", "refused_as_checkpoint_error", "removed_layers_of"]

log = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """The checkpoint cannot be used: missing file, not a SpeechLLM checkpoint, unsafe to unpickle, or unfit for
    the command."""


# Globals a checkpoint may hold beyond what torch's weights_only unpickler accepts by default (tensors, dict, list,
# tuple, set, str, bytes, int, float, bool, None, OrderedDict, torch dtypes/devices). Our fit and heal checkpoints
# (hyper-parameters as asdict() dicts, ModelCheckpoint/IterativePruning callback states, loops, AdamW/LambdaLR
# states, the Lhotse sampler state) need none, and tests/test_checkpoint_safety.py keeps it that way: make a new
# entry a plain type (asdict, str(path), float(x)) rather than allow-listing its class here. An entry here reaches
# our own loads and the CLIs' --ckpt_path check only: Lightning's resume would also need add_safe_globals.
SAFE_GLOBALS: tuple[Any, ...] = ()

# torch's refusal names the first offending global ("GLOBAL exec was not an allowed global by default", "GLOBAL
# posix.system whose module posix is blocked"); the rest of its message suggests weights_only=False, which we don't.
_REFUSED_GLOBAL = re.compile(r"GLOBAL (\S+) (?:was not an allowed global|whose module)")


def _refused_object(message: str) -> str:
    """The offending global of torch's weights_only refusal, else its own (last) line of explanation."""
    match = _REFUSED_GLOBAL.search(message)
    if match:
        return f"global {match.group(1)!r}"
    detail = message.split("WeightsUnpickler error:")[-1].strip().splitlines()
    return detail[0] if detail else "an object torch's weights_only unpickler refuses"


@contextmanager
def refused_as_checkpoint_error(path: str | Path) -> Iterator[None]:
    """Turn torch's weights_only refusal (an UnpicklingError) into a CheckpointError naming ``path`` and the
    offending global. torch's own message is dropped (``from None``): it recommends ``weights_only=False``."""
    try:
        yield
    except pickle.UnpicklingError as error:
        raise CheckpointError(
            f"checkpoint {path} was refused: it holds objects that are not plain tensors or containers "
            f"({_refused_object(str(error))}), and unpickling them could run arbitrary code. lightning_speechllm "
            "writes checkpoints of tensors and plain containers only; ask whoever sent this file for one of "
            "those") from None


def load_checkpoint_file(ckpt_path: str | Path, mmap: bool = False) -> Any:
    """The object saved in ``ckpt_path`` (on CPU), read as data: tensors, plain containers and the
    :data:`SAFE_GLOBALS` only (``torch.load(weights_only=True)``), never code. A checkpoint holding anything else
    raises :class:`CheckpointError`. ``mmap``: map the tensors instead of reading them (zip-format files)."""
    path = Path(ckpt_path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    with refused_as_checkpoint_error(path), torch.serialization.safe_globals(list(SAFE_GLOBALS)):
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)


def check_checkpoint_file(ckpt_path: str | Path) -> None:
    """Raise :class:`CheckpointError` if ``ckpt_path`` holds more than :func:`load_checkpoint_file` accepts; its
    tensors are mapped, not read (cheap), where the file is in torch's zip format (every torch.save since 1.6)."""
    load_checkpoint_file(ckpt_path, mmap=zipfile.is_zipfile(ckpt_path))


def read_checkpoint(ckpt_path: str | Path) -> dict[str, Any]:
    """The checkpoint dict of ``ckpt_path`` (on CPU), checked to be a SpeechLLMModule/HealingModule checkpoint."""
    path = Path(ckpt_path)
    checkpoint = load_checkpoint_file(path)
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"checkpoint {path} is a {type(checkpoint).__name__}, not a Lightning checkpoint dict")
    for key in ("hyper_parameters", "state_dict"):
        if key not in checkpoint:
            raise CheckpointError(f"checkpoint {path} has no {key!r} entry (keys: {sorted(checkpoint)[:8]})")
    if "model" not in checkpoint["hyper_parameters"]:
        raise CheckpointError(f"checkpoint {path}: hyper_parameters has no 'model' entry (not a SpeechLLMModule)")
    if "healing" in checkpoint and "healing" not in checkpoint["hyper_parameters"]:
        raise CheckpointError(f"checkpoint {path}: a healing checkpoint without 'healing' hyper-parameters")
    return checkpoint


def removed_layers_of(checkpoint: dict[str, Any]) -> list[int]:
    """The decoder layers the checkpoint's model has removed (original numbering): a healing checkpoint's final
    plan (iterative rounds included), else the model settings' ``removed_layers``."""
    if "healing" in checkpoint:
        return sorted(int(i) for i in checkpoint["healing"]["plan"]["removed_layers"])
    return sorted(int(i) for i in checkpoint["hyper_parameters"]["model"].get("removed_layers") or [])


def dropped_sublayers_of(checkpoint: dict[str, Any]) -> dict[str, list[int]]:
    """``{"removed_attention": [...], "removed_mlp": [...]}`` of the checkpoint's model, only the non-empty ones."""
    source = checkpoint["healing"]["plan"] if "healing" in checkpoint else checkpoint["hyper_parameters"]["model"]
    return {key: sorted(int(i) for i in source[key]) for key in ("removed_attention", "removed_mlp") if source.get(key)}


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
