"""Preemption: on SIGTERM or SLURM's warning signal, checkpoint at the next optimizer step, stop cleanly, requeue.

SLURM warns a job before its time limit with the signal of ``#SBATCH --signal=SIGUSR1@90`` and ends a job (time
limit, ``scancel``, preemption) with SIGTERM, then SIGKILL. :class:`PreemptionCheckpoint` (on by default in ``fit``
and ``heal``) handles both:

1. Its signal handlers only set a flag: a handler runs between two bytecodes of whatever the rank was doing, so it must
   not save, log or join a collective there (Lightning's SLURM handler does all three).
2. After each optimizer step (``on_train_batch_end``) the ranks share their flags (one small all-reduce), so all of
   them stop at the same step, also when only one rank got the signal.
3. Every rank joins ``trainer.save_checkpoint`` of ``<default_root_dir>/preempted.ckpt`` (weights, optimizer, LR
   schedule, loop counters, the Lhotse sampler's position, and each rank's RNG states, restored on resume). It is
   written to ``preempted.ckpt.partial`` and renamed over the old file once complete: a crash mid-write leaves the
   previous checkpoint intact.
4. On the requeue signal (SIGUSR1, or the ``requeue_signal`` of the trainer's ``SLURMEnvironment``) under SLURM, global
   rank 0 runs ``scontrol requeue <job id>``; SIGTERM (``scancel``, time limit) does not requeue.
5. Every rank leaves ``fit`` by raising :class:`Preempted`, a ``SystemExit(0)``: no end-of-training validation, test
   or report of the unfinished model, and the process exits with status 0.

Resuming: ``--ckpt_path last`` (:func:`resolve_last_checkpoint`, through the :class:`ResumeLast` CLI mixin) takes the
newest of ``preempted.ckpt`` and the ``ModelCheckpoint`` ``last*.ckpt`` files of every run under the run root.
The sbatch scripts pass it when SLURM restarts a job (``SLURM_RESTART_COUNT`` > 0).

Lightning's own SLURM handling is switched off: ``SLURMEnvironment(auto_requeue=True)``, Lightning's default under
srun, saves an ``hpc_ckpt_<n>.ckpt`` inside the SIGUSR1 handler; :meth:`PreemptionCheckpoint.setup` sets
``auto_requeue`` to False (rank detection is kept). Lightning's SIGTERM notifier, installed for every ``fit``, is
replaced while training runs (from ``on_train_start`` to ``on_train_end``) and comes back afterwards.
"""
from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from types import FrameType
from typing import Any

import lightning as L
import numpy as np
import torch
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.fabric.utilities.rank_zero import rank_zero_only

from lightning_speechllm.io_utils import replace_dir

__all__ = ["PREEMPTED_FILENAME", "Preempted", "PreemptionCheckpoint", "ResumeLast", "requeue_slurm_job",
           "resolve_last_checkpoint", "with_preemption_checkpoint"]

PREEMPTED_FILENAME = "preempted.ckpt"
_CHECKPOINT_KEY = "preemption"  # top-level key of the preemption checkpoint: signals, step, every rank's RNG states


class Preempted(SystemExit):
    """Raised on every rank once the preemption checkpoint is written: leaves ``Trainer.fit`` (Lightning tears down
    and calls ``on_exception``) and ends the process with status 0 (``SystemExit(0)``)."""

    def __init__(self, message: str) -> None:
        super().__init__(0)
        self.message = message

    def __str__(self) -> str:
        return self.message


class PreemptionCheckpoint(L.Callback):
    """Checkpoint and stop at the next optimizer step after SIGTERM or the requeue signal; requeue under SLURM.

    Args:
        dirpath: where ``filename`` goes (default: the trainer's ``default_root_dir``, the same for every run of a
            root, so that a requeued job finds it).
        filename: the checkpoint's name; it is overwritten by the next preemption.
        requeue: on the requeue signal under SLURM, ``scontrol requeue`` the job (from global rank 0).
        requeue_signal: the signal that asks for a requeue (default: the ``requeue_signal`` of the trainer's
            ``SLURMEnvironment``, else SIGUSR1). SIGTERM is always handled, never requeues.
        check_every_n_steps: how often the ranks compare their flags (one small all-reduce and host sync). Larger
            values cost less and react later: keep ``n * step time`` well inside the ``--signal`` lead time.
        enabled: False leaves the signals to Lightning (and its ``auto_requeue``).

    Only the first ``PreemptionCheckpoint`` of ``trainer.callbacks`` acts, so one listed in a config (with other
    settings) replaces the default one the CLIs add.
    """

    def __init__(self, dirpath: str | None = None, filename: str = PREEMPTED_FILENAME, requeue: bool = True,
                 requeue_signal: str | None = None, check_every_n_steps: int = 1, enabled: bool = True) -> None:
        super().__init__()
        if check_every_n_steps < 1:
            raise ValueError(f"check_every_n_steps must be >= 1, got {check_every_n_steps}")
        if requeue_signal is not None and not isinstance(getattr(signal, requeue_signal, None), signal.Signals):
            raise ValueError(f"unknown requeue_signal {requeue_signal!r}; expected a name such as 'SIGUSR1'")
        self.dirpath, self.filename, self.requeue = dirpath, filename, requeue
        self.requeue_signal, self.check_every_n_steps, self.enabled = requeue_signal, check_every_n_steps, enabled
        self._active = False
        self._signums: list[signal.Signals] = []  # handled signals; index = column of the shared flags
        self._requeue_signum: signal.Signals | None = None
        self._previous: dict[signal.Signals, Any] = {}  # handlers replaced by ours (installed iff not empty)
        self._received: dict[int, float] = {}  # signum -> when this process first got it (set by the handler only)
        self._saving: dict[str, Any] | None = None  # what on_save_checkpoint adds to the preemption checkpoint
        self._rng_to_restore: list[dict[str, Any]] | None = None

    # ------------------------------------------------------------------------------------------------ public
    @property
    def received(self) -> dict[str, float]:
        """Signals this process got (name -> time.time() of the first one)."""
        return {signal.Signals(signum).name: at for signum, at in dict(self._received).items()}

    def checkpoint_path(self, trainer: L.Trainer) -> str:
        return os.path.join(str(self.dirpath or trainer.default_root_dir), self.filename)

    # ------------------------------------------------------------------------------------------------ hooks
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        first = next(c for c in trainer.callbacks if isinstance(c, PreemptionCheckpoint))
        self._active = self.enabled and first is self and stage == "fit"
        if not self._active:
            return
        requeue_signal = self.requeue_signal
        environment = _cluster_environment(trainer)
        if isinstance(environment, SLURMEnvironment):
            if requeue_signal is None and environment.requeue_signal is not None:
                requeue_signal = signal.Signals(environment.requeue_signal).name
            if environment.auto_requeue:
                # Lightning would register its SIGUSR1 handler (checkpoint + collectives inside the handler) right
                # after setup; without auto_requeue it registers none. Rank/world-size detection is unaffected.
                environment.auto_requeue = False
                _print(trainer, "preemption: Lightning's SLURM auto-requeue handler is off; PreemptionCheckpoint "
                                "handles the requeue signal")
        names = ["SIGTERM", requeue_signal or "SIGUSR1"]
        self._signums = [getattr(signal, name) for name in dict.fromkeys(names) if hasattr(signal, name)]
        self._requeue_signum = getattr(signal, requeue_signal or "SIGUSR1", None)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._active:
            return
        if self._rng_to_restore is not None:
            self._restore_rng(trainer, self._rng_to_restore)
            self._rng_to_restore = None
        self._install()
        names = " or ".join(s.name for s in self._signums)
        _print(trainer, f"preemption: on {names} the ranks write {self.checkpoint_path(trainer)} after the current "
                        "optimizer step and exit (resume with --ckpt_path last)")

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        # The same answer on every rank (a rank that skipped the all-reduce below would hang the others).
        if not self._active or not self._signums or not _stepped(trainer) \
                or trainer.global_step % self.check_every_n_steps:
            return
        flags = self._gather_flags(trainer)  # [rank][signal index] -> got it
        if not any(any(row) for row in flags):
            return
        if _training_ends_now(trainer):
            _print(trainer, f"preemption: {_who(flags, self._signums)} at the last step {trainer.global_step}; "
                            "finishing normally instead of checkpointing")
            self._received.clear()
            return
        self._checkpoint_and_stop(trainer, flags)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._uninstall()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._uninstall()  # before Lightning's teardown restores the handlers it replaced

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._uninstall()

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        if self._saving is not None:
            checkpoint[_CHECKPOINT_KEY] = self._saving

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        saved = checkpoint.get(_CHECKPOINT_KEY)
        if self._active and isinstance(saved, Mapping) and saved.get("rng_states"):
            self._rng_to_restore = list(saved["rng_states"])  # applied at on_train_start, after the loaders drew

    # ------------------------------------------------------------------------------------------------ signals
    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        # Only a flag: this runs between two bytecodes of any code (a collective, a write, the logging lock ...).
        self._received.setdefault(signum, time.time())

    def _install(self) -> None:
        if self._previous or threading.current_thread() is not threading.main_thread():
            return  # signal.signal works in the main thread only
        for signum in self._signums:
            self._previous[signum] = signal.signal(signum, self._on_signal)

    def _uninstall(self) -> None:
        for signum, previous in self._previous.items():
            if signal.getsignal(signum) == self._on_signal:  # leave a handler someone installed after us
                signal.signal(signum, signal.SIG_DFL if previous is None else previous)
        self._previous = {}

    def _gather_flags(self, trainer: L.Trainer) -> list[list[int]]:
        """[rank][index in self._signums] -> whether that rank got that signal (one small all-reduce)."""
        distributed = trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized()
        # On the accelerator only when NCCL needs it: one rank alone costs no device sync.
        flags = torch.zeros(trainer.world_size, len(self._signums), dtype=torch.int32,
                            device=trainer.strategy.root_device if distributed else "cpu")
        flags[trainer.global_rank] = torch.tensor([int(s in self._received) for s in self._signums])
        if distributed:
            torch.distributed.all_reduce(flags)  # a sum: each rank filled its own row only
        return flags.tolist()

    # ------------------------------------------------------------------------------------------------ stopping
    def _checkpoint_and_stop(self, trainer: L.Trainer, flags: list[list[int]]) -> None:
        step, path, started = trainer.global_step, self.checkpoint_path(trainer), time.monotonic()
        requeue_index = self._signums.index(self._requeue_signum) if self._requeue_signum in self._signums else None
        wants_requeue = self.requeue and requeue_index is not None and any(row[requeue_index] for row in flags)
        self._saving = {"global_step": step, "signals": _who(flags, self._signums),
                        "slurm_job_id": _slurm_job_id(os.environ),
                        "rng_states": _gather_objects(trainer, capture_rng_state())}
        try:
            _save_atomically(trainer, path)
        finally:
            self._saving = None
        seconds = time.monotonic() - started
        if trainer.is_global_zero:
            if not wants_requeue:
                outcome = "not requeued (no requeue signal)"
            elif isinstance(_cluster_environment(trainer), SLURMEnvironment):
                outcome = requeue_slurm_job()
            else:
                outcome = "not requeued (not a SLURM run)"
            print(f"preemption: {_who(flags, self._signums)}: checkpoint at step {step} written to {path} in "
                  f"{seconds:.1f} s; {outcome}; exiting (resume with --ckpt_path last)", flush=True)
        for logger in trainer.loggers:
            logger.finalize("finished")  # flush what was logged: the process ends next
        raise Preempted(f"preempted at step {step}; checkpoint {path}")

    @staticmethod
    def _restore_rng(trainer: L.Trainer, states: list[dict[str, Any]]) -> None:
        if len(states) != trainer.world_size:
            _print(trainer, f"preemption: the checkpoint holds RNG states of {len(states)} ranks, this run has "
                            f"{trainer.world_size}: random draws (dropout) continue from the seed instead")
            return
        restore_rng_state(states[trainer.global_rank])


# ---------------------------------------------------------------------------------------------------- helpers
def _print(trainer: L.Trainer | None, message: str) -> None:
    """Print on global rank 0 (before `fit` sets the trainer's rank up, Lightning's rank from the environment)."""
    if (trainer.is_global_zero if trainer is not None else getattr(rank_zero_only, "rank", 0) == 0):
        print(message, flush=True)


def _who(flags: list[list[int]], signums: list[signal.Signals]) -> str:
    """'SIGTERM received on ranks 0, 1' (one clause per signal that any rank got)."""
    parts = []
    for index, signum in enumerate(signums):
        ranks = [str(rank) for rank, row in enumerate(flags) if row[index]]
        if ranks:
            parts.append(f"{signum.name} received on rank{'s' if len(ranks) > 1 else ''} {', '.join(ranks)}")
    return "; ".join(parts)


def _cluster_environment(trainer: L.Trainer) -> Any:
    environment = getattr(trainer.strategy, "cluster_environment", None)
    if environment is None:  # single-device strategies keep it on the connector only
        environment = getattr(getattr(trainer, "_accelerator_connector", None), "cluster_environment", None)
    return environment


def _stepped(trainer: L.Trainer) -> bool:
    """Whether this batch ended with an optimizer step (with gradient accumulation, a batch in between leaves
    gradients that no checkpoint holds)."""
    loop = trainer.fit_loop.epoch_loop
    should_accumulate = getattr(loop, "_should_accumulate", None)
    if callable(should_accumulate):
        return not should_accumulate()
    return (loop.batch_progress.current.ready % trainer.accumulate_grad_batches) == 0


def _training_ends_now(trainer: L.Trainer) -> bool:
    """The last optimizer step of the run: let it validate and end normally rather than checkpoint a finished run."""
    if trainer.max_steps is not None and 0 < trainer.max_steps <= trainer.global_step:
        return True
    max_epochs = trainer.fit_loop.max_epochs
    last_epoch = max_epochs is not None and max_epochs >= 0 and trainer.current_epoch + 1 >= max_epochs
    return last_epoch and trainer.fit_loop.epoch_loop.batch_progress.is_last_batch


def _gather_objects(trainer: L.Trainer, obj: Any) -> list[Any]:
    if trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        gathered: list[Any] = [None] * trainer.world_size
        torch.distributed.all_gather_object(gathered, obj)
        return gathered
    return [obj]


def capture_rng_state() -> dict[str, Any]:
    """This process's RNG states as tensors and plain containers (checkpoints are loaded with weights_only=True)."""
    kind, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    version, python_state, gauss = random.getstate()
    return {"torch": torch.get_rng_state(),
            "torch.cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(position), int(has_gauss),
                      float(cached_gaussian)],
            "python": [version, list(python_state), gauss]}


def restore_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("torch.cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["torch.cuda"])
    kind, keys, position, has_gauss, cached_gaussian = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, cached_gaussian))
    version, python_state, gauss = state["python"]
    random.setstate((version, tuple(python_state), gauss))


def _save_atomically(trainer: L.Trainer, path: str) -> None:
    """``trainer.save_checkpoint`` (every rank joins) to a sibling, then rank 0 renames it over ``path``."""
    partial = f"{path}.partial"  # a sibling: the rename stays on one filesystem
    fs = get_filesystem(path)
    if trainer.is_global_zero and fs.exists(partial):
        fs.rm(partial, recursive=True)  # left by a save that died: never mixed with the new one
    trainer.strategy.barrier("preemption-checkpoint-start")  # sharded saves write from every rank
    trainer.save_checkpoint(partial, weights_only=False)  # ends with a barrier: every writing rank is done
    if trainer.is_global_zero:
        if isinstance(fs, LocalFileSystem):
            if os.path.isdir(partial):  # distributed checkpoints (ModelParallelStrategy's default) are directories
                replace_dir(Path(partial), Path(path))
            else:
                with open(partial, "rb+") as written:
                    os.fsync(written.fileno())  # on disk before the rename makes it the checkpoint
                os.replace(partial, path)
        else:
            fs.mv(partial, path, recursive=True)
    trainer.strategy.barrier("preemption-checkpoint-done")


def _slurm_job_id(environ: Mapping[str, str]) -> str | None:
    """``<array job>_<task>`` for array jobs, else ``SLURM_JOB_ID``; None outside SLURM."""
    array_job, array_task = environ.get("SLURM_ARRAY_JOB_ID"), environ.get("SLURM_ARRAY_TASK_ID")
    if array_job and array_task:
        return f"{array_job}_{array_task}"
    return environ.get("SLURM_JOB_ID") or None


def requeue_slurm_job(environ: Mapping[str, str] | None = None, timeout: float = 60.0) -> str:
    """``scontrol requeue`` this SLURM job; returns what happened, for the log line (never raises)."""
    job = _slurm_job_id(os.environ if environ is None else environ)
    if job is None:
        return "not requeued (no SLURM_JOB_ID)"
    if not re.fullmatch(r"[0-9]+(_[0-9]+)?", job):
        return f"not requeued (unexpected SLURM job id {job!r})"
    try:
        done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=timeout,
                              check=False)
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"`scontrol requeue {job}` failed: {error}"
    if done.returncode != 0:
        return f"`scontrol requeue {job}` failed with exit code {done.returncode}: {done.stderr.strip()}"
    return f"requeued SLURM job {job}"


# ---------------------------------------------------------------------------------------------------- resuming
def resolve_last_checkpoint(trainer: L.Trainer, ckpt_path: Any) -> Any:
    """``"last"``: the newest (by modification time) of the preemption checkpoint and the ``ModelCheckpoint``
    ``last*.ckpt`` files of every run under the run root (``<root>/**/checkpoints/``, every logger version) or a
    configured ``dirpath``; None (train from scratch, with a note) when there is none. Other values unchanged.

    Lightning's own ``"last"`` looks in the ``ModelCheckpoint`` directory of the *new* logger version only, which a
    fresh process has not written yet, so it never resumes across processes."""
    if ckpt_path != "last":
        return ckpt_path
    roots = {str(trainer.default_root_dir), *(str(lg.save_dir) for lg in trainer.loggers if lg.save_dir)}
    if not all(isinstance(get_filesystem(root), LocalFileSystem) for root in roots):
        return ckpt_path  # remote roots: Lightning's own lookup
    candidates = {Path(c.checkpoint_path(trainer)) for c in trainer.callbacks if isinstance(c, PreemptionCheckpoint)}
    for root in roots:
        candidates.update(Path(root).glob("**/checkpoints/last*.ckpt"))
    for callback in trainer.checkpoint_callbacks:
        dirpath = getattr(callback, "dirpath", None)
        if dirpath and isinstance(get_filesystem(dirpath), LocalFileSystem):
            candidates.update(Path(dirpath).glob("last*.ckpt"))
    existing = [path for path in candidates if path.exists()]
    if not existing:
        _print(None, f"--ckpt_path last: no preemption or last checkpoint under {' or '.join(sorted(roots))}; "
                     "training from scratch")
        return None
    newest = max(existing, key=lambda path: path.stat().st_mtime)
    _print(None, f"--ckpt_path last: resuming from {newest} (the newest of {len(existing)})")
    return str(newest)


class ResumeLast:
    """LightningCLI mixin: ``fit --ckpt_path last`` resumes from :func:`resolve_last_checkpoint`."""

    trainer: L.Trainer

    def fit(self, model: L.LightningModule, **kwargs: Any) -> None:
        kwargs["ckpt_path"] = resolve_last_checkpoint(self.trainer, kwargs.get("ckpt_path"))
        self.trainer.fit(model, **kwargs)


def with_preemption_checkpoint(trainer_defaults: dict[str, Any]) -> dict[str, Any]:
    """``trainer_defaults`` of a CLI with a new :class:`PreemptionCheckpoint` appended to its callbacks (LightningCLI
    appends default callbacks after the configured ones, so a configured one comes first and wins)."""
    callbacks = trainer_defaults.get("callbacks") or []
    callbacks = list(callbacks) if isinstance(callbacks, (list, tuple)) else [callbacks]
    return {**trainer_defaults, "callbacks": [*callbacks, PreemptionCheckpoint()]}
