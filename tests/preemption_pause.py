"""Test-only callbacks for tests/test_preemption.py (importable by class path from the `fit` / `heal` processes):
hold every rank at one optimizer step until the test has sent its signals, or signal this process at one step, so
that the preemption checkpoint lands at a known step without timing guesses."""
from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import lightning as L

from lightning_speechllm.preemption import PreemptionCheckpoint


class PauseForSignal(L.Callback):
    """At global step ``at_step`` each rank writes ``<marker_dir>/rank<r>.pid`` (its pid) and waits for
    ``<marker_dir>/go`` (a JSON list of the ranks the test signalled); a signalled rank then also waits until its
    signal handler ran. Listed before the (default, last) PreemptionCheckpoint, so that one sees the flags at this
    very step."""

    def __init__(self, at_step: int, marker_dir: str, timeout: float = 120.0) -> None:
        super().__init__()
        self.at_step, self.marker_dir, self.timeout = at_step, Path(marker_dir), timeout

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if trainer.global_step != self.at_step:
            return
        preemption = next(c for c in trainer.callbacks if isinstance(c, PreemptionCheckpoint))
        marker = self.marker_dir / f"rank{trainer.global_rank}.pid"
        marker.with_suffix(".tmp").write_text(str(os.getpid()))
        os.replace(marker.with_suffix(".tmp"), marker)  # the test never reads half a pid
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            go = self.marker_dir / "go"
            if go.exists() and (trainer.global_rank not in json.loads(go.read_text()) or preemption.received):
                return
            time.sleep(0.01)
        raise TimeoutError(f"rank {trainer.global_rank}: no go / signal within {self.timeout} s")


class SignalAt(L.Callback):
    """Sends the signal ``signal_name`` to this very process at global step ``step`` and waits until the
    PreemptionCheckpoint saw it (listed before it, so it acts at this step); records which SIGTERM handler was
    installed while training ran."""

    def __init__(self, step: int | None = None, signal_name: str = "SIGTERM") -> None:
        super().__init__()
        self.step, self.signal_name, self.handler_in_training = step, signal_name, None

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self.handler_in_training = signal.getsignal(signal.SIGTERM)
        if trainer.global_step != self.step:
            return
        os.kill(os.getpid(), getattr(signal, self.signal_name))
        preemption = next(c for c in trainer.callbacks if isinstance(c, PreemptionCheckpoint))
        deadline = time.monotonic() + 10
        while not preemption.received and time.monotonic() < deadline:  # the handler runs between two bytecodes
            time.sleep(0.001)
