"""Phase ``environment``: versions, the GPU, a bf16 matmul's TFLOP/s (what this card reaches at best)."""
from __future__ import annotations

import os
import platform
import time
from typing import Any

from ..context import Context
from ..helpers import sync


def phase_environment(ctx: Context) -> dict[str, Any]:
    import lightning
    import peft
    import torch
    import transformers

    opts = ctx.opts
    out: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                           "transformers": transformers.__version__, "lightning": lightning.__version__,
                           "peft": peft.__version__, "cpu_count": os.cpu_count(), "device": opts.device,
                           "precision": opts.precision, "peak_tflops": opts.peak_tflops}
    if opts.cuda:
        if not torch.cuda.is_available():
            raise RuntimeError("--device cuda but torch.cuda.is_available() is False")
        props = torch.cuda.get_device_properties(0)
        out.update(gpu=props.name, gpu_memory_bytes=int(props.total_memory), gpu_capability=f"{props.major}."
                   f"{props.minor}", gpu_multiprocessors=props.multi_processor_count, cuda=torch.version.cuda)
    n, iters = opts.sizes.matmul_size if opts.cuda else min(opts.sizes.matmul_size, 512), 10
    a = torch.randn(n, n, device=opts.device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=opts.device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    sync(opts)
    started = time.perf_counter()
    for _ in range(iters):
        a @ b
    sync(opts)
    out["matmul_bf16_size"] = n
    out["matmul_bf16_tflops"] = 2 * n**3 * iters / (time.perf_counter() - started) / 1e12
    return out
