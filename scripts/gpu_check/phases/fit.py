"""Phase ``fit``: ``SpeechLLMModule`` + ``SpeechDataModule`` through ``Trainer.fit``: tokens/s, MFU, peak memory."""
from __future__ import annotations

import time
from typing import Any

from ..context import Context, datamodule, decoding_config, model_config, optim_config, trainable_params, trainer
from ..helpers import finite_float
from ..timing import add_counted_mfu, counted_flops, make_step_timer, throughput


def phase_fit(ctx: Context) -> dict[str, Any]:
    import lightning as L

    from lightning_speechllm.model.module import SpeechLLMModule

    sizes = ctx.opts.sizes
    L.seed_everything(0, verbose=False)
    started = time.perf_counter()
    module = SpeechLLMModule(model=model_config(ctx), optim=optim_config(), decoding=decoding_config(ctx))
    load_s = time.perf_counter() - started
    dm, timer = datamodule(ctx), make_step_timer(ctx.opts)
    fit_trainer = trainer(ctx, "fit", max_steps=sizes.fit_steps, callbacks=[timer])
    started = time.perf_counter()
    fit_trainer.fit(module, datamodule=dm)
    fit_s = time.perf_counter() - started
    ctx.fit = {"module": module, "trainer": fit_trainer, "datamodule": dm, "batch": timer.last_batch}
    out = {"load_s": load_s, "fit_s": fit_s,
           **throughput(ctx.opts, timer, ctx.counts, ctx.counts.num_layers, trainable_params(module), False,
                        sizes.warmup_steps),
           "final_train_loss": finite_float(fit_trainer.callback_metrics.get("train/loss"))}
    ctx.fit_step_s = out["step_s_median"]

    def step(batch: Any) -> tuple[Any, int]:
        loss, (_, inputs) = module.model_step(batch)
        return loss, int(inputs.attention_mask.sum())

    add_counted_mfu(ctx.opts, out, counted_flops(ctx.opts, module, timer.last_batch, step))
    return out
