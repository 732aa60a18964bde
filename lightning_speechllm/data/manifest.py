"""Manifest reading and validation → Lhotse ``CutSet``.

Three input kinds (see :func:`detect_manifest_format`):

* ``jsonl``: our JSONL, one utterance a line: ``{"id", "audio", "text", "task": "asr"|"ast", "duration"?,
  "src_lang"?, "tgt_lang"?, "translation"?}``. Audio paths may be relative to the manifest. For ``ast`` the target
  is ``translation`` and ``text`` is the source transcript. ``.jsonl.gz`` is read too.
* ``lhotse``: a Lhotse CutSet manifest (``.jsonl``/``.jsonl.gz`` of cuts); custom fields ``task``, ``translation``,
  ``src_lang``, ``tgt_lang`` (``task`` defaults to ``asr``, ``src_lang`` to the supervision's language).
* ``shar``: a Lhotse Shar directory, streamed with ``CutSet.from_shar``; nothing is checked eagerly.

Eager checks (cheap, at read time, with line numbers): UTF-8, JSON, required fields and their types, task, empty text,
duplicate ids, audio file exists, audio header (``soundfile.info``: readable, non-empty, duration ≤
``max_audio_seconds``). Checks needing the samples (decodable, NaN/inf) run lazily in
:class:`~lightning_speechllm.data.dataset.SpeechDataset`. Every cut carries ``custom["manifest"]`` and
``custom["line"]`` so lazy rejections can name where the utterance came from.
"""
from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import soundfile as sf
from lhotse import CutSet, Recording, SupervisionSegment
from lhotse.audio import AudioSource
from lhotse.cut import Cut
from lhotse.serialization import deserialize_item

from lightning_speechllm.data.bad_samples import BadReason, BadSampleHandler

ManifestFormat = Literal["jsonl", "lhotse", "shar"]
TASKS: tuple[str, ...] = ("asr", "ast")
REQUIRED_FIELDS: tuple[str, ...] = ("id", "audio", "text", "task")
DEFAULT_MAX_AUDIO_SECONDS = 30.0
_CUT_TYPES = {"MonoCut", "MultiCut", "MixedCut", "PaddingCut"}


class CheckFailed(Exception):
    """One validation check failed; callers turn it into a handler call with the manifest/line context."""

    def __init__(self, reason: BadReason, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def _open_bytes(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else path.open("rb")


def _iter_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, raw bytes) for every non-blank line."""
    with _open_bytes(path) as f:
        for lineno, raw in enumerate(f, start=1):
            if raw.strip():
                yield lineno, raw


def _parse_line(raw: bytes) -> dict[str, Any]:
    """Decode one manifest line: UTF-8 first (the whole line), then a JSON object."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CheckFailed(BadReason.INVALID_UTF8, f"line is not valid UTF-8 (byte {e.start}: {raw[e.start:e.start + 4]!r})")
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise CheckFailed(BadReason.INVALID_JSON, f"line is not valid JSON: {e.msg} (column {e.colno})")
    if not isinstance(obj, dict):
        raise CheckFailed(BadReason.INVALID_JSON, f"line is JSON {type(obj).__name__}, expected an object")
    return obj


def detect_manifest_format(path: str | Path) -> ManifestFormat:
    """``shar`` for a directory, ``lhotse`` when the first line is a serialised Lhotse cut, else ``jsonl``."""
    path = Path(path)
    if path.is_dir():
        if not any(path.glob("cuts.*.jsonl*")):
            raise FileNotFoundError(f"{path}: directory is not a Lhotse Shar directory (no cuts.*.jsonl[.gz] shards)")
        return "shar"
    if not path.is_file():
        raise FileNotFoundError(f"manifest not found: {path}")
    for _, raw in _iter_lines(path):
        try:
            first = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            return "jsonl"  # the JSONL reader reports the bad line precisely
        return "lhotse" if isinstance(first, dict) and first.get("type") in _CUT_TYPES else "jsonl"
    return "jsonl"


def _require_str(obj: dict[str, Any], key: str) -> str:
    if key not in obj:
        raise CheckFailed(BadReason.MISSING_FIELD, f"missing field '{key}'")
    value = obj[key]
    if not isinstance(value, str):
        raise CheckFailed(BadReason.INVALID_FIELD, f"field '{key}' must be a string, got {type(value).__name__}")
    return value


def _optional_str(obj: dict[str, Any], key: str) -> str | None:
    value = obj.get(key)
    if value is not None and not isinstance(value, str):
        raise CheckFailed(BadReason.INVALID_FIELD, f"field '{key}' must be a string, got {type(value).__name__}")
    return value


def check_text_fields(text: str | None, task: Any, translation: str | None) -> None:
    """Task is asr/ast; the transcript is non-empty; an ast utterance has a non-empty translation."""
    if task not in TASKS:
        raise CheckFailed(BadReason.INVALID_FIELD, f"field 'task' must be one of {TASKS}, got {task!r}")
    if text is None or not text.strip():
        raise CheckFailed(BadReason.EMPTY_TEXT, "empty transcript ('text')")
    if task == "ast":
        if translation is None:
            raise CheckFailed(BadReason.MISSING_FIELD, "missing field 'translation' (required for task 'ast')")
        if not translation.strip():
            raise CheckFailed(BadReason.EMPTY_TEXT, "empty 'translation' for task 'ast'")


def check_duration(duration: float, max_audio_seconds: float | None) -> None:
    """Non-empty and not longer than the limit (never truncated silently)."""
    if duration <= 0:
        raise CheckFailed(BadReason.ZERO_LENGTH, "audio has zero length")
    if max_audio_seconds is not None and duration > max_audio_seconds:
        raise CheckFailed(BadReason.TOO_LONG, f"audio is {duration:.2f} s, longer than max_audio_seconds={max_audio_seconds}")


def _probe_audio(audio_path: Path) -> sf._SoundFileInfo:
    if not audio_path.is_file():
        raise CheckFailed(BadReason.MISSING_FILE, f"audio file not found: {audio_path}")
    try:
        return sf.info(str(audio_path))
    except Exception as e:  # libsndfile raises several types (LibsndfileError, RuntimeError, TypeError)
        raise CheckFailed(BadReason.UNREADABLE_AUDIO, f"cannot read audio header of {audio_path}: {e}")


def _jsonl_record_to_cut(obj: dict[str, Any], manifest: Path, line: int, max_audio_seconds: float | None) -> Cut:
    """Validate one parsed JSONL utterance and turn it into a cut (Mono or Multi, by channel count)."""
    utt_id = _require_str(obj, "id")
    if not utt_id.strip():
        raise CheckFailed(BadReason.INVALID_FIELD, "field 'id' is empty")
    audio = _require_str(obj, "audio")
    text = _require_str(obj, "text")
    if "task" not in obj:
        raise CheckFailed(BadReason.MISSING_FIELD, "missing field 'task'")
    task = obj["task"]
    translation = _optional_str(obj, "translation")
    src_lang, tgt_lang = _optional_str(obj, "src_lang"), _optional_str(obj, "tgt_lang")
    if "duration" in obj and not isinstance(obj["duration"], (int, float)):
        raise CheckFailed(BadReason.INVALID_FIELD, f"field 'duration' must be a number, got {obj['duration']!r}")
    check_text_fields(text, task, translation)
    audio_path = Path(audio) if Path(audio).is_absolute() else (manifest.parent / audio)
    info = _probe_audio(audio_path)
    if info.frames <= 0:
        raise CheckFailed(BadReason.ZERO_LENGTH, f"audio file has zero samples: {audio_path}")
    duration = info.frames / info.samplerate
    check_duration(duration, max_audio_seconds)
    recording = Recording(
        id=utt_id,
        sources=[AudioSource(type="file", channels=list(range(info.channels)), source=str(audio_path))],
        sampling_rate=info.samplerate,
        num_samples=info.frames,
        duration=duration,
    )
    cut = recording.to_cut()
    cut.supervisions = [
        SupervisionSegment(
            id=utt_id, recording_id=utt_id, start=0.0, duration=duration, channel=cut.channel, text=text,
            language=src_lang,
        )
    ]
    cut.custom = {
        "task": task, "translation": translation, "src_lang": src_lang, "tgt_lang": tgt_lang,
        "manifest": str(manifest), "line": line,
    }
    return cut


def cut_fields(cut: Cut) -> dict[str, Any]:
    """The text/task metadata of a cut: ``task``, ``text`` (transcript), ``translation``, ``src_lang``, ``tgt_lang``."""
    custom = cut.custom or {}
    sup = cut.supervisions[0] if cut.supervisions else None
    text = sup.text if sup is not None else None
    src_lang = custom.get("src_lang") or (sup.language if sup is not None else None)
    return {
        "task": custom.get("task", "asr"),
        "text": text,
        "translation": custom.get("translation"),
        "src_lang": src_lang,
        "tgt_lang": custom.get("tgt_lang"),
    }


def check_cut(cut: Cut, max_audio_seconds: float | None, check_files: bool = True) -> None:
    """Metadata checks for a Lhotse cut (eager for CutSet manifests, lazy for Shar): text, task, duration, files."""
    f = cut_fields(cut)
    check_text_fields(f["text"], f["task"], f["translation"])
    check_duration(cut.duration, max_audio_seconds)
    if check_files and cut.has_recording:
        for src in cut.recording.sources:
            if src.type == "file" and not Path(src.source).is_file():
                raise CheckFailed(BadReason.MISSING_FILE, f"audio file not found: {src.source}")


def _lhotse_record_to_cut(obj: dict[str, Any], manifest: Path, line: int, max_audio_seconds: float | None) -> Cut:
    try:
        cut = deserialize_item(obj)
    except Exception as e:  # lhotse raises KeyError/TypeError/ValueError for malformed items
        raise CheckFailed(BadReason.INVALID_FIELD, f"not a valid Lhotse cut: {type(e).__name__}: {e}")
    if not isinstance(cut, Cut):
        raise CheckFailed(BadReason.INVALID_FIELD, f"expected a Lhotse cut, got {type(cut).__name__}")
    check_cut(cut, max_audio_seconds)
    cut.custom = {**(cut.custom or {}), "manifest": str(manifest), "line": line}
    return cut


def read_manifest(
    path: str | Path,
    handler: BadSampleHandler,
    max_audio_seconds: float | None = DEFAULT_MAX_AUDIO_SECONDS,
    seen_ids: dict[str, tuple[str, int]] | None = None,
) -> CutSet:
    """Read and validate a JSONL or Lhotse CutSet manifest into an eager ``CutSet``.

    Bad lines go to ``handler`` (raise or record). ``seen_ids`` (id → (manifest, line)) carries duplicate detection
    across several manifests; the first occurrence wins.
    """
    path = Path(path)
    fmt = detect_manifest_format(path)
    if fmt == "shar":
        raise ValueError(f"{path}: a Shar directory is streamed, use open_shar() instead of read_manifest()")
    to_cut = _jsonl_record_to_cut if fmt == "jsonl" else _lhotse_record_to_cut
    seen_ids = {} if seen_ids is None else seen_ids
    cuts: list[Cut] = []
    for lineno, raw in _iter_lines(path):
        utt_id: str | None = None
        try:
            obj = _parse_line(raw)
            utt_id = obj.get("id") if isinstance(obj.get("id"), str) else None
            cut = to_cut(obj, path, lineno, max_audio_seconds)
            if cut.id in seen_ids:
                first_path, first_line = seen_ids[cut.id]
                raise CheckFailed(BadReason.DUPLICATE_ID, f"duplicate id '{cut.id}' (first at {first_path}:{first_line})")
        except CheckFailed as r:
            handler.reject(path, lineno, r.reason, r.detail, utt_id)
            continue
        seen_ids[cut.id] = (str(path), lineno)
        cuts.append(cut)
    return CutSet.from_cuts(cuts)


def read_manifests(
    paths: str | Path | list[str | Path],
    handler: BadSampleHandler,
    max_audio_seconds: float | None = DEFAULT_MAX_AUDIO_SECONDS,
) -> CutSet:
    """Read several JSONL/Lhotse manifests into one ``CutSet`` (ids must be unique across all of them)."""
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    if not paths:
        raise ValueError("no manifest paths given")
    seen: dict[str, tuple[str, int]] = {}
    parts = [read_manifest(p, handler, max_audio_seconds, seen_ids=seen) for p in paths]
    return parts[0] if len(parts) == 1 else CutSet.from_cuts(c for part in parts for c in part)


def open_shar(path: str | Path, shuffle_shards: bool = False, seed: int = 0, split_for_dataloading: bool = True) -> CutSet:
    """Stream a Lhotse Shar directory; shards are split across DDP ranks and dataloader workers.

    Lhotse derives the rank/world size from the environment / ``torch.distributed`` and the worker id from
    ``torch.utils.data.get_worker_info()``: the same shard goes to exactly one (rank, worker).
    """
    path = Path(path)
    if detect_manifest_format(path) != "shar":
        raise ValueError(f"{path}: not a Lhotse Shar directory")
    return CutSet.from_shar(
        in_dir=path, split_for_dataloading=split_for_dataloading, shuffle_shards=shuffle_shards, seed=seed
    )
