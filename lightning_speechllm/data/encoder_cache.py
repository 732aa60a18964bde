"""Frozen-encoder outputs computed once and stored with Lhotse, keyed so that a stale cache is never read.

A frozen speech encoder gives the same frames for an utterance at every epoch, so training needs them once. The model
layer supplies the encoding function and a key (a digest of the encoder's class, config, weights and window policy,
see ``SpeechLLM.encoder_cache_key``); this module runs it over the utterances that are not cached yet and attaches
each utterance's frames to its cut as the Lhotse temporal array ``encoder_frames`` (``numpy_files`` storage, float16),
with ``encoder_key``. Layout::

    <root>/<key>/encoder.json          what the key stands for
    <root>/<key>/frames/<digest>.npy   [frames, dim] of one utterance; the digest covers its id, audio source
                                       (path, and the file's size and modification time), offset and duration,
                                       so a changed recording (re-rendered at the same length too) never reads old
                                       frames

The key names the directory, so another encoder, other weights or another window gets another directory; every batch
carries its key for the model to check. Each file is written to a temporary name and renamed, so an interrupted run
leaves no partial array, and a later manifest with more utterances computes only the new ones.

Building the cache applies the data layer's bad-sample policy (``data.bad_samples``) as the dataset does: audio that
cannot be decoded, is empty, non-finite or too long, and frames that come out non-finite, are an error naming the
manifest, line and utterance ("error"), or are counted in ``rejected.jsonl`` and left out of the cached set ("skip"):
a NaN frame never reaches training.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from lhotse import CutSet
from lhotse.array import Array, TemporalArray
from lhotse.cut import Cut
from tqdm import tqdm

from lightning_speechllm.data.bad_samples import BadReason, BadSampleHandler
from lightning_speechllm.data.batch import SAMPLE_RATE
from lightning_speechllm.data.dataset import FRAMES_FIELD, KEY_FIELD, decode_checked, reject_cut
from lightning_speechllm.data.manifest import CheckFailed

EncodeFn = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
"""(waveforms [B, S] float32 at 16 kHz, lengths [B]) -> (frames [B, T, D], frame lengths [B])."""
STORAGE_TYPE = "numpy_files"  # Lhotse's NumpyFilesReader: <storage_path>/<storage_key>


@dataclasses.dataclass(frozen=True)
class _Policy:
    """The bad-sample policy and the lazy audio checks, as the dataset applies them."""

    handler: BadSampleHandler
    max_audio_seconds: float | None
    source: str

    def reject(self, cut: Cut, failure: CheckFailed) -> None:
        reject_cut(self.handler, cut, failure, self.source)


def cached_encoder_outputs(cuts: CutSet, encode: EncodeFn, key: str, root: str | Path, *,
                           description: dict | None = None, frame_shift: float = 0.02, batch_size: int = 16,
                           progress: bool = True, handler: BadSampleHandler | None = None,
                           max_audio_seconds: float | None = None, source: str | Path = "<cuts>") -> CutSet:
    """``cuts`` with each utterance's encoder frames attached (``cut.load_custom("encoder_frames")``), computed with
    ``encode`` (under ``torch.no_grad``) for the utterances not yet in ``<root>/<key>``. Concurrent processes (DDP
    ranks) take turns: the first computes, the others find the files.

    ``handler`` applies the bad-sample policy (default "error") to utterances whose audio fails the dataset's checks
    (``max_audio_seconds`` included) or whose frames are not finite; under "skip" they are left out of the result.
    ``source`` names the manifest of cuts that do not carry one."""
    if not key or "/" in key or key.startswith("."):
        raise ValueError(f"encoder cache key must be a plain directory name, got {key!r}")
    frames_dir = Path(root) / key / "frames"
    frames_dir.mkdir(parents=True, exist_ok=True)
    names = {cut.id: utterance_digest(cut) for cut in cuts}
    policy = _Policy(handler or BadSampleHandler("error"), max_audio_seconds, str(source))
    rejected: set[str] = set()
    with _locked(frames_dir.parent / ".lock"):
        info = frames_dir.parent / "encoder.json"
        if not info.is_file():
            info.write_text(json.dumps({"key": key, **(description or {})}, indent=2, default=str))
        missing = [cut for cut in cuts if not (frames_dir / f"{names[cut.id]}.npy").is_file()]
        if missing:
            rejected = _compute(missing, encode, frames_dir, names, batch_size, progress, policy)
    return CutSet.from_cuts(_attach(cut, frames_dir, names[cut.id], key, frame_shift)
                            for cut in cuts if cut.id not in rejected)


def utterance_digest(cut: Cut) -> str:
    """A name for a cut's frames that changes with its id, audio source(s), offset and duration, and with each
    source file's size and modification time: a file re-rendered in place at the same length gets new frames."""
    sources = [(s.type, str(s.source), s.channels, _file_stamp(s)) for s in cut.recording.sources] \
        if cut.has_recording else []
    identity = json.dumps([cut.id, sources, round(cut.start, 6), round(cut.duration, 6)])
    return hashlib.sha1(identity.encode()).hexdigest()


def _file_stamp(source) -> list[int] | None:  # noqa: ANN001 (a Lhotse AudioSource)
    """(size, mtime in ns) of a file source; None for other sources, or a missing file (its decode then fails)."""
    if source.type != "file":
        return None
    try:
        stat = os.stat(source.source)
    except OSError:
        return None
    return [stat.st_size, stat.st_mtime_ns]


def _compute(cuts: list[Cut], encode: EncodeFn, frames_dir: Path, names: dict[str, str], batch_size: int,
             progress: bool, policy: _Policy) -> set[str]:
    """Encode and store ``cuts``; returns the ids the policy rejected (only under "skip": "error" raises)."""
    rejected: set[str] = set()
    with tqdm(total=len(cuts), desc="caching encoder outputs", unit="utt", disable=not progress) as bar:
        for start in range(0, len(cuts), batch_size):
            chunk = cuts[start:start + batch_size]
            decoded = _decode_chunk(chunk, policy)
            rejected.update(cut.id for cut in chunk if cut.id not in decoded)
            kept = [cut for cut in chunk if cut.id in decoded]
            if kept:
                frames, lens = _encode_chunk([decoded[cut.id] for cut in kept], encode)
                for cut, utterance_frames, length in zip(kept, frames, lens.tolist()):
                    array = utterance_frames[:length].numpy().astype(np.float16)
                    if _finite_or_rejected(cut, array, policy):
                        _save_atomic(frames_dir / f"{names[cut.id]}.npy", array)
                    else:
                        rejected.add(cut.id)
            bar.update(len(chunk))
    return rejected


def _decode_chunk(chunk: list[Cut], policy: _Policy) -> dict[str, np.ndarray]:
    """Waveforms of the cuts that pass the dataset's audio checks, by id; the others go to the policy."""
    decoded = {}
    for cut in chunk:
        try:
            decoded[cut.id] = decode_checked(cut, SAMPLE_RATE, policy.max_audio_seconds)
        except CheckFailed as failure:
            policy.reject(cut, failure)
    return decoded


def _finite_or_rejected(cut: Cut, frames: np.ndarray, policy: _Policy) -> bool:
    """True for finite frames; else the policy hears of it (checked after the float16 cast, which can overflow)."""
    if np.isfinite(frames).all():
        return True
    bad = int((~np.isfinite(frames)).sum())
    policy.reject(cut, CheckFailed(BadReason.NON_FINITE, f"the encoder's frames contain {bad} NaN/inf values "
                                   "(as stored, float16)"))
    return False


def _encode_chunk(waveforms: list[np.ndarray], encode: EncodeFn) -> tuple[torch.Tensor, torch.Tensor]:
    lens = torch.tensor([len(w) for w in waveforms])
    audio = torch.zeros(len(waveforms), int(lens.max()))
    for row, waveform in enumerate(waveforms):
        audio[row, : len(waveform)] = torch.from_numpy(waveform)
    with torch.no_grad():
        frames, frame_lens = encode(audio, lens)
    return frames.float().cpu(), frame_lens.cpu()


def _save_atomic(path: Path, array: np.ndarray) -> None:
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    with open(partial, "wb") as handle:
        np.save(handle, array, allow_pickle=False)
    os.replace(partial, path)


def _attach(cut: Cut, frames_dir: Path, name: str, key: str, frame_shift: float) -> Cut:
    shape = list(np.load(frames_dir / f"{name}.npy", mmap_mode="r").shape)
    array = TemporalArray(Array(STORAGE_TYPE, str(frames_dir), f"{name}.npy", shape), temporal_dim=0,
                          frame_shift=frame_shift, start=0.0)
    return dataclasses.replace(cut, custom={**(cut.custom or {}), FRAMES_FIELD: array, KEY_FIELD: key})


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
