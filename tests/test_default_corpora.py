"""Tests for the corpora the shipped configs read (data/default_corpora.py): what is built, what is dropped."""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import soundfile as sf

from lightning_speechllm.data import default_corpora, prepare

PROMPTS = {"agent-pass": "Please enter your password followed by the pound key.", "activated": "Activated.",
           "vm-goodbye": "Goodbye.", "digits/7": "7"}


def _fake_asterisk(root: Path, monkeypatch) -> None:
    sounds = root / "sounds" / "en"
    for i, name in enumerate(PROMPTS):
        t = np.arange(int((0.6 + 0.3 * i) * 8000)) / 8000
        (sounds / name).parent.mkdir(parents=True, exist_ok=True)
        sf.write(str(sounds / f"{name}.wav"), (0.3 * np.sin(2 * np.pi * 200 * t)).astype(np.float32), 8000,
                 subtype="PCM_16")
    transcripts = root / "core-sounds-en.txt.gz"
    with gzip.open(transcripts, "wt", encoding="utf-8") as f:
        f.write("".join(f"{name}: {text}\n" for name, text in PROMPTS.items()))
    monkeypatch.setattr(prepare, "ASTERISK_SOUNDS_DIR", sounds)
    monkeypatch.setattr(prepare, "ASTERISK_TRANSCRIPTS", transcripts)


def _data(*train: str, **test_sets: str) -> SimpleNamespace:
    return SimpleNamespace(train=list(train), val_sets={}, test_sets=dict(test_sets))


def test_corpora_derived_from_the_real_prompts_are_built_after_them(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    _fake_asterisk(tmp_path / "debian", monkeypatch)
    monkeypatch.setattr(default_corpora, "DEFAULT_TTS_VOICES", "espeak")  # the fast engine; voices: test_voices.py
    data = _data("data_cache/asterisk/train.jsonl", "data_cache/asterisk_aug/train.jsonl",
                 "data_cache/asterisk_tts/train.jsonl", real="data_cache/asterisk/heldout.jsonl")
    default_corpora.prepare_default_corpora(data)
    train = [json.loads(line)["id"] for line in Path("data_cache/asterisk/train.jsonl").read_text().splitlines()]
    aug = [json.loads(line)["id"] for line in Path("data_cache/asterisk_aug/train.jsonl").read_text().splitlines()]
    tts = [json.loads(line)["id"] for line in Path("data_cache/asterisk_tts/train.jsonl").read_text().splitlines()]
    assert train and aug == [f"{i}-aug{k}" for i in train for k in range(default_corpora.ASTERISK_AUGMENTED_COPIES)]
    assert tts == [f"tts-{i}-{k}" for i in train for k in range(default_corpora.ASTERISK_TTS_COPIES)]
    assert len(data.train) == 3 and "note:" not in capsys.readouterr().out


def test_without_the_asterisk_packages_the_corpora_built_from_them_are_dropped_with_a_note(tmp_path, monkeypatch,
                                                                                          capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(prepare, "ASTERISK_TRANSCRIPTS", tmp_path / "missing.txt.gz")
    data = _data("mine.jsonl", "data_cache/asterisk/train.jsonl", "data_cache/asterisk_aug/train.jsonl",
                 "data_cache/asterisk_tts/train.jsonl", test="mine.jsonl", real="data_cache/asterisk/heldout.jsonl")
    default_corpora.prepare_default_corpora(data)
    assert data.train == ["mine.jsonl"] and data.test_sets == {"test": "mine.jsonl"}
    out = capsys.readouterr().out
    assert "data_cache/asterisk_aug/train.jsonl" in out and "data_cache/asterisk_tts/train.jsonl" in out
    assert out.count("missing.txt.gz") == 4  # asterisk train + real set, and each derived corpus
    assert not Path("data_cache/asterisk_aug").exists()
