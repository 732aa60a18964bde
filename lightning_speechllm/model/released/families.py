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
    """How one released SpeechLLM class is laid out (attribute paths from the top-level model) and how its audio
    tower reads its features. The prompt (chat template, audio markers) is the model's own processor's."""

    model_type: str
    """``config.json``'s ``model_type``."""
    class_name: str
    """The transformers class that loads and exports it."""
    decoder: str = "model.language_model"
    """The decoder (a ``*Model`` with ``.layers``, ``.embed_tokens``, ``.norm``)."""
    lm_head: str = "lm_head"
    audio_tower: str = "model.audio_tower"
    projector: str | None = "model.multi_modal_projector"
    """None: the tower ends in its own projection to the decoder's width (Qwen2.5-Omni)."""
    projector_layers: tuple[str, str] | None = None
    """The projector is two linears of the module at `projector` with GELU between (Phi-4-multimodal's speech
    projection: ``up_proj_for_speech``, ``down_proj_for_speech``); None: that module is the projector."""
    decoder_embedding: str | None = None
    """The decoder's own multimodal embedding module (Phi-4-multimodal's ``embed_tokens_extend``, which holds the
    audio tower and projector): the decoder view gets a pass-through in its place, since the framework hands the
    decoder its speech positions as embeddings."""
    adapter_subfolder: str = ""
    """Where in the directory a shipped audio LoRA adapter sits (Phi-4-multimodal: ``speech-lora``); it is merged at
    load (:func:`~.parts.merge_audio_adapter`)."""
    tower_mask: str = "none"
    """How the tower is told which mel frames are real: 'attention' (a bidirectional mask over its conv frames, as
    Qwen2-Audio's model builds it), 'features' (an ``input_features_mask`` argument, Audio Flamingo 3), 'packed'
    (the batch's real mel frames packed along time with their lengths, and its output packed the same way:
    Qwen2.5-Omni), 'packed_output' (padded mels and their mask in, its output packed: Qwen3-ASR) or 'none'."""
    frame_lengths: str = "pooled"
    """Real tower frames per utterance: 'pooled' (stride-2 conv, then 2x average pooling), 'conv' (stride-2 conv
    only) or 'window' (every frame of the padded window is a speech position). Unused where the tower's own output
    says (the 'packed*' masks, 'utterance' features)."""
    features: str = "window"
    """How its feature extractor is called: 'window' (Whisper-style: log-mels padded to the tower's window, with a
    mel-frame mask), 'longest' (padded to the batch's longest, as its processor does: Qwen3-ASR, whose tower reads
    any length in 1 s chunks) or 'utterance' (Granite Speech, Phi-4: each utterance alone, unpadded; their
    Conformers mask no padding in their convolutions, so a batch is run one utterance at a time, as their
    processors see one)."""
    windowed_projector: bool = False
    """The projector reads fixed windows of tower frames (Granite Speech's Q-Former: ``window_size`` frames to
    ``window_size // downsample_rate`` positions, the last window zero-padded); False: a per-position projector."""
    stacked_frames: bool = False
    """The projector reads the tower's frames stacked along the features, as many as the audio config's
    ``intermediate_size`` / ``hidden_size`` (Voxtral, GLM-ASR); False: one frame per position."""
    feature_mask_argument: str | None = None
    """The stock forward's keyword for the mel-frame mask (None: it takes none)."""
    causal_lm_class: str | None = None
    """The transformers ``*ForCausalLM`` class that runs the decoder; None: the one ``AutoModelForCausalLM`` maps
    its text config to. Qwen2.5-Omni's text model has none: its 3-D rotary positions are equal along the three axes
    for audio and text (one position per token), which is Qwen2's RoPE, so Qwen2's causal-LM head runs it. Granite
    Speech's class applies its head without Granite's ``logits_scaling``, as Llama's causal-LM head does."""
    audio_in_text: bool = False
    """Its chat template reads message content as plain strings, the audio token written in the user's text (Granite
    Speech's model card: ``"<|audio|>can you transcribe the speech into a written format?"``); False: content as a
    list of audio and text items."""
    prompt_ids: bool = False
    """The prompt is rendered to token ids by the tokenizer itself (mistral-common's, for Voxtral), which writes the
    audio tokens from an actual audio; False: the processor's Jinja chat template, rendered as text."""


FAMILIES: dict[str, ReleasedFamily] = {
    family.model_type: family
    for family in (
        ReleasedFamily(model_type="qwen2_audio", class_name="Qwen2AudioForConditionalGeneration",
                       tower_mask="attention", frame_lengths="pooled",
                       feature_mask_argument="feature_attention_mask"),
        ReleasedFamily(model_type="audioflamingo3", class_name="AudioFlamingo3ForConditionalGeneration",
                       tower_mask="features", frame_lengths="pooled", feature_mask_argument="input_features_mask"),
        ReleasedFamily(model_type="glmasr", class_name="GlmAsrForConditionalGeneration", tower_mask="none",
                       frame_lengths="conv", stacked_frames=True, feature_mask_argument="input_features_mask"),
        *(ReleasedFamily(model_type=model_type, class_name="Qwen2_5OmniThinkerForConditionalGeneration",
                         projector=None, tower_mask="packed", frame_lengths="pooled",
                         feature_mask_argument="feature_attention_mask", causal_lm_class="Qwen2ForCausalLM")
          for model_type in ("qwen2_5_omni", "qwen2_5_omni_thinker")),
        ReleasedFamily(model_type="granite_speech", class_name="GraniteSpeechForConditionalGeneration",
                       audio_tower="model.encoder", projector="model.projector", features="utterance",
                       windowed_projector=True, feature_mask_argument="input_features_mask",
                       causal_lm_class="LlamaForCausalLM", audio_in_text=True),
        ReleasedFamily(model_type="phi4_multimodal", class_name="Phi4MultimodalForCausalLM", decoder="model",
                       audio_tower="model.embed_tokens_extend.audio_embed.encoder",
                       projector="model.embed_tokens_extend.audio_embed",
                       projector_layers=("up_proj_for_speech", "down_proj_for_speech"),
                       decoder_embedding="embed_tokens_extend", features="utterance", adapter_subfolder="speech-lora"),
        ReleasedFamily(model_type="qwen3_asr", class_name="Qwen3ASRForConditionalGeneration",
                       tower_mask="packed_output", features="longest", feature_mask_argument="input_features_mask"),
        ReleasedFamily(model_type="voxtral", class_name="VoxtralForConditionalGeneration", tower_mask="none",
                       frame_lengths="window", stacked_frames=True, prompt_ids=True),
    )
}
"""The families every command supports, by ``model_type``."""

NOT_YET: dict[str, str] = {
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


def read_config(directory: str | Path) -> dict:
    """``directory/config.json`` as a dict (an error naming the file when it is missing or unreadable)."""
    path = Path(directory).expanduser() / "config.json"
    if not path.is_file():
        raise ReleasedModelError(f"{path} does not exist: model.pretrained must be a local Hugging Face directory")
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ReleasedModelError(f"{path}: not a readable JSON config ({error})") from error
    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
        raise ReleasedModelError(f"{path} has no model_type string")
    return config


def read_model_type(directory: str | Path) -> str:
    """``model_type`` of ``directory/config.json``."""
    return read_config(directory)["model_type"]


def is_released_dir(directory: str | Path) -> bool:
    """Whether ``directory`` holds a released SpeechLLM family this module knows of (supported, not yet, or
    refused), rather than a plain causal LM."""
    path = Path(directory).expanduser() / "config.json"
    return path.is_file() and read_model_type(directory) in {**FAMILIES, **NOT_YET, **REFUSED}


def detect_family(directory: str | Path) -> ReleasedFamily:
    """The family of the released SpeechLLM in ``directory``, or an error that names the reason it is unsupported."""
    model_type = read_model_type(directory)
    where = Path(directory).expanduser() / "config.json"
    if model_type in REFUSED:
        raise ReleasedModelError(f"{where}: model_type {model_type!r} is refused: {REFUSED[model_type]}")
    if model_type in FAMILIES:
        return FAMILIES[model_type]
    if model_type in NOT_YET:
        raise ReleasedModelError(f"{where}: {NOT_YET[model_type]} ({model_type!r}) is not supported yet; supported "
                                 f"released families: {sorted(FAMILIES)}")
    raise ReleasedModelError(f"{where}: model_type {model_type!r} is not a released SpeechLLM family this framework "
                             f"knows (supported: {sorted(FAMILIES)}); a plain causal LM goes in model.llm_path")
