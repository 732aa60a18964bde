"""Tests for corpus preparation (Asterisk, LibriSpeech, CoVoST 2) and the ``data`` CLI, on small fake trees."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from lightning_speechllm.data.prepare import (
    ASTERISK_SOUNDS_DIR,
    ASTERISK_TRANSCRIPTS,
    clean_prompt_text,
    main,
    is_heldout_sentence,
    parse_asterisk_transcripts,
    prepare_asterisk,
    prepare_covost2,
    prepare_librispeech,
    read_covost_tsv,
)


def _tone(path: Path, seconds: float, sample_rate: int, amplitude: float = 0.3, fmt: str = "WAV") -> None:
    """A speech-like test signal: a few harmonics with a syllable-rate envelope."""
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    signal = sum(np.sin(2 * np.pi * f * t) / k for k, f in enumerate((140.0, 280.0, 420.0, 560.0), start=1))
    envelope = 0.5 * (1 - np.cos(2 * np.pi * 4 * t))
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), (amplitude * envelope * signal / 2).astype(np.float32), sample_rate, format=fmt,
             subtype="PCM_16")


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


# ----------------------------------------------------------------------------------------------------------------
# Asterisk
# ----------------------------------------------------------------------------------------------------------------
TRANSCRIPT = """; Core Asterisk Sounds in English

activated: Activated.
agent-pass: Please enter your password  followed by the pound key.
ascending-2tone: [ascending tones]
letters/dash: dash [-]
digits/7: 7
silence/1: silence one
empty-one:
missing-file: This prompt has no recording.
activated: Activated again.
this line has no colon
"""


def test_clean_prompt_text() -> None:
    assert clean_prompt_text("dash [-]") == "dash"
    assert clean_prompt_text("  [sound of monkeys screaming] ") == ""
    assert clean_prompt_text("Please  enter\tyour number.") == "Please enter your number."


def test_parse_asterisk_transcripts_keeps_and_drops_with_reasons() -> None:
    report = parse_asterisk_transcripts(TRANSCRIPT.splitlines())
    kept = {e.name: e.text for e in report.kept}
    assert kept == {"activated": "Activated.", "agent-pass": "Please enter your password followed by the pound key.",
                    "letters/dash": "dash", "digits/7": "7", "silence/1": "silence one",
                    "missing-file": "This prompt has no recording."}
    assert report.dropped["non-speech annotation"] == ["ascending-2tone"]
    assert report.dropped["no text"] == ["empty-one"]
    assert report.dropped["duplicate name"] == ["activated"]
    assert report.dropped["malformed line"] == ["line 12: 'this line has no colon'"]
    assert next(e for e in report.kept if e.name == "digits/7").line == 7


@pytest.fixture()
def fake_asterisk(tmp_path: Path) -> tuple[Path, Path]:
    sounds = tmp_path / "sounds" / "en"
    _tone(sounds / "activated.wav", 0.8, 8000)
    _tone(sounds / "agent-pass.wav", 2.5, 8000)
    _tone(sounds / "letters" / "dash.wav", 0.5, 8000)
    _tone(sounds / "digits" / "7.wav", 0.4, 8000)
    _tone(sounds / "silence" / "1.wav", 1.0, 8000, amplitude=0.0)
    transcripts = tmp_path / "core-sounds-en.txt.gz"
    with gzip.open(transcripts, "wt", encoding="utf-8") as f:
        f.write(TRANSCRIPT)
    return sounds, transcripts


def test_prepare_asterisk_on_a_fake_tree(fake_asterisk: tuple[Path, Path], tmp_path: Path) -> None:
    from lhotse import CutSet

    sounds, transcripts = fake_asterisk
    out = prepare_asterisk(tmp_path / "out", sounds_dir=sounds, transcripts=transcripts, progress=False)
    rows = {row["id"]: row for row in _rows(out / "test.jsonl")}
    assert set(rows) == {"asterisk-activated", "asterisk-agent-pass", "asterisk-letters-dash", "asterisk-digits-7"}
    row = rows["asterisk-agent-pass"]
    assert row["text"] == "Please enter your password followed by the pound key."
    assert (row["task"], row["src_lang"]) == ("asr", "en")
    info = sf.info(str(out / row["audio"]))
    assert info.samplerate == 16000 and abs(info.duration - 2.5) < 0.01 and abs(row["duration"] - 2.5) < 0.01
    summary = json.loads((out / "prepare.json").read_text())
    assert summary["kept"] == 4
    assert summary["dropped"] == {"non-speech annotation": 1, "no text": 1, "duplicate name": 1, "malformed line": 1,
                                  "no audio file": 1, "silent audio": 1}
    cuts = CutSet.from_file(out / "cuts_test.jsonl.gz")
    assert sorted(c.id for c in cuts) == sorted(rows) and all(c.sampling_rate == 16000 for c in cuts)
    train, dev, heldout = ({r["id"] for r in _rows(out / f"{split}.jsonl")} for split in ("train", "dev", "heldout"))
    assert train | dev | heldout == set(rows) and not train & heldout and not dev & (train | heldout)
    assert heldout == {i for i in rows if is_heldout_sentence(rows[i]["text"], 0.25)}
    assert dev == {i for i in set(rows) - heldout if is_heldout_sentence(rows[i]["text"], 0.1, salt="dev")}
    assert json.loads((out / "prepare.json").read_text())["splits"] == {
        "test": 4, "train": len(train), "dev": len(dev), "heldout": len(heldout)}


def test_prepare_asterisk_dev_split_takes_every_sentence_its_hash_names(fake_asterisk, tmp_path: Path) -> None:
    sounds, transcripts = fake_asterisk
    out = prepare_asterisk(tmp_path / "out", sounds, transcripts, progress=False, heldout_fraction=0.0,
                           dev_fraction=1.0)
    assert _rows(out / "train.jsonl") == [] and _rows(out / "heldout.jsonl") == []
    assert len(_rows(out / "dev.jsonl")) == 4
    (out / "dev.jsonl").unlink()  # an older cache without the dev split is rebuilt
    again = prepare_asterisk(out, sounds, transcripts, progress=False)
    assert (again / "dev.jsonl").is_file() and len(_rows(again / "test.jsonl")) == 4


def test_heldout_sentences_are_chosen_by_their_words_not_by_case_punctuation_or_order():
    sentences = [f"Please enter extension {n}, followed by pound." for n in range(400)]
    heldout = [s for s in sentences if is_heldout_sentence(s, 0.25)]
    assert 70 <= len(heldout) <= 130  # about a quarter
    assert all(is_heldout_sentence(s.upper().replace(",", ""), 0.25) for s in heldout)
    assert not any(is_heldout_sentence(s, 0.0) for s in sentences) and all(is_heldout_sentence(s, 1.0) for s in sentences)
    dev = [s for s in sentences if is_heldout_sentence(s, 0.25, salt="dev")]
    assert 70 <= len(dev) <= 130 and 0 < len(set(dev) & set(heldout)) < 50  # another, independent draw


def test_prepare_asterisk_drops_long_prompts_and_is_idempotent(fake_asterisk: tuple[Path, Path],
                                                               tmp_path: Path) -> None:
    sounds, transcripts = fake_asterisk
    out = prepare_asterisk(tmp_path / "out", sounds, transcripts, max_seconds=2.0, progress=False)
    assert "asterisk-agent-pass" not in {r["id"] for r in _rows(out / "test.jsonl")}
    assert json.loads((out / "prepare.json").read_text())["dropped"]["longer than 2 s"] == 1
    (out / "test.jsonl").write_text("")
    prepare_asterisk(out, sounds, transcripts, max_seconds=2.0, progress=False)
    assert (out / "test.jsonl").read_text() == ""  # complete output is not rebuilt
    prepare_asterisk(out, sounds, transcripts, max_seconds=2.0, force=True, progress=False)
    assert len(_rows(out / "test.jsonl")) == 3


def test_prepare_asterisk_names_the_package_when_missing(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="asterisk-core-sounds-en-wav"):
        prepare_asterisk(tmp_path / "out", sounds_dir=tmp_path, transcripts=tmp_path / "nope.txt.gz")
    with pytest.raises(FileNotFoundError, match="apt-get install"):
        prepare_asterisk(tmp_path / "out", sounds_dir=tmp_path / "nope", transcripts=__file__)


@pytest.mark.skipif(not (ASTERISK_TRANSCRIPTS.is_file() and ASTERISK_SOUNDS_DIR.is_dir()),
                    reason="Debian packages asterisk-core-sounds-en-wav and asterisk-core-sounds-en not installed")
def test_real_asterisk_transcripts_map_to_real_files() -> None:
    with gzip.open(ASTERISK_TRANSCRIPTS, "rt", encoding="utf-8") as f:
        report = parse_asterisk_transcripts(f.read().splitlines())
    assert len(report.kept) > 500
    assert "ascending-2tone" in report.dropped["non-speech annotation"]
    found = [e for e in report.kept if (ASTERISK_SOUNDS_DIR / f"{e.name}.wav").is_file()]
    assert len(found) >= 0.98 * len(report.kept)
    assert any("/" in e.name for e in found)  # digits/, letters/... subdirectories
    assert sf.info(str(ASTERISK_SOUNDS_DIR / f"{found[0].name}.wav")).samplerate == 8000


# ----------------------------------------------------------------------------------------------------------------
# LibriSpeech
# ----------------------------------------------------------------------------------------------------------------
def _fake_librispeech(root: Path) -> Path:
    corpus = root / "LibriSpeech"
    lines = {("test-clean", "1089", "134686"): ["HE HOPED THERE WOULD BE STEW FOR DINNER", "STUFF IT INTO YOU"],
             ("dev-clean", "84", "121123"): ["GO DO YOU HEAR"]}
    for (part, speaker, chapter), texts in lines.items():
        chapter_dir = corpus / part / speaker / chapter
        trans = []
        for i, text in enumerate(texts):
            utt = f"{speaker}-{chapter}-{i:04d}"
            _tone(chapter_dir / f"{utt}.flac", 0.5 + 0.25 * i, 16000, fmt="FLAC")
            trans.append(f"{utt} {text}")
        (chapter_dir / f"{speaker}-{chapter}.trans.txt").write_text("\n".join(trans) + "\n")
    return corpus


def test_prepare_librispeech_wraps_the_lhotse_recipe(tmp_path: Path) -> None:
    from lhotse import CutSet

    corpus = _fake_librispeech(tmp_path)
    out = prepare_librispeech(corpus, tmp_path / "out")
    rows = _rows(out / "test-clean.jsonl")
    assert sorted(r["id"] for r in rows) == ["1089-134686-0000", "1089-134686-0001"]
    by_id = {r["id"]: r for r in rows}
    assert by_id["1089-134686-0001"]["text"] == "STUFF IT INTO YOU"
    assert by_id["1089-134686-0001"]["src_lang"] == "en" and by_id["1089-134686-0001"]["task"] == "asr"
    assert abs(by_id["1089-134686-0001"]["duration"] - 0.75) < 1e-3
    assert (out / by_id["1089-134686-0000"]["audio"]).resolve() == \
        (corpus / "test-clean/1089/134686/1089-134686-0000.flac").resolve()
    assert len(_rows(out / "dev-clean.jsonl")) == 1
    assert len(CutSet.from_file(out / "cuts_dev-clean.jsonl.gz")) == 1


def test_prepare_librispeech_rejects_a_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="LibriSpeech"):
        prepare_librispeech(tmp_path / "nope", tmp_path / "out")


# ----------------------------------------------------------------------------------------------------------------
# CoVoST 2
# ----------------------------------------------------------------------------------------------------------------
def _fake_covost(root: Path) -> tuple[Path, Path]:
    clips = root / "cv" / "clips"
    rows = {"train": [("common_voice_en_1.wav", "Hello there.", "Hallo.", "c1"),
                      ("common_voice_en_2.wav", "Good \"morning\".", "Guten \"Morgen\".", "c2")],
            "test": [("common_voice_en_3.wav", "See you soon.", "Bis bald.", "c1")]}
    for split, items in rows.items():
        lines = ["path\tsentence\ttranslation\tclient_id"]
        for path, sentence, translation, client in items:
            _tone(clips / path, 1.0, 48000)
            lines.append(f"{path}\t{sentence}\t{translation}\t{client}")
        (root / f"covost_v2.en_de.{split}.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root, clips


def test_prepare_covost2_writes_ast_manifests(tmp_path: Path) -> None:
    from lhotse import CutSet

    tsv_dir, clips = _fake_covost(tmp_path)
    out = prepare_covost2(tsv_dir, clips, tmp_path / "out", splits=("train", "test"))
    rows = _rows(out / "ast_train.jsonl")
    assert [r["text"] for r in rows] == ["Hello there.", 'Good "morning".']
    assert rows[1]["translation"] == 'Guten "Morgen".'
    assert all(r["task"] == "ast" and r["src_lang"] == "en" and r["tgt_lang"] == "de" for r in rows)
    assert (out / rows[0]["audio"]).resolve() == (clips / "common_voice_en_1.wav").resolve()
    cut = CutSet.from_file(out / "cuts_ast_test.jsonl.gz")[0]
    assert cut.supervisions[0].custom == {"task": "ast", "translation": "Bis bald.", "tgt_lang": "de"}
    assert cut.supervisions[0].speaker == "c1"


def test_covost_errors_name_the_file_and_line(tmp_path: Path) -> None:
    tsv_dir, clips = _fake_covost(tmp_path)
    bad = tsv_dir / "covost_v2.en_de.dev.tsv"
    bad.write_text("path\tsentence\ttranslation\nx.wav\tHi.\t\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"dev\.tsv:2: empty field\(s\) \['translation'\]"):
        read_covost_tsv(bad)
    bad.write_text("path\tsentence\n", encoding="utf-8")
    with pytest.raises(ValueError, match="translation"):
        read_covost_tsv(bad)
    (tsv_dir / "covost_v2.en_de.test.tsv").write_text("path\tsentence\ttranslation\nmissing.wav\tHi.\tHallo.\n")
    with pytest.raises(FileNotFoundError, match="missing.wav"):
        prepare_covost2(tsv_dir, clips, tmp_path / "out", splits=("test",))


# ----------------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------------
def test_cli_synth_and_prepare(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                               fake_asterisk: tuple[Path, Path]) -> None:
    out = tmp_path / "synth"
    argv = ["data", "synth", "--out", str(out), "--seed", "4", "--train", "2", "--dev", "1", "--test", "1",
            "--ast-train", "1", "--ast-dev", "1", "--ast-test", "1", "--no-progress"]
    assert main(argv) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["utterances"] == {"train": 2, "dev": 1, "test": 1, "ast_train": 1, "ast_dev": 1, "ast_test": 1}
    assert json.loads((out / "corpus.json").read_text())["seed"] == 4

    sounds, transcripts = fake_asterisk
    assert main(["prepare", "asterisk", "--out", str(tmp_path / "ast"), "--sounds-dir", str(sounds),
                 "--transcripts", str(transcripts)]) == 0
    assert len(_rows(tmp_path / "ast" / "test.jsonl")) == 4

    assert main(["data", "prepare", "asterisk", "--sounds-dir", str(tmp_path / "none"), "--transcripts",
                 str(tmp_path / "none.gz"), "--out", str(tmp_path / "x")]) == 1
    assert "asterisk-core-sounds-en-wav" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["data", "prepare", "timit"])
