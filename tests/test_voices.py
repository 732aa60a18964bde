"""Tests for the TTS voices beyond espeak-ng (voices.py) and their use in the synthetic corpus (synth.py)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from lightning_speechllm.data import voices as V
from lightning_speechllm.data.synth import MARKER, synthesize_corpus

SIZES = {"train": 6, "dev": 1, "test": 1}
NO_AST = {"train": 0, "dev": 0, "test": 0}
needs_flite = pytest.mark.skipif(shutil.which("flite") is None,
                                 reason="flite is not installed (Debian package `flite`: apt-get install flite)")


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _hashes(corpus: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted((corpus / "wav").glob("*.wav"))}


def test_parse_voices_expands_flite_reads_weights_and_names_errors() -> None:
    specs = V.parse_voices("espeak, flite ,piper-joe:2")
    assert [s.name for s in specs] == ["espeak", "flite-slt", "flite-awb", "flite-rms", "flite-kal16", "piper-joe"]
    assert [s.weight for s in specs] == [1, 1, 1, 1, 1, 2]
    assert V.parse_voices(["flite-kal16:0.5"]) == [V.VoiceSpec("flite", "kal16", 0.5)]
    assert V.parse_voices("piper")[0].name == "piper-joe"
    with pytest.raises(V.VoiceError, match="unknown voice 'flite-bob'.*flite-slt"):
        V.parse_voices("flite-bob")
    with pytest.raises(V.VoiceError, match="weight 'x'"):
        V.parse_voices("espeak:x")
    with pytest.raises(V.VoiceError, match="> 0"):
        V.parse_voices("espeak:0")
    with pytest.raises(V.VoiceError, match="given twice.*flite-slt"):
        V.parse_voices("flite,flite-slt")
    with pytest.raises(V.VoiceError, match="no voice"):
        V.parse_voices(" , ")


def test_a_missing_engine_is_skipped_with_one_note_naming_the_package(monkeypatch) -> None:
    monkeypatch.setattr(V.shutil, "which", lambda name: None)
    notes: list[str] = []
    kept = V.available_voices(V.parse_voices("espeak,flite"), printer=notes.append)
    assert [s.name for s in kept] == ["espeak"]
    assert len(notes) == 1 and "flite-slt, flite-awb, flite-rms, flite-kal16" in notes[0]
    assert "apt-get install flite" in notes[0]


def test_corpus_fails_clearly_when_no_voice_can_run(monkeypatch, tmp_path: Path, capsys) -> None:
    monkeypatch.setattr(V.shutil, "which", lambda name: None)
    with pytest.raises(V.VoiceError, match="none of the voices"):
        synthesize_corpus(tmp_path / "c", sizes=SIZES, ast_sizes=NO_AST, progress=False, tts_voices="flite-slt")
    assert "apt-get install flite" in capsys.readouterr().out


def test_espeak_alone_is_exactly_the_default_corpus(tmp_path: Path) -> None:
    a = synthesize_corpus(tmp_path / "a", sizes=SIZES, ast_sizes=NO_AST, progress=False)
    b = synthesize_corpus(tmp_path / "b", sizes=SIZES, ast_sizes=NO_AST, progress=False, tts_voices="espeak")
    assert _hashes(a) == _hashes(b)
    assert (a / MARKER).read_text() == (b / MARKER).read_text()  # same config: no tts_voices key


@needs_flite
def test_flite_voice_speaks_deterministically() -> None:
    speaker = V.FliteSynthesizer("slt", stretch=1.1, f0_shift=0.95)
    audio, rate = speaker.speak("Please call me at seven o'clock.")
    again, _ = speaker.speak("Please call me at seven o'clock.")
    assert rate == 16000 and audio.dtype == np.float32 and 1.0 < audio.size / rate < 4.0
    assert float(np.abs(audio).max()) > 0.05 and np.array_equal(audio, again)
    slower, _ = V.FliteSynthesizer("slt", stretch=1.3).speak("Please call me at seven o'clock.")
    assert slower.size > audio.size * 1.1
    with pytest.raises(V.VoiceError, match="no voice 'kal'"):
        V.FliteSynthesizer("kal")


@needs_flite
def test_flite_corpus_rows_speakers_and_rebuild(tmp_path: Path) -> None:
    from lhotse import CutSet

    espeak_only = synthesize_corpus(tmp_path / "e", sizes=SIZES, ast_sizes=NO_AST, progress=False)
    out = synthesize_corpus(tmp_path / "f", sizes=SIZES, ast_sizes=NO_AST, progress=False,
                            tts_voices="espeak,flite-slt:3")
    rows = _rows(out / "train.jsonl")
    assert [r["id"] for r in rows] == [r["id"] for r in _rows(espeak_only / "train.jsonl")]
    assert [r["text"] for r in rows] == [r["text"] for r in _rows(espeak_only / "train.jsonl")]
    speakers = {c.id: c.supervisions[0].speaker for split in SIZES
                for c in CutSet.from_file(out / f"cuts_{split}.jsonl.gz")}
    flite_ids = [i for i, s in speakers.items() if s.startswith("flite-slt@d")]
    assert flite_ids and len(flite_ids) < len(speakers)  # both voices drawn
    for row in rows:
        assert set(row) == {"id", "audio", "text", "duration", "task", "src_lang"}
        info = sf.info(str(out / row["audio"]))
        assert (info.samplerate, info.channels, info.subtype) == (16000, 1, "PCM_16")
        assert abs(info.duration - row["duration"]) < 1e-3
    a, e = _hashes(out), _hashes(espeak_only)
    for utt_id, speaker in speakers.items():  # an utterance left to espeak-ng is the default corpus's file
        assert (a[f"{utt_id}.wav"] == e[f"{utt_id}.wav"]) == (not speaker.startswith("flite"))
    summary = json.loads((out / "corpus.json").read_text())
    assert summary["tts_voices"] == ["espeak:1", "flite-slt:3"]
    assert summary["per_voice"]["flite-slt"]["utterances"] == len(flite_ids)
    again = synthesize_corpus(tmp_path / "g", sizes=SIZES, ast_sizes=NO_AST, progress=False,
                              tts_voices="espeak,flite-slt:3")
    assert _hashes(again) == a


@pytest.mark.skipif(V.engine_missing("piper") is not None, reason=str(V.engine_missing("piper")))
def test_piper_voice_speaks_and_a_rebuild_is_identical(tmp_path: Path) -> None:
    sizes = {"train": 3, "dev": 0, "test": 0}
    a = synthesize_corpus(tmp_path / "a", sizes=sizes, ast_sizes=NO_AST, progress=False, tts_voices="piper-joe")
    b = synthesize_corpus(tmp_path / "b", sizes=sizes, ast_sizes=NO_AST, progress=False, tts_voices="piper-joe")
    assert _hashes(a) == _hashes(b) and len(_hashes(a)) == 3
    for row in _rows(a / "train.jsonl"):
        audio, rate = sf.read(str(a / row["audio"]), dtype="float32")
        assert rate == 16000 and np.sqrt(np.mean(audio ** 2)) > 0.01
