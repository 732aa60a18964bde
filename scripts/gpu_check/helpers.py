"""Device helpers of the phases: synchronise, autocast, free memory, a phase's peak memory, the benchmarks reused
from ``scripts/bench/``, and number formatting."""
from __future__ import annotations

import gc
import importlib.util
import math
import sys
from contextlib import nullcontext
from typing import Any

from .options import REPO, Options


def bench(name: str) -> Any:
    """``scripts/bench/<name>.py`` as a module (reused, not copied)."""
    module_name = f"gpu_check_bench_{name}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, REPO / "scripts" / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


def sync(opts: Options) -> None:
    if opts.cuda:
        import torch

        torch.cuda.synchronize()


def autocast(opts: Options) -> Any:
    import torch

    if "bf16" not in opts.precision and "16-mixed" not in opts.precision:
        return nullcontext()
    dtype = torch.bfloat16 if "bf16" in opts.precision else torch.float16
    return torch.autocast(device_type="cuda" if opts.cuda else "cpu", dtype=dtype)


def free(opts: Options) -> None:
    gc.collect()
    if opts.cuda:
        import torch

        torch.cuda.empty_cache()


def gib(value: float | None) -> str:
    return "-" if value is None else f"{value / 2**30:.2f} GiB"


def finite_float(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


class PeakMemory:
    """Peak memory of one phase: torch.cuda.max_memory_allocated on CUDA; VmHWM (peak RSS) on the CPU, reset at the
    phase start through /proc/self/clear_refs (None where the kernel refuses)."""

    def __init__(self, opts: Options) -> None:
        self.cuda = opts.cuda
        self.resettable = True
        self.start_bytes = 0

    def reset(self) -> None:
        gc.collect()
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            self.start_bytes = int(torch.cuda.memory_allocated())
        else:
            memory = bench("memory")
            self.resettable = memory.reset_peak_rss()
            self.start_bytes = memory.rss_bytes()

    def read(self) -> dict[str, Any]:
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            return {"peak_memory_bytes": int(torch.cuda.max_memory_allocated()),
                    "peak_reserved_bytes": int(torch.cuda.max_memory_reserved()),
                    "memory_at_start_bytes": self.start_bytes, "memory_source": "torch.cuda.max_memory_allocated"}
        peak = bench("memory").vm_hwm_bytes() if self.resettable else None
        return {"peak_memory_bytes": peak, "memory_at_start_bytes": self.start_bytes,
                "memory_source": "VmHWM (peak RSS) after a reset" if self.resettable else None}
