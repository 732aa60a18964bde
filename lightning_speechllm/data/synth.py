"""Synthetic English speech corpus (ASR) and English→French speech-translation set (AST) spoken by espeak-ng.

espeak-ng is reached through the ``espeakng-loader`` wheel (it bundles ``libespeak-ng`` and its voice data) with
ctypes. The library keeps global state, so every call goes through one process-wide :class:`_Espeak` object under a
lock, and each utterance sets its voice, rate and pitch afresh. The noise generators of espeak-ng call libc
``rand()``; :meth:`EspeakSynthesizer.speak` reseeds it (``srand``) before each utterance, which makes every file a
pure function of (text, voice, rate, pitch, seed): the same corpus seed gives byte-identical WAV files.

Layout written by :func:`synthesize_corpus`::

    <out>/wav/<id>.wav              16 kHz, 16-bit PCM mono
    <out>/<split>.jsonl             ASR manifests (train/dev/test)
    <out>/ast_<split>.jsonl         English speech -> French text
    <out>/cuts_<split>.jsonl.gz     Lhotse CutSets of the same utterances (cuts_ast_<split>.jsonl.gz for AST)
    <out>/corpus.json               seed, sizes, voices, counts, hours
    <out>/.complete                 marker, written last
"""

from __future__ import annotations

import _ctypes
import atexit
import ctypes
import ctypes.util
import contextlib
import functools
import json
import random
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torchaudio
from tqdm import tqdm

from lightning_speechllm.data.sentences import SentencePair, unique_pairs, unique_sentences

TARGET_SAMPLE_RATE = 16_000
DEFAULT_SIZES: dict[str, int] = {"train": 2000, "dev": 100, "test": 100}
DEFAULT_AST_SIZES: dict[str, int] = {"train": 200, "dev": 50, "test": 50}
MARKER = ".complete"

# speak_lib.h constants (espeak-ng 1.52)
_AUDIO_OUTPUT_SYNCHRONOUS = 2  # espeak_AUDIO_OUTPUT: PLAYBACK=0, RETRIEVAL=1, SYNCHRONOUS=2, SYNCH_PLAYBACK=3
_POS_CHARACTER = 1  # espeak_POSITION_TYPE
_ESPEAK_CHARS_UTF8 = 1  # espeakCHARS_UTF8
_ESPEAK_RATE, _ESPEAK_VOLUME, _ESPEAK_PITCH, _ESPEAK_RANGE = 1, 2, 3, 4  # espeak_PARAMETER
_EE_OK = 0  # espeak_ERROR
_ESPEAK_INITIALIZE_DONT_EXIT = 0x8000
_BUFFER_MS = 200

_SYNTH_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)

# English voices and variants spoken in the corpus (voice name as espeak-ng's SetVoiceByName expects it).
VOICES: tuple[str, ...] = (
    "en-us", "en-us+m3", "en-us+f2", "en-us+m7", "en-us+f4",
    "en", "en+m1", "en+f3", "en+m5", "en+f1",
    "en-gb-x-rp", "en-gb-x-rp+m2", "en-gb-scotland", "en-gb-scotland+f5", "en-029", "en-gb-x-gbclan+m4",
)
RATE_RANGE = (140, 200)  # words per minute (espeak default 175)
PITCH_RANGE = (30, 70)  # 0..100 (espeak default 50)


class EspeakError(RuntimeError):
    """espeak-ng could not be loaded, initialised or asked to speak."""


def _bind(lib: ctypes.CDLL) -> None:
    """Declare the argument/return types of the speak_lib.h functions used here."""
    lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
    lib.espeak_Initialize.restype = ctypes.c_int
    lib.espeak_SetSynthCallback.argtypes = [_SYNTH_CALLBACK]
    lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
    lib.espeak_SetVoiceByName.restype = ctypes.c_int
    lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
    lib.espeak_SetParameter.restype = ctypes.c_int
    lib.espeak_Synth.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int, ctypes.c_uint,
                                 ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p]
    lib.espeak_Synth.restype = ctypes.c_int
    lib.espeak_ng_SetRandSeed.argtypes = [ctypes.c_long]
    lib.espeak_Terminate.restype = ctypes.c_int


class _Espeak:
    """libespeak-ng in synchronous mode, loaded fresh for each utterance.

    espeak-ng's wave generator keeps static state between utterances (pitch flutter index, phase, echo buffer),
    so the same text spoken twice in one process differs slightly, and espeak_Terminate/espeak_Initialize do not
    reset it. Each utterance therefore dlopens the library, speaks, and dlcloses it again (about 20 ms), which makes
    the output a pure function of its inputs. Calls are serialised by a module-wide lock.
    """

    _lock = threading.Lock()

    def __init__(self) -> None:
        try:
            import espeakng_loader
        except ImportError as err:  # pragma: no cover - a declared dependency
            raise EspeakError("espeak-ng is missing: pip install espeakng-loader") from err
        self._library_path = _private_copy(Path(espeakng_loader.get_library_path()))
        self._data_path = espeakng_loader.get_data_path().encode()
        self._libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        self._chunks: list[np.ndarray] = []
        self._callback = _SYNTH_CALLBACK(self._on_samples)  # keep a reference: ctypes must not free it

    def _on_samples(self, wav: ctypes.POINTER(ctypes.c_short), num_samples: int, events: int) -> int:
        if wav and num_samples > 0:
            self._chunks.append(np.ctypeslib.as_array(wav, shape=(num_samples,)).copy())
        return 0  # 0 = continue synthesis

    def synth(self, text: str, voice: str, rate: int, pitch: int, seed: int) -> tuple[np.ndarray, int]:
        """Speak ``text``; return int16 samples and espeak-ng's sample rate."""
        with self._lock:
            lib = ctypes.CDLL(self._library_path)
            try:
                _bind(lib)
                sample_rate = lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, _BUFFER_MS, self._data_path,
                                                    _ESPEAK_INITIALIZE_DONT_EXIT)
                if sample_rate <= 0:
                    raise EspeakError(f"espeak_Initialize failed ({sample_rate}) with data {self._data_path.decode()}")
                try:
                    samples = self._speak(lib, text, voice, rate, pitch, seed)
                finally:
                    lib.espeak_Terminate()
            finally:
                handle = lib._handle
                del lib
                _ctypes.dlclose(handle)
        return samples, int(sample_rate)

    def _speak(self, lib: ctypes.CDLL, text: str, voice: str, rate: int, pitch: int, seed: int) -> np.ndarray:
        lib.espeak_SetSynthCallback(self._callback)
        if lib.espeak_SetVoiceByName(voice.encode()) != _EE_OK:
            raise EspeakError(f"espeak-ng has no voice {voice!r} (try e.g. 'en-us', 'en+f2', 'en-gb-x-rp+m3')")
        for param, value in ((_ESPEAK_RATE, rate), (_ESPEAK_PITCH, pitch), (_ESPEAK_VOLUME, 100)):
            if lib.espeak_SetParameter(param, int(value), 0) != _EE_OK:
                raise EspeakError(f"espeak_SetParameter({param}, {value}) failed for voice {voice!r}")
        lib.espeak_ng_SetRandSeed(seed & 0x7FFFFFFF)  # espeak-ng's own noise generator
        self._libc.srand(ctypes.c_uint(seed & 0xFFFFFFFF))  # older code paths call libc rand()
        self._chunks = []
        encoded = text.encode("utf-8")
        status = lib.espeak_Synth(encoded, len(encoded) + 1, 0, _POS_CHARACTER, 0, _ESPEAK_CHARS_UTF8, None, None)
        if status != _EE_OK:
            raise EspeakError(f"espeak_Synth returned {status} for text {text!r} (voice {voice!r})")
        chunks, self._chunks = self._chunks, []
        return np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int16)


def _private_copy(library: Path) -> str:
    """A per-process copy of libespeak-ng, so that dlclose really unloads it even when other code in the process
    (another ctypes user of espeakng-loader) holds the original: a second handle would keep its static state alive."""
    directory = Path(tempfile.mkdtemp(prefix="lsllm-espeak-"))
    atexit.register(shutil.rmtree, directory, ignore_errors=True)
    copy = directory / library.name
    shutil.copy2(library, copy)
    return str(copy)


_ENGINE: _Espeak | None = None


def _engine() -> _Espeak:
    global _ENGINE
    if _ENGINE is None:
        _ENGINE = _Espeak()
    return _ENGINE


@dataclass(frozen=True)
class EspeakSynthesizer:
    """One espeak-ng speaker: a voice (with optional ``+variant``), a rate in words/minute and a pitch 0..100."""

    voice: str = "en-us"
    rate: int = 175
    pitch: int = 50

    def __post_init__(self) -> None:
        if not 80 <= self.rate <= 450:
            raise ValueError(f"rate must be in 80..450 words/minute, got {self.rate}")
        if not 0 <= self.pitch <= 100:
            raise ValueError(f"pitch must be in 0..100, got {self.pitch}")

    @property
    def name(self) -> str:
        return f"{self.voice}@r{self.rate}p{self.pitch}"

    def speak(self, text: str, seed: int = 0) -> tuple[np.ndarray, int]:
        """Synthesize ``text``: float32 mono samples in [-1, 1] and espeak-ng's native sample rate (22,050 Hz)."""
        if not text.strip():
            raise ValueError("speak() needs non-empty text")
        samples, sample_rate = _engine().synth(text, self.voice, self.rate, self.pitch, seed)
        return samples.astype(np.float32) / 32768.0, sample_rate


@functools.lru_cache(maxsize=8)
def _resampler(orig_sr: int, target_sr: int) -> torchaudio.transforms.Resample:
    return torchaudio.transforms.Resample(orig_sr, target_sr)  # caches the sinc kernel (functional rebuilds it)


def resample(audio: np.ndarray, orig_sr: int, target_sr: int = TARGET_SAMPLE_RATE) -> np.ndarray:
    """Band-limited sinc resampling with torchaudio (float32 in, float32 out)."""
    if orig_sr == target_sr:
        return audio.astype(np.float32, copy=False)
    tensor = torch.from_numpy(np.ascontiguousarray(audio, dtype=np.float32))
    with torch.no_grad():
        return _resampler(orig_sr, target_sr)(tensor).numpy()


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Temporarily set torch's intra-op threads (one thread resamples short clips ~10x faster on a busy CPU)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def write_wav(path: Path, audio: np.ndarray, sample_rate: int) -> None:
    """Write 16-bit PCM mono WAV (clipped to [-1, 1])."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), np.clip(audio, -1.0, 1.0), sample_rate, subtype="PCM_16", format="WAV")


# --------------------------------------------------------------------------------------------------------------
# Corpus
# --------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Utterance:
    """One corpus item before synthesis."""

    id: str
    split: str
    task: str  # "asr" | "ast"
    text: str
    translation: str | None
    voice: str
    rate: int
    pitch: int
    seed: int


def _speaker_rng(seed: int, utt_id: str) -> random.Random:
    return random.Random(f"{seed}:{utt_id}")


def _plan(seed: int, sizes: dict[str, int], ast_sizes: dict[str, int], voices: Sequence[str]) -> list[Utterance]:
    """Deterministic list of utterances; sentences are unique across every split and task."""
    sentences = unique_sentences(sum(sizes.values()), seed=seed)
    pairs = unique_pairs(sum(ast_sizes.values()), seed=seed + 1_000_003, exclude=sentences)
    plan: list[Utterance] = []

    def add(task: str, split: str, index: int, text: str, translation: str | None) -> None:
        prefix = "synth" if task == "asr" else "synth-ast"
        utt_id = f"{prefix}-{split}-{index:06d}"
        rng = _speaker_rng(seed, utt_id)
        plan.append(Utterance(utt_id, split, task, text, translation, rng.choice(list(voices)),
                              rng.randint(*RATE_RANGE), rng.randint(*PITCH_RANGE), rng.getrandbits(31)))

    start = 0
    for split, size in sizes.items():
        for i, text in enumerate(sentences[start:start + size]):
            add("asr", split, i, text, None)
        start += size
    start = 0
    for split, size in ast_sizes.items():
        chunk: list[SentencePair] = pairs[start:start + size]
        for i, pair in enumerate(chunk):
            add("ast", split, i, pair.en, pair.fr)
        start += size
    return plan


def _synthesize_one(utt: Utterance, path: Path) -> float:
    """Speak one planned utterance, resample to 16 kHz, write it; return its duration in seconds."""
    audio, sample_rate = EspeakSynthesizer(utt.voice, utt.rate, utt.pitch).speak(utt.text, seed=utt.seed)
    if audio.size == 0 or float(np.abs(audio).max()) < 1e-3:
        raise EspeakError(f"espeak-ng produced silence for {utt.id} ({utt.voice}): {utt.text!r}")
    audio = resample(audio, sample_rate)
    write_wav(path, audio, TARGET_SAMPLE_RATE)
    return len(audio) / TARGET_SAMPLE_RATE


def _manifest_row(utt: Utterance, duration: float) -> dict:
    row = {"id": utt.id, "audio": f"wav/{utt.id}.wav", "text": utt.text, "duration": round(duration, 4),
           "task": utt.task, "src_lang": "en"}
    if utt.task == "ast":
        row["tgt_lang"] = "fr"
        row["translation"] = utt.translation
    return row


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    tmp.replace(path)


def write_lhotse_cuts(out_dir: Path, rows: list[dict], path: Path, speakers: dict[str, str] | None = None) -> Path:
    """Write manifest rows as a Lhotse CutSet (one recording + one supervision per row, absolute audio paths)."""
    from lhotse import CutSet, Recording, RecordingSet, SupervisionSegment, SupervisionSet

    recordings, supervisions = [], []
    for row in rows:
        audio_path = (out_dir / row["audio"]).resolve()
        recording = Recording.from_file(audio_path, recording_id=row["id"])
        custom = {"task": row["task"]}
        if row["task"] == "ast":
            custom.update(translation=row["translation"], tgt_lang=row["tgt_lang"])
        supervisions.append(SupervisionSegment(
            id=row["id"], recording_id=row["id"], start=0.0, duration=recording.duration, channel=0,
            text=row["text"], language=row["src_lang"],
            speaker=(speakers or {}).get(row["id"]), custom=custom))
        recordings.append(recording)
    cuts = CutSet.from_manifests(recordings=RecordingSet.from_recordings(recordings),
                                 supervisions=SupervisionSet.from_segments(supervisions))
    cuts = cuts.modify_ids(lambda cut_id: cut_id.rsplit("-", 1)[0])  # from_manifests appends "-<index>"
    cuts.to_file(path)
    return path


def _is_complete(out_dir: Path, config: dict) -> bool:
    marker = out_dir / MARKER
    if not marker.is_file():
        return False
    try:
        return json.loads(marker.read_text())["config"] == config
    except (json.JSONDecodeError, KeyError):
        return False


def synthesize_corpus(out_dir: Path | str = Path("data_cache/synth"), seed: int = 0,
                      sizes: dict[str, int] | None = None, ast_sizes: dict[str, int] | None = None,
                      force: bool = False, voices: Sequence[str] = VOICES, progress: bool = True) -> Path:
    """Synthesize the ASR and AST corpus into ``out_dir`` and return it.

    Skips the work when ``out_dir`` already holds a complete corpus built with the same seed/sizes/voices
    (marker file written last) unless ``force``. Sizes are utterances per split, e.g. ``{"train": 2000, ...}``.
    """
    out_dir = Path(out_dir)
    sizes = dict(DEFAULT_SIZES if sizes is None else sizes)
    ast_sizes = dict(DEFAULT_AST_SIZES if ast_sizes is None else ast_sizes)
    for name, table in (("sizes", sizes), ("ast_sizes", ast_sizes)):
        bad = {k: v for k, v in table.items() if not isinstance(v, int) or v < 0}
        if bad:
            raise ValueError(f"{name}: sizes must be non-negative ints, got {bad}")
    config = {"seed": seed, "sizes": sizes, "ast_sizes": ast_sizes, "voices": list(voices),
              "sample_rate": TARGET_SAMPLE_RATE}
    if not force and _is_complete(out_dir, config):
        return out_dir
    (out_dir / MARKER).unlink(missing_ok=True)
    wav_dir = out_dir / "wav"
    wav_dir.mkdir(parents=True, exist_ok=True)

    plan = _plan(seed, sizes, ast_sizes, voices)
    rows: dict[tuple[str, str], list[dict]] = {}
    speakers: dict[str, str] = {}
    total_seconds = 0.0
    started = time.perf_counter()
    with torch_threads(1):
        for utt in tqdm(plan, desc="espeak-ng", unit="utt", disable=not progress):
            duration = _synthesize_one(utt, wav_dir / f"{utt.id}.wav")
            total_seconds += duration
            speakers[utt.id] = EspeakSynthesizer(utt.voice, utt.rate, utt.pitch).name
            rows.setdefault((utt.task, utt.split), []).append(_manifest_row(utt, duration))
    elapsed = time.perf_counter() - started

    counts: dict[str, int] = {}
    for (task, split), split_rows in rows.items():
        stem = split if task == "asr" else f"ast_{split}"
        _write_jsonl(out_dir / f"{stem}.jsonl", split_rows)
        write_lhotse_cuts(out_dir, split_rows, out_dir / f"cuts_{stem}.jsonl.gz", speakers)
        counts[stem] = len(split_rows)
    summary = {**config, "counts": counts, "total_hours": round(total_seconds / 3600, 4),
               "synthesis_seconds": round(elapsed, 2),
               "utterances_per_second": round(len(plan) / max(elapsed, 1e-9), 2),
               "manifest_format": "jsonl: id, audio (relative), text, duration, task, src_lang, tgt_lang?, "
                                  "translation?"}
    (out_dir / "corpus.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    (out_dir / MARKER).write_text(json.dumps({"config": config}) + "\n")
    return out_dir


__all__ = ["DEFAULT_AST_SIZES", "DEFAULT_SIZES", "EspeakError", "EspeakSynthesizer", "TARGET_SAMPLE_RATE", "VOICES",
           "Utterance", "resample", "torch_threads", "synthesize_corpus", "write_lhotse_cuts", "write_wav"]
