"""IterativePruning: rounds remove the planted identity layer first, record their state, resume restores the mask."""
from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

from lightning_speechllm.healing.iterative import IterativePruning, IterativePruningError, best_block
from lightning_speechllm.healing.module import HealingConfig, HealingModule
from lightning_speechllm.model.module import DecodingConfig, OptimConfig
from lightning_speechllm.model.speechllm import LoraConfig
from tests.test_module import trainer
from tests.test_speechllm import make_batch
from tests.tiny_speechllm import tiny_speechllm

IDENTITY = 2
LAYERS = 5


class Data(L.LightningDataModule):
    val_set_names = ["dev"]

    def train_dataloader(self) -> DataLoader:
        return DataLoader([make_batch(seed=0)] * 8, batch_size=None)

    def val_dataloader(self) -> list[DataLoader]:
        return [DataLoader([make_batch(seed=10), make_batch(seed=11)], batch_size=None)]


class MaskProbe(L.Callback):
    """Records the removed layers when training starts (after any checkpoint restore)."""

    def on_train_start(self, trainer, pl_module) -> None:
        self.at_start = pl_module.speechllm.layer_mask.removed_layers


def planted_module() -> HealingModule:
    speechllm = tiny_speechllm(layers=LAYERS)
    layer = speechllm.llm.model.layers[IDENTITY]
    with torch.no_grad():  # the layer adds nothing to the residual stream: d(IDENTITY, 1) = 0
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.down_proj.weight.zero_()
    config = HealingConfig(lora=LoraConfig(r=4, alpha=4, target_modules=["q_proj", "v_proj"]))
    return HealingModule(healing=config, speechllm=speechllm,
                         optim=OptimConfig(lr=1e-3, warmup_steps=0, schedule="constant"),
                         decoding=DecodingConfig(generate_in_validation=False))


def test_best_block_picks_the_smallest_distance_of_the_row():
    table = torch.tensor([[0.5, 0.1, 0.3], [0.2, 0.4, float("nan")], [0.6, float("nan"), float("nan")]])
    assert best_block(table, 1) == (1, pytest.approx(0.1))
    assert best_block(table, 2) == (0, pytest.approx(0.2))
    with pytest.raises(IterativePruningError, match="block of 3 from 3"):
        best_block(table, 3)


def test_two_rounds_remove_the_identity_layer_and_resume_restores_round_one(tmp_path):
    module = planted_module()
    callback = IterativePruning(layers_per_round=1, rounds=2, heal_steps=2, measure_batches=2)
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ck", every_n_train_steps=2, save_top_k=-1)
    trainer(tmp_path, max_steps=4, limit_val_batches=0, callbacks=[callback, checkpoints]).fit(module, Data())

    removed = module.speechllm.layer_mask.removed_layers
    assert len(removed) == 2 and IDENTITY in removed
    assert callback.history[0]["removed"] == [IDENTITY] and callback.history[0]["distance"] < 1e-6
    assert [r["step"] for r in callback.history] == [0, 2]
    assert module.plan["removed_layers"] == list(removed) and module.plan["iterative"]
    assert len(module.speechllm.layer_mask.active_layers) == LAYERS - 2

    round_one = tmp_path / "ck" / "epoch=0-step=2.ckpt"
    saved = torch.load(round_one, weights_only=False)
    assert saved["healing"]["plan"]["removed_layers"] == [IDENTITY]
    resumed, probe = planted_module(), MaskProbe()
    resumed_callback = IterativePruning(layers_per_round=1, rounds=2, heal_steps=2, measure_batches=2)
    trainer(tmp_path / "b", max_steps=4, limit_val_batches=0, callbacks=[resumed_callback, probe]).fit(
        resumed, Data(), ckpt_path=round_one)
    assert probe.at_start == (IDENTITY,)  # the round-1 mask, restored from a module built unpruned
    assert resumed_callback.history[0] == callback.history[0]
    assert resumed.speechllm.layer_mask.removed_layers == removed  # round 2 picks the same block again


def test_a_resume_that_disagrees_with_the_record_is_refused(tmp_path):
    module = planted_module()
    callback = IterativePruning(rounds=1, heal_steps=1, measure_batches=1)
    callback.load_state_dict({"history": [{"round": 1, "step": 0, "removed": [4], "distance": 0.0}],
                              "initial_removed": []})
    with pytest.raises(IterativePruningError, match=r"removes layers \[\], but the schedule's record says \[4\]"):
        trainer(tmp_path, max_steps=1, limit_val_batches=0, callbacks=[callback]).fit(module, Data())


def test_bad_settings_are_rejected():
    with pytest.raises(ValueError, match="layers_per_round must be >= 1"):
        IterativePruning(layers_per_round=0)
