"""SpeechLLMModule: fast_dev_run, loss goes down, trainable-only checkpoints, resume, LR schedule."""
from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

from lightning_speechllm.evaluation import normalize_english
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
    with pytest.raises(ValueError, match="'step'"):
        lr_lambda(5, 0, 10, "step", 0.0)


def test_a_batch_emptied_by_the_skip_policy_trains_nothing_and_is_counted(tmp_path):
    model = module(lora=True)
    empty = make_batch().subset([])
    before = {k: v.clone() for k, v in model.speechllm.trainable_state_dict().items()}
    trainer(tmp_path, max_steps=2, limit_val_batches=0).fit(model, train_dataloaders=DataLoader([empty, empty], batch_size=None))
    assert model.empty_batches == 2
    for key, value in model.speechllm.trainable_state_dict().items():
        torch.testing.assert_close(value, before[key], atol=0, rtol=0)


def test_lhotse_padding_duplicates_are_not_scored(tmp_path):
    model = module()
    batch = make_batch()
    batch.ids = ["u0", "u1", "u0_dup0"]
    hyps = ["the cat sat on the mat", "one two three", "something else entirely"]
    model._update_metrics("val", "dev", batch, hyps)
    counts = model.eval_metrics["val|dev|asr"].compute()
    expected_words = sum(len(normalize_english(text).split()) for text in hyps[:2])
    assert counts["wer"].item() == 0.0 and counts["reference_words"].item() == expected_words
    assert [h.id for h in model.hypotheses] == ["u0", "u1"]
