"""Frozen-encoder outputs computed once and stored with Lhotse, keyed so that a stale cache is never read.

A frozen speech encoder gives the same frames for an utterance at every epoch, so training needs them once. The model
layer supplies the encoding function and a key (a digest of the encoder's class, config, weights and window policy,
see ``SpeechLLM.encoder_cache_key``); this module runs it over the utterances that are not cached yet and attaches
each utterance's frames to its cut as the Lhotse temporal array ``encoder_frames`` (``numpy_files`` storage, float16),
with ``encoder_key``. Layout::

    <root>/<key>/encoder.json          what the key stands for
    <root>/<key>/frames/<digest>.npy   [frames, dim] of one utterance; the digest covers its id, audio source,
                                       offset and duration, so a changed recording never reads old frames

The key names the directory, so another encoder, other weights or another window gets another directory; every batch
carries its key for the model to check. Each file is written to a temporary name and renamed, so an interrupted run
leaves no partial array, and a later manifest with more utterances computes only the new ones.
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

from lightning_speechllm.data.dataset import FRAMES_FIELD, KEY_FIELD, load_waveform

EncodeFn = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
"""(waveforms [B, S] float32 at 16 kHz, lengths [B]) -> (frames [B, T, D], frame lengths [B])."""
STORAGE_TYPE = "numpy_files"  # Lhotse's NumpyFilesReader: <storage_path>/<storage_key>


def cached_encoder_outputs(cuts: CutSet, encode: EncodeFn, key: str, root: str | Path, *,
                           description: dict | None = None, frame_shift: float = 0.02, batch_size: int = 16,
                           progress: bool = True) -> CutSet:
    """``cuts`` with each utterance's encoder frames attached (``cut.load_custom("encoder_frames")``), computed with
    ``encode`` (under ``torch.no_grad``) for the utterances not yet in ``<root>/<key>``. Concurrent processes (DDP
    ranks) take turns: the first computes, the others find the files."""
    if not key or "/" in key or key.startswith("."):
        raise ValueError(f"encoder cache key must be a plain directory name, got {key!r}")
    frames_dir = Path(root) / key / "frames"
    frames_dir.mkdir(parents=True, exist_ok=True)
    names = {cut.id: utterance_digest(cut) for cut in cuts}
    with _locked(frames_dir.parent / ".lock"):
        info = frames_dir.parent / "encoder.json"
        if not info.is_file():
            info.write_text(json.dumps({"key": key, **(description or {})}, indent=2, default=str))
        missing = [cut for cut in cuts if not (frames_dir / f"{names[cut.id]}.npy").is_file()]
        if missing:
            _compute(missing, encode, frames_dir, names, batch_size, progress)
    return CutSet.from_cuts(_attach(cut, frames_dir, names[cut.id], key, frame_shift) for cut in cuts)


def utterance_digest(cut: Cut) -> str:
    """A name for a cut's frames that changes with its id, audio source(s), offset and duration."""
    sources = [(s.type, str(s.source), s.channels) for s in cut.recording.sources] if cut.has_recording else []
    identity = json.dumps([cut.id, sources, round(cut.start, 6), round(cut.duration, 6)])
    return hashlib.sha1(identity.encode()).hexdigest()


def _compute(cuts: list[Cut], encode: EncodeFn, frames_dir: Path, names: dict[str, str], batch_size: int,
             progress: bool) -> None:
    with tqdm(total=len(cuts), desc="caching encoder outputs", unit="utt", disable=not progress) as bar:
        for start in range(0, len(cuts), batch_size):
            chunk = cuts[start:start + batch_size]
            frames, lens = _encode_chunk(chunk, encode)
            for cut, utterance_frames, length in zip(chunk, frames, lens.tolist()):
                _save_atomic(frames_dir / f"{names[cut.id]}.npy", utterance_frames[:length].numpy().astype(np.float16))
            bar.update(len(chunk))


def _encode_chunk(chunk: list[Cut], encode: EncodeFn) -> tuple[torch.Tensor, torch.Tensor]:
    waveforms = [load_waveform(cut) for cut in chunk]
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
