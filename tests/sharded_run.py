"""A tiny fit or heal run under one strategy, for tests/test_sharded.py (run as a script: Lightning relaunches it for
rank 1). Rank 0 writes the trainable weights, the step, and the shape of one decoder weight on rank 0."""
import argparse
import os

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

from lightning_speechllm.data.datamodule import SpeechDataModule
from lightning_speechllm.healing.losses import LossSpec
from lightning_speechllm.healing.module import HealingConfig, HealingModule
from lightning_speechllm.model.module import DecodingConfig, OptimConfig, SpeechLLMModule
from lightning_speechllm.model.sharding import FSDP2Strategy
from lightning_speechllm.model.speechllm import LoraConfig
from tests.test_speechllm import make_batch
from tests.tiny_speechllm import tiny_speechllm

torch.set_num_threads(1)
parser = argparse.ArgumentParser()
parser.add_argument("kind", choices=["fit", "heal"])
parser.add_argument("strategy", choices=["single", "ddp", "fsdp"])
parser.add_argument("max_steps", type=int)
parser.add_argument("out")
parser.add_argument("--manifest", help="train on this manifest through SpeechDataModule (else 8 in-memory batches)")
parser.add_argument("--checkpoint_every", type=int, help="save checkpoints into <out>.ckpt/ every N steps")
parser.add_argument("--resume", help="checkpoint to resume from")
args = parser.parse_args()

# eps 1e-4: Adam's first step is sign(g), and where |g| is far below the default 1e-8 float noise flips that sign.
optim = OptimConfig(lr=1e-2, warmup_steps=0, schedule="constant", eps=1e-4)
decoding = DecodingConfig(generate_in_validation=False)
lora = LoraConfig(r=4, alpha=4, dropout=0.0, target_modules=["q_proj", "v_proj"])
if args.kind == "heal":
    losses = [LossSpec("TaskCrossEntropy"), LossSpec("KLDivergence", {"temperature": 2.0}),
              LossSpec("HiddenStateMSE", weight=0.5)]
    module = HealingModule(healing=HealingConfig(removed_layers=[1, 2], lora=lora, losses=losses), optim=optim,
                           decoding=decoding, speechllm=tiny_speechllm(seed=0))
else:
    module = SpeechLLMModule(optim=optim, decoding=decoding, speechllm=tiny_speechllm(seed=0, lora=lora))
single = args.strategy == "single"
callbacks = [ModelCheckpoint(dirpath=f"{args.out}.ckpt", every_n_train_steps=args.checkpoint_every, save_top_k=-1)
             ] if args.checkpoint_every else []
trainer = L.Trainer(accelerator="cpu", devices=1 if single else 2,
                    strategy={"single": "auto", "ddp": "ddp", "fsdp": FSDP2Strategy()}[args.strategy],
                    accumulate_grad_batches=2 if single else 1, max_steps=args.max_steps, limit_val_batches=0,
                    gradient_clip_val=1.0, use_distributed_sampler=False, logger=False, callbacks=callbacks,
                    enable_checkpointing=bool(callbacks), enable_progress_bar=False, enable_model_summary=False)
if args.manifest:
    data = {"datamodule": SpeechDataModule(train=args.manifest, max_duration=0.6, num_buckets=2, seed=3)}
else:
    # Rank r of 2 takes batches r, r + 2, ...; one process takes them all, two per step: the same global batches.
    rank = int(os.environ.get("LOCAL_RANK", 0))
    batches = [make_batch(seed=i) for i in range(8)][rank::1 if single else 2]
    data = {"train_dataloaders": DataLoader(batches, batch_size=None)}
trainer.fit(module, **data, ckpt_path=args.resume)
state = module.speechllm.trainable_state_dict()  # a collective under FSDP: every rank asks
layer = module.speechllm.layer_mask._state.layer_list[3].self_attn.q_proj
weight = getattr(layer, "base_layer", layer).weight
local = weight.to_local() if hasattr(weight, "to_local") else weight
if trainer.global_rank == 0:
    torch.save({"state": state, "steps": trainer.global_step, "local_rows": local.shape[0], "rows": weight.shape[0],
                "active": list(module.speechllm.layer_mask.active_layers)}, args.out)
if torch.distributed.is_initialized():  # an open gloo group at interpreter exit can abort the process (SIGABRT)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
