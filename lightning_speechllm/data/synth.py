"""Synthetic English speech corpus (ASR) and English→French speech-translation set (AST) spoken by espeak-ng
(the default) and, on request, by flite and Piper voices (``tts_voices``, see :mod:`lightning_speechllm.data.voices`).

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
    <out>/corpus.json               seed, sizes, voices, counts, hours (per TTS voice: utterances, audio and
                                    compute seconds)
    <out>/.complete                 marker, written last

With ``tts_voices`` (e.g. ``["espeak", "flite-slt", "piper-joe:2"]``) each utterance is spoken by one of those voices,
drawn with their weights from a per-utterance RNG separate from the one that picks espeak-ng's voice, rate and pitch:
an utterance that falls to espeak-ng is the same file as in the espeak-only corpus, and ``["espeak"]`` alone gives
exactly the default corpus. Voices whose engine is not installed are skipped with a printed note.
"""

from __future__ import annotations

import _ctypes
import atexit
import ctypes
import ctypes.util
import contextlib
import functools
import hashlib
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
from lightning_speechllm.data.voices import (
    FLITE_F0_RANGE,
    FLITE_STRETCH_RANGE,
    PIPER_LENGTH_RANGE,
    PIPER_NOISE_RANGE,
    PIPER_NOISE_W_RANGE,
    FliteSynthesizer,
    PiperEngine,
    VoiceError,
    VoiceSpec,
    available_voices,
    parse_voices,
    piper_name,
)

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
    engine: str = "espeak"  # "espeak" | "flite" | "piper"
    options: tuple[tuple[str, float], ...] = ()  # the engine's delivery (flite: stretch, f0_shift; piper: scales)

    @property
    def speaker(self) -> str:
        """The speaker name written into the Lhotse cuts (voice and delivery)."""
        opts = dict(self.options)
        if self.engine == "flite":
            return FliteSynthesizer(self.voice, opts["stretch"], opts["f0_shift"]).name
        if self.engine == "piper":
            return piper_name(opts["length_scale"], opts["noise_scale"], opts["noise_w"])
        return EspeakSynthesizer(self.voice, self.rate, self.pitch).name


def _speaker_rng(seed: int, utt_id: str) -> random.Random:
    return random.Random(f"{seed}:{utt_id}")


def _plan(seed: int, sizes: dict[str, int], ast_sizes: dict[str, int], voices: Sequence[str],
          tts_voices: Sequence[VoiceSpec] | None = None) -> list[Utterance]:
    """Deterministic list of utterances; sentences are unique across every split and task. Without ``tts_voices``
    every utterance is espeak-ng's; with them, each draws its voice (see the module docstring)."""
    sentences = unique_sentences(sum(sizes.values()), seed=seed)
    pairs = unique_pairs(sum(ast_sizes.values()), seed=seed + 1_000_003, exclude=sentences)
    plan: list[Utterance] = []

    def add(task: str, split: str, index: int, text: str, translation: str | None) -> None:
        prefix = "synth" if task == "asr" else "synth-ast"
        plan.append(_utterance(seed, f"{prefix}-{split}-{index:06d}", split, task, text, translation, voices,
                               tts_voices))

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


def _utterance(seed: int, utt_id: str, split: str, task: str, text: str, translation: str | None,
               voices: Sequence[str], tts_voices: Sequence[VoiceSpec] | None) -> Utterance:
    """One planned utterance: espeak-ng's voice, rate, pitch and seed drawn from the id, then its TTS voice."""
    rng = _speaker_rng(seed, utt_id)
    utt = Utterance(utt_id, split, task, text, translation, rng.choice(list(voices)),
                    rng.randint(*RATE_RANGE), rng.randint(*PITCH_RANGE), rng.getrandbits(31))
    return _assign_voice(utt, seed, tts_voices) if tts_voices else utt


def _assign_voice(utt: Utterance, seed: int, tts_voices: Sequence[VoiceSpec]) -> Utterance:
    """Draw the utterance's TTS voice (by weight) and its delivery from an RNG of its own, so the espeak-ng draws
    of :func:`_plan` stay as they are in the espeak-only corpus."""
    rng = random.Random(f"{seed}:{utt.id}:tts")
    spec = rng.choices(list(tts_voices), weights=[v.weight for v in tts_voices])[0]
    if spec.engine == "espeak":
        return utt
    if spec.engine == "flite":
        options = (("stretch", round(rng.uniform(*FLITE_STRETCH_RANGE), 2)),
                   ("f0_shift", round(rng.uniform(*FLITE_F0_RANGE), 2)))
    elif spec.engine == "piper":
        options = (("length_scale", round(rng.uniform(*PIPER_LENGTH_RANGE), 2)),
                   ("noise_scale", round(rng.uniform(*PIPER_NOISE_RANGE), 2)),
                   ("noise_w", round(rng.uniform(*PIPER_NOISE_W_RANGE), 2)))
    else:  # pragma: no cover - parse_voices knows no other engine
        raise VoiceError(f"unknown engine {spec.engine!r}")
    return Utterance(utt.id, utt.split, utt.task, utt.text, utt.translation, spec.voice, 0, 0, utt.seed,
                     engine=spec.engine, options=options)


class _Speakers:
    """Speaks planned utterances with their engine; Piper's session is made once, seeded with the corpus seed."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self._piper: PiperEngine | None = None

    def speak(self, utt: Utterance) -> tuple[np.ndarray, int]:
        opts = dict(utt.options)
        if utt.engine == "flite":
            return FliteSynthesizer(utt.voice, opts["stretch"], opts["f0_shift"]).speak(utt.text)
        if utt.engine == "piper":
            if self._piper is None:
                self._piper = PiperEngine(seed=self.seed)
            return self._piper.speak(utt.text, opts["length_scale"], opts["noise_scale"], opts["noise_w"])
        return EspeakSynthesizer(utt.voice, utt.rate, utt.pitch).speak(utt.text, seed=utt.seed)


def _synthesize_one(utt: Utterance, path: Path, speakers: _Speakers | None = None) -> float:
    """Speak one planned utterance, resample to 16 kHz, write it; return its duration in seconds."""
    audio, sample_rate = (speakers or _Speakers(0)).speak(utt)
    if audio.size == 0 or float(np.abs(audio).max()) < 1e-3:
        error = EspeakError if utt.engine == "espeak" else VoiceError
        raise error(f"{utt.engine} produced silence for {utt.id} ({utt.speaker}): {utt.text!r}")
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


def corpus_is_complete(out_dir: Path, config: dict) -> bool:
    """Whether ``out_dir`` holds a complete build (its marker, written last) of exactly ``config``."""
    marker = out_dir / MARKER
    if not marker.is_file():
        return False
    try:
        return json.loads(marker.read_text())["config"] == config
    except (json.JSONDecodeError, KeyError):
        return False


def synthesize_corpus(out_dir: Path | str = Path("data_cache/synth"), seed: int = 0,
                      sizes: dict[str, int] | None = None, ast_sizes: dict[str, int] | None = None,
                      force: bool = False, voices: Sequence[str] = VOICES, progress: bool = True,
                      tts_voices: str | Sequence[str] | None = None) -> Path:
    """Synthesize the ASR and AST corpus into ``out_dir`` and return it.

    Skips the work when ``out_dir`` already holds a complete corpus built with the same seed/sizes/voices
    (marker file written last) unless ``force``. Sizes are utterances per split, e.g. ``{"train": 2000, ...}``.
    ``voices`` are espeak-ng's voices; ``tts_voices`` (``"espeak,flite-slt,piper-joe:2"`` or a list) spreads the
    utterances over TTS voices by weight (:func:`~lightning_speechllm.data.voices.parse_voices`); those whose engine
    is missing are skipped with a printed note, and a :class:`VoiceError` is raised when none is left.
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
    specs = _resolve_tts_voices(tts_voices)
    if specs is not None:
        config["tts_voices"] = [f"{s.name}:{s.weight:g}" for s in specs]
    if not force and corpus_is_complete(out_dir, config):
        return out_dir
    plan = _plan(seed, sizes, ast_sizes, voices, specs)
    description = "espeak-ng" if specs is None else "tts " + ",".join(s.name for s in specs)
    _render(plan, out_dir, config, seed, description, progress)
    return out_dir


def _render(plan: list[Utterance], out_dir: Path, config: dict, seed: int, description: str,
            progress: bool) -> None:
    """Speak the plan into ``out_dir/wav``, write each (task, split)'s manifest and CutSet, ``corpus.json`` (counts,
    hours, per-voice compute) and, last, the marker holding ``config``."""
    (out_dir / MARKER).unlink(missing_ok=True)
    wav_dir = out_dir / "wav"
    wav_dir.mkdir(parents=True, exist_ok=True)
    rows: dict[tuple[str, str], list[dict]] = {}
    speakers: dict[str, str] = {}
    per_voice: dict[str, dict[str, float]] = {}
    total_seconds = 0.0
    engines = _Speakers(seed)
    started = time.perf_counter()
    with torch_threads(1):
        for utt in tqdm(plan, desc=description, unit="utt", disable=not progress):
            utt_started = time.perf_counter()
            duration = _synthesize_one(utt, wav_dir / f"{utt.id}.wav", engines)
            stats = per_voice.setdefault(_voice_key(utt), {"utterances": 0, "audio_seconds": 0.0,
                                                           "compute_seconds": 0.0})
            stats["utterances"] += 1
            stats["audio_seconds"] += duration
            stats["compute_seconds"] += time.perf_counter() - utt_started
            total_seconds += duration
            speakers[utt.id] = utt.speaker
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
               "per_voice": {name: {"utterances": int(v["utterances"]), "audio_seconds": round(v["audio_seconds"], 2),
                                    "compute_seconds": round(v["compute_seconds"], 2),
                                    "compute_per_audio_second": round(v["compute_seconds"] / max(v["audio_seconds"],
                                                                                                 1e-9), 4)}
                             for name, v in sorted(per_voice.items())},
               "manifest_format": "jsonl: id, audio (relative), text, duration, task, src_lang, tgt_lang?, "
                                  "translation?"}
    (out_dir / "corpus.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    (out_dir / MARKER).write_text(json.dumps({"config": config}) + "\n")


def speak_manifest_texts(manifest: Path | str, out_dir: Path | str, tts_voices: str | Sequence[str],
                         copies: int = 1, seed: int = 0, force: bool = False, progress: bool = True) -> Path:
    """TTS renderings of the texts of an ASR manifest (e.g. the real prompts' training sentences, so the voices speak
    that domain too): each row spoken ``copies`` times, each copy by a voice drawn by weight from ``tts_voices`` with
    its own delivery. Writes ``<out>/train.jsonl`` (ids ``tts-<row id>-<copy>``) and ``cuts_train.jsonl.gz``; skipped
    when a complete set from the same manifest content, voices, copies and seed is there."""
    from lightning_speechllm.data.bad_samples import BadSampleHandler
    from lightning_speechllm.data.manifest import cut_fields, read_manifest

    manifest, out_dir = Path(manifest), Path(out_dir)
    if copies < 1:
        raise ValueError(f"copies must be >= 1, got {copies}")
    specs = _resolve_tts_voices(tts_voices) or [VoiceSpec("espeak")]
    texts = {cut.id: cut_fields(cut) for cut in read_manifest(manifest, BadSampleHandler("error"))}
    digest = hashlib.sha256(manifest.read_bytes()).hexdigest()[:16]
    config = {"texts_from": str(manifest), "texts_sha256": digest, "copies": copies, "seed": seed,
              "voices": list(VOICES), "tts_voices": [f"{s.name}:{s.weight:g}" for s in specs],
              "sample_rate": TARGET_SAMPLE_RATE}
    if not force and corpus_is_complete(out_dir, config):
        return out_dir
    plan = [_utterance(seed, f"tts-{utt_id}-{copy}", "train", "asr", fields["text"], None, VOICES, specs)
            for utt_id, fields in texts.items() if fields["task"] == "asr" for copy in range(copies)]
    if not plan:
        raise ValueError(f"{manifest}: no ASR rows to speak")
    _render(plan, out_dir, config, seed, f"tts {manifest.name} x{copies}", progress)
    return out_dir


def _voice_key(utt: Utterance) -> str:
    return "espeak" if utt.engine == "espeak" else f"{utt.engine}-{utt.voice}"


def _resolve_tts_voices(tts_voices: str | Sequence[str] | None) -> list[VoiceSpec] | None:
    """The usable TTS voices (None: the espeak-only default, also for ``"espeak"`` alone at weight 1)."""
    if tts_voices is None:
        return None
    specs = available_voices(parse_voices(tts_voices))
    if not specs:
        raise VoiceError(f"none of the voices {tts_voices!r} can run here (see the notes above)")
    if [(s.engine, s.weight) for s in specs] == [("espeak", 1.0)]:
        return None
    return specs


__all__ = ["DEFAULT_AST_SIZES", "DEFAULT_SIZES", "EspeakError", "EspeakSynthesizer", "TARGET_SAMPLE_RATE", "VOICES",
           "Utterance", "VoiceError", "corpus_is_complete", "resample", "speak_manifest_texts", "synthesize_corpus",
           "torch_threads", "write_lhotse_cuts", "write_wav"]
