"""SpeechDataModule: DDP sharding, mid-epoch resume (also through a Lightning checkpoint), named eval sets,
text-only mode, and one real 2-process CPU DDP run."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import soundfile as sf
import torch

from lightning_speechllm.data.bad_samples import BadSampleHandler
from lightning_speechllm.data.batch import SpeechBatch
from lightning_speechllm.data.datamodule import SpeechDataModule, build_eval_sampler, build_train_sampler
from lightning_speechllm.data.manifest import read_manifest

REPO = Path(__file__).resolve().parents[1]


def _corpus(tmp: Path, n: int = 24, prefix: str = "u", name: str = "train.jsonl") -> Path:
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        sr = 16000 if i % 2 else 8000
        wav = tmp / f"{prefix}{i}.wav"
        sf.write(wav, (0.05 * rng.standard_normal(int(sr * (0.2 + 0.05 * (i % 9))))).astype(np.float32), sr)
        rows.append({"id": f"{prefix}{i}", "audio": wav.name, "text": f"text of {prefix}{i}", "task": "asr"})
    path = tmp / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_ddp_samplers_cover_each_cut_once_per_epoch(tmp_path: Path) -> None:
    cuts = read_manifest(_corpus(tmp_path, n=23), BadSampleHandler("error"))
    all_ids = sorted(c.id for c in cuts)
    orders = []
    for epoch in range(2):
        per_rank = []
        for rank in range(2):
            sampler = build_train_sampler(cuts, max_duration=1.5, num_buckets=3, seed=7, rank=rank, world_size=2)
            sampler.set_epoch(epoch)
            per_rank.append([c.id for batch in sampler for c in batch])
        assert not set(per_rank[0]) & set(per_rank[1])
        assert sorted(per_rank[0] + per_rank[1]) == all_ids
        orders.append(per_rank[0])
    assert orders[0] != orders[1]  # reshuffled per epoch
    eval_ids = [
        [c.id for b in build_eval_sampler(cuts, max_duration=1.0, rank=r, world_size=2) for c in b] for r in range(2)
    ]
    assert not set(eval_ids[0]) & set(eval_ids[1]) and sorted(eval_ids[0] + eval_ids[1]) == all_ids


def _epoch_ids(loader) -> list[list[str]]:
    return [b.ids for b in loader]


def test_mid_epoch_resume_from_state_dict(tmp_path: Path) -> None:
    manifest = _corpus(tmp_path)
    kw = dict(max_duration=1.5, num_buckets=3, seed=11)
    full = SpeechDataModule(manifest, **kw)
    full.setup("fit")
    loader = full.train_dataloader()
    loader.sampler.set_epoch(1)
    reference = _epoch_ids(loader)
    assert len(reference) >= 6

    first = SpeechDataModule(manifest, **kw)
    first.setup("fit")
    it_loader = first.train_dataloader()
    it_loader.sampler.set_epoch(1)
    it = iter(it_loader)
    head = [next(it).ids for _ in range(4)]
    state = first.state_dict()
    assert head == reference[:4]

    resumed = SpeechDataModule(manifest, **kw)
    resumed.load_state_dict(json.loads(json.dumps(state)))  # survives a serialisation round trip
    resumed.setup("fit")
    rest = resumed.train_dataloader()
    rest.sampler.set_epoch(1)  # Lightning calls this with the same epoch on resume: must not reset
    assert _epoch_ids(rest) == reference[4:]


class _RecordingModule(L.LightningModule):
    """Records the ids of every train batch / every eval batch per dataloader name."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.train_ids: list[list[str]] = []
        self.epoch_ends: list[int] = []
        self.eval_ids: dict[str, list[str]] = {}

    def training_step(self, batch: SpeechBatch, batch_idx: int) -> torch.Tensor:
        self.train_ids.append(list(batch.ids))
        return (self.w * batch.audio.mean()).sum() + self.w.square().sum()

    def on_train_epoch_end(self) -> None:
        self.epoch_ends.append(len(self.train_ids))

    def validation_step(self, batch: SpeechBatch, batch_idx: int, dataloader_idx: int = 0) -> None:
        name = self.trainer.datamodule.val_set_names[dataloader_idx]
        self.eval_ids.setdefault(name, []).extend(batch.ids)
        self.log(f"val/{name}/n", float(len(batch)), add_dataloader_idx=False, batch_size=len(batch))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _trainer(root: Path, **kw) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu", devices=1, default_root_dir=root, logger=False, enable_progress_bar=False,
        enable_model_summary=False, use_distributed_sampler=False, num_sanity_val_steps=0, **kw,
    )


def test_lightning_checkpoint_resume_continues_mid_epoch_with_workers(tmp_path: Path) -> None:
    """A worker prefetches ahead of the loop; the checkpoint must hold the consumed position, not the sampled one."""
    manifest = _corpus(tmp_path)
    kw = dict(max_duration=1.5, num_buckets=3, seed=5, num_workers=1)
    ref_model = _RecordingModule()
    _trainer(tmp_path / "ref", max_epochs=2, limit_val_batches=0).fit(ref_model, SpeechDataModule(manifest, **kw))

    n0 = ref_model.epoch_ends[0]
    step = n0 + 2  # inside epoch 1
    ckpt = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ck", every_n_train_steps=step, save_top_k=-1)
    cut_model = _RecordingModule()
    _trainer(tmp_path / "a", max_steps=step, limit_val_batches=0, callbacks=[ckpt]).fit(
        cut_model, SpeechDataModule(manifest, **kw)
    )
    [path] = list((tmp_path / "ck").iterdir())
    state = torch.load(path, weights_only=True)["SpeechDataModule"]["train_sampler"]
    assert state["epoch"] == 1 and state["diagnostics"]["stats_per_epoch"][1]["kept_batches"] == 2

    resumed = _RecordingModule()
    _trainer(tmp_path / "b", max_epochs=2, limit_val_batches=0).fit(
        resumed, SpeechDataModule(manifest, **kw), ckpt_path=path
    )
    assert cut_model.train_ids[:step] == ref_model.train_ids[:step]
    assert resumed.train_ids == ref_model.train_ids[step:]


def test_named_validation_sets_and_text_only(tmp_path: Path) -> None:
    clean = _corpus(tmp_path, n=5, prefix="c", name="clean.jsonl")
    other = _corpus(tmp_path, n=3, prefix="o", name="other.jsonl")
    dm = SpeechDataModule(val_sets={"other": other, "clean": clean}, max_duration=0.8)
    assert dm.val_set_names == ["other", "clean"]
    model = _RecordingModule()
    results = _trainer(tmp_path).validate(model, datamodule=dm, verbose=False)
    assert model.eval_ids == {"other": ["o0", "o1", "o2"], "clean": [f"c{i}" for i in range(5)]}
    assert [set(r) for r in results] == [{"val/other/n"}, {"val/clean/n"}]  # one result per set, in order

    speech = [[b for b in loader] for loader in dm.val_dataloader()]
    text = [[b for b in loader] for loader in dm.text_only_val_dataloaders()]
    for s_batches, t_batches in zip(speech, text):
        assert [b.ids for b in s_batches] == [b.ids for b in t_batches]
        for s, t in zip(s_batches, t_batches):
            assert t.text_only and not s.text_only
            assert t.audio.shape == (len(t), 0) and t.audio_lens.eq(0).all() and s.audio_lens.gt(0).all()
            assert t.transcripts == s.transcripts and t.texts == s.texts
    all_text = SpeechDataModule(val_sets={"clean": clean}, max_duration=0.8, text_only=True)
    all_text.setup("validate")
    assert all(b.text_only for b in all_text.val_dataloader()[0])


def test_ddp_requires_lhotse_sharding(tmp_path: Path) -> None:
    dm = SpeechDataModule(_corpus(tmp_path, n=2), max_duration=1.0)
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False)
    dm.trainer = trainer
    with pytest.raises(ValueError, match="use_distributed_sampler=False"):
        dm.setup("fit")


DDP_SCRIPT = """
import json, os, sys
from pathlib import Path
import lightning as L
import torch
from lightning_speechllm.data.datamodule import SpeechDataModule

class Rec(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.seen = []
    def training_step(self, batch, batch_idx):
        self.seen.append(list(batch.ids))
        return (self.w * batch.audio.mean()).sum() + self.w.square().sum()
    def on_train_epoch_end(self):
        out = Path(sys.argv[2]) / f"rank{self.global_rank}_epoch{self.current_epoch}.json"
        out.write_text(json.dumps(self.seen))
        self.seen = []
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

if __name__ == "__main__":
    dm = SpeechDataModule(sys.argv[1], max_duration=1.5, num_buckets=3, seed=3)
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=2, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        use_distributed_sampler=False)
    trainer.fit(Rec(), dm)
"""


@pytest.mark.slow
def test_real_ddp_two_ranks_partition_each_epoch(tmp_path: Path) -> None:
    manifest = _corpus(tmp_path, n=21)
    script = tmp_path / "ddp_run.py"
    script.write_text(textwrap.dedent(DDP_SCRIPT))
    out = tmp_path / "out"
    out.mkdir()
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(script), str(manifest), str(out)], cwd=tmp_path, env=env, capture_output=True,
        text=True, timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    all_ids = sorted(f"u{i}" for i in range(21))
    for epoch in range(2):
        r0, r1 = (json.loads((out / f"rank{r}_epoch{epoch}.json").read_text()) for r in range(2))
        assert len(r0) == len(r1)  # same number of steps on both ranks (no DDP hang)
        ids0, ids1 = [i for b in r0 for i in b], [i for b in r1 for i in b]
        assert not set(ids0) & set(ids1)
        assert sorted(ids0 + ids1) == all_ids


def test_state_before_training_restores_a_full_epoch(tmp_path: Path) -> None:
    manifest = _corpus(tmp_path, n=4)
    dm = SpeechDataModule(manifest, max_duration=1.0)
    assert dm.state_dict() == {}  # no sampler yet
    dm.setup("fit")
    dm.train_dataloader()
    fresh = SpeechDataModule(manifest, max_duration=1.0)
    fresh.load_state_dict(dm.state_dict())
    fresh.setup("fit")
    assert sorted(i for b in fresh.train_dataloader() for i in b.ids) == [f"u{i}" for i in range(4)]
