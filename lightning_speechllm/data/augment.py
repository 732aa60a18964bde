"""Augmented copies of a speech manifest, rendered to WAV once: speed, channel (telephone μ-law, GSM, a simulated
room), loudness and noise, with Lhotse's transforms.

The encoder cache computes a frozen encoder's frames once per utterance, so nothing can be augmented on the fly in
training: each copy is a recording of its own, with its own id, and the cache reads it like any other. Every copy
draws its effects from an RNG seeded by (seed, utterance id, copy), so a rebuild gives the same files.

Layout written by :func:`augment_manifest`::

    <out>/wav/<id>-aug<k>.wav       16 kHz, 16-bit PCM mono
    <out>/train.jsonl               the copies (text, task and languages of their source row)
    <out>/cuts_train.jsonl.gz       the same as a Lhotse CutSet (speaker: the effects applied)
    <out>/augment.json              source, copies, effects, counts
    <out>/.complete                 marker, written last
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from lightning_speechllm.data.bad_samples import BadSampleHandler
from lightning_speechllm.data.manifest import cut_fields, read_manifest
from lightning_speechllm.data.synth import (
    MARKER,
    TARGET_SAMPLE_RATE,
    corpus_is_complete,
    resample,
    torch_threads,
    write_lhotse_cuts,
    write_wav,
)

EFFECTS: tuple[str, ...] = ("speed", "channel", "volume", "noise")
CHANNELS: tuple[str, ...] = ("clean", "telephone", "gsm", "room")
SPEED_RANGE = (0.9, 1.1)  # Lhotse perturb_speed (pitch moves with it, as in Kaldi's 3-way speed perturbation)
VOLUME_RANGE = (0.35, 1.6)
NOISE_SNR_DB = (12.0, 35.0)  # white noise, applied to half the copies
NOISE_PROBABILITY = 0.5


class AugmentError(ValueError):
    """An unknown effect, or a bad number of copies."""


@dataclass(frozen=True)
class Augmentation:
    """The effects of one copy, in the order they are applied."""

    speed: float = 1.0
    channel: str = "clean"
    room_seed: int = 0
    volume: float = 1.0
    snr_db: float | None = None

    @property
    def name(self) -> str:
        noise = f"+snr{self.snr_db:.0f}" if self.snr_db is not None else ""
        return f"sp{self.speed:.2f}+{self.channel}+vol{self.volume:.2f}{noise}"


def parse_effects(effects: str | Sequence[str]) -> tuple[str, ...]:
    """``"speed,channel"`` or a list → the effects; raises :class:`AugmentError` naming an unknown one."""
    items = [e.strip() for part in ([effects] if isinstance(effects, str) else effects) for e in str(part).split(",")]
    items = [e for e in items if e]
    unknown = [e for e in items if e not in EFFECTS]
    if unknown or not items:
        raise AugmentError(f"unknown effect(s) {unknown or items!r}; known: {', '.join(EFFECTS)}")
    return tuple(dict.fromkeys(items))


def draw_augmentation(rng: random.Random, effects: Sequence[str]) -> Augmentation:
    """One copy's effects, drawn from ``rng`` (every draw is made whatever ``effects`` holds, so turning one effect
    off leaves the others' draws as they were)."""
    speed = round(rng.uniform(*SPEED_RANGE), 2)
    channel = rng.choice(CHANNELS)
    room_seed = rng.getrandbits(31)
    volume = round(rng.uniform(*VOLUME_RANGE), 2)
    snr_db = round(rng.uniform(*NOISE_SNR_DB), 1) if rng.random() < NOISE_PROBABILITY else None
    return Augmentation(speed=speed if "speed" in effects else 1.0,
                        channel=channel if "channel" in effects else "clean", room_seed=room_seed,
                        volume=volume if "volume" in effects else 1.0,
                        snr_db=snr_db if "noise" in effects else None)


def apply_augmentation(recording, augmentation: Augmentation, noise_seed: int = 0) -> np.ndarray:
    """The augmented mono samples (float32, 16 kHz) of a Lhotse ``Recording``."""
    if augmentation.speed != 1.0:
        recording = recording.perturb_speed(augmentation.speed)
    if augmentation.channel == "telephone":
        recording = recording.narrowband("mulaw")  # 8 kHz μ-law and back, like the real prompts
    elif augmentation.channel == "gsm":
        recording = recording.compress("gsm")
    elif augmentation.channel == "room":
        recording = recording.reverb_rir(room_rng_seed=augmentation.room_seed,
                                         source_rng_seed=augmentation.room_seed + 1)
    if augmentation.volume != 1.0:
        recording = recording.perturb_volume(augmentation.volume)
    audio = recording.load_audio().mean(axis=0).astype(np.float32)
    if recording.sampling_rate != TARGET_SAMPLE_RATE:
        audio = resample(audio, recording.sampling_rate)
    if augmentation.snr_db is not None:
        power = float(np.mean(audio.astype(np.float64) ** 2)) or 1e-10
        noise = np.random.default_rng(noise_seed).standard_normal(audio.shape)
        audio = audio + (noise * np.sqrt(power / 10 ** (augmentation.snr_db / 10))).astype(np.float32)
    peak = float(np.abs(audio).max())
    return audio / peak * 0.99 if peak > 0.99 else audio  # no clipping in the 16-bit file


def augment_manifest(manifest: Path | str, out_dir: Path | str, copies: int = 2,
                     effects: str | Sequence[str] = EFFECTS, seed: int = 0, force: bool = False,
                     progress: bool = True) -> Path:
    """Write ``copies`` augmented copies of every utterance of ``manifest`` (JSONL or Lhotse) into ``out_dir``
    (layout in the module docstring) and return it; skipped when a complete set from the same manifest content,
    copies, effects and seed is there."""
    manifest, out_dir = Path(manifest), Path(out_dir)
    if not isinstance(copies, int) or copies < 1:
        raise AugmentError(f"copies must be an int >= 1, got {copies!r}")
    chosen = parse_effects(effects)
    if not manifest.is_file():
        raise FileNotFoundError(f"manifest to augment not found: {manifest}")
    config = {"source": str(manifest), "source_sha256": hashlib.sha256(manifest.read_bytes()).hexdigest()[:16],
              "copies": copies, "effects": list(chosen), "seed": seed, "sample_rate": TARGET_SAMPLE_RATE}
    if not force and corpus_is_complete(out_dir, config):
        return out_dir
    (out_dir / MARKER).unlink(missing_ok=True)
    (out_dir / "wav").mkdir(parents=True, exist_ok=True)
    cuts = read_manifest(manifest, BadSampleHandler("error"))
    rows, speakers, channels = [], {}, {c: 0 for c in CHANNELS}
    with torch_threads(1):
        for cut in tqdm(cuts, desc=f"augment {manifest.name} x{copies}", unit="utt", disable=not progress):
            fields = cut_fields(cut)
            recording = cut.recording if cut.has_recording else None
            if recording is None:
                raise AugmentError(f"{manifest}: utterance {cut.id} has no recording to augment")
            for copy in range(copies):
                rng = random.Random(f"{seed}:{cut.id}:{copy}")
                augmentation = draw_augmentation(rng, chosen)
                audio = apply_augmentation(recording, augmentation, noise_seed=rng.getrandbits(31))
                utt_id = f"{cut.id}-aug{copy}"
                write_wav(out_dir / "wav" / f"{utt_id}.wav", audio, TARGET_SAMPLE_RATE)
                row = {"id": utt_id, "audio": f"wav/{utt_id}.wav", "text": fields["text"],
                       "duration": round(len(audio) / TARGET_SAMPLE_RATE, 4), "task": fields["task"],
                       "src_lang": fields["src_lang"] or "en"}
                if fields["task"] == "ast":
                    row.update(tgt_lang=fields["tgt_lang"], translation=fields["translation"])
                rows.append(row)
                speakers[utt_id] = augmentation.name
                channels[augmentation.channel] += 1
    with (out_dir / "train.jsonl").open("w", encoding="utf-8") as f:
        f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    write_lhotse_cuts(out_dir, rows, out_dir / "cuts_train.jsonl.gz", speakers)
    summary = {**config, "utterances": len(rows), "channels": channels,
               "hours": round(sum(r["duration"] for r in rows) / 3600, 4)}
    (out_dir / "augment.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out_dir / MARKER).write_text(json.dumps({"config": config}) + "\n")
    return out_dir


__all__ = ["CHANNELS", "EFFECTS", "AugmentError", "Augmentation", "apply_augmentation", "augment_manifest",
           "draw_augmentation", "parse_effects"]
