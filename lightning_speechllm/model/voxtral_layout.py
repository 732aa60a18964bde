"""An assembled SpeechLLM written as a stock ``VoxtralForConditionalGeneration`` directory (``export --format
voxtral``): the layout that transformers reloads, and that llama.cpp's own converter and audio path read.

Voxtral's audio path is a Whisper encoder on a 30 s window, 4 encoder frames stacked per position (its encoder's
``intermediate_size // hidden_size``), then Linear -> GELU -> Linear without biases into a Llama decoder. A SpeechLLM
of that shape maps weight for weight:

- the Whisper encoder -> ``audio_tower`` (the same modules and names);
- the projector's two linears -> ``multi_modal_projector.linear_1`` / ``linear_2``;
- the decoder (active layers, LoRA merged, replacements as stock layers) -> ``language_model`` / ``lm_head``.

Voxtral feeds every frame of the 30 s window (375 positions, the silence after the utterance included), so the
model must have been trained so (``encoder_whole_window``); one that saw only its utterances' frames is refused.
The tokenizer stays the LLM's (``tokenizer.json``, which llama.cpp's converter reads): the audio placeholder is a
special token of it that the prompt never writes. ``VoxtralProcessor`` itself needs mistral-common's tekken
tokenizer with ``[AUDIO]`` at id 24, so the directory is fed by its WhisperFeatureExtractor and tokenizer
(``pruning.json`` names the placeholder).
"""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import TYPE_CHECKING

import transformers
from torch import nn
from transformers import PreTrainedTokenizerBase

from lightning_speechllm.io_utils import atomic_directory

from .export import PRUNING_FILE, pruning_info
from .layer_mask import unwrap_peft
from .prompts import SPEECH_PLACEHOLDER
from .released.export import checked_meta_model, released_state_dict
from .released.families import FAMILIES

if TYPE_CHECKING:  # the SpeechLLM imports this package's neighbours
    from .speechllm import SpeechLLM

__all__ = ["VoxtralExportError", "audio_placeholder_token", "save_voxtral", "voxtral_blockers"]

_DECODERS = ("llama",)
"""Decoder families Voxtral's text model takes in llama.cpp (its converter writes Voxtral as a Llama)."""
_PLACEHOLDER_NAMES = ("[AUDIO]", "<|AUDIO|>", "<|audio|>", "<|audio_pad|>")


class VoxtralExportError(ValueError):
    """A SpeechLLM that has no Voxtral form (the message says why)."""


def voxtral_blockers(speechllm: SpeechLLM) -> list[str]:
    """Why `speechllm` cannot be written as a stock Voxtral directory (empty: it can)."""
    from .encoders import WhisperSpeechEncoder

    encoder, reasons = speechllm.encoder, []
    if speechllm.released is not None:
        return [f"it is a released {speechllm.released.family.class_name}: export it in its own class"]
    if not isinstance(encoder, WhisperSpeechEncoder):
        return [f"its encoder is {type(encoder).__name__ if encoder is not None else 'absent'}: Voxtral's audio "
                "tower is a Whisper encoder (WavLM, HuBERT and wav2vec2 have no Voxtral form)"]
    stack = encoder.config.encoder_ffn_dim // encoder.config.d_model
    projector = speechllm.config.projector
    if projector.kind != "mlp":
        reasons.append(f"projector kind {projector.kind!r}: Voxtral stacks frames into Linear-GELU-Linear ('mlp')")
    if projector.downsample != stack:
        reasons.append(f"projector downsample {projector.downsample}: Voxtral stacks encoder_ffn_dim // d_model = "
                       f"{stack} frames per position")
    if projector.bias:
        reasons.append("projector biases: Voxtral's projector has none (projector.bias: false)")
    hidden = unwrap_peft(speechllm.llm).config.hidden_size
    if projector.hidden_dim != hidden:
        reasons.append(f"projector hidden_dim {projector.hidden_dim}: Voxtral's is the decoder's width ({hidden})")
    model_type = unwrap_peft(speechllm.llm).config.model_type
    if model_type not in _DECODERS:
        reasons.append(f"decoder {model_type!r}: llama.cpp reads Voxtral's text model as a Llama ({_DECODERS})")
    if not encoder.whole_window:
        reasons.append("it was run on its utterances' encoder frames only: Voxtral feeds all 375 positions of the 30 s "
                       "window (train with model.encoder_whole_window: true)")
    return reasons


def audio_placeholder_token(speechllm: SpeechLLM) -> tuple[str, PreTrainedTokenizerBase]:
    """The token that marks the audio positions for the stock class, and the tokenizer to ship with it: a special
    token of the LLM's tokenizer named like an audio token, else one that the prompt, padding and the end of a target
    never use; else ``[AUDIO]`` added to a copy of the tokenizer on an embedding row no token uses."""
    tokenizer = speechllm.tokenizer
    specials = [token for token in tokenizer.all_special_tokens + list(tokenizer.get_added_vocab())
                if token not in (tokenizer.pad_token, tokenizer.eos_token, tokenizer.bos_token, tokenizer.unk_token)]
    prompt = speechllm.prompts.render("asr", None)
    used = {tokenizer.convert_ids_to_tokens(speechllm.prompts.end_token_id)}
    free = [token for token in dict.fromkeys(specials) if token not in prompt and token not in used]
    named = [token for token in free if token in _PLACEHOLDER_NAMES]
    if named or free:
        return (named or free)[0], tokenizer
    rows = unwrap_peft(speechllm.llm).get_input_embeddings().num_embeddings
    if len(tokenizer) >= rows:
        raise VoxtralExportError(f"the tokenizer has no special token left to mark the audio positions, and all "
                                 f"{rows} embedding rows are tokens: none can be added")
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.add_special_tokens({"additional_special_tokens": ["[AUDIO]"]})
    return "[AUDIO]", tokenizer


class _VoxtralProjector(nn.Module):
    """The projector's two linears under Voxtral's names (the same tensors)."""

    def __init__(self, net: nn.Sequential) -> None:
        super().__init__()
        self.linear_1, self.linear_2 = net[0], net[2]


def save_voxtral(speechllm: SpeechLLM, out_dir: str | Path) -> Path:
    """Write `speechllm` as a stock ``VoxtralForConditionalGeneration`` directory into `out_dir` (assembled in a
    temporary sibling, then renamed into place), with its tokenizer and a WhisperFeatureExtractor; returns `out_dir`.
    Refused with every reason when the model has no Voxtral form."""
    blockers = voxtral_blockers(speechllm)
    if blockers:
        raise VoxtralExportError("this SpeechLLM has no Voxtral form: " + "; ".join(blockers))
    whisper, llm = speechllm.encoder.config, unwrap_peft(speechllm.llm)
    placeholder, tokenizer = audio_placeholder_token(speechllm)
    config = transformers.VoxtralConfig(
        audio_config={"model_type": "voxtral_encoder", "hidden_size": whisper.d_model,
                      "intermediate_size": whisper.encoder_ffn_dim, "num_hidden_layers": whisper.encoder_layers,
                      "num_attention_heads": whisper.encoder_attention_heads, "num_mel_bins": whisper.num_mel_bins,
                      "max_source_positions": whisper.max_source_positions,
                      "scale_embedding": whisper.scale_embedding,
                      "activation_function": whisper.activation_function, "vocab_size": whisper.vocab_size},
        text_config={**llm.config.to_dict(), "tie_word_embeddings": False},  # the cut layer count
        audio_token_id=tokenizer.convert_tokens_to_ids(placeholder), projector_hidden_act="gelu")
    state = released_state_dict(FAMILIES["voxtral"], speechllm.llm, speechllm.encoder.encoder,
                                _VoxtralProjector(speechllm.projector.net))
    embeddings = state["model.language_model.embed_tokens.weight"]
    if state["lm_head.weight"].data_ptr() == embeddings.data_ptr():  # Voxtral's class ties no weights: untied copy
        state["lm_head.weight"] = embeddings.clone()
    stock = checked_meta_model("VoxtralForConditionalGeneration", config, state, VoxtralExportError)
    out = Path(out_dir).expanduser().resolve()
    with atomic_directory(out, VoxtralExportError) as tmp:
        stock.save_pretrained(tmp, state_dict=state)
        tokenizer.save_pretrained(tmp)
        window_seconds = whisper.max_source_positions * 2 * 160 // 16000  # 30 for every released Whisper
        transformers.WhisperFeatureExtractor(feature_size=whisper.num_mel_bins,
                                             chunk_length=window_seconds).save_pretrained(tmp)
        llm.generation_config.save_pretrained(tmp)
        info = {**pruning_info(speechllm.llm), "format": "voxtral", "audio_token": placeholder,
                "audio_token_id": config.audio_token_id, "prompt": speechllm.prompts.render("asr", None),
                "speech_placeholder": SPEECH_PLACEHOLDER}
        (tmp / PRUNING_FILE).write_text(json.dumps(info, indent=2) + "\n")
    return out
