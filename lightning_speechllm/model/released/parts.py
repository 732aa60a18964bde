"""A released SpeechLLM split into the framework's three parts, sharing its weights (nothing is copied).

- :class:`ReleasedAudioEncoder`: the model's own feature extractor (from its processor files) and audio tower, behind
  the :class:`~lightning_speechllm.model.encoders.SpeechEncoder` interface;
- :class:`ReleasedProjector`: its projector, with the frame stacking the stock class does around it;
- a causal-LM view of its decoder (``*ForCausalLM`` whose ``model`` and ``lm_head`` are the released modules), so
  layer masks, LoRA, the redundancy maps and generation run on it as on any text LLM.

:func:`load_released` reads a local directory into those parts (:func:`parts_from_model` splits a model already in
memory); :class:`ReleasedOrigin` keeps what the export in the stock class needs (config, processor).
"""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from operator import attrgetter
from pathlib import Path

import numpy as np
import torch
import transformers
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoProcessor,
    FeatureExtractionMixin,
    GenerationConfig,
    PretrainedConfig,
    PreTrainedModel,
    ProcessorMixin,
)
from transformers.masking_utils import create_bidirectional_mask

from lightning_speechllm.data.batch import SAMPLE_RATE
from lightning_speechllm.model.encoders import EncoderError, SpeechEncoder

from .families import FAMILIES, ReleasedFamily, ReleasedModelError, detect_family

log = logging.getLogger(__name__)
ADAPTER_CONFIG = "adapter_config.json"
"""A PEFT adapter shipped inside a released model's directory (Granite Speech's audio LoRA)."""

__all__ = ["PassThroughEmbedding", "ReleasedAudioEncoder", "ReleasedOrigin", "ReleasedParts", "ReleasedProjector",
           "TwoLayerProjector", "decoder_view", "load_released", "merge_audio_adapter", "parts_from_model"]


class ReleasedAudioEncoder(SpeechEncoder):
    """Waveforms -> the released audio tower's frames, through the model's own feature extractor, prepared as its
    processor prepares them (padded to its window, to the batch's longest, or one utterance at a time). Utterances
    longer than a window are refused, not cut."""

    def __init__(self, tower: nn.Module, feature_extractor: FeatureExtractionMixin, family: ReleasedFamily) -> None:
        super().__init__()
        self.tower = tower
        self.config = tower.config
        self.feature_extractor = feature_extractor
        self.family = family
        # A tower that projects itself (no separate projector) hands the decoder its output_dim
        self.output_dim = tower.config.hidden_size if family.projector else tower.config.output_dim
        self.window_samples = int(feature_extractor.n_samples) if family.features == "window" else None
        """None: no window (utterances of any length)."""

    def features(self, audio: torch.Tensor, audio_lens: torch.Tensor) -> dict[str, torch.Tensor]:
        """The feature extractor's ``input_features`` [B, mels, frames] and mel-frame ``attention_mask`` [B, frames]
        of each utterance, padded to the window (no window: to the batch's longest), as the processor pads them."""
        if self.window_samples is not None and bool((audio_lens > self.window_samples).any()):
            seconds = float(audio_lens.max()) / SAMPLE_RATE
            raise EncoderError(f"an utterance of {seconds:.1f} s is longer than {self.family.class_name}'s "
                               f"{self.window_samples / SAMPLE_RATE:.0f} s audio window: cap data.max_audio_seconds")
        waves = [audio[i, :n].detach().float().cpu().numpy() for i, n in enumerate(audio_lens.tolist())]
        padding = True if self.window_samples is None else "max_length"
        with torch.autocast(device_type=audio.device.type, enabled=False):  # features in float32, as stock
            return self.feature_extractor(waves, sampling_rate=SAMPLE_RATE, padding=padding,
                                          return_attention_mask=True, return_tensors="pt")

    def forward(self, audio: torch.Tensor, audio_lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.family.features == "utterance":
            return self._frames_one_by_one(audio, audio_lens)
        features = self.features(audio, audio_lens)
        weight = next(self.tower.parameters())
        # AF3's and GLM-ASR's towers do not cast their input (Qwen2-Audio's and Voxtral's do): a half tower needs it
        mel = features["input_features"].to(weight.device, weight.dtype)
        mel_mask = features["attention_mask"].to(weight.device)
        conv_lens = (mel_mask.sum(-1) - 1) // 2 + 1  # the towers' stride-2 second conv (the stock formula)
        if self.family.tower_mask == "attention":
            frames = self.tower(mel, attention_mask=self._conv_frame_mask(mel, conv_lens)).last_hidden_state
        elif self.family.tower_mask == "features":
            frames = self.tower(mel, input_features_mask=mel_mask).last_hidden_state
        elif self.family.tower_mask == "packed":
            return self._packed_frames(mel, mel_mask, (conv_lens - 2) // 2 + 1)
        elif self.family.tower_mask == "packed_output":
            packed = self.tower(mel, input_features_mask=mel_mask).last_hidden_state
            return self._unpack(packed, self._chunked_conv_lengths(mel_mask.sum(-1)))
        else:
            frames = self.tower(mel).last_hidden_state
        lengths = {"pooled": (conv_lens - 2) // 2 + 1, "conv": conv_lens,
                   "window": torch.full_like(conv_lens, frames.shape[1])}[self.family.frame_lengths]
        return frames, lengths

    def _frames_one_by_one(self, audio: torch.Tensor, audio_lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Granite Speech, Phi-4-multimodal: each utterance through its own feature extractor and the tower alone
        (their Conformers' convolutions see no padding mask), right-padded with zeros to [B, max, D]."""
        frames = [self._one_utterance(audio[row, :n]) for row, n in enumerate(audio_lens.tolist())]
        lengths = torch.tensor([len(f) for f in frames], device=audio.device)
        return nn.utils.rnn.pad_sequence(frames, batch_first=True), lengths

    def _one_utterance(self, wave: torch.Tensor) -> torch.Tensor:
        """[T, D] tower frames of one utterance. Phi-4's extractor names its features ``audio_input_features`` and
        counts the speech positions (``audio_embed_sizes``), and its tower returns a tensor; Granite's frames are
        all speech positions."""
        weight = next(self.tower.parameters())
        wave = wave.detach().float().cpu()
        if self.family.decoder_embedding:  # Phi-4-multimodal
            with torch.autocast(device_type=weight.device.type, enabled=False):
                features = self.feature_extractor([wave.numpy()], sampling_rate=SAMPLE_RATE, return_tensors="pt")
            keep = int(features["audio_embed_sizes"][0])
            return self.tower(features["audio_input_features"].to(weight.device, weight.dtype), None)[0, :keep]
        with torch.autocast(device_type=weight.device.type, enabled=False):
            mel = self.feature_extractor([wave], device=None)["input_features"]
        return self.tower(mel.to(weight.device, weight.dtype)).last_hidden_state[0]

    def _packed_frames(self, mel: torch.Tensor, mel_mask: torch.Tensor,
                       lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Qwen2.5-Omni's tower: the real mel frames of the batch end to end [mels, sum], as its model packs them;
        its packed output is split per utterance and right-padded to [B, max, D]."""
        packed = mel.transpose(1, 2)[mel_mask.bool()].transpose(0, 1)
        return self._unpack(self.tower(packed, feature_lens=mel_mask.sum(-1)).last_hidden_state, lengths)

    def _unpack(self, out: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A tower's output packed along time [sum, D], split per utterance and right-padded to [B, max, D]."""
        if out.shape[0] != int(lengths.sum()):
            raise EncoderError(f"{self.family.class_name}'s tower gave {out.shape[0]} frames for {lengths.tolist()}")
        return nn.utils.rnn.pad_sequence(list(out.split(lengths.tolist())), batch_first=True), lengths

    def _chunked_conv_lengths(self, mel_lengths: torch.Tensor) -> torch.Tensor:
        """Qwen3-ASR's frames per utterance: its mels cut into chunks of ``2 * n_window`` frames, each through three
        stride-2 convolutions (13 frames from a whole 100-frame chunk)."""
        def after_convs(frames: torch.Tensor) -> torch.Tensor:
            for _ in range(3):
                frames = torch.where(frames > 0, (frames - 1) // 2 + 1, torch.zeros_like(frames))
            return frames

        chunk = 2 * self.tower.config.n_window
        whole = torch.div(mel_lengths, chunk, rounding_mode="floor")
        return whole * after_convs(torch.full_like(mel_lengths, chunk)) + after_convs(mel_lengths % chunk)

    def _conv_frame_mask(self, mel: torch.Tensor, conv_lens: torch.Tensor) -> torch.Tensor:
        """Qwen2-Audio's tower mask: attention over the real conv frames only (built as its model builds it)."""
        positions = (mel.shape[-1] - 2) // 2 + 1
        keep = (torch.arange(positions, device=mel.device)[None, :] < conv_lens[:, None]).long()
        dummy = torch.zeros((mel.shape[0], positions, 1), dtype=next(self.tower.parameters()).dtype,
                            device=mel.device)
        return create_bidirectional_mask(config=self.tower.config, inputs_embeds=dummy, attention_mask=keep)


class ReleasedProjector(nn.Module):
    """The released projector: ``frames_per_position`` frames stacked along the features, then its own module; or
    its own windowed module (Granite Speech's Q-Former) on the frames, zeroed past each utterance's length."""

    def __init__(self, projector: nn.Module | None, frames_per_position: int, windowed: bool = False) -> None:
        super().__init__()
        self.net = projector if projector is not None else nn.Identity()  # None: the tower projects itself
        self.frames_per_position = frames_per_position
        self.windowed = windowed

    def forward(self, frames: torch.Tensor, lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.windowed:
            return self._windows(frames, lens)
        k = self.frames_per_position
        batch, time, dim = frames.shape
        # Frames past the last whole group never reach a position (GLM-ASR's formula); cached frames come trimmed
        # to each utterance's length, which need not be a multiple of k.
        frames = frames[:, : time - time % k]
        weight = next(self.net.parameters(), frames)
        stacked = frames.reshape(batch, time // k, dim * k).to(weight.dtype)
        return self.net(stacked).clone(), torch.div(lens, k, rounding_mode="floor")

    def _windows(self, frames: torch.Tensor, lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each utterance's last window is zero-padded as the stock model pads a lone utterance, so frames past its
        length are zeroed; ``ceil(len / window) * queries`` positions are its own."""
        window, queries = self.net.window_size, self.net.num_queries
        real = torch.arange(frames.shape[1], device=frames.device)[None, :] < lens[:, None]
        weight = next(self.net.parameters())
        out = self.net((frames * real[..., None]).to(weight.dtype))
        return out, torch.div(lens + window - 1, window, rounding_mode="floor") * queries


class TwoLayerProjector(nn.Module):
    """Two linears of a released module with GELU between (Phi-4-multimodal's speech projection), under their own
    attribute names, so that the state dict keys are the stock module's."""

    def __init__(self, module: nn.Module, names: tuple[str, str]) -> None:
        super().__init__()
        self.names = names
        for name in names:
            self.add_module(name, getattr(module, name))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        up, down = (getattr(self, name) for name in self.names)
        return down(nn.functional.gelu(up(x)))


class PassThroughEmbedding(nn.Module):
    """In place of a decoder's multimodal embedding (Phi-4's ``embed_tokens_extend``): the token embeddings as given
    (the framework brings speech positions in as embeddings; decoding steps are text tokens)."""

    def forward(self, input_ids: torch.Tensor, inputs_embeds: torch.Tensor, **_: object) -> torch.Tensor:
        return inputs_embeds


def decoder_view(model: PreTrainedModel, family: ReleasedFamily) -> PreTrainedModel:
    """A ``*ForCausalLM`` of the released decoder's architecture whose ``model``, ``lm_head`` and config are the
    released model's own (built on the meta device, then given the real modules). A decoder that embeds audio
    itself (``family.decoder_embedding``) has that module replaced by a pass-through, in `model` too."""
    decoder, head = attrgetter(family.decoder)(model), attrgetter(family.lm_head)(model)
    if family.decoder_embedding:
        setattr(decoder, family.decoder_embedding, PassThroughEmbedding())
    with torch.device("meta"):
        view = (getattr(transformers, family.causal_lm_class)(decoder.config) if family.causal_lm_class else
                AutoModelForCausalLM.from_config(decoder.config))
    view.model, view.lm_head, view.config = decoder, head, decoder.config
    view.generation_config = model.generation_config
    leftover = [name for name, p in view.named_parameters() if p.device.type == "meta"]
    if leftover:
        raise ReleasedModelError(f"{family.class_name}: the causal-LM view of its decoder kept unfilled weights "
                                 f"{leftover[:3]}")
    return view.eval()


@dataclass
class ReleasedOrigin:
    """Where a SpeechLLM's parts came from: what writing it back in its own class needs."""

    family: ReleasedFamily
    config: PretrainedConfig
    """The released model's top-level config (the export replaces its text config by the cut one)."""
    processor: ProcessorMixin
    """Its processor: tokenizer, feature extractor, chat template (saved with the export)."""
    generation_config: GenerationConfig
    source: str | None = None
    """The directory it was loaded from (None: built in memory)."""
    other_weights: dict[str, torch.Tensor] = field(default_factory=dict)
    """The stock model's weights outside the decoder, lm_head, tower and projector (Qwen2.5-Omni's vision tower),
    by their key, shared with nothing the framework trains: written back unchanged by the export."""

    def render_chat(self, messages: list[dict]) -> str | list[int]:
        """The model's own chat template on `messages`: text from the processor's Jinja template (generation prompt
        added), or token ids from a tokenizer that renders them itself (Voxtral's mistral-common), one audio item
        read as a second of silence (the audio tokens then fill the model's whole window, as for any utterance)."""
        if not self.family.prompt_ids:
            if self.processor.chat_template and not self.family.audio_in_text:
                return self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            # A template over plain strings (Granite Speech's; a tokenizer's, as Phi-4-multimodal keeps it): the
            # audio token written in the text, as their model cards prompt them
            flat = [{**m, "content": "".join(self.audio_token if item.get("type") == "audio" else item["text"]
                                             for item in m["content"])}
                    if isinstance(m["content"], list) else m for m in messages]
            owner = self.processor if self.processor.chat_template else self.processor.tokenizer
            return owner.apply_chat_template(flat, tokenize=False, add_generation_prompt=True)
        silence = {"type": "audio", "base64": _silent_wav_base64()}
        messages = [{**m, "content": [silence if item.get("type") == "audio" else item for item in m["content"]]}
                    if isinstance(m["content"], list) else m for m in messages]
        return list(self.processor.tokenizer.apply_chat_template(messages, tokenize=True)["input_ids"])

    @property
    def audio_token(self) -> str:
        """The placeholder the processor's template writes where the audio goes (one per speech position)."""
        return self.processor.audio_token


@dataclass
class ReleasedParts:
    """A released SpeechLLM as the framework's parts (sharing the stock model's weights) and their origin."""

    origin: ReleasedOrigin
    llm: PreTrainedModel
    encoder: ReleasedAudioEncoder
    projector: ReleasedProjector

    @property
    def tokenizer(self) -> object:
        """The processor's tokenizer."""
        return self.origin.processor.tokenizer


def parts_from_model(model: PreTrainedModel, processor: ProcessorMixin, source: str | None = None) -> ReleasedParts:
    """Split a loaded (or in-memory) released model into the framework's parts; `processor` is its own. The parts
    share `model`'s modules; a decoder that embeds audio itself (Phi-4-multimodal) gets a pass-through there."""
    model_type = model.config.model_type
    family = detect_family(source) if source is not None else FAMILIES.get(model_type)
    if family is None:
        raise ReleasedModelError(f"{type(model).__name__} (model_type {model_type!r}) is not a supported released "
                                 f"family: {sorted(FAMILIES)}")
    if not (family.prompt_ids or getattr(processor, "chat_template", None) or processor.tokenizer.chat_template):
        raise ReleasedModelError(f"{source or family.class_name}: neither the processor nor its tokenizer has a chat "
                                 "template (chat_template.jinja / .json), so the prompt around the audio is unknown")
    audio_token = getattr(processor, "audio_token", None)
    tokenizer = processor.tokenizer
    if not audio_token or tokenizer.convert_tokens_to_ids(audio_token) in (None, tokenizer.unk_token_id):
        raise ReleasedModelError(f"{source or family.class_name}: the processor's audio token {audio_token!r} is "
                                 "not in its tokenizer")
    tower = attrgetter(family.audio_tower)(model)
    stack = tower.config.intermediate_size // tower.config.hidden_size if family.stacked_frames else 1
    projector = attrgetter(family.projector)(model) if family.projector else None
    if projector is not None and family.projector_layers:
        projector = TwoLayerProjector(projector, family.projector_layers)
    other = _other_weights(model, family, tower, projector)
    origin = ReleasedOrigin(family, copy.deepcopy(model.config), processor, copy.deepcopy(model.generation_config),
                            source, other)
    return ReleasedParts(origin, decoder_view(model, family),
                         ReleasedAudioEncoder(tower, _feature_extractor(processor), family),
                         ReleasedProjector(projector, stack, windowed=family.windowed_projector))


def _other_weights(model: PreTrainedModel, family: ReleasedFamily, tower: nn.Module,
                   projector: nn.Module | None) -> dict[str, torch.Tensor]:
    """The stock model's weights that none of the parts holds (Qwen2.5-Omni's vision tower, Phi-4's image
    embedding), by key."""
    decoder = attrgetter(family.decoder)(model)
    skip = f"{family.decoder_embedding}." if family.decoder_embedding else None
    covered = {f"{family.decoder}.{key}" for key in decoder.state_dict() if not (skip and key.startswith(skip))}
    covered |= {f"{family.lm_head}.{key}" for key in attrgetter(family.lm_head)(model).state_dict()}
    covered |= {f"{family.audio_tower}.{key}" for key in tower.state_dict()}
    if projector is not None:
        covered |= {f"{family.projector}.{key}" for key in projector.state_dict()}
    return {key: value for key, value in model.state_dict().items() if key not in covered}


def load_released(directory: str | Path, dtype: torch.dtype = torch.float32,
                  attn_implementation: str | None = None) -> ReleasedParts:
    """Load the released SpeechLLM in ``directory`` (weights, processor: tokenizer, feature extractor, chat template)
    into its parts."""
    directory = Path(directory).expanduser()
    family = detect_family(directory)  # refusals first, before any weight is read
    if not any((directory / name).is_file() for name in ("processor_config.json", "preprocessor_config.json")):
        raise ReleasedModelError(f"{directory} has no processor files (processor_config.json or "
                                 "preprocessor_config.json): the feature extractor and prompt are unknown")
    processor = AutoProcessor.from_pretrained(directory, trust_remote_code=False)
    adapter = (directory / family.adapter_subfolder / ADAPTER_CONFIG).is_file()
    # transformers would inject a shipped adapter itself (unmerged, switched by the class); PEFT loads and merges it
    # below instead, so transformers' search for one is pointed at a folder that does not exist.
    model = getattr(transformers, family.class_name).from_pretrained(
        directory, dtype=dtype, attn_implementation=attn_implementation, trust_remote_code=False,
        **({"adapter_kwargs": {"subfolder": "no-adapter-here"}} if adapter else {})).eval()
    if adapter:
        model = merge_audio_adapter(model, directory / family.adapter_subfolder)
    return parts_from_model(model, processor, str(directory))


def merge_audio_adapter(model: PreTrainedModel, directory: str | Path) -> PreTrainedModel:
    """`model` with the LoRA adapter shipped in `directory` (``adapter_config.json``, ``adapter_model.safetensors``)
    merged into its weights, its config marked as carrying none (``has_lora_adapter`` false).

    Granite Speech ships one and its class switches it on for audio inputs only; Phi-4-multimodal ships its speech
    LoRA in ``speech-lora/`` for the user to switch on for audio. Every speech input then sees the weights the stock
    model uses for audio exactly; the text-input map and text-only prompts run through the merged weights too, where
    the stock model would leave the adapter off."""
    from peft import PeftModel

    merged = PeftModel.from_pretrained(model, str(directory), is_trainable=False).merge_and_unload()
    if hasattr(merged.config, "has_lora_adapter"):
        merged.config.has_lora_adapter = False
    log.info("%s: merged its audio LoRA adapter (%s) into the decoder", directory, ADAPTER_CONFIG)
    return merged


def _feature_extractor(processor: ProcessorMixin) -> FeatureExtractionMixin:
    """The processor's feature extractor (Granite Speech's calls it ``audio_processor``)."""
    extractor = getattr(processor, "feature_extractor", None) or getattr(processor, "audio_processor", None)
    if extractor is None:
        raise ReleasedModelError(f"{type(processor).__name__} has no feature extractor")
    return extractor


def _silent_wav_base64(seconds: float = 1.0) -> str:
    """A silent 16 kHz WAV, base64-encoded (what mistral-common's chat template reads as an audio item)."""
    import base64
    import io

    import soundfile as sf

    buffer = io.BytesIO()
    sf.write(buffer, np.zeros(int(SAMPLE_RATE * seconds), dtype=np.float32), SAMPLE_RATE, format="WAV")
    return base64.b64encode(buffer.getvalue()).decode()
