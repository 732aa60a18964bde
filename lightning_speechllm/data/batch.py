"""The batch contract between the data layer and the model: raw 16 kHz audio plus text and task metadata."""
from __future__ import annotations

import re
from dataclasses import dataclass, field, replace

import torch

SAMPLE_RATE = 16_000
_PADDING_DUPLICATE = re.compile(r"_dup\d+$")


def is_padding_duplicate(utterance_id: str) -> bool:
    """True for the copies Lhotse adds to pad the last DDP eval step (`<id>_dup<k>`); they must not be scored."""
    return bool(_PADDING_DUPLICATE.search(utterance_id))


@dataclass
class SpeechBatch:
    """A collated batch of utterances. Features (log-mel etc.) are computed by the model's encoder on device."""

    ids: list[str]
    """Utterance ids."""
    audio: torch.Tensor
    """Float32 waveforms at 16 kHz, zero-padded on the right, shape [B, S] (S may be 0 in text-only mode)."""
    audio_lens: torch.Tensor
    """Valid samples per utterance, int64 [B]."""
    texts: list[str]
    """Target text: the transcript for ASR, the translation for speech translation."""
    tasks: list[str]
    """'asr' or 'ast' per utterance."""
    transcripts: list[str]
    """Source-language transcript (fed as text in place of speech in text-only mode)."""
    src_langs: list[str | None] = field(default_factory=list)
    tgt_langs: list[str | None] = field(default_factory=list)
    text_only: bool = False
    """True when the model should read `transcripts` as text instead of the audio."""
    encoder_frames: torch.Tensor | None = None
    """Cached frozen-encoder output [B, T, D], right-padded (then `audio` is [B, 0]); see `data.encoder_cache`."""
    encoder_frame_lens: torch.Tensor | None = None
    """Valid frames per utterance of `encoder_frames`, int64 [B]."""
    encoder_key: str | None = None
    """The encoder cache key `encoder_frames` were made with; the model refuses frames of another encoder."""

    def __len__(self) -> int:
        return len(self.ids)

    def to(self, device: torch.device | str) -> "SpeechBatch":
        self.audio = self.audio.to(device, non_blocking=True)
        self.audio_lens = self.audio_lens.to(device, non_blocking=True)
        if self.encoder_frames is not None:
            self.encoder_frames = self.encoder_frames.to(device, non_blocking=True)
            self.encoder_frame_lens = self.encoder_frame_lens.to(device, non_blocking=True)
        return self

    def pin_memory(self) -> "SpeechBatch":
        """A copy whose tensors sit in pinned (page-locked) host memory, so that `to(device, non_blocking=True)` is
        a truly asynchronous copy. The DataLoader's `pin_memory=True` calls this (it pins only what it knows how
        to: tensors, containers, or objects with this method). Without an accelerator torch cannot pin: the
        batch is returned as is."""
        if not _can_pin():
            return self
        frames = {}
        if self.encoder_frames is not None:
            frames = {"encoder_frames": self.encoder_frames.pin_memory(),
                      "encoder_frame_lens": self.encoder_frame_lens.pin_memory()}
        return replace(self, **frames, audio=self.audio.pin_memory(), audio_lens=self.audio_lens.pin_memory())

    def subset(self, rows: list[int]) -> "SpeechBatch":
        """The utterances at `rows`, audio trimmed to the longest of them."""
        lens = self.audio_lens[rows]
        width = int(lens.max()) if len(rows) and self.audio.shape[1] else 0
        pick = lambda values: [values[i] for i in rows] if values else []  # noqa: E731
        frames = {}
        if self.encoder_frames is not None:
            frame_lens = self.encoder_frame_lens[rows]
            frames = {"encoder_frames": self.encoder_frames[rows, : int(frame_lens.max()) if len(rows) else 0],
                      "encoder_frame_lens": frame_lens}
        return replace(self, **frames, ids=pick(self.ids), audio=self.audio[rows, :width], audio_lens=lens,
                       texts=pick(self.texts), tasks=pick(self.tasks), transcripts=pick(self.transcripts),
                       src_langs=pick(self.src_langs), tgt_langs=pick(self.tgt_langs))

    def as_text_only(self) -> "SpeechBatch":
        """The same utterances as a text-only batch: [B, 0] audio, zero lengths, transcripts read as text."""
        return replace(self, audio=self.audio[:, :0], audio_lens=torch.zeros_like(self.audio_lens), text_only=True,
                       encoder_frames=None, encoder_frame_lens=None, encoder_key=None)


def _can_pin() -> bool:
    """Whether host memory can be pinned: torch needs an accelerator (CUDA, XPU...) to page-lock memory."""
    return torch.accelerator.is_available()
