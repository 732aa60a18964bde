"""The anchor beside a real-speech WER: Whisper tiny.en's own decoder on the same audio.

The SpeechLLM reads the frozen Whisper encoder's outputs; Whisper's own decoder reading those outputs shows what the
encoder carries. :func:`anchor_wer` decodes every utterance of a JSONL manifest with it (greedy, batched) and scores
it with the project's WER (:class:`~lightning_speechllm.evaluation.metrics.WordErrorCounts`, Whisper's English
normaliser), so the two numbers compare. The result is cached in ``<cache_dir>/<model>-<hash>.json``
keyed by the model name and the sha256 of the manifest and of every audio file it names: it runs once per set.

Which sets get an anchor (:func:`real_speech_sets`): those whose manifest folder holds a ``prepare.json`` saying
``"real_speech": true`` (``data prepare real_speakers``, ``data prepare asterisk``) or naming the Asterisk corpus.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from lightning_speechllm.io_utils import atomic_write_text

DEFAULT_MODEL = "whisper-tiny.en"
DEFAULT_CACHE_DIR = Path("data_cache/anchor")
REAL_CORPORA = ("asterisk-core-sounds-en",)
CACHE_FORMAT = 2
"""Part of each cache key: 2 stores WER in percent, like scores.json (1 stored fractions)."""

Decoder = Callable[[list[np.ndarray]], list[str]]
"""16 kHz float32 waveforms → transcripts."""


def read_jsonl_manifest(path: Path | str) -> list[dict]:
    """Rows of one of our JSONL manifests, ``audio`` made absolute (relative to the manifest's folder)."""
    path = Path(path)
    if path.suffix != ".jsonl":
        raise ValueError(f"{path}: the anchor reads JSONL manifests (id, audio, text, ...)")
    rows = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            row = json.loads(line)
            missing = [k for k in ("id", "audio", "text") if k not in row]
            if missing:
                raise ValueError(f"{path}:{lineno}: missing field(s) {missing}")
            rows.append({**row, "audio": str((path.parent / row["audio"]).resolve())})
    return rows


def read_wave(path: str | Path) -> np.ndarray:
    """An audio file as a 16 kHz mono float32 waveform."""
    import soundfile as sf

    from lightning_speechllm.data.synth import resample

    audio, rate = sf.read(str(path), dtype="float32", always_2d=True)
    return resample(audio.mean(axis=1), rate, 16000)


def manifest_key(path: Path | str, model: str) -> str:
    """sha256 over the model name, the manifest bytes and each audio file's bytes (first 16 hex digits)."""
    digest = hashlib.sha256(f"{model}\0{CACHE_FORMAT}\0".encode() + Path(path).read_bytes())
    for row in read_jsonl_manifest(path):
        digest.update(Path(row["audio"]).read_bytes())
    return digest.hexdigest()[:16]


def word_error_scores(hypotheses: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Corpus WER with S/D/I counts, exactly as the model's `test/<set>/wer` is computed, and like it in percent
    (wer and insertion_rate)."""
    from lightning_speechllm.evaluation.metrics import WordErrorCounts

    metric = WordErrorCounts()
    metric.update(list(hypotheses), list(references))
    return {k: (100.0 * float(v) if k in ("wer", "insertion_rate") else int(v)) for k, v in metric.compute().items()}


def whisper_decoder(model: str = DEFAULT_MODEL, batch_size: int = 8, threads: int | None = None) -> Decoder:
    """Whisper's own greedy decoder (the converted offline weights that `demo` loads), batched; `threads` None keeps
    torch's thread count (it runs inside `fit`, on the cores training just used)."""
    import torch
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    from lightning_speechllm import assets
    from lightning_speechllm.data.synth import torch_threads

    path = assets.resolve(model)
    processor = WhisperProcessor.from_pretrained(path)
    whisper = WhisperForConditionalGeneration.from_pretrained(path).eval()

    def decode(waves: list[np.ndarray]) -> list[str]:
        out: list[str] = []
        with torch_threads(threads) if threads else contextlib.nullcontext(), torch.no_grad():
            for start in range(0, len(waves), batch_size):
                batch = [np.asarray(w, dtype=np.float32) for w in waves[start:start + batch_size]]
                features = processor(batch, sampling_rate=16000, return_tensors="pt").input_features
                with quiet_transformers():  # per-batch warnings about Whisper's own generation defaults
                    ids = whisper.generate(features, max_new_tokens=128)
                out += [t.strip() for t in processor.batch_decode(ids, skip_special_tokens=True)]
        return out

    return decode


@contextlib.contextmanager
def quiet_transformers():
    """transformers' logging at error level for the duration."""
    from transformers.utils import logging as hf_logging

    previous = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(previous)


def anchor_wer(manifest: Path | str, decoder: Decoder | None = None, *, model: str = DEFAULT_MODEL,
               cache_dir: Path | str | None = DEFAULT_CACHE_DIR) -> dict:
    """Whisper's own WER on ``manifest``: ``{"model", "manifest", "key", "utterances", "wer", "substitutions", ...,
    "hypotheses": {id: text}}``, read from the cache when the same model decoded the same manifest and audio."""
    manifest = Path(manifest)
    key = manifest_key(manifest, model)
    cached = Path(cache_dir) / f"{model}-{key}.json" if cache_dir is not None else None
    if cached is not None and cached.is_file():
        return json.loads(cached.read_text(encoding="utf-8"))
    rows = read_jsonl_manifest(manifest)
    waves = [read_wave(row["audio"]) for row in rows]
    hypotheses = (decoder or whisper_decoder(model))(waves)
    if len(hypotheses) != len(rows):
        raise ValueError(f"the decoder returned {len(hypotheses)} transcripts for {len(rows)} utterances")
    result = {"model": model, "manifest": str(manifest), "key": key, "utterances": len(rows),
              **word_error_scores(hypotheses, [r["text"] for r in rows]),
              "hypotheses": {r["id"]: h for r, h in zip(rows, hypotheses)}}
    if cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(json.dumps(result, indent=1, ensure_ascii=False), cached)
    return result


def is_real_speech(manifest: Path | str) -> bool:
    """Whether the manifest's folder was prepared from real recordings (its ``prepare.json`` says so)."""
    info = Path(manifest).parent / "prepare.json"
    if not info.is_file():
        return False
    try:
        data = json.loads(info.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return False
    return bool(data.get("real_speech")) or data.get("corpus") in REAL_CORPORA


def real_speech_sets(sets: dict[str, str | Path]) -> dict[str, Path]:
    """The named JSONL sets whose manifests are real speech (see :func:`is_real_speech`)."""
    return {name: Path(str(path)) for name, path in sets.items()
            if str(path).endswith(".jsonl") and Path(str(path)).is_file() and is_real_speech(path)}


def anchor_scores(sets: dict[str, str | Path], decoder: Decoder | None = None, *, model: str = DEFAULT_MODEL,
                  cache_dir: Path | str | None = DEFAULT_CACHE_DIR, real_only: bool = True) -> dict[str, dict]:
    """``{set name: anchor_wer(...) without the hypotheses}`` for every real-speech set among ``sets`` (every set
    when not ``real_only``); the Whisper decoder is loaded once, and only when some set is not cached yet."""
    out: dict[str, dict] = {}
    lazy: list[Decoder] = []

    def shared(waves: list[np.ndarray]) -> list[str]:
        if not lazy:
            lazy.append(decoder or whisper_decoder(model))
        return lazy[0](waves)

    chosen = real_speech_sets(sets) if real_only else {name: Path(str(path)) for name, path in sets.items()}
    for name, path in chosen.items():
        result = anchor_wer(path, shared, model=model, cache_dir=cache_dir)
        out[name] = {k: v for k, v in result.items() if k != "hypotheses"}
    return out


__all__ = ["DEFAULT_CACHE_DIR", "DEFAULT_MODEL", "anchor_scores", "anchor_wer", "is_real_speech", "manifest_key",
           "read_jsonl_manifest", "real_speech_sets", "whisper_decoder", "word_error_scores"]
