"""A tiny iterative prune-heal run on one process or on 2 gloo DDP ranks (``find_unused_parameters=False``, as
configs/trainer/ddp.yaml), for tests/test_iterative_ddp.py. Run as a script: Lightning relaunches it for rank 1.

LoRA sits on every layer (``lora.layers: null``, no initial plan); layer 2 adds nothing to the residual stream, so
round 1 removes it for sure. Rank r of 2 takes training batches r, r + 2, ...; one process takes them all, two per
step: the same global batches. Every rank writes ``<out>.rank<r>.pt`` (trainable weights, rounds, step, error)."""
import argparse
import os

import lightning as L
import torch
from lightning.pytorch.strategies import DDPStrategy
from torch.utils.data import DataLoader

from lightning_speechllm.healing.iterative import IterativePruning, IterativePruningError
from lightning_speechllm.healing.losses import LossSpec
from lightning_speechllm.healing.module import HealingConfig, HealingModule
from lightning_speechllm.model.module import DecodingConfig, OptimConfig
from lightning_speechllm.model.speechllm import LoraConfig
from tests.test_speechllm import make_batch
from tests.tiny_speechllm import tiny_speechllm

IDENTITY, LAYERS = 2, 5

torch.set_num_threads(1)
parser = argparse.ArgumentParser()
parser.add_argument("devices", type=int, choices=[1, 2])
parser.add_argument("out")
parser.add_argument("--max_steps", type=int, default=4)
parser.add_argument("--val_batches_rank1", type=int, default=1, help="validation batches of rank 1 (rank 0: 1)")
args = parser.parse_args()
rank = int(os.environ.get("LOCAL_RANK", 0))
single = args.devices == 1


class Data(L.LightningDataModule):
    val_set_names = ["dev"]

    def train_dataloader(self) -> DataLoader:
        return DataLoader([make_batch(seed=i) for i in range(8)][rank::1 if single else 2], batch_size=None)

    def val_dataloader(self) -> list[DataLoader]:
        count = args.val_batches_rank1 if rank == 1 else 1
        return [DataLoader([make_batch(seed=10 + i) for i in range(count)], batch_size=None)]


speechllm = tiny_speechllm(seed=0, layers=LAYERS)
with torch.no_grad():  # layer IDENTITY adds nothing to the residual stream: d(IDENTITY, 1) = 0
    speechllm.llm.model.layers[IDENTITY].self_attn.o_proj.weight.zero_()
    speechllm.llm.model.layers[IDENTITY].mlp.down_proj.weight.zero_()
lora = LoraConfig(layers=None, r=4, alpha=4, dropout=0.0, target_modules=["q_proj", "v_proj"])
losses = [LossSpec("TaskCrossEntropy"), LossSpec("KLDivergence", {"temperature": 2.0})]
# eps 1e-4: Adam's first step is sign(g), and where |g| is far below the default 1e-8 float noise flips that sign.
module = HealingModule(healing=HealingConfig(lora=lora, losses=losses), speechllm=speechllm,
                       optim=OptimConfig(lr=1e-2, warmup_steps=0, schedule="constant", eps=1e-4),
                       decoding=DecodingConfig(generate_in_validation=False))
callback = IterativePruning(layers_per_round=1, rounds=2, heal_steps=2, measure_batches=1)
trainer = L.Trainer(accelerator="cpu", devices=args.devices,
                    strategy="auto" if single else DDPStrategy(find_unused_parameters=False, static_graph=False),
                    accumulate_grad_batches=2 if single else 1, max_steps=args.max_steps, limit_val_batches=0,
                    gradient_clip_val=1.0, use_distributed_sampler=False, logger=False, callbacks=[callback],
                    enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
error = None
try:
    trainer.fit(module, Data())
except IterativePruningError as caught:
    error = str(caught)
torch.save({"state": module.speechllm.trainable_state_dict(), "steps": trainer.global_step, "error": error,
            "rounds": [r["removed"] for r in callback.history], "removed": list(module.plan["removed_layers"])},
           f"{args.out}.rank{trainer.global_rank}.pt")
