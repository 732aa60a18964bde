"""Phase ``heal``: ``HealingModule`` on the reloaded model with a pruning plan, LoRA on the receiving layer, losses
TaskCrossEntropy + KLDivergence (the shared-weight teacher): tokens/s, MFU, peak memory."""
from __future__ import annotations

import time
from typing import Any

from ..context import Context, datamodule, decoding_config, model_config, optim_config, trainable_params, trainer
from ..helpers import finite_float
from ..timing import add_counted_mfu, counted_flops, make_step_timer, throughput


def phase_heal(ctx: Context) -> dict[str, Any]:
    import lightning as L

    from lightning_speechllm.healing.module import HealingConfig, HealingModule
    from lightning_speechllm.model.speechllm import LoraConfig
    from lightning_speechllm.pruning.plan import plan_explicit

    sizes = ctx.opts.sizes
    L.seed_everything(0, verbose=False)
    plan_path = plan_explicit(ctx.counts.num_layers, ctx.removed_layers).to_json(ctx.work_dir / "plan.json")
    losses = [{"class_path": "TaskCrossEntropy"}, {"class_path": "KLDivergence", "init_args": {"temperature": 2.0}}]
    healing = HealingConfig(plan_path=str(plan_path), losses=losses,
                            lora=LoraConfig(r=sizes.lora_r, alpha=sizes.lora_r, dropout=0.05))
    speechllm = ctx.reloaded.speechllm if ctx.reloaded is not None else None  # the fitted projector, when reloaded
    ctx.reloaded = None
    started = time.perf_counter()
    module = HealingModule(model=model_config(ctx), healing=healing, optim=optim_config(),
                           decoding=decoding_config(ctx, generate=False), speechllm=speechllm)
    build_s = time.perf_counter() - started
    timer = make_step_timer(ctx.opts)
    heal_trainer = trainer(ctx, "heal", max_steps=sizes.heal_steps, callbacks=[timer])
    started = time.perf_counter()
    heal_trainer.fit(module, datamodule=datamodule(ctx))
    heal_s = time.perf_counter() - started
    active = len(module.speechllm.layer_mask.active_layers)
    out = {"build_s": build_s, "heal_s": heal_s, "from_checkpoint": speechllm is not None,
           "removed_layers": module.plan["removed_layers"], "receiving_layers": module.plan["receiving_layers"],
           **throughput(ctx.opts, timer, ctx.counts, active, trainable_params(module), True, sizes.warmup_steps),
           "final_losses": {k.removeprefix("train/"): finite_float(v) for k, v in heal_trainer.callback_metrics.items()
                            if k.startswith("train/loss")}}
    if ctx.fit_step_s and out["step_s_median"]:
        out["step_time_over_fit"] = out["step_s_median"] / ctx.fit_step_s

    def step(batch: Any) -> tuple[Any, int]:
        total, _ = module.healing_step(batch)
        return total, int(module.tokens_in_last_batch)

    add_counted_mfu(ctx.opts, out, counted_flops(ctx.opts, module, timer.last_batch, step))
    return out
