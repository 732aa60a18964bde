"""Frozen-encoder outputs computed once and stored with Lhotse, keyed so that a stale cache is never read.

A frozen speech encoder gives the same frames for an utterance at every epoch, so training needs them once. The model
layer supplies the encoding function and a key (a digest of the encoder's class, config, weights and window policy,
see ``SpeechLLM.encoder_cache_key``); this module runs it over a CutSet and stores each utterance's frames as a
float16 ``.npy`` through Lhotse's ``NumpyFilesWriter``, attached to its cut as the temporal array ``encoder_frames``
(with ``encoder_key``). Layout::

    <root>/<key>/frames/...npy     one array [frames, dim] per utterance
    <root>/<key>/cuts.jsonl.gz     the cuts with their arrays attached
    <root>/<key>/encoder.json      what the key stands for
    <root>/<key>/.complete         marker, written last (the directory appears in one rename)

The key names the directory, so another encoder, other weights or another window gets another directory, and every
batch carries its key for the model to check.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from lhotse import CutSet
from lhotse.features.io import NumpyFilesWriter
from tqdm import tqdm

from lightning_speechllm.data.dataset import FRAMES_FIELD, KEY_FIELD, load_waveform

MARKER = ".complete"
EncodeFn = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
"""(waveforms [B, S] float32 at 16 kHz, lengths [B]) -> (frames [B, T, D], frame lengths [B])."""


def cached_encoder_outputs(cuts: CutSet, encode: EncodeFn, key: str, root: str | Path, *,
                           description: dict | None = None, frame_shift: float = 0.02, batch_size: int = 16,
                           progress: bool = True) -> CutSet:
    """``cuts`` with each utterance's encoder frames attached (``cut.load_custom("encoder_frames")``): read from
    ``<root>/<key>`` when that cache is complete, else computed with ``encode`` (under ``torch.no_grad``) and stored.
    Concurrent processes (DDP ranks) wait for one of them to write the cache."""
    if not key or "/" in key:
        raise ValueError(f"encoder cache key must be a non-empty name without '/', got {key!r}")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    target = root / key
    with _locked(root / f".{key}.lock"):
        if not (target / MARKER).is_file():
            _write_cache(cuts, encode, key, target, description or {}, frame_shift, batch_size, progress)
    cached = CutSet.from_file(target / "cuts.jsonl.gz")
    missing = sorted(set(cuts.ids) - set(cached.ids))
    if missing:
        raise ValueError(f"encoder cache {target} lacks {len(missing)} of the utterances asked for (e.g. {missing[:3]}); "
                         "it was built for another manifest: delete the directory to rebuild it")
    return cached.subset(cut_ids=list(cuts.ids))


def _write_cache(cuts: CutSet, encode: EncodeFn, key: str, target: Path, description: dict, frame_shift: float,
                 batch_size: int, progress: bool) -> None:
    staging = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=target.parent))
    try:
        writer = NumpyFilesWriter(staging / "frames")
        stored = []
        cut_list = list(cuts)
        bar = tqdm(total=len(cut_list), desc="caching encoder outputs", unit="utt", disable=not progress)
        for start in range(0, len(cut_list), batch_size):
            chunk = cut_list[start:start + batch_size]
            frames, lens = _encode_chunk(chunk, encode)
            for cut, utterance_frames, length in zip(chunk, frames, lens.tolist()):
                array = writer.store_array(cut.id, utterance_frames[:length].numpy().astype(np.float16),
                                           frame_shift=frame_shift, temporal_dim=0)
                array = dataclasses.replace(array, array=dataclasses.replace(array.array,
                                                                             storage_path=str(target / "frames")))
                custom = {**(cut.custom or {}), FRAMES_FIELD: array, KEY_FIELD: key}
                stored.append(dataclasses.replace(cut, custom=custom))
            bar.update(len(chunk))
        bar.close()
        CutSet.from_cuts(stored).to_file(staging / "cuts.jsonl.gz")
        (staging / "encoder.json").write_text(json.dumps({"key": key, **description}, indent=2))
        (staging / MARKER).write_text("")
        if target.exists():  # an incomplete earlier attempt
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def _encode_chunk(chunk: list, encode: EncodeFn) -> tuple[torch.Tensor, torch.Tensor]:
    waveforms = [load_waveform(cut) for cut in chunk]
    lens = torch.tensor([len(w) for w in waveforms])
    audio = torch.zeros(len(waveforms), int(lens.max()))
    for row, waveform in enumerate(waveforms):
        audio[row, : len(waveform)] = torch.from_numpy(waveform)
    with torch.no_grad():
        frames, frame_lens = encode(audio, lens)
    return frames.float().cpu(), frame_lens.cpu()


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
