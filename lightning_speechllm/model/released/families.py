"""Released SpeechLLM families: where each keeps its decoder, audio tower and projector, and which ones are refused.

A released SpeechLLM (Qwen2-Audio, Voxtral, ...) is one transformers class holding an audio tower, a projector and a
causal LM decoder. The framework measures, prunes and heals it through the same three parts as a SpeechLLM it
assembles itself; a :class:`ReleasedFamily` says where those parts sit in the released class and how its audio
becomes decoder positions. The family is read from ``config.json``'s ``model_type``.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


class ReleasedModelError(ValueError):
    """A released-model directory the framework cannot load, prune or export (the message says why)."""


@dataclass(frozen=True)
class ReleasedFamily:
    """How one released SpeechLLM class is laid out (attribute paths from the top-level model)."""

    model_type: str
    """``config.json``'s ``model_type``."""
    class_name: str
    """The transformers class that loads and exports it."""
    decoder: str
    """The decoder (a ``*Model`` with ``.layers``, ``.embed_tokens``, ``.norm``)."""
    lm_head: str
    audio_tower: str
    projector: str
    frames_per_position: int
    """Encoder frames the projector reads for one decoder position (stacked along the features)."""
    audio_lengths: str
    """'masked': the tower attends to the real frames only and the audio spans them (Qwen2-Audio); 'window': every
    frame of the padded window is a speech position (Voxtral)."""
    speech_prefix: str
    """Text before the audio placeholders in the prompt (the processor's audio start token)."""
    speech_suffix: str
    """Text after them."""
    audio_token: str
    """The placeholder token the stock model replaces by one speech embedding each."""


FAMILIES: dict[str, ReleasedFamily] = {
    family.model_type: family
    for family in (
        ReleasedFamily(model_type="qwen2_audio", class_name="Qwen2AudioForConditionalGeneration",
                       decoder="model.language_model", lm_head="lm_head", audio_tower="model.audio_tower",
                       projector="model.multi_modal_projector", frames_per_position=1, audio_lengths="masked",
                       speech_prefix="<|audio_bos|>", speech_suffix="<|audio_eos|>", audio_token="<|AUDIO|>"),
    )
}
"""The families every command supports, by ``model_type``."""

NOT_YET: dict[str, str] = {
    "voxtral": "Voxtral (Llama decoder, Whisper-style tower, 4 frames per position)",
    "granite_speech": "Granite Speech (its LoRA is active on audio inputs only)",
    "qwen2_5_omni": "the Qwen2.5-Omni thinker",
    "phi4_multimodal": "Phi-4-multimodal",
    "qwen3_asr": "Qwen3-ASR",
    "glm_asr": "GLM-ASR",
    "audioflamingo3": "Audio Flamingo 3",
    "kyutai_speech_to_text": "Kyutai speech-to-text",
}
"""Native transformers SpeechLLMs whose adapter is not written yet."""

REFUSED: dict[str, str] = {
    "gemma3n": "its last decoder layers share the KV cache of earlier ones (num_kv_shared_layers): removing a layer "
               "breaks every layer that reads its cache",
    "gemma4": "its last decoder layers share the KV cache of earlier ones (num_kv_shared_layers): removing a layer "
              "breaks every layer that reads its cache",
    "qwen3_omni_moe": "its decoder routes tokens through mixture-of-experts layers, and pruning MoE routing is "
                      "untested here",
}
"""Families whose decoder cannot be pruned safely, with the reason."""


def read_model_type(directory: str | Path) -> str:
    """``model_type`` of ``directory/config.json`` (an error naming the file when it is missing or unreadable)."""
    path = Path(directory).expanduser() / "config.json"
    if not path.is_file():
        raise ReleasedModelError(f"{path} does not exist: model.pretrained must be a local Hugging Face directory")
    try:
        model_type = json.loads(path.read_text()).get("model_type")
    except (OSError, json.JSONDecodeError) as error:
        raise ReleasedModelError(f"{path}: not a readable JSON config ({error})") from error
    if not isinstance(model_type, str):
        raise ReleasedModelError(f"{path} has no model_type string")
    return model_type


def is_released_dir(directory: str | Path) -> bool:
    """Whether ``directory`` holds a released SpeechLLM family this module knows of (supported, not yet, or
    refused), rather than a plain causal LM."""
    path = Path(directory).expanduser() / "config.json"
    return path.is_file() and read_model_type(directory) in {**FAMILIES, **NOT_YET, **REFUSED}


def detect_family(directory: str | Path) -> ReleasedFamily:
    """The family of the released SpeechLLM in ``directory``, or an error that names the reason it is unsupported."""
    model_type = read_model_type(directory)
    if model_type in FAMILIES:
        return FAMILIES[model_type]
    where = Path(directory).expanduser() / "config.json"
    if model_type in REFUSED:
        raise ReleasedModelError(f"{where}: model_type {model_type!r} is refused: {REFUSED[model_type]}")
    if model_type in NOT_YET:
        raise ReleasedModelError(f"{where}: {NOT_YET[model_type]} ({model_type!r}) is not supported yet; supported "
                                 f"released families: {sorted(FAMILIES)}")
    raise ReleasedModelError(f"{where}: model_type {model_type!r} is not a released SpeechLLM family this framework "
                             f"knows (supported: {sorted(FAMILIES)}); a plain causal LM goes in model.llm_path")
