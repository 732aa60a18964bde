"""Precision chosen by the hardware: bf16 autocast only where the device computes bf16 natively, fp32 elsewhere.

On a CPU without native bf16 (AVX2 only) autocast emulates it: SmolLM2-135M forward + backward ran 51x slower than
fp32 on an AMD EPYC (AVX2). So a precision left unset (``trainer.precision: null``, the shipped configs) becomes:

* CUDA: ``bf16-mixed`` where the GPU computes bf16 (Ampere and newer), else ``32-true``;
* CPU: ``bf16-mixed`` where torch reports native bf16 kernels (AVX512-BF16 or AMX on x86, bf16 on Arm) AND a short
  timed probe (a decoder-shaped MLP, forward + backward, about a second) runs faster under bf16 autocast than in fp32
  (flags alone can lie: a VM, ``ONEDNN_MAX_CPU_ISA`` or ``ATEN_CPU_CAPABILITY`` may cap what the kernels use), else
  ``32-true``;
* anything else (MPS, ...): ``32-true``.

A precision the user sets (``--trainer.precision``, a config key) always wins. Every command prints one line naming
the choice and why, e.g. ``precision: 32-true (this CPU has no native bf16: AVX2)``.
"""
from __future__ import annotations

import functools
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["PrecisionChoice", "choose_precision", "cpu_bf16_probe", "cpu_has_native_bf16", "resolve_precision"]

# bf16 autocast must beat fp32 by this factor in the probe: a tie keeps fp32 (exact, and no slower).
PROBE_MIN_SPEEDUP = 1.1
_X86_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
_INHERITED = "LIGHTNING_SPEECHLLM_AUTO_PRECISION"


@dataclass(frozen=True)
class PrecisionChoice:
    """A Lightning precision and the reason it was chosen."""

    precision: str
    reason: str

    def line(self) -> str:
        return f"precision: {self.precision} ({self.reason})"


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            return set(line.split(":", 1)[1].split())
    return set()


def cpu_has_native_bf16() -> tuple[bool, str]:
    """Whether torch's CPU kernels compute bf16 natively, and a short description (the ISA and bf16 flags).

    ``torch.ops.mkldnn._is_mkldnn_bf16_supported`` is what oneDNN itself checks (it follows ``ATEN_CPU_CAPABILITY``);
    where that op is missing, the CPU flags decide (x86 ``avx512_bf16`` / ``amx_bf16``, Arm ``bf16``)."""
    capability = torch.backends.cpu.get_cpu_capability()
    flags = _cpu_flags()
    bf16_flags = [flag.upper().replace("_", "-") for flag in (*_X86_BF16_FLAGS, "bf16") if flag in flags]
    try:
        native = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        native = bool(bf16_flags)
    described = capability if not native else ", ".join([capability, *bf16_flags]) if bf16_flags else capability
    return native, described


def _probe_seconds(bf16: bool, x: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> float:
    start = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        y = torch.nn.functional.linear(torch.nn.functional.silu(torch.nn.functional.linear(x, up)), down)
    y.float().square().mean().backward()
    return time.perf_counter() - start


@functools.lru_cache(maxsize=1)
def cpu_bf16_probe(tokens: int = 512, width: int = 576, hidden: int = 1536, repeats: int = 5) -> float:
    """fp32 seconds / bf16-autocast seconds of a decoder MLP's forward + backward (SmolLM2-135M's shape, frozen
    weights, gradient to the input as when only a projector trains); the best of ``repeats`` runs of each,
    interleaved. Above 1: bf16 is faster. About a second where bf16 is native, a few where it is emulated."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, width, generator=generator, requires_grad=True)
    up = torch.randn(hidden, width, generator=generator) / width ** 0.5
    down = torch.randn(width, hidden, generator=generator) / hidden ** 0.5
    _probe_seconds(True, x, up, down)  # warm-up: oneDNN builds its kernels on first use
    _probe_seconds(False, x, up, down)
    rounds = [(_probe_seconds(False, x, up, down), _probe_seconds(True, x, up, down)) for _ in range(repeats)]
    fp32, bf16 = (min(times) for times in zip(*rounds))  # interleaved: a change of load hits both alike
    return fp32 / bf16


def _device_type(accelerator: str | None) -> str:
    accelerator = (accelerator or "auto").lower()
    if accelerator in ("gpu", "cuda"):
        return "cuda"
    if accelerator == "auto":
        if torch.cuda.is_available():
            return "cuda"
        mps = getattr(torch.backends, "mps", None)
        return "mps" if mps is not None and mps.is_available() else "cpu"
    return accelerator


@functools.lru_cache(maxsize=None)
def choose_precision(accelerator: str | None = "cpu") -> PrecisionChoice:
    """The precision the hardware behind ``accelerator`` (Lightning's name: cpu, gpu, cuda, auto, mps) runs fastest
    without emulation: ``bf16-mixed`` where bf16 is native (and, on a CPU, measured faster), else ``32-true``."""
    device = _device_type(accelerator)
    if device == "cuda":
        if not torch.cuda.is_available():
            return PrecisionChoice("32-true", "no CUDA device visible")
        name = torch.cuda.get_device_name()
        if torch.cuda.is_bf16_supported(including_emulation=False):
            return PrecisionChoice("bf16-mixed", f"{name} computes bf16 natively")
        return PrecisionChoice("32-true", f"{name} has no native bf16")
    if device != "cpu":
        return PrecisionChoice("32-true", f"the {device} accelerator: bf16 autocast is not chosen automatically")
    native, described = cpu_has_native_bf16()
    if not native:
        return PrecisionChoice("32-true", f"this CPU has no native bf16: {described}")
    speedup = cpu_bf16_probe()
    if speedup < PROBE_MIN_SPEEDUP:
        return PrecisionChoice("32-true", f"this CPU reports native bf16 ({described}) but a probe ran bf16 autocast "
                                          f"only {speedup:.2f}x as fast as fp32")
    return PrecisionChoice("bf16-mixed", f"this CPU computes bf16 natively: {described}; a probe ran bf16 autocast "
                                         f"{speedup:.2f}x as fast as fp32")


def resolve_precision(precision: str | int | None, accelerator: object, source: str = "--trainer.precision",
                      announce: bool = True) -> str | int:
    """``precision`` when set (the user's choice wins), else :func:`choose_precision` for ``accelerator``; prints the
    one line that names the choice and why (``announce``, on the launching process only).

    The automatic choice is handed to processes this one starts (DDP ranks re-run the command) through the
    environment, so that every rank trains in the same precision whatever its own probe would time."""
    launching = _is_launching_process()
    if precision is not None:
        choice = PrecisionChoice(str(precision), f"set by {source}")
    elif not launching and os.environ.get(_INHERITED):
        choice = PrecisionChoice(os.environ[_INHERITED], "chosen by the launching process")
    else:
        choice = choose_precision(accelerator if isinstance(accelerator, str) else "auto")
        os.environ[_INHERITED] = choice.precision
    if announce and launching:
        print(choice.line(), flush=True)
    return precision if precision is not None else choice.precision


def _is_launching_process() -> bool:
    return all(os.environ.get(name, "0") == "0" for name in ("LOCAL_RANK", "NODE_RANK", "SLURM_PROCID"))
