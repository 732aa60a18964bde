"""Phase ``fsdp``: ``fit`` under ``lightning_speechllm.model.sharding.FSDP2Strategy`` at world size 1, then its
single-file checkpoint read back."""
from __future__ import annotations

import time
from typing import Any

from ..context import Context, datamodule, decoding_config, model_config, optim_config, trainable_params, trainer
from ..helpers import finite_float
from ..timing import make_step_timer, throughput


def phase_fsdp(ctx: Context) -> dict[str, Any]:
    import lightning as L
    import torch

    from lightning_speechllm.model.checkpoint import read_checkpoint
    from lightning_speechllm.model.module import STATE_PREFIX, SpeechLLMModule
    from lightning_speechllm.model.sharding import FSDP2Strategy, is_sharded

    sizes = ctx.opts.sizes
    L.seed_everything(0, verbose=False)
    try:
        started = time.perf_counter()
        module = SpeechLLMModule(model=model_config(ctx), optim=optim_config(),
                                 decoding=decoding_config(ctx, generate=False))
        load_s = time.perf_counter() - started
        timer = make_step_timer(ctx.opts)
        fsdp_trainer = trainer(ctx, "fsdp", max_steps=sizes.fsdp_steps, callbacks=[timer], strategy=FSDP2Strategy())
        started = time.perf_counter()
        fsdp_trainer.fit(module, datamodule=datamodule(ctx))
        fit_s = time.perf_counter() - started
        warmup = min(sizes.warmup_steps, max(0, sizes.fsdp_steps - 2))
        out = {"load_s": load_s, "fit_s": fit_s, "world_size": fsdp_trainer.world_size,
               "strategy": type(fsdp_trainer.strategy).__name__, "decoder_sharded": is_sharded(module.speechllm.llm),
               **throughput(ctx.opts, timer, ctx.counts, ctx.counts.num_layers, trainable_params(module), False,
                            warmup),
               "final_train_loss": finite_float(fsdp_trainer.callback_metrics.get("train/loss"))}
        if ctx.fit_step_s and out["step_s_median"]:
            out["step_time_over_fit"] = out["step_s_median"] / ctx.fit_step_s
        path = ctx.work_dir / "fsdp.ckpt"
        fsdp_trainer.save_checkpoint(path, weights_only=False)
        saved = set(read_checkpoint(path)["state_dict"])
        mask = module.speechllm.layer_mask
        with mask.active(range(mask.num_layers)):
            expected = {STATE_PREFIX + n for n, p in module.speechllm.named_parameters() if p.requires_grad}
        out.update(checkpoint_bytes=path.stat().st_size, checkpoint_keys_match=saved == expected)
        return out
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
