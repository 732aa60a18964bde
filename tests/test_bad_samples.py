"""Every bad-input case under both policies: "error" names manifest, line and reason; "skip" drops and records."""
from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import soundfile as sf
import torch

from lightning_speechllm.data.bad_samples import (
    BadReason,
    BadSampleError,
    BadSampleHandler,
    count_rejected,
    read_rejected,
    warn_rejected,
)
from lightning_speechllm.data.datamodule import SpeechDataModule
from lightning_speechllm.data.manifest import read_manifest


def _wav(path: Path, seconds: float = 0.5, sr: int = 16000, values: np.ndarray | None = None) -> str:
    x = values if values is not None else (0.1 * np.sin(np.arange(int(sr * seconds)) * 0.07)).astype(np.float32)
    sf.write(path, x, sr, subtype="FLOAT")
    return path.name


def _good(tmp: Path, i: int) -> dict:
    return {"id": f"ok{i}", "audio": _wav(tmp / f"ok{i}.wav"), "text": f"good {i}", "task": "asr"}


def _write(tmp: Path, bad_line: bytes) -> Path:
    """Manifest: good line 1, the bad line at line 2, good line 3."""
    lines = [json.dumps(_good(tmp, 0)).encode(), bad_line, json.dumps(_good(tmp, 1)).encode()]
    path = tmp / "manifest.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def _row(**kw) -> bytes:
    return json.dumps(kw, ensure_ascii=False).encode("utf-8")


# Eager cases (found at manifest read): name → (bad line builder, reason, text expected in the message).
EAGER_CASES = {
    "missing_file": (lambda t: _row(id="b", audio="nope.wav", text="x", task="asr"), BadReason.MISSING_FILE, "not found"),
    "corrupt_header": (
        lambda t: (t / "junk.wav").write_bytes(b"RIFF\x00\x01garbage" * 10) and _row(id="b", audio="junk.wav", text="x", task="asr"),
        BadReason.UNREADABLE_AUDIO, "cannot read audio header",
    ),
    "zero_length": (
        lambda t: _row(id="b", audio=_wav(t / "empty.wav", values=np.zeros(0, np.float32)), text="x", task="asr"),
        BadReason.ZERO_LENGTH, "zero samples",
    ),
    "too_long": (
        lambda t: _row(id="b", audio=_wav(t / "long.wav", seconds=2.5, sr=8000), text="x", task="asr"),
        BadReason.TOO_LONG, "max_audio_seconds=2.0",
    ),
    "empty_text": (lambda t: _row(id="b", audio=_wav(t / "e.wav"), text="  ", task="asr"), BadReason.EMPTY_TEXT, "empty transcript"),
    "empty_translation": (
        lambda t: _row(id="b", audio=_wav(t / "e.wav"), text="hi", task="ast", translation=""),
        BadReason.EMPTY_TEXT, "empty 'translation'",
    ),
    "missing_translation": (
        lambda t: _row(id="b", audio=_wav(t / "e.wav"), text="hi", task="ast"), BadReason.MISSING_FIELD, "'translation'",
    ),
    "invalid_utf8": (lambda t: b'{"id": "b", "audio": "x.wav", "text": "caf\xe9", "task": "asr"}', BadReason.INVALID_UTF8, "UTF-8"),
    "not_json": (lambda t: b'{"id": "b", "audio": ', BadReason.INVALID_JSON, "not valid JSON"),
    "json_not_object": (lambda t: b'["b"]', BadReason.INVALID_JSON, "expected an object"),
    "missing_audio_field": (lambda t: _row(id="b", text="x", task="asr"), BadReason.MISSING_FIELD, "missing field 'audio'"),
    "missing_task_field": (lambda t: _row(id="b", audio=_wav(t / "e.wav"), text="x"), BadReason.MISSING_FIELD, "missing field 'task'"),
    "bad_task": (lambda t: _row(id="b", audio=_wav(t / "e.wav"), text="x", task="tts"), BadReason.INVALID_FIELD, "'task'"),
    "duplicate_id": (
        lambda t: _row(id="ok0", audio=_wav(t / "e.wav"), text="x", task="asr"), BadReason.DUPLICATE_ID, "duplicate id 'ok0'",
    ),
}


@pytest.mark.parametrize("case", sorted(EAGER_CASES))
def test_eager_bad_sample_error_names_manifest_line_reason(tmp_path: Path, case: str) -> None:
    build, reason, expected = EAGER_CASES[case]
    manifest = _write(tmp_path, build(tmp_path))
    with pytest.raises(BadSampleError) as info:
        read_manifest(manifest, BadSampleHandler("error"), max_audio_seconds=2.0)
    msg = str(info.value)
    assert f"{manifest}:2:" in msg and f"[{reason.value}]" in msg and expected in msg, msg
    assert info.value.line == 2 and info.value.reason == reason and info.value.manifest == str(manifest)


@pytest.mark.parametrize("case", sorted(EAGER_CASES))
def test_eager_bad_sample_skip_drops_and_records(tmp_path: Path, case: str) -> None:
    build, reason, _ = EAGER_CASES[case]
    manifest = _write(tmp_path, build(tmp_path))
    rejected = tmp_path / "out" / "rejected.jsonl"
    cuts = read_manifest(manifest, BadSampleHandler("skip", rejected), max_audio_seconds=2.0)
    assert sorted(c.id for c in cuts) == ["ok0", "ok1"]
    [rec] = read_rejected(rejected)
    assert (rec.manifest, rec.line, rec.reason) == (str(manifest), 2, reason.value)
    assert rec.id == (None if reason in (BadReason.INVALID_UTF8, BadReason.INVALID_JSON) else ("ok0" if case == "duplicate_id" else "b"))


def test_other_sample_rate_is_resampled_not_rejected(tmp_path: Path) -> None:
    row = _row(id="b", audio=_wav(tmp_path / "sr.wav", seconds=0.5, sr=22050), text="x", task="asr")
    manifest = _write(tmp_path, row)
    dm = SpeechDataModule(val_sets={"v": manifest}, max_duration=10, rejected_dir=tmp_path)
    dm.setup("validate")
    [batch] = list(dm.val_dataloader()[0])
    assert batch.ids == ["ok0", "b", "ok1"]
    assert batch.audio_lens.tolist()[1] == pytest.approx(8000, abs=2)


def _lazy_dm(tmp_path: Path, policy: str, spoil) -> tuple[SpeechDataModule, Path]:
    """A datamodule whose line-2 audio is spoiled AFTER the eager read (so only the lazy check can see it)."""
    bad = tmp_path / "bad.wav"
    manifest = _write(tmp_path, _row(id="b", audio=_wav(bad), text="x", task="asr"))
    dm = SpeechDataModule(
        val_sets={"v": manifest}, max_duration=10, on_bad_sample=policy, rejected_dir=tmp_path / "logs",
        max_audio_seconds=2.0,
    )
    dm.setup("validate")
    spoil(bad)
    return dm, manifest


LAZY_CASES = {
    "nan": (lambda p: sf.write(p, np.full(8000, np.nan, np.float32), 16000, subtype="FLOAT"), BadReason.NON_FINITE, "NaN"),
    "inf": (lambda p: sf.write(p, np.r_[np.zeros(10), np.inf].astype(np.float32), 16000, subtype="FLOAT"), BadReason.NON_FINITE, "inf"),
    "corrupt": (lambda p: p.write_bytes(b"\x00garbage" * 100), BadReason.UNREADABLE_AUDIO, "cannot decode audio"),
    "length_changed": (lambda p: sf.write(p, np.zeros(16000 * 3, np.float32), 16000), BadReason.UNREADABLE_AUDIO, "diverged"),
}


@pytest.mark.parametrize("case", sorted(LAZY_CASES))
def test_lazy_bad_sample_error(tmp_path: Path, case: str) -> None:
    spoil, reason, expected = LAZY_CASES[case]
    dm, manifest = _lazy_dm(tmp_path, "error", spoil)
    with pytest.raises(BadSampleError) as info:
        list(dm.val_dataloader()[0])
    msg = str(info.value)
    assert f"{manifest}:2:" in msg and f"[{reason.value}]" in msg and expected in msg and "id=b" in msg, msg


@pytest.mark.parametrize("case", sorted(LAZY_CASES))
def test_lazy_bad_sample_skip_drops_from_batch(tmp_path: Path, case: str) -> None:
    spoil, reason, _ = LAZY_CASES[case]
    dm, manifest = _lazy_dm(tmp_path, "skip", spoil)
    [batch] = list(dm.val_dataloader()[0])
    assert batch.ids == ["ok0", "ok1"] and batch.audio.shape[0] == 2
    [rec] = read_rejected(tmp_path / "logs" / "rejected.jsonl")
    assert (rec.manifest, rec.line, rec.id, rec.reason) == (str(manifest), 2, "b", reason.value)


def test_lazy_error_crosses_worker_process(tmp_path: Path) -> None:
    """A BadSampleError raised in a dataloader worker reaches the main process with its full message."""
    dm, manifest = _lazy_dm(tmp_path, "error", LAZY_CASES["nan"][0])
    dm.num_workers = 1
    with pytest.raises(BadSampleError, match=rf"{manifest}:2: \[non_finite\]"):
        list(dm.val_dataloader()[0])


def test_skip_counts_and_epoch_warning(tmp_path: Path) -> None:
    """Counts are per reason, repeats of the same sample (later epochs) count once, the warning lists them."""
    rejected = tmp_path / "rejected.jsonl"
    handler = BadSampleHandler("skip", rejected)
    for _ in range(2):  # the same lazily rejected sample seen in two epochs
        handler.reject("m.jsonl", 4, BadReason.NON_FINITE, "nan", "a")
    handler.reject("m.jsonl", 5, BadReason.EMPTY_TEXT, "empty", "b")
    handler.reject("m.jsonl", 6, BadReason.EMPTY_TEXT, "empty", "c")
    assert len(rejected.read_text().splitlines()) == 4
    assert count_rejected(rejected) == {"empty_text": 2, "non_finite": 1}
    with pytest.warns(RuntimeWarning, match=r"3 bad sample\(s\) skipped .*empty_text=2, non_finite=1"):
        warn_rejected(rejected, "train epoch 0")


def test_policy_validation() -> None:
    with pytest.raises(ValueError, match="on_bad_sample"):
        BadSampleHandler("ignore")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="rejected_path"):
        BadSampleHandler("skip")


class _CountingModule(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.ids: list[str] = []

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        self.ids.extend(batch.ids)
        return self.w.square().sum()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_skip_under_trainer_writes_to_log_dir_and_warns_each_epoch(tmp_path: Path) -> None:
    nan = _wav(tmp_path / "nan.wav", values=np.full(4000, np.nan, np.float32))
    manifest = _write(tmp_path, _row(id="b", audio=nan, text="x", task="asr"))
    dm = SpeechDataModule(manifest, max_duration=10.0, on_bad_sample="skip")
    model = _CountingModule()
    trainer = L.Trainer(
        accelerator="cpu", max_epochs=2, default_root_dir=tmp_path / "run", logger=False, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, use_distributed_sampler=False,
    )
    with pytest.warns(RuntimeWarning, match=r"\[train epoch 1\] 1 bad sample\(s\) skipped so far \(non_finite=1\)"):
        trainer.fit(model, dm)
    assert sorted(model.ids) == ["ok0", "ok0", "ok1", "ok1"]
    assert dm.rejected_path == tmp_path / "run" / "rejected.jsonl"
    assert count_rejected(dm.rejected_path) == {"non_finite": 1}
    assert dm.report_bad_samples() == {"non_finite": 1}
