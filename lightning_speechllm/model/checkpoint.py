"""Safe reading of checkpoints, shared by every command that reads one (``measure``, ``sweep``, ``export``, ``heal``,
the CLIs' ``--ckpt_path`` check and the FSDP2 strategy).

A checkpoint of a :class:`~lightning_speechllm.model.module.SpeechLLMModule` (or of a healing module) holds only the
trainable weights plus, in its hyper-parameters, the model settings (base model paths, projector, LoRA, prompt ...); a
healing checkpoint also holds its final pruning plan. :func:`read_checkpoint` checks that shape and
:func:`removed_layers_of` / :func:`dropped_sublayers_of` read the plan; rebuilding the module from them is
:func:`lightning_speechllm.checkpoints.load_module`, above both the model and the healing floors.

Checkpoints travel between people, and unpickling can run code: :func:`load_checkpoint_file` (used for every
checkpoint we read ourselves) loads them as data only (``torch.load(weights_only=True)``) and turns a refusal into a
:class:`CheckpointError` naming the file and the offending object.
"""
from __future__ import annotations

import pickle
import re
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

__all__ = ["CheckpointError", "SAFE_GLOBALS", "check_checkpoint_file", "load_checkpoint_file", "dropped_sublayers_of",
           "read_checkpoint", "refused_as_checkpoint_error", "removed_layers_of"]


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
