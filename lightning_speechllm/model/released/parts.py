"""A released SpeechLLM split into the framework's three parts, sharing its weights (nothing is copied).

- :class:`ReleasedAudioEncoder`: the model's own feature extractor (from its processor files) and audio tower, behind
  the :class:`~lightning_speechllm.model.encoders.SpeechEncoder` interface;
- :class:`ReleasedProjector`: its projector, with the frame stacking the stock class does around it;
- a causal-LM view of its decoder (``*ForCausalLM`` whose ``model`` and ``lm_head`` are the released modules), so
  layer masks, LoRA, the redundancy maps and generation run on it as on any text LLM.

:func:`load_released` reads a local directory into those parts; the stock model object is kept for the export.
"""
from __future__ import annotations

from dataclasses import dataclass
from operator import attrgetter
from pathlib import Path

import numpy as np
import torch
import transformers
from torch import nn
from transformers import AutoConfig, AutoFeatureExtractor, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers.masking_utils import create_bidirectional_mask

from lightning_speechllm.data.batch import SAMPLE_RATE
from lightning_speechllm.model.encoders import EncoderError, SpeechEncoder

from .families import ReleasedFamily, ReleasedModelError, detect_family

__all__ = ["ReleasedAudioEncoder", "ReleasedParts", "ReleasedProjector", "decoder_view", "load_released"]


class ReleasedAudioEncoder(SpeechEncoder):
    """Waveforms -> the released audio tower's frames, through the model's own feature extractor (padded to its
    window, as its processor does). Utterances longer than the window are refused, not cut."""

    def __init__(self, tower: nn.Module, feature_extractor, family: ReleasedFamily) -> None:
        super().__init__()
        self.tower = tower
        self.config = tower.config
        self.feature_extractor = feature_extractor
        self.family = family
        self.output_dim = tower.config.d_model
        self.window_samples = int(feature_extractor.n_samples)

    def forward(self, audio: torch.Tensor, audio_lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        too_long = audio_lens > self.window_samples
        if bool(too_long.any()):
            seconds = float(audio_lens[too_long].max()) / SAMPLE_RATE
            raise EncoderError(f"an utterance of {seconds:.1f} s is longer than {self.family.class_name}'s "
                               f"{self.window_samples / SAMPLE_RATE:.0f} s audio window: cap data.max_audio_seconds")
        waves = [audio[i, :n].detach().float().cpu().numpy().astype(np.float32)
                 for i, n in enumerate(audio_lens.tolist())]
        with torch.autocast(device_type=audio.device.type, enabled=False):  # features in float32, as stock
            features = self.feature_extractor(waves, sampling_rate=SAMPLE_RATE, padding="max_length",
                                              return_attention_mask=True, return_tensors="pt")
        device = next(self.tower.parameters()).device
        mel = features["input_features"].to(device)
        if self.family.audio_lengths == "masked":
            return self._masked(mel, features["attention_mask"].sum(-1).to(device))
        frames = self.tower(mel).last_hidden_state
        return frames, torch.full((len(waves),), frames.shape[1], dtype=torch.long, device=device)

    def _masked(self, mel: torch.Tensor, mel_lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Qwen2-Audio's tower: attention over the real conv frames only, then 2x average pooling (the stock
        model's own length formula and mask)."""
        conv_lens = (mel_lens - 1) // 2 + 1
        pooled_lens = (conv_lens - 2) // 2 + 1
        positions = (mel.shape[-1] - 2) // 2 + 1
        keep = (torch.arange(positions, device=mel.device)[None, :] < conv_lens[:, None]).long()
        dummy = torch.zeros((mel.shape[0], positions, 1), dtype=next(self.tower.parameters()).dtype,
                            device=mel.device)
        mask = create_bidirectional_mask(config=self.tower.config, inputs_embeds=dummy, attention_mask=keep)
        return self.tower(mel, attention_mask=mask).last_hidden_state, pooled_lens


class ReleasedProjector(nn.Module):
    """The released projector: ``frames_per_position`` frames stacked along the features, then its own module."""

    def __init__(self, projector: nn.Module, frames_per_position: int) -> None:
        super().__init__()
        self.net = projector
        self.frames_per_position = frames_per_position

    def forward(self, frames: torch.Tensor, lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k = self.frames_per_position
        batch, time, dim = frames.shape
        if time % k:
            raise ValueError(f"the projector stacks {k} frames per position, but the tower gave {time} frames")
        stacked = frames.reshape(batch, time // k, dim * k).to(next(self.net.parameters()).dtype)
        return self.net(stacked).clone(), torch.div(lens, k, rounding_mode="floor")


def decoder_view(model: PreTrainedModel, family: ReleasedFamily) -> PreTrainedModel:
    """A ``*ForCausalLM`` of the released decoder's architecture whose ``model``, ``lm_head`` and config are the
    released model's own (built on the meta device, then given the real modules)."""
    decoder, head = attrgetter(family.decoder)(model), attrgetter(family.lm_head)(model)
    with torch.device("meta"):
        view = AutoModelForCausalLM.from_config(decoder.config)
    view.model, view.lm_head, view.config = decoder, head, decoder.config
    view.generation_config = model.generation_config
    leftover = [name for name, p in view.named_parameters() if p.device.type == "meta"]
    if leftover:
        raise ReleasedModelError(f"{family.class_name}: the causal-LM view of its decoder kept unfilled weights "
                                 f"{leftover[:3]}")
    return view.eval()


@dataclass
class ReleasedParts:
    """A released SpeechLLM as the framework's parts, plus the stock model they share weights with."""

    family: ReleasedFamily
    model: PreTrainedModel
    llm: PreTrainedModel
    tokenizer: object
    encoder: ReleasedAudioEncoder
    projector: ReleasedProjector
    speech_markers: tuple[str, str]


def load_released(directory: str | Path, dtype: torch.dtype = torch.float32,
                  attn_implementation: str | None = None) -> ReleasedParts:
    """Load the released SpeechLLM in ``directory`` (weights, tokenizer, feature extractor) into its parts."""
    directory = Path(directory).expanduser()
    family = detect_family(directory)
    model_class = getattr(transformers, family.class_name)
    config = AutoConfig.from_pretrained(directory, trust_remote_code=False)
    model = model_class.from_pretrained(directory, config=config, dtype=dtype, attn_implementation=attn_implementation,
                                        trust_remote_code=False).eval()
    tokenizer = AutoTokenizer.from_pretrained(directory, trust_remote_code=False)
    feature_extractor = AutoFeatureExtractor.from_pretrained(directory, trust_remote_code=False)
    markers = _speech_markers(directory, family)
    missing = [token for token in (*markers, family.audio_token) if token and token not in tokenizer.get_vocab()]
    if missing:
        raise ReleasedModelError(f"{directory}: the tokenizer has no {missing} token(s) that {family.class_name} "
                                 "puts around / in place of the audio")
    encoder = ReleasedAudioEncoder(attrgetter(family.audio_tower)(model), feature_extractor, family)
    projector = ReleasedProjector(attrgetter(family.projector)(model), family.frames_per_position)
    return ReleasedParts(family, model, decoder_view(model, family), tokenizer, encoder, projector, markers)


def _speech_markers(directory: Path, family: ReleasedFamily) -> tuple[str, str]:
    """The audio start / end texts: the processor's own (``processor_config.json``) where it names them."""
    import json

    path = directory / "processor_config.json"
    saved = json.loads(path.read_text()) if path.is_file() else {}
    return saved.get("audio_bos_token", family.speech_prefix), saved.get("audio_eos_token", family.speech_suffix)
