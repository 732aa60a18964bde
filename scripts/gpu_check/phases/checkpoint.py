"""Phase ``checkpoint``: ``trainer.save_checkpoint`` then ``lightning_speechllm.checkpoints.load_module``: the trainable
weights equal, the same loss on one batch."""
from __future__ import annotations

import time
from typing import Any

from ..context import Context
from ..helpers import autocast


def phase_checkpoint(ctx: Context) -> dict[str, Any]:
    import torch

    from lightning_speechllm.checkpoints import load_module

    fitted, fit_trainer = ctx.fit["module"], ctx.fit["trainer"]
    path = ctx.work_dir / "fit.ckpt"
    started = time.perf_counter()
    fit_trainer.save_checkpoint(path, weights_only=False)  # as ModelCheckpoint writes it (optimizer too)
    save_s = time.perf_counter() - started
    started = time.perf_counter()
    reloaded = load_module(path)
    load_s = time.perf_counter() - started
    before, after = fitted.speechllm.trainable_state_dict(), reloaded.speechllm.trainable_state_dict()
    same_keys = before.keys() == after.keys()
    diff = max((float((before[k].float().cpu() - after[k].float().cpu()).abs().max()) for k in before if k in after),
               default=None)
    for module in (fitted, reloaded):
        module.to(ctx.opts.device).eval()  # fit's teardown left the fitted one on the CPU
    with torch.no_grad(), autocast(ctx.opts):
        loss_before = float(fitted.model_step(ctx.fit["batch"])[0])
        loss_after = float(reloaded.model_step(ctx.fit["batch"])[0])
    ctx.reloaded = reloaded
    ctx.fit.clear()  # the fitted module and its trainer go; the reloaded model heals next
    return {"save_s": save_s, "load_s": load_s, "checkpoint_bytes": path.stat().st_size, "tensors": len(after),
            "same_keys": same_keys, "max_abs_diff": diff, "loss_before": loss_before, "loss_after": loss_after,
            "loss_abs_diff": abs(loss_before - loss_after)}
