"""Phase ``heal_memory``: ``scripts/bench/healing.py``'s worker, in this process: peak memory of a healing step
student-only vs shared teacher vs a teacher copy."""
from __future__ import annotations

import time
from typing import Any

from ..context import Context
from ..helpers import PeakMemory, bench, free


def phase_heal_memory(ctx: Context) -> dict[str, Any]:
    """scripts/bench/healing.py's worker for student-only, shared teacher and teacher copy, in this process."""
    healing = bench("healing")
    sizes = ctx.opts.sizes
    args = healing.BenchArgs(llm_path=str(ctx.paths["llm"]), removed_layers=list(ctx.removed_layers),
                             lora_r=sizes.lora_r, batch_size=sizes.memory_batch_size, steps=sizes.memory_steps,
                             warmup_steps=1, device=ctx.opts.device, dtype=ctx.opts.llm_dtype)
    out: dict[str, Any] = {"batch_size": args.batch_size, "steps": args.warmup_steps + args.steps,
                           "batches": "text-only (the bench's sentences)", "variants": {}}
    meter = PeakMemory(ctx.opts)
    for variant in healing.MEMORY_VARIANTS:  # student, shared, copy
        meter.reset()
        started = time.perf_counter()
        result = healing.worker(args, variant)
        if not ctx.opts.cuda:  # the worker's CPU figure is the process's lifetime peak: use this variant's own
            result["peak_bytes"] = meter.read()["peak_memory_bytes"]
        result["seconds"] = time.perf_counter() - started
        result.pop("step_s", None)
        if result["peak_bytes"] is not None:
            result["step_bytes"] = result["peak_bytes"] - result["loaded_bytes"]
        out["variants"][variant] = result
        free(ctx.opts)
    peaks = [v["peak_bytes"] for v in out["variants"].values()]
    out["peak_memory_bytes"] = None if None in peaks else max(peaks)  # the phase's peak: its largest variant's
    student = out["variants"]["student"]["peak_bytes"]
    for variant in ("shared", "copy"):
        peak = out["variants"][variant]["peak_bytes"]
        out[f"{variant}_over_student"] = peak / student if peak and student else None
    return out
