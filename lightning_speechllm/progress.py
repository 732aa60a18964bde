"""Training progress as plain log lines, for runs whose output is a file (a SLURM ``.out``), not a terminal."""
from __future__ import annotations

import logging
import sys
import time
from collections import deque
from typing import Any

import lightning as L


class PlainProgressLog(L.Callback):
    """Every `every_n_steps` optimizer steps, rank 0 prints one line: step/max, mean loss over those steps, LR,
    utterances/s, LLM tokens/s (when the module reports ``tokens_in_last_batch``), elapsed time and ETA."""

    def __init__(self, every_n_steps: int = 20) -> None:
        super().__init__()
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
        self.every_n_steps = every_n_steps
        self._losses: deque[Any] = deque(maxlen=every_n_steps)  # detached tensors: read only when printing
        self._start = 0.0
        self._start_step = 0
        self._utterances = 0
        self._tokens: Any = 0
        self._printed_step = -1

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start, self._start_step = time.monotonic(), trainer.global_step
        self._utterances = self._tokens = 0

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._utterances += len(batch) if hasattr(batch, "__len__") else 0
        self._tokens = self._tokens + getattr(pl_module, "tokens_in_last_batch", 0)
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if loss is not None:
            self._losses.append(loss.detach() if hasattr(loss, "detach") else loss)
        step = trainer.global_step
        last = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None
        if trainer.is_global_zero and step != self._printed_step and (step % self.every_n_steps == 0 or step == last):
            self._printed_step = step
            print(self.line(trainer, step, last), flush=True)

    def line(self, trainer: L.Trainer, step: int, last: int | None) -> str:
        elapsed = max(time.monotonic() - self._start, 1e-9)
        done = max(step - self._start_step, 1)
        parts = [f"step {step}/{last}" if last else f"step {step}"]
        if self._losses:
            parts.append(f"loss {float(sum(self._losses)) / len(self._losses):.4f}")
        if trainer.optimizers:
            parts.append(f"lr {trainer.optimizers[0].param_groups[0]['lr']:.2e}")
        parts.append(f"{self._utterances / elapsed:.1f} utt/s")
        if int(self._tokens):
            parts.append(f"{int(self._tokens) / elapsed:.0f} tok/s")
        parts.append(f"elapsed {_clock(elapsed)}")
        if last:
            parts.append(f"ETA {_clock(elapsed / done * max(last - step, 0))}")
        return " | ".join(parts)


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{secs:02d}" if minutes >= 60 else f"{minutes}:{secs:02d}"


def progress_defaults(stream=None) -> dict:
    """Trainer defaults for the CLIs: on a terminal, Lightning's progress bar; otherwise no bar (it writes nothing
    readable to a file) and a :class:`PlainProgressLog`."""
    stream = sys.stdout if stream is None else stream
    if getattr(stream, "isatty", lambda: False)():
        return {}
    return {"enable_progress_bar": False, "callbacks": [PlainProgressLog()]}


class _NoProductTips(logging.Filter):
    """Drops the "💡 Tip:" lines Lightning logs at every start to advertise its cloud products (litlogger,
    litmodels): they say nothing about the run and fill every SLURM log."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip:")


def hide_lightning_product_tips() -> None:
    """Install :class:`_NoProductTips` on the logger of Lightning's rank-zero messages (once; other messages pass)."""
    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, _NoProductTips) for f in logger.filters):
        logger.addFilter(_NoProductTips())
