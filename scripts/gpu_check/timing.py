"""Step timing and FLOPs: a callback timing each training step, the mfu_6n formula, torch's counted FLOPs, and
the throughput of a phase (see the package docstring for the formulas)."""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .helpers import autocast, sync
from .options import SAMPLE_RATE, Options


def _encoder_windows(pl_module: Any, batch: Any) -> list[int]:
    """Encoder frames computed per utterance: its whole window (Whisper pads to it), in encoder frames."""
    encoder = getattr(pl_module.speechllm, "encoder", None)
    if encoder is None or batch.text_only or not hasattr(encoder, "windows"):
        return []
    return [int(w) // 320 for w in encoder.windows(batch.audio_lens).tolist()]  # 160 samples/mel frame, stride 2


def make_step_timer(opts: Options) -> Any:
    import lightning as L

    class StepTimer(L.Callback):
        """Step starts (synchronised) and what each step processed: LLM tokens, utterances, encoder frames."""

        def __init__(self) -> None:
            self.starts: list[float] = []
            self.ends: list[float] = []
            self.steps: list[dict[str, float]] = []
            self.last_batch: Any = None

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            sync(opts)
            self.starts.append(time.perf_counter())
            windows = _encoder_windows(pl_module, batch)
            self._step = {"utterances": len(batch), "audio_seconds": float(batch.audio_lens.sum()) / SAMPLE_RATE,
                          "encoder_frames": sum(windows), "encoder_frames_sq": sum(w * w for w in windows)}
            self.last_batch = batch

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            sync(opts)
            self.ends.append(time.perf_counter())
            self._step["tokens"] = int(pl_module.tokens_in_last_batch)
            self.steps.append(self._step)

        def intervals(self) -> list[float]:
            """Step i: from its start to the next step's start (the last one: to its end)."""
            nxt = self.starts[1:len(self.ends)] + self.ends[-1:]
            return [b - a for a, b in zip(self.starts, nxt)]

    return StepTimer()


@dataclass
class Counts:
    """Parameter counts for the FLOP formulas (from meta-device builds of the configs)."""

    layer_params: int
    num_layers: int
    head_params: int
    decoder_params: int
    encoder_params: int
    encoder_layers: int
    encoder_dim: int


def model_flops(counts: Counts, step: dict[str, float], active_layers: int, trainable: int, teacher: bool) -> float:
    """The mfu_6n formula of the module docstring for one step."""
    student = active_layers * counts.layer_params + counts.head_params + trainable
    flops = 6 * student * step["tokens"]
    if teacher:
        flops += 2 * (counts.num_layers * counts.layer_params + counts.head_params) * step["tokens"]
    flops += 2 * counts.encoder_params * step["encoder_frames"]
    flops += 4 * counts.encoder_layers * counts.encoder_dim * step["encoder_frames_sq"]
    return float(flops)


def counted_flops(opts: Options, module: Any, batch: Any, step: Callable[[Any], tuple[Any, int]]) -> dict[str, Any]:
    """FLOPs of one training step (forward + backward as executed) by torch's FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    module.to(opts.device)  # Lightning's single-device teardown left it on the CPU
    module.train()
    counter = FlopCounterMode(display=False)
    with counter:
        with autocast(opts):
            loss, tokens = step(batch)
        loss.backward()
    module.zero_grad(set_to_none=True)
    flops = int(counter.get_total_flops())
    return {"counted_flops_per_step": flops, "counted_tokens": tokens,
            "counted_flops_per_token": flops / max(tokens, 1)}


def throughput(opts: Options, timer: Any, counts: Counts, active_layers: int, trainable: int,
               teacher: bool, warmup: int) -> dict[str, Any]:
    """tokens/s, utterances/s, step times and mfu_6n over the steps after `warmup`."""
    intervals = timer.intervals()
    measured = list(zip(timer.steps, intervals))[warmup:] or list(zip(timer.steps, intervals))
    seconds = sum(s for _, s in measured)
    tokens = sum(step["tokens"] for step, _ in measured)
    flops = sum(model_flops(counts, step, active_layers, trainable, teacher) for step, _ in measured)
    step_s = [s for _, s in measured]
    return {
        "steps": len(timer.steps), "measured_steps": len(measured), "warmup_steps": len(timer.steps) - len(measured),
        "step_s_median": statistics.median(step_s) if step_s else None,
        "step_s_mean": seconds / len(step_s) if step_s else None,
        "tokens_per_step_mean": tokens / len(measured) if measured else None,
        "utterances_per_step_mean": sum(s["utterances"] for s, _ in measured) / max(len(measured), 1),
        "tokens_per_s": tokens / seconds if seconds else None,
        "utterances_per_s": sum(s["utterances"] for s, _ in measured) / seconds if seconds else None,
        "audio_seconds_per_s": sum(s["audio_seconds"] for s, _ in measured) / seconds if seconds else None,
        "model_flops_per_step_6n": flops / max(len(measured), 1),
        "model_tflops_per_s_6n": flops / seconds / 1e12 if seconds else None,
        "mfu_6n": flops / seconds / (opts.peak_tflops * 1e12) if seconds else None,
        "active_layers": active_layers, "trainable_params": trainable,
        "step_s": [round(s, 4) for s in intervals],  # every step, the warm-up ones included
    }


def add_counted_mfu(opts: Options, out: dict[str, Any], counted: dict[str, Any]) -> None:
    out.update(counted)
    if out.get("tokens_per_s"):
        achieved = counted["counted_flops_per_token"] * out["tokens_per_s"]
        out["counted_tflops_per_s"] = achieved / 1e12
        out["mfu_counted"] = achieved / (opts.peak_tflops * 1e12)
