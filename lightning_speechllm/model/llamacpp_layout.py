"""An assembled Whisper SpeechLLM written for llama.cpp (``export --format llamacpp``): the two directories that
llama.cpp's own converter reads, and the facts its runtime needs.

llama.cpp's audio path (mtmd) has no graph of its own for "Whisper, then k frames stacked, then Linear-GELU-Linear".
Its Voxtral graph would be that for k = 4, but the pinned llama.cpp (llama-cpp-python 0.3.36) average-pools by 2
first and then aborts on its own token count (see :mod:`lightning_speechllm.edge.runtime`). Its GLM-ASR graph
(projector type ``glma``) is, step for step:

    Whisper (conv, layers) -> [Whisper's final LayerNorm, optional] -> LayerNorm -> stack k -> Linear -> GELU (erf)
    -> Linear -> [begin-of-audio row, positions..., end-of-audio row]

So ours maps exactly: Whisper's final LayerNorm is written as the projector's pre-norm (the tower's own is left out,
which llama.cpp allows), the projector's linears as ``linear_1``/``linear_2`` (zero biases where it has none), and
the begin/end rows as zeros that the runtime drops. The layout is that of GLM-ASR-Nano's checkpoint (architecture
``GlmasrModel``), which is what the converter maps to ``glma``; transformers does not load it, llama.cpp does.

Written under the export folder:

- ``decoder/``: the pruned decoder as a stock Hugging Face directory (the converter's text model);
- ``audio/``: Whisper encoder + projector in GLM-ASR-Nano's names (the converter's ``--mmproj`` input);
- ``speech.json``: the prompt with its speech placeholder, the frames stacked per position, and which positions the
  model reads (see :data:`SPEECH_FILE`).

llama.cpp encodes audio in 30 s windows (3000 mel frames) and its count check needs k to divide the 1500 encoder
frames; a model trained on a shorter window (``encoder_window_step_seconds``) maps, but hears a context it was not
trained on (the note in ``speech.json`` says so, and ``gguf-eval`` measures what it costs).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import save_file

from lightning_speechllm.io_utils import atomic_directory

from .export import save_pruned_decoder
from .prompts import SPEECH_PLACEHOLDER

if TYPE_CHECKING:  # the SpeechLLM imports this package's neighbours
    from .speechllm import SpeechLLM

__all__ = ["LLAMACPP_WINDOW_SECONDS", "SPEECH_FILE", "LlamaCppExportError", "llamacpp_blockers", "save_llamacpp"]

SPEECH_FILE = "speech.json"
"""What the llama.cpp runtime reads beside the GGUF files: ``prompt`` (with ``speech_placeholder``),
``frames_per_position`` (k), ``speech_positions`` ('utterance': the positions covering the audio, as the framework
feeds them; 'window': all of the 30 s window's), ``boundary_rows`` (rows llama.cpp adds before and after the
positions, dropped), and ``trained_window_seconds`` with a ``note`` when the model was trained on another window."""
LLAMACPP_WINDOW_SECONDS = 30
"""mtmd cuts audio into 30 s windows of 3000 mel frames (1500 Whisper frames) and encodes each whole."""
_WINDOW_FRAMES = 1500


class LlamaCppExportError(ValueError):
    """A SpeechLLM that llama.cpp's audio graph cannot reproduce (the message says why)."""


def llamacpp_blockers(speechllm: SpeechLLM) -> list[str]:
    """Why `speechllm` cannot be written for llama.cpp's GLM-ASR audio graph (empty: it can)."""
    from .encoders import WhisperSpeechEncoder

    if speechllm.released is not None:
        return [f"it is a released {speechllm.released.family.class_name}: export it in its own class"]
    encoder, projector = speechllm.encoder, speechllm.config.projector
    if not isinstance(encoder, WhisperSpeechEncoder):
        name = type(encoder).__name__ if encoder is not None else "absent"
        return [(f"its encoder is {name}: llama.cpp's audio graphs read a Whisper encoder (WavLM, HuBERT and wav2vec2 "
                 "have none there)")]
    reasons = []
    if encoder.config.encoder_layers < 3:
        reasons.append(f"its Whisper has {encoder.config.encoder_layers} layers: llama.cpp's converter numbers the "
                       "projector's two linears like encoder blocks, so it needs at least 3")
    if encoder.config.max_source_positions != _WINDOW_FRAMES:
        reasons.append(f"its Whisper has {encoder.config.max_source_positions} positions: llama.cpp feeds 30 s "
                       f"windows ({_WINDOW_FRAMES} frames)")
    if projector.kind != "mlp":
        reasons.append(f"projector kind {projector.kind!r}: llama.cpp's graph stacks frames into Linear-GELU-Linear "
                       "('mlp')")
    if _WINDOW_FRAMES % projector.downsample:
        reasons.append(f"projector downsample {projector.downsample} does not divide the window's {_WINDOW_FRAMES} "
                       "frames: llama.cpp's token count check aborts on a partial last group")
    return reasons


def _trained_window_seconds(speechllm: SpeechLLM) -> float | None:
    """The window the model's encoder was run on, when it is not llama.cpp's 30 s for every utterance."""
    config = speechllm.config
    window = config.encoder_window_seconds or config.encoder_window_step_seconds
    return None if window is None or window >= LLAMACPP_WINDOW_SECONDS else float(window)


def speech_info(speechllm: SpeechLLM) -> dict[str, Any]:
    """The ``speech.json`` of `speechllm` (see :data:`SPEECH_FILE`)."""
    window = _trained_window_seconds(speechllm)
    info: dict[str, Any] = {
        "format": "llamacpp", "projector_type": "glma", "prompt": speechllm.prompts.render("asr", None),
        "speech_placeholder": SPEECH_PLACEHOLDER, "frames_per_position": speechllm.config.projector.downsample,
        "speech_positions": "window" if speechllm.encoder.whole_window else "utterance", "boundary_rows": 1,
        "trained_window_seconds": window if window is not None else LLAMACPP_WINDOW_SECONDS}
    if window is not None:
        info["note"] = (f"trained on a {window:g} s encoder window; llama.cpp encodes every utterance in a "
                        f"{LLAMACPP_WINDOW_SECONDS} s window, so its Whisper frames differ from training's")
    return info


def audio_state_dict(speechllm: SpeechLLM) -> dict[str, torch.Tensor]:
    """Whisper encoder + projector under GLM-ASR-Nano's names (see the module docstring)."""
    state: dict[str, torch.Tensor] = {}
    for name, tensor in speechllm.encoder.encoder.state_dict().items():
        if name.startswith("layer_norm."):  # Whisper's final norm becomes the projector's pre-norm
            state["audio_encoder.layer_norm." + name.removeprefix("layer_norm.")] = tensor
        else:
            state["audio_encoder.whisper." + name] = tensor
    for index, linear in ((0, speechllm.projector.net[0]), (2, speechllm.projector.net[2])):
        state[f"audio_encoder.adapting.{index}.weight"] = linear.weight
        bias = linear.bias if linear.bias is not None else torch.zeros(linear.out_features)
        state[f"audio_encoder.adapting.{index}.bias"] = bias
    width = speechllm.projector.net[2].out_features
    state["audio_encoder.audio_bos_eos_token.weight"] = torch.zeros(2, width)  # rows the runtime drops
    return {name: tensor.detach().float().contiguous().cpu() for name, tensor in state.items()}


def _audio_config(speechllm: SpeechLLM) -> dict[str, Any]:
    whisper = speechllm.encoder.config
    keys = ("d_model", "encoder_layers", "encoder_attention_heads", "encoder_ffn_dim", "num_mel_bins",
            "max_source_positions", "activation_function", "scale_embedding")
    return {"architectures": ["GlmasrModel"], "merge_factor": speechllm.config.projector.downsample,
            "whisper_config": {"model_type": "whisper", "layer_norm_eps": 1e-5,
                               **{key: getattr(whisper, key) for key in keys}},
            "text_config": {"hidden_size": speechllm.projector.net[2].out_features}}


def save_llamacpp(speechllm: SpeechLLM, out_dir: str | Path) -> Path:
    """Write ``decoder/``, ``audio/`` and ``speech.json`` of `speechllm` into `out_dir` (assembled in a temporary
    sibling, then renamed into place); returns `out_dir`. Refused with every reason when llama.cpp's graph cannot
    reproduce the model."""
    blockers = llamacpp_blockers(speechllm)
    if blockers:
        raise LlamaCppExportError("this SpeechLLM has no llama.cpp form: " + "; ".join(blockers))
    out = Path(out_dir).expanduser().resolve()
    with atomic_directory(out, LlamaCppExportError) as tmp:
        save_pruned_decoder(speechllm.llm, tmp / "decoder", speechllm.tokenizer)
        audio = tmp / "audio"
        audio.mkdir()
        save_file(audio_state_dict(speechllm), str(audio / "model.safetensors"))
        (audio / "config.json").write_text(json.dumps(_audio_config(speechllm), indent=2) + "\n")
        (tmp / SPEECH_FILE).write_text(json.dumps(speech_info(speechllm), indent=2) + "\n")
    return out
