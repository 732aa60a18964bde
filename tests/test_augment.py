"""Tests for augmented copies of a manifest (data/augment.py) and TTS renderings of a manifest's texts."""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from lightning_speechllm.data.augment import (
    AugmentError,
    Augmentation,
    apply_augmentation,
    augment_manifest,
    draw_augmentation,
    parse_effects,
)
from lightning_speechllm.data.prepare import main
from lightning_speechllm.data.synth import speak_manifest_texts


def _tone(path: Path, seconds: float, sample_rate: int = 16000) -> None:
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    signal = 0.3 * np.sin(2 * np.pi * 220 * t) * (0.5 - 0.5 * np.cos(2 * np.pi * 3 * t))
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), signal.astype(np.float32), sample_rate, subtype="PCM_16")


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture()
def manifest(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    rows = [{"id": "a", "audio": "a.wav", "text": "Please enter your password.", "duration": 1.5, "task": "asr",
             "src_lang": "en"},
            {"id": "b", "audio": "b.wav", "text": "Good morning.", "duration": 2.0, "task": "ast", "src_lang": "en",
             "tgt_lang": "fr", "translation": "Bonjour."}]
    for row in rows:
        _tone(src / row["audio"], row["duration"])
    path = src / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _hashes(out: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted((out / "wav").glob("*.wav"))}


def test_augmented_copies_keep_their_text_change_their_audio_and_rebuild_identically(manifest, tmp_path):
    out = augment_manifest(manifest, tmp_path / "aug", copies=3, progress=False)
    rows = {r["id"]: r for r in _rows(out / "train.jsonl")}
    assert sorted(rows) == ["a-aug0", "a-aug1", "a-aug2", "b-aug0", "b-aug1", "b-aug2"]
    assert rows["a-aug1"]["text"] == "Please enter your password." and rows["a-aug1"]["task"] == "asr"
    assert rows["b-aug0"]["translation"] == "Bonjour." and rows["b-aug0"]["tgt_lang"] == "fr"
    for utt_id, row in rows.items():
        audio, rate = sf.read(str(out / row["audio"]), dtype="float32")
        assert rate == 16000 and abs(len(audio) / rate - row["duration"]) < 1e-3
        augmentation = draw_augmentation(random.Random(f"0:{utt_id.rsplit('-', 1)[0]}:{utt_id[-1]}"),
                                         ("speed", "channel", "volume", "noise"))
        source_seconds = 1.5 if utt_id.startswith("a") else 2.0
        assert abs(row["duration"] - source_seconds / augmentation.speed) < 0.02  # speed changes the length
        assert float(np.abs(audio).max()) <= 0.99 + 1e-4  # never clipped
    summary = json.loads((out / "augment.json").read_text())
    assert summary["utterances"] == 6 and sum(summary["channels"].values()) == 6
    first = _hashes(out)
    assert len(set(first.values())) == 6
    augment_manifest(manifest, out, copies=3, progress=False, force=True)
    assert _hashes(out) == first  # seeded per (utterance, copy)
    assert augment_manifest(manifest, out, copies=3, progress=False) == out  # complete: skipped
    augment_manifest(manifest, out, copies=1, progress=False)  # another config: rebuilt
    assert [r["id"] for r in _rows(out / "train.jsonl")] == ["a-aug0", "b-aug0"]


def test_each_effect_changes_what_it_names(manifest):
    from lhotse import Recording

    recording = Recording.from_file(manifest.parent / "a.wav")
    clean = apply_augmentation(recording, Augmentation())
    assert np.allclose(clean, recording.load_audio()[0], atol=1e-6)
    assert len(apply_augmentation(recording, Augmentation(speed=1.1))) == pytest.approx(len(clean) / 1.1, abs=2)
    quiet = apply_augmentation(recording, Augmentation(volume=0.5))
    assert np.allclose(quiet, clean * 0.5, atol=1e-4)
    noisy = apply_augmentation(recording, Augmentation(snr_db=10.0), noise_seed=1)
    snr = 10 * np.log10(np.mean(clean.astype(np.float64) ** 2) / np.mean((noisy - clean).astype(np.float64) ** 2))
    assert snr == pytest.approx(10.0, abs=0.5)
    for channel in ("telephone", "gsm", "room"):
        out = apply_augmentation(recording, Augmentation(channel=channel, room_seed=3))
        assert out.dtype == np.float32 and not np.allclose(out[:len(clean)], clean, atol=1e-3), channel


def test_effects_turned_off_leave_the_others_draws_as_they_were():
    full = draw_augmentation(random.Random(5), ("speed", "channel", "volume", "noise"))
    speed_only = draw_augmentation(random.Random(5), ("speed",))
    assert speed_only == Augmentation(speed=full.speed, room_seed=full.room_seed)


def test_bad_effects_copies_and_sources_are_named(manifest, tmp_path):
    with pytest.raises(AugmentError, match="unknown effect.*'echo'.*known: speed"):
        parse_effects("speed,echo")
    with pytest.raises(AugmentError, match="copies must be an int >= 1, got 0"):
        augment_manifest(manifest, tmp_path / "x", copies=0)
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        augment_manifest(tmp_path / "missing.jsonl", tmp_path / "x")


def test_data_augment_cli(manifest, tmp_path, capsys):
    assert main(["augment", str(manifest), "--out", str(tmp_path / "aug"), "--copies", "1", "--effects", "speed",
                 "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["utterances"] == {"train": 2}
    assert main(["augment", str(manifest), "--out", str(tmp_path / "aug"), "--effects", "echo"]) == 1
    assert "unknown effect" in capsys.readouterr().err


def test_manifest_texts_are_spoken_by_the_voices_copies_times(manifest, tmp_path, capsys):
    out = speak_manifest_texts(manifest, tmp_path / "tts", "espeak", copies=2, progress=False)
    rows = _rows(out / "train.jsonl")
    assert [r["id"] for r in rows] == ["tts-a-0", "tts-a-1"]  # the AST row is not spoken
    assert {r["text"] for r in rows} == {"Please enter your password."}
    first = _hashes(out)
    assert len(set(first.values())) == 2  # each copy its own espeak-ng voice / rate / pitch draw
    speak_manifest_texts(manifest, out, "espeak", copies=2, progress=False, force=True)
    assert _hashes(out) == first
    with pytest.raises(ValueError, match="copies must be >= 1"):
        speak_manifest_texts(manifest, out, "espeak", copies=0)
    assert main(["synth", "--texts-from", str(manifest), "--out", str(tmp_path / "tts2"), "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["utterances"] == {"train": 1}
