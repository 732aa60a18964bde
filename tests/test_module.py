"""SpeechLLMModule: fast_dev_run, loss goes down, trainable-only checkpoints, resume, LR schedule."""
from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

from lightning_speechllm.evaluation import normalize_english
from lightning_speechllm.model.generation import GenerationOutput
from lightning_speechllm.model.module import DecodingConfig, OptimConfig, SpeechLLMModule, lr_lambda
from lightning_speechllm.model.speechllm import LoraConfig
from tests.test_speechllm import make_batch
from tests.tiny_speechllm import tiny_speechllm


class NamedSets(L.LightningDataModule):
    """Two named validation sets of ready-made SpeechBatches."""

    val_set_names = ["clean", "ast-fr"]

    def __init__(self, n_train: int = 4):
        super().__init__()
        self.train = [make_batch(seed=i) for i in range(n_train)]
        ast = make_batch(seconds=(0.5, 0.7), texts=["le chat", "bonjour"], tasks=["ast", "ast"], tgt_langs=["fr", "fr"])
        self.val = [[make_batch(seed=100)], [ast]]

    def train_dataloader(self):
        return DataLoader(self.train, batch_size=None, shuffle=False)

    def val_dataloader(self):
        return [DataLoader(v, batch_size=None) for v in self.val]


def trainer(tmp_path, **kwargs) -> L.Trainer:
    defaults = dict(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                    default_root_dir=tmp_path)
    return L.Trainer(**{**defaults, **kwargs})


def module(lora: bool = False, **optim) -> SpeechLLMModule:
    lora_config = LoraConfig(layers=[1], r=4, alpha=4, target_modules=["q_proj", "v_proj"]) if lora else None
    return SpeechLLMModule(optim=OptimConfig(**{"lr": 3e-3, "warmup_steps": 2, **optim}),
                           decoding=DecodingConfig(max_new_tokens=4), speechllm=tiny_speechllm(lora=lora_config))


def test_fast_dev_run_logs_named_sets(tmp_path):
    model = module()
    trainer(tmp_path, fast_dev_run=True).fit(model, datamodule=NamedSets())
    metrics = trainer_metrics = model.trainer.callback_metrics
    assert "val/clean/wer" in metrics and "val/ast-fr/bleu" in metrics and "val/clean/loss" in trainer_metrics
    assert {h.set_name for h in model.hypotheses} == {"clean", "ast-fr"}


def test_training_lowers_the_loss_on_a_fixed_batch(tmp_path):
    model = module(lora=True, lr=1e-2, warmup_steps=0, schedule="constant")
    data = NamedSets(n_train=1)
    batch = data.train[0]
    before = model.model_step(batch)[0].item()
    trainer(tmp_path, max_steps=15, limit_val_batches=0).fit(model, train_dataloaders=DataLoader(data.train * 15, batch_size=None))
    after = model.model_step(batch)[0].item()
    assert after < 0.7 * before, (before, after)


def test_checkpoint_holds_only_trainable_weights_and_reloads(tmp_path):
    model = module(lora=True)
    t = trainer(tmp_path, max_steps=2, limit_val_batches=0)
    t.fit(model, train_dataloaders=DataLoader(NamedSets().train, batch_size=None))
    path = tmp_path / "model.ckpt"
    t.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=False)
    keys = set(checkpoint["state_dict"])
    assert keys and all(k.startswith("speechllm.projector.") or "lora_" in k for k in keys)
    assert checkpoint["hyper_parameters"]["model"]["lora"]["layers"] == [1]
    fresh = SpeechLLMModule.load_from_checkpoint(path, speechllm=tiny_speechllm(
        seed=9, lora=LoraConfig(layers=[1], r=4, alpha=4, target_modules=["q_proj", "v_proj"])))
    for key, value in model.speechllm.trainable_state_dict().items():
        torch.testing.assert_close(fresh.speechllm.trainable_state_dict()[key], value)


def test_checkpoint_of_another_model_is_refused(tmp_path):
    model = module(lora=True)
    t = trainer(tmp_path, max_steps=1, limit_val_batches=0)
    t.fit(model, train_dataloaders=DataLoader(NamedSets().train, batch_size=None))
    t.save_checkpoint(tmp_path / "lora.ckpt")
    with pytest.raises(KeyError, match="unexpected"):
        SpeechLLMModule.load_from_checkpoint(tmp_path / "lora.ckpt", speechllm=tiny_speechllm())


def test_resume_continues_like_an_uninterrupted_run(tmp_path):
    """Weights, AdamW moments and the LR schedule resume exactly. One batch per epoch, so a plain DataLoader's
    restart cannot hide a wrong state (the mid-epoch data position is tested with the datamodule)."""
    data = NamedSets(n_train=1)
    straight = module()
    every_epoch = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1)
    trainer(tmp_path / "a", max_steps=5, limit_val_batches=0, callbacks=[every_epoch], enable_checkpointing=True).fit(
        straight, train_dataloaders=DataLoader(data.train, batch_size=None))
    epoch_end = tmp_path / "ckpt" / "epoch=1-step=2.ckpt"
    resumed = module()
    trainer(tmp_path / "c", max_steps=5, limit_val_batches=0).fit(
        resumed, train_dataloaders=DataLoader(data.train, batch_size=None), ckpt_path=epoch_end)
    for key, value in straight.speechllm.trainable_state_dict().items():
        torch.testing.assert_close(resumed.speechllm.trainable_state_dict()[key], value, atol=1e-6, rtol=1e-5)


def test_lr_schedule_warmup_then_linear_decay():
    assert [round(lr_lambda(s, 4, 12, "linear", 0.0), 3) for s in (0, 3, 4, 8, 12)] == [0.25, 1.0, 1.0, 0.5, 0.0]
    assert lr_lambda(12, 4, 12, "cosine", 0.1) == pytest.approx(0.1)
    # warmup-stable-decay: the peak until the last quarter of the 8 post-warm-up steps, then linear to 0
    assert [lr_lambda(s, 4, 12, "linear", 0.0, 0.25) for s in (3, 4, 9, 10, 11, 12)] == [1.0, 1.0, 1.0, 1.0, 0.5, 0.0]
    with pytest.raises(ValueError, match="decay_fraction must be in"):
        lr_lambda(5, 0, 10, "linear", 0.0, 0.0)
    with pytest.raises(ValueError, match="'step'"):
        lr_lambda(5, 0, 10, "step", 0.0)


def test_lora_gets_its_own_peak_lr_on_the_same_schedule(tmp_path):
    lit = module(lora=True, lr=1e-2, lora_lr=1e-3, warmup_steps=0, schedule="linear")
    fit = trainer(tmp_path, max_steps=4)
    fit.fit(lit, train_dataloaders=DataLoader([make_batch()] * 4, batch_size=None))
    groups = fit.optimizers[0].param_groups
    lora = {id(p) for name, p in lit.named_parameters() if "lora_" in name}
    assert [g["initial_lr"] for g in groups] == [1e-2, 1e-3]
    assert all(id(p) not in lora for p in groups[0]["params"]) and {id(p) for p in groups[1]["params"]} == lora
    assert groups[1]["lr"] / groups[1]["initial_lr"] == pytest.approx(groups[0]["lr"] / groups[0]["initial_lr"])
    with pytest.raises(ValueError, match="optim.lora_lr must be > 0"):
        trainer(tmp_path, max_steps=1).fit(module(lora=True, lora_lr=0.0),
                                           train_dataloaders=DataLoader([make_batch()], batch_size=None))


def test_a_batch_emptied_by_the_skip_policy_trains_nothing_and_is_counted(tmp_path):
    model = module(lora=True)
    empty = make_batch().subset([])
    before = {k: v.clone() for k, v in model.speechllm.trainable_state_dict().items()}
    trainer(tmp_path, max_steps=2, limit_val_batches=0).fit(model, train_dataloaders=DataLoader([empty, empty], batch_size=None))
    assert model.empty_batches == 2
    for key, value in model.speechllm.trainable_state_dict().items():
        torch.testing.assert_close(value, before[key], atol=0, rtol=0)


def test_lhotse_padding_duplicates_are_not_scored(tmp_path, monkeypatch):
    model = module()
    batch = make_batch()
    batch.ids = ["u0", "u1", "u0_dup0"]
    hyps = {"u0": "the cat sat on the mat", "u1": "one two three", "u0_dup0": "something else entirely"}
    monkeypatch.setattr(model.speechllm, "generate_with_details",
                        lambda b, n, *args: GenerationOutput([hyps[i] for i in b.ids], [1] * len(b), [True] * len(b), n))
    logged = {}
    monkeypatch.setattr(model, "log", lambda name, value, **kw: logged.setdefault(name, (float(value), kw)))
    model._eval_step("val", batch, 0)  # without a trainer, dataloader 0 is the set "val0"
    counts = model.eval_metrics["val|val0|asr"].compute()
    expected_words = sum(len(normalize_english(text).split()) for text in list(hyps.values())[:2])
    assert counts["wer"].item() == 0.0 and counts["reference_words"].item() == expected_words
    assert [h.id for h in model.hypotheses] == ["u0", "u1"]
    # The loss is that of the two real utterances, weighted by their target tokens.
    loss, (_, inputs) = model.model_step(batch.subset([0, 1]))
    assert logged["val/val0/loss"][0] == pytest.approx(float(loss))
    assert logged["val/val0/loss"][1]["batch_size"] == int((inputs.labels != -100).sum()) > 2


class _MetricKeysAtStart(L.Callback):
    """Records the module's metric keys when validation starts, before any batch."""

    def __init__(self):
        self.keys: list[str] = []

    def on_validation_start(self, trainer, pl_module):
        self.keys = sorted(pl_module.eval_metrics)


class TaskedSets(NamedSets):
    """NamedSets that also states the tasks of each set, as SpeechDataModule.eval_set_tasks does."""

    def eval_set_tasks(self, split):
        return {"clean": ("asr",), "ast-fr": ("ast",)} if split == "val" else {}


@pytest.mark.parametrize("datamodule, expected", [
    (TaskedSets, ["val|ast-fr|ast", "val|clean|asr"]),
    (NamedSets, ["val|ast-fr|asr", "val|ast-fr|ast", "val|clean|asr", "val|clean|ast"]),  # tasks unknown: both
])
def test_eval_metrics_exist_before_the_first_batch_and_unscored_ones_are_not_logged(tmp_path, datamodule, expected):
    model, keys = module(), _MetricKeysAtStart()
    trainer(tmp_path, callbacks=[keys], limit_val_batches=1).validate(model, datamodule=datamodule(), verbose=False)
    assert keys.keys == expected
    metrics = model.trainer.callback_metrics
    assert "val/clean/wer" in metrics and "val/ast-fr/bleu" in metrics
    assert "val/clean/bleu" not in metrics and "val/ast-fr/wer" not in metrics  # created, never updated: not logged


def test_speech_datamodule_states_the_tasks_of_each_named_set(tmp_path):
    import json

    import numpy as np
    import soundfile as sf

    from lightning_speechllm.data.datamodule import SpeechDataModule

    sf.write(tmp_path / "a.wav", np.zeros(1600, np.float32), 16000)
    rows = {"asr": [{"id": "u0", "audio": "a.wav", "text": "hello", "task": "asr"}],
            "mixed": [{"id": "u1", "audio": "a.wav", "text": "hello", "task": "asr"},
                      {"id": "u2", "audio": "a.wav", "text": "bonjour", "task": "ast", "translation": "hello",
                       "src_lang": "fr", "tgt_lang": "en"}]}
    for name, lines in rows.items():
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    data = SpeechDataModule(val_sets={"b": tmp_path / "mixed.jsonl", "a": tmp_path / "asr.jsonl"},
                            test_sets={"t": tmp_path / "asr.jsonl"})
    assert data.eval_set_tasks("val") == {"b": ("asr", "ast"), "a": ("asr",)}
    assert data.eval_set_tasks("test") == {"t": ("asr",)}
    with pytest.raises(KeyError, match="'train'"):
        data.eval_set_tasks("train")


DDP_EVAL_SCRIPT = """
import json
import sys
import lightning as L
import torch
from lightning_speechllm.data.datamodule import SpeechDataModule
from lightning_speechllm.model.module import DecodingConfig, SpeechLLMModule
from tests.tiny_speechllm import tiny_speechllm

torch.set_num_threads(1)
manifest, out = sys.argv[1], sys.argv[2]
module = SpeechLLMModule(decoding=DecodingConfig(max_new_tokens=3), speechllm=tiny_speechllm(seed=0))
# max_cuts=1: batch k goes to rank k % 2, so rank 0 scores u0, u2 (ASR) and rank 1 scores u1 (AST), u3 (ASR).
data = SpeechDataModule(val_sets={"mixed": manifest}, max_cuts=1, text_only=True)
trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", use_distributed_sampler=False, logger=False,
                    enable_progress_bar=False, enable_model_summary=False)
trainer.validate(module, datamodule=data, verbose=False)
scored = sorted({h.task for h in module.hypotheses})
metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.endswith(("/wer", "/bleu", "_rate"))}
with open(f"{out}.{trainer.global_rank}", "w") as stream:
    json.dump({"tasks": scored, "metrics": metrics}, stream)
"""


@pytest.mark.slow
def test_two_rank_ddp_validation_logs_bleu_although_one_shard_has_no_ast(tmp_path):
    """Rank 0's shard holds no AST utterance, so lazily created metrics would differ per rank and the BLEU sync
    would hang or mismatch; pre-created metrics give every rank the same collectives and the same BLEU."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    import numpy as np
    import soundfile as sf

    sf.write(tmp_path / "a.wav", np.zeros(1600, np.float32), 16000)
    rows = [{"id": "u0", "audio": "a.wav", "text": "the cat sat on the mat", "task": "asr"},
            {"id": "u1", "audio": "a.wav", "text": "le chat", "task": "ast", "translation": "the cat",
             "src_lang": "fr", "tgt_lang": "en"},
            {"id": "u2", "audio": "a.wav", "text": "one two three", "task": "asr"},
            {"id": "u3", "audio": "a.wav", "text": "hello world", "task": "asr"}]
    (tmp_path / "mixed.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    script = tmp_path / "eval_ddp.py"
    script.write_text(DDP_EVAL_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "mixed.jsonl"), str(tmp_path / "out")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"out.{rank}").read_text()) for rank in (0, 1)]
    assert ranks[0]["tasks"] == ["asr"] and ranks[1]["tasks"] == ["asr", "ast"]
    failure_rates = {f"val/mixed/{rate}" for rate in ("insertion_rate", "loop_rate", "empty_rate", "max_tokens_rate")}
    assert set(ranks[0]["metrics"]) == {"val/mixed/wer", "val/mixed/bleu", *failure_rates}
    assert ranks[0]["metrics"] == ranks[1]["metrics"]
