"""What a stored sweep point or method-comparison row must agree on to be reused: the parts of a run that change its
scores, shared by :mod:`~lightning_speechllm.evaluation.sweep.run` and
:mod:`~lightning_speechllm.evaluation.method_comparison`.

A rerun after any of these changed must score again, never read a stale result: the model settings that change
what the decoder computes (prompt, dtypes, attention kernel, encoder window, projector shape), the trained weights,
the decoding, the trainer's precision, the content of every manifest scored (sha256 of the file bytes, not only the
set names), the data settings that decide which utterances are scored and how they are batched, and, when the run
heals, the training data and its sampler.
"""
from __future__ import annotations

import hashlib
from dataclasses import asdict
from pathlib import Path
from typing import Any

import lightning as L

from lightning_speechllm.evaluation.sweep.table import SweepError
from lightning_speechllm.model.module import DecodingConfig
from lightning_speechllm.model.speechllm import SpeechLLM

__all__ = ["data_key", "decoding_key", "file_sha256", "manifest_sha256", "model_key", "run_key", "trainer_key",
           "weights_sha256"]

# Data settings that decide which evaluation utterances are scored and how they are batched (left padding, bucket
# order): the scores move with them.
_EVAL_DATA_KEYS = ("eval_max_duration", "max_cuts", "max_audio_seconds", "on_bad_sample", "text_only")
# Sampler settings of the healing data: another order or batch size heals another model.
_TRAIN_DATA_KEYS = ("max_duration", "max_cuts", "num_buckets", "seed", "shuffle", "drop_last", "quadratic_duration",
                    "buffer_size", "num_cuts_for_bins_estimate")
# Model settings besides the weights that change what the model computes.
_MODEL_KEYS = ("llm_path", "encoder_path", "llm_dtype", "encoder_dtype", "attn_implementation",
               "encoder_window_seconds", "encoder_window_step_seconds")


def file_sha256(path: str | Path | None) -> str | None:
    """sha256 of the bytes of ``path``; None for no path or a missing file (an optional input left out)."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest() if path and Path(path).is_file() else None


def manifest_sha256(path: str | Path) -> str:
    """sha256 of a manifest's content: a JSONL / Lhotse file's bytes; for a Lhotse Shar directory, the bytes of its
    ``cuts.*`` shards (every utterance's text and audio reference) plus the names and sizes of its other shards
    (hashing gigabytes of audio tar files at every rerun would cost minutes). A missing manifest is an error naming
    it."""
    path = Path(path)
    if path.is_file():
        return hashlib.sha256(path.read_bytes()).hexdigest()
    if not path.is_dir():
        raise SweepError(f"manifest {path} does not exist: cannot key the run on its content")
    digest = hashlib.sha256()
    for item in sorted(p for p in path.rglob("*") if p.is_file()):
        name = item.relative_to(path).as_posix()
        digest.update(name.encode())
        digest.update(item.read_bytes() if item.name.startswith("cuts.") else str(item.stat().st_size).encode())
    return digest.hexdigest()


def weights_sha256(speechllm: SpeechLLM) -> str:
    """sha256 of the trained weights (projector, LoRA, a tuned encoder), by name."""
    digest = hashlib.sha256()
    for name, tensor in sorted(speechllm.trainable_state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()


def model_key(speechllm: SpeechLLM) -> dict[str, Any]:
    """The model: base paths, dtypes, attention kernel, encoder window, prompt, projector shape, trained weights."""
    config = speechllm.config
    released = {"pretrained": config.pretrained} if config.pretrained else {}  # older keys stay as they were
    return {**released, **{key: getattr(config, key) for key in _MODEL_KEYS}, "prompt": asdict(config.prompt),
            "projector": asdict(config.projector), "trained_weights_sha256": weights_sha256(speechllm)}


def decoding_key(decoding: DecodingConfig | None) -> dict[str, Any]:
    """The decoding settings that change hypotheses (evaluation always generates)."""
    decoding = decoding or DecodingConfig()
    return {"max_new_tokens": decoding.max_new_tokens, "num_beams": decoding.num_beams}


def trainer_key(trainer_kwargs: dict[str, Any] | None) -> dict[str, Any]:
    """The trainer's precision (bf16-mixed and 32-true score differently); None: Lightning's default."""
    precision = (trainer_kwargs or {}).get("precision")
    return {"precision": None if precision is None else str(precision)}


def _named_manifests(sets: dict[str, Any] | None) -> dict[str, str] | None:
    return None if sets is None else {str(name): manifest_sha256(path) for name, path in sets.items()}


def data_key(datamodule: L.LightningDataModule, stage: str, heal: bool) -> dict[str, Any]:
    """The data: the content of every manifest ``stage`` scores (by set name), the settings that pick and batch its
    utterances and, with ``heal``, the training manifests and their sampler. A datamodule without manifests (sets
    held in memory) is keyed by what it declares: nothing beyond its set names."""
    sets = getattr(datamodule, "val_sets" if stage == "validate" else "test_sets", None)
    key: dict[str, Any] = {"manifests": _named_manifests(sets),
                           **{name: getattr(datamodule, name, None) for name in _EVAL_DATA_KEYS}}
    if heal:
        train = getattr(datamodule, "train_paths", None)
        key["train_manifests"] = None if train is None else [manifest_sha256(path) for path in train]
        key["train_sampler"] = {name: getattr(datamodule, name, None) for name in _TRAIN_DATA_KEYS}
    return key


def run_key(speechllm: SpeechLLM, datamodule: L.LightningDataModule, decoding: DecodingConfig | None,
            trainer_kwargs: dict[str, Any] | None, stage: str, heal: bool) -> dict[str, Any]:
    """Model, decoding, precision and data of a run, as one JSON-able dict (see the module docstring)."""
    return {"model": model_key(speechllm), "decoding": decoding_key(decoding), "trainer": trainer_key(trainer_kwargs),
            "data": data_key(datamodule, stage, heal)}
