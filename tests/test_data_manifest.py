"""Manifest reading: our JSONL, Lhotse CutSet manifests, Lhotse Shar round trip; waveforms delivered at 16 kHz."""
from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from lhotse import CutSet

from lightning_speechllm.data.bad_samples import BadSampleError, BadSampleHandler, read_rejected
from lightning_speechllm.data.batch import SAMPLE_RATE
from lightning_speechllm.data.datamodule import SpeechDataModule
from lightning_speechllm.data.dataset import SpeechDataset, load_waveform
from lightning_speechllm.data.manifest import detect_manifest_format, open_shar, read_manifest, read_manifests


def _tone(seconds: float, sr: int, channels: int = 1, freq: float = 220.0) -> np.ndarray:
    t = np.arange(int(seconds * sr)) / sr
    x = (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)
    return x if channels == 1 else np.stack([x * (c + 1) / channels for c in range(channels)], axis=1)


def _corpus(tmp: Path, n: int = 6) -> Path:
    """JSONL manifest with relative audio paths, mixed sample rates and tasks."""
    (tmp / "wav").mkdir()
    rows = []
    for i in range(n):
        sr = (16000, 8000, 22050)[i % 3]
        sf.write(tmp / "wav" / f"u{i}.wav", _tone(0.3 + 0.1 * i, sr), sr)
        row = {"id": f"u{i}", "audio": f"wav/u{i}.wav", "text": f"words {i}", "task": "asr", "src_lang": "en"}
        if i % 2:
            row.update(task="ast", translation=f"Wörter {i}", tgt_lang="de")
        rows.append(row)
    path = tmp / "corpus.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def test_jsonl_manifest_to_cuts(tmp_path: Path) -> None:
    path = _corpus(tmp_path)
    cuts = read_manifest(path, BadSampleHandler("error"))
    assert [c.id for c in cuts] == [f"u{i}" for i in range(6)]
    c1 = cuts[1]
    assert c1.sampling_rate == 8000 and c1.duration == pytest.approx(0.4)
    assert c1.custom["task"] == "ast" and c1.custom["translation"] == "Wörter 1" and c1.custom["tgt_lang"] == "de"
    assert (c1.custom["manifest"], c1.custom["line"]) == (str(path), 2)
    assert c1.supervisions[0].text == "words 1" and c1.supervisions[0].language == "en"
    assert Path(c1.recording.sources[0].source) == tmp_path / "wav" / "u1.wav"


def test_gzipped_jsonl_and_duplicates_across_manifests(tmp_path: Path) -> None:
    path = _corpus(tmp_path)
    gz = tmp_path / "copy.jsonl.gz"
    with gzip.open(gz, "wb") as f:
        f.write(path.read_bytes().replace(b'"wav/', f'"{tmp_path}/wav/'.encode()))
    assert len(read_manifest(gz, BadSampleHandler("error"))) == 6
    with pytest.raises(BadSampleError, match=rf"{gz}:1: \[duplicate_id\] duplicate id 'u0' \(first at {path}:1\)"):
        read_manifests([path, gz], BadSampleHandler("error"))


def test_waveforms_resampled_downmixed_and_padded(tmp_path: Path) -> None:
    sf.write(tmp_path / "st.wav", _tone(0.5, 44100, channels=2), 44100)
    sf.write(tmp_path / "m.wav", _tone(0.25, 8000), 8000)
    rows = [
        {"id": "stereo", "audio": "st.wav", "text": "a", "task": "asr"},
        {"id": "mono", "audio": "m.wav", "text": "b", "task": "asr"},
    ]
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    cuts = read_manifest(tmp_path / "m.jsonl", BadSampleHandler("error"))
    stereo = load_waveform(cuts[0])
    assert stereo.ndim == 1 and stereo.dtype == np.float32 and len(stereo) == SAMPLE_RATE // 2
    # Downmix = mean of channels (0.5x and 1x the tone) → 0.75 x 0.3 amplitude.
    assert np.abs(stereo).max() == pytest.approx(0.225, rel=0.02)
    batch = SpeechDataset(BadSampleHandler("error"))[cuts]
    assert batch.ids == ["stereo", "mono"] and batch.audio.shape == (2, 8000)
    assert batch.audio_lens.tolist() == [8000, 4000]
    assert batch.audio[1, 4000:].abs().sum() == 0  # right zero padding
    assert batch.audio.dtype.is_floating_point and not batch.text_only


def _lhotse_cuts(tmp_path: Path) -> CutSet:
    cuts = read_manifest(_corpus(tmp_path), BadSampleHandler("error"))
    for c in cuts:  # a plain Lhotse cut set: no manifest bookkeeping fields
        c.custom = {k: v for k, v in c.custom.items() if k not in ("manifest", "line")}
    return cuts


def test_lhotse_cutset_manifest(tmp_path: Path) -> None:
    cuts = _lhotse_cuts(tmp_path)
    path = tmp_path / "cuts.jsonl.gz"
    cuts.to_file(path)
    assert detect_manifest_format(path) == "lhotse" and detect_manifest_format(tmp_path / "corpus.jsonl") == "jsonl"
    read = read_manifest(path, BadSampleHandler("error"))
    assert [c.id for c in read] == [c.id for c in cuts]
    assert read[3].custom["task"] == "ast" and read[3].custom["line"] == 4
    batch = SpeechDataset(BadSampleHandler("error"))[read.subset(first=2)]
    assert batch.texts == ["words 0", "Wörter 1"] and batch.transcripts == ["words 0", "words 1"]
    assert batch.tasks == ["asr", "ast"] and batch.tgt_langs == [None, "de"] and batch.src_langs == ["en", "en"]


def test_lhotse_cutset_bad_cut_named_by_line(tmp_path: Path) -> None:
    cuts = _lhotse_cuts(tmp_path)
    cuts[2].supervisions[0].text = ""
    path = tmp_path / "cuts.jsonl"
    cuts.to_file(path)
    with pytest.raises(BadSampleError, match=rf"{path}:3: \[empty_text\].*\(id=u2\)"):
        read_manifest(path, BadSampleHandler("error"))
    kept = read_manifest(path, BadSampleHandler("skip", tmp_path / "r.jsonl"), max_audio_seconds=0.75)
    assert [c.id for c in kept] == ["u0", "u1", "u3", "u4"]
    assert [(r.line, r.reason) for r in read_rejected(tmp_path / "r.jsonl")] == [(3, "empty_text"), (6, "too_long")]


def test_shar_round_trip_streams_every_cut(tmp_path: Path) -> None:
    cuts = _lhotse_cuts(tmp_path)
    shar = tmp_path / "shar"
    shar.mkdir()
    cuts.to_shar(shar, fields={"recording": "wav"}, shard_size=2)
    assert detect_manifest_format(shar) == "shar" and len(list(shar.glob("recording.*.tar"))) == 3
    streamed = {c.id: c for c in open_shar(shar, split_for_dataloading=False)}
    assert sorted(streamed) == sorted(c.id for c in cuts) and streamed["u3"].custom["translation"] == "Wörter 3"

    dm = SpeechDataModule(train=shar, val_sets={"dev": shar}, max_duration=2.0, num_buckets=2, seed=3)
    dm.setup("fit")
    train = [b for b in dm.train_dataloader()]
    ids = [i for b in train for i in b.ids]
    assert sorted(ids) == sorted(c.id for c in cuts)  # each utterance exactly once per epoch
    [dev] = dm.val_dataloader()
    batch_by_id = {i: (b.audio[k, : b.audio_lens[k]], b.texts[k]) for b in dev for k, i in enumerate(b.ids)}
    for cut in cuts:
        audio, text = batch_by_id[cut.id]
        ref = load_waveform(cut)
        assert audio.shape[0] == ref.shape[0]
        assert np.abs(audio.numpy() - ref).max() < 1e-3  # 16-bit wav inside the shard
        assert text == (cut.custom.get("translation") or cut.supervisions[0].text)


def test_shar_metadata_checked_lazily(tmp_path: Path) -> None:
    cuts = _lhotse_cuts(tmp_path)
    cuts[0].supervisions[0].text = " "
    shar = tmp_path / "shar"
    shar.mkdir()
    cuts.to_shar(shar, fields={"recording": "wav"}, shard_size=10)
    dm = SpeechDataModule(val_sets={"dev": shar}, max_duration=100.0, on_bad_sample="skip", rejected_dir=tmp_path)
    dm.setup("validate")
    ids = [i for b in dm.val_dataloader()[0] for i in b.ids]
    assert sorted(ids) == [f"u{i}" for i in range(1, 6)]
    [rec] = read_rejected(tmp_path / "rejected.jsonl")
    assert (rec.manifest, rec.line, rec.id, rec.reason) == (str(shar), None, "u0", "empty_text")


def test_unknown_paths_are_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nothing.jsonl"):
        detect_manifest_format(tmp_path / "nothing.jsonl")
    with pytest.raises(FileNotFoundError, match="not a Lhotse Shar directory"):
        detect_manifest_format(tmp_path)
