"""Lhotse map-style dataset: a sampled ``CutSet`` → one :class:`SpeechBatch` of 16 kHz float32 waveforms.

Cuts that carry cached frozen-encoder outputs (``encoder_cache``) give batches of encoder frames instead of
waveforms. Lazy checks happen here, when the samples are read: decodable audio, non-empty, finite (no NaN/inf), real
duration ≤ ``max_audio_seconds``; for streamed Shar cuts (never validated eagerly) also the text/task metadata.
Under ``on_bad_sample="skip"`` a rejected utterance is dropped from its batch (possibly leaving an empty batch,
``len(batch) == 0``, which the model should skip) and recorded in ``rejected.jsonl``.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from lhotse import CutSet
from lhotse.cut import Cut

from lightning_speechllm.data.bad_samples import BadReason, BadSampleHandler
from lightning_speechllm.data.batch import SAMPLE_RATE, SpeechBatch
from lightning_speechllm.data.manifest import DEFAULT_MAX_AUDIO_SECONDS, CheckFailed, check_cut, cut_fields

FRAMES_FIELD = "encoder_frames"
"""Custom field of a cut holding its cached encoder output (a Lhotse TemporalArray)."""
KEY_FIELD = "encoder_key"
"""Custom field of a cut naming the encoder cache key of ``FRAMES_FIELD``."""


@dataclass
class Utterance:
    """One loaded, validated utterance before collation."""

    id: str
    audio: np.ndarray
    """1-D float32 samples at 16 kHz (empty in text-only mode)."""
    text: str
    """Target: transcript (asr) or translation (ast)."""
    task: str
    transcript: str
    src_lang: str | None = None
    tgt_lang: str | None = None
    encoder_frames: np.ndarray | None = None
    """Cached frozen-encoder output [frames, dim] (see ``encoder_cache``); then ``audio`` is not read."""
    encoder_key: str | None = None
    """The key of the encoder that made ``encoder_frames``."""


def load_waveform(cut: Cut, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Read a cut's audio, resample to ``sample_rate`` (not an error) and downmix channels to mono float32."""
    if cut.sampling_rate != sample_rate:
        cut = cut.resample(sample_rate)
    audio = np.asarray(cut.load_audio(), dtype=np.float32)
    if audio.ndim == 2:
        audio = audio.mean(axis=0) if audio.shape[0] > 1 else audio[0]
    return audio


def check_waveform(audio: np.ndarray, sample_rate: int, max_audio_seconds: float | None) -> None:
    """Non-empty, finite, and not longer than the limit (the real, decoded duration)."""
    if audio.size == 0:
        raise CheckFailed(BadReason.ZERO_LENGTH, "decoded audio has zero samples")
    if not np.isfinite(audio).all():
        n_nan, n_inf = int(np.isnan(audio).sum()), int(np.isinf(audio).sum())
        raise CheckFailed(BadReason.NON_FINITE, f"audio contains {n_nan} NaN and {n_inf} inf samples")
    seconds = audio.size / sample_rate
    if max_audio_seconds is not None and seconds > max_audio_seconds:
        raise CheckFailed(
            BadReason.TOO_LONG, f"decoded audio is {seconds:.2f} s, longer than max_audio_seconds={max_audio_seconds}"
        )


def decode_checked(cut: Cut, sample_rate: int, max_audio_seconds: float | None) -> np.ndarray:
    """A cut's waveform after the lazy checks every audio path applies before an encoder sees it (the dataset and
    the encoder cache alike); raises :class:`CheckFailed` for an undecodable, empty, non-finite or too long one."""
    try:
        audio = load_waveform(cut, sample_rate)
    except Exception as e:  # decoders raise many types; all mean "this file cannot be read"
        first_line = str(e).splitlines()[0] if str(e) else ""
        raise CheckFailed(BadReason.UNREADABLE_AUDIO,
                          f"cannot decode audio {_audio_name(cut)}: {type(e).__name__}: {first_line}") from e
    check_waveform(audio, sample_rate, max_audio_seconds)
    return audio


def _audio_name(cut: Cut) -> str:
    """The audio file(s) of a cut, for error messages (a recording in memory or from a URL says its type)."""
    sources = cut.recording.sources if cut.has_recording else []
    return ", ".join(str(s.source) if s.type in ("file", "url") else f"<{s.type}>" for s in sources) or "<none>"


def reject_cut(handler: BadSampleHandler, cut: Cut, failure: CheckFailed, source: str) -> None:
    """Apply the bad-sample policy to ``cut``: raise naming its manifest, line and id, or record and drop it.
    ``source`` labels cuts that do not say which manifest they came from (Shar shards)."""
    custom = cut.custom or {}
    handler.reject(custom.get("manifest", source), custom.get("line"), failure.reason, failure.detail, cut.id)


def collate_utterances(utts: list[Utterance], text_only: bool = False) -> SpeechBatch:
    """Right-pad waveforms with zeros into ``[B, S]``; ``text_only`` gives ``[B, 0]`` audio and zero lengths."""
    cached = sum(u.encoder_frames is not None for u in utts)
    if not text_only and cached:
        if cached != len(utts):
            raise ValueError(f"{cached} of the {len(utts)} utterances of a batch carry cached encoder outputs: "
                             "cache the whole set (SpeechDataModule.use_encoder_cache)")
        return _collate_encoder_frames(utts)
    lens = torch.tensor([0 if text_only else len(u.audio) for u in utts], dtype=torch.int64)
    max_len = int(lens.max()) if len(utts) else 0
    audio = torch.zeros(len(utts), max_len, dtype=torch.float32)
    for i, u in enumerate(utts):
        if lens[i] > 0:
            audio[i, : lens[i]] = torch.from_numpy(u.audio)
    return SpeechBatch(
        ids=[u.id for u in utts],
        audio=audio,
        audio_lens=lens,
        texts=[u.text for u in utts],
        tasks=[u.task for u in utts],
        transcripts=[u.transcript for u in utts],
        src_langs=[u.src_lang for u in utts],
        tgt_langs=[u.tgt_lang for u in utts],
        text_only=text_only,
    )


def _collate_encoder_frames(utts: list[Utterance]) -> SpeechBatch:
    """A batch of cached encoder outputs: frames right-padded into ``[B, T, D]``, no waveforms (``[B, 0]``)."""
    keys = {u.encoder_key for u in utts}
    if len(keys) != 1:
        raise ValueError(f"one batch mixes encoder caches {sorted(map(str, keys))}")
    frame_lens = torch.tensor([len(u.encoder_frames) for u in utts], dtype=torch.int64)
    frames = torch.zeros(len(utts), int(frame_lens.max()), utts[0].encoder_frames.shape[1])
    for row, u in enumerate(utts):
        frames[row, : len(u.encoder_frames)] = torch.from_numpy(u.encoder_frames.astype(np.float32))
    return SpeechBatch(
        ids=[u.id for u in utts], audio=torch.zeros(len(utts), 0), audio_lens=torch.zeros(len(utts), dtype=torch.int64),
        texts=[u.text for u in utts], tasks=[u.task for u in utts], transcripts=[u.transcript for u in utts],
        src_langs=[u.src_lang for u in utts], tgt_langs=[u.tgt_lang for u in utts],
        encoder_frames=frames, encoder_frame_lens=frame_lens, encoder_key=keys.pop(),
    )


class SpeechDataset(torch.utils.data.Dataset):
    """Map-style Lhotse dataset: ``dataset[cuts] -> SpeechBatch`` (use with a Lhotse sampler, ``batch_size=None``).

    Args:
        handler: applies the bad-sample policy (raise, or drop + record).
        max_audio_seconds: longest accepted utterance (``None``: no limit).
        text_only: skip audio entirely; batches carry transcripts and ``[B, 0]`` audio.
        source: manifest label for cuts without ``custom["manifest"]`` (Shar shards).
        check_metadata: also check text/task/duration here (for Shar, where nothing was checked eagerly).
        sample_rate: output sample rate.
    """

    def __init__(
        self,
        handler: BadSampleHandler,
        max_audio_seconds: float | None = DEFAULT_MAX_AUDIO_SECONDS,
        text_only: bool = False,
        source: str | Path | None = None,
        check_metadata: bool = False,
        sample_rate: int = SAMPLE_RATE,
    ) -> None:
        self.handler = handler
        self.max_audio_seconds = max_audio_seconds
        self.text_only = text_only
        self.source = str(source) if source is not None else "<cuts>"
        self.check_metadata = check_metadata
        self.sample_rate = sample_rate

    def load_utterance(self, cut: Cut) -> Utterance:
        """Load and check one cut; raises :class:`CheckFailed` when it is unusable."""
        if self.check_metadata:
            check_cut(cut, self.max_audio_seconds, check_files=False)
        fields = cut_fields(cut)
        target = fields["translation"] if fields["task"] == "ast" else fields["text"]
        audio = np.zeros(0, dtype=np.float32)
        if not self.text_only and cut.has_custom(FRAMES_FIELD):
            return Utterance(
                id=cut.id, audio=audio, text=target, task=fields["task"], transcript=fields["text"],
                src_lang=fields["src_lang"], tgt_lang=fields["tgt_lang"],
                encoder_frames=cut.load_custom(FRAMES_FIELD), encoder_key=cut.custom[KEY_FIELD],
            )
        if not self.text_only:
            audio = decode_checked(cut, self.sample_rate, self.max_audio_seconds)
        return Utterance(
            id=cut.id, audio=audio, text=target, task=fields["task"], transcript=fields["text"],
            src_lang=fields["src_lang"], tgt_lang=fields["tgt_lang"],
        )

    def __getitem__(self, cuts: CutSet) -> SpeechBatch:
        utts: list[Utterance] = []
        for cut in cuts:
            try:
                utts.append(self.load_utterance(cut))
            except CheckFailed as failure:
                reject_cut(self.handler, cut, failure, self.source)
        return collate_utterances(utts, text_only=self.text_only)
