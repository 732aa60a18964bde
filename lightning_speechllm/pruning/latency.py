"""Decode latency of each decoder unit, for plans under a latency budget.

Forward hooks on every decoder layer, on its attention sublayer and on the LLM itself time the cached decoding steps
of greedy generation (exactly ``new_tokens`` tokens are forced, as ``efficiency`` does; the prefill, the first LLM
call of each ``generate``, is not counted). Per unit the time is summed over the decoding steps of all batches and
divided by their number: milliseconds per decoding step of the LLM forward (``efficiency``'s
``decode_ms_per_token`` also counts what ``generate`` does between forwards). The
medians over ``repeats`` passes are kept. On CUDA every hook synchronises the model's device, so each unit is
charged its own kernels (and the step is a little slower than unhooked decoding: :func:`time_decode_units` with
``units=False`` hooks the LLM alone).

A whole layer's time includes its attention's; the attention is timed on its own, so ``layer - attention`` is what
removing the layer still saves once its attention is dropped.
"""
from __future__ import annotations

import statistics
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from lightning_speechllm.model.layer_mask import get_layer_mask_state, unwrap_peft
from lightning_speechllm.model.sublayer_mask import attention_module

if TYPE_CHECKING:
    from lightning_speechllm.data.batch import SpeechBatch
    from lightning_speechllm.model.speechllm import SpeechLLM

__all__ = ["DecodeTiming", "time_decode_units"]


@dataclass(frozen=True)
class DecodeTiming:
    """Milliseconds per cached decoding step: each decoder layer (original numbering, 0 for a removed one), each
    attention sublayer, and the whole LLM forward (embedding, norm and LM head included)."""

    layer_ms: tuple[float, ...]
    attention_ms: tuple[float, ...]
    step_ms: float
    steps: int
    """Decoding steps timed per pass."""


class _UnitClock:
    """Accumulates the wall time inside each hooked module during decoding steps."""

    def __init__(self, llm: nn.Module, layers: Sequence[nn.Module], device: torch.device) -> None:
        self.llm, self.layers, self.device = llm, list(layers), device
        self.calls = 0  # LLM forwards of the current generate call: the first one is the prefill
        self.steps = 0
        self.seconds: dict[Any, float] = {}
        self._started: dict[Any, float] = {}

    def now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def reset(self) -> None:
        self.steps = 0
        self.seconds = {key: 0.0 for key in self.seconds}

    def _start(self, key: Any):
        def hook(*_: Any) -> None:
            if key == "llm":
                self.calls += 1
                if self.calls > 1:
                    self.steps += 1
            if self.calls > 1:
                self._started[key] = self.now()
        return hook

    def _stop(self, key: Any):
        def hook(*_: Any) -> None:
            if self.calls > 1:
                self.seconds[key] = self.seconds.get(key, 0.0) + self.now() - self._started.pop(key)
        return hook

    @contextmanager
    def attached(self) -> Iterator[_UnitClock]:
        modules: list[tuple[Any, nn.Module]] = [("llm", self.llm)]
        for index, layer in enumerate(self.layers):
            modules += [(("layer", index), layer), (("attention", index), attention_module(layer))]
        handles = []
        for key, module in modules:
            self.seconds.setdefault(key, 0.0)
            handles += [module.register_forward_pre_hook(self._start(key)),
                        module.register_forward_hook(self._stop(key))]
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()


@torch.no_grad()
def time_decode_units(speechllm: SpeechLLM, batches: Sequence[SpeechBatch], new_tokens: int = 16, repeats: int = 3,
                      warmup: int = 1, units: bool = True) -> DecodeTiming:
    """Time every decoder unit of ``speechllm`` as masked now over ``new_tokens`` forced tokens per batch (medians
    over ``repeats`` passes after ``warmup`` untimed ones; eval mode inside, restored after). ``units=False`` times
    the LLM forward alone (``layer_ms`` and ``attention_ms`` empty): two hooks a step instead of two per unit, whose
    synchronisation on a GPU would otherwise slow what is timed."""
    if new_tokens < 2 or repeats < 1 or warmup < 0 or not batches:
        raise ValueError(f"need batches, new_tokens >= 2, repeats >= 1 and warmup >= 0; got {len(batches)} batches, "
                         f"{new_tokens}, {repeats}, {warmup}")
    layers = get_layer_mask_state(speechllm.layer_mask.model).layer_list if units else []
    clock = _UnitClock(unwrap_peft(speechllm.llm), layers, speechllm.device)
    passes: list[dict[Any, float]] = []
    modes = [(module, module.training) for module in speechllm.modules()]
    speechllm.eval()
    try:
        with clock.attached():
            for index in range(warmup + repeats):
                clock.reset()
                for batch in batches:
                    clock.calls = 0
                    speechllm.generate(batch.to(speechllm.device), max_new_tokens=new_tokens,
                                       min_new_tokens=new_tokens)
                if clock.steps != len(batches) * (new_tokens - 1):
                    raise RuntimeError(f"expected {new_tokens - 1} cached decoding steps per batch, timed "
                                       f"{clock.steps} over {len(batches)} batches: generation stopped early")
                if index >= warmup:
                    passes.append({key: 1e3 * seconds / clock.steps for key, seconds in clock.seconds.items()})
    finally:
        for module, training in modes:
            module.training = training
    median = {key: statistics.median(one[key] for one in passes) for key in passes[0]}
    return DecodeTiming(layer_ms=tuple(median[("layer", i)] for i in range(len(layers))),
                        attention_ms=tuple(median[("attention", i)] for i in range(len(layers))),
                        step_ms=median["llm"], steps=clock.steps)
