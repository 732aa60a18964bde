"""The bad-input policy of the data layer: reject an utterance loudly ("error") or drop and count it ("skip").

Every rejection names the manifest, the 1-based line (``None`` for Shar shards, which have no lines), the utterance
id when known, a machine-readable reason and a human-readable detail. Under ``"skip"`` each rejection is appended, as
one JSON line, to ``rejected.jsonl``; appends of single short lines are atomic on POSIX, so dataloader worker
processes can report lazily-rejected samples into the same file. :class:`BadSampleReport` (a Lightning callback)
summarises the file with counts per reason at the end of every train/validation epoch.
"""
from __future__ import annotations

import json
import os
import warnings
from collections import Counter
from dataclasses import asdict, dataclass
from enum import Enum
from pathlib import Path
from typing import Any, Literal

import lightning as L

BadSamplePolicy = Literal["error", "skip"]
POLICIES: tuple[str, ...] = ("error", "skip")
REJECTED_FILENAME = "rejected.jsonl"


class BadReason(str, Enum):
    """Why an utterance was rejected."""

    INVALID_JSON = "invalid_json"
    INVALID_UTF8 = "invalid_utf8"
    MISSING_FIELD = "missing_field"
    INVALID_FIELD = "invalid_field"
    DUPLICATE_ID = "duplicate_id"
    EMPTY_TEXT = "empty_text"
    MISSING_FILE = "missing_file"
    UNREADABLE_AUDIO = "unreadable_audio"
    ZERO_LENGTH = "zero_length"
    NON_FINITE = "non_finite"
    TOO_LONG = "too_long"


class BadSampleError(ValueError):
    """A manifest line or an utterance's audio is unusable (raised under ``on_bad_sample="error"``).

    The message alone carries everything (it must survive PyTorch's re-raise from dataloader workers, which rebuilds
    the exception from its message); the structured fields are set when raised in-process.
    """

    def __init__(
        self,
        message: str,
        *,
        manifest: str | None = None,
        line: int | None = None,
        reason: BadReason | None = None,
        sample_id: str | None = None,
    ) -> None:
        super().__init__(message)
        self.manifest = manifest
        self.line = line
        self.reason = reason
        self.sample_id = sample_id


@dataclass(frozen=True)
class RejectedSample:
    """One rejection: where it came from and why."""

    manifest: str
    line: int | None
    id: str | None
    reason: str
    detail: str

    def message(self) -> str:
        """``manifest:line: [reason] detail (id=...)`` — the text of the matching :class:`BadSampleError`."""
        where = f"{self.manifest}:{self.line}" if self.line is not None else self.manifest
        who = f" (id={self.id})" if self.id is not None else ""
        return f"{where}: [{self.reason}] {self.detail}{who}"


def check_policy(policy: str) -> BadSamplePolicy:
    """Validate an ``on_bad_sample`` value."""
    if policy not in POLICIES:
        raise ValueError(f"on_bad_sample must be one of {POLICIES}, got {policy!r}")
    return policy  # type: ignore[return-value]


class BadSampleHandler:
    """Applies the policy to one rejection: raises under "error", logs to ``rejected.jsonl`` under "skip".

    Picklable (holds only the policy and a path) so dataloader workers carry their own copy.
    """

    def __init__(self, policy: BadSamplePolicy = "error", rejected_path: str | Path | None = None) -> None:
        self.policy = check_policy(policy)
        self.rejected_path = Path(rejected_path) if rejected_path is not None else None
        if self.policy == "skip" and self.rejected_path is None:
            raise ValueError("on_bad_sample='skip' needs a rejected_path to write rejected.jsonl into")

    def reject(
        self, manifest: str | Path, line: int | None, reason: BadReason, detail: str, sample_id: str | None = None
    ) -> RejectedSample:
        """Record one bad sample; raise :class:`BadSampleError` under the "error" policy."""
        record = RejectedSample(str(manifest), line, sample_id, BadReason(reason).value, detail)
        if self.policy == "error":
            raise BadSampleError(
                record.message(), manifest=record.manifest, line=line, reason=BadReason(reason), sample_id=sample_id
            )
        assert self.rejected_path is not None
        self.rejected_path.parent.mkdir(parents=True, exist_ok=True)
        data = (json.dumps(asdict(record), ensure_ascii=False) + "\n").encode("utf-8")
        fd = os.open(self.rejected_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
        return record


def read_rejected(path: str | Path) -> list[RejectedSample]:
    """Read ``rejected.jsonl``, dropping repeats of the same (manifest, line, id, reason) from later epochs."""
    path = Path(path)
    if not path.exists():
        return []
    seen: dict[tuple[Any, ...], RejectedSample] = {}
    with path.open("r", encoding="utf-8") as f:
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                rec = RejectedSample(**json.loads(raw))
            except (json.JSONDecodeError, TypeError) as e:
                raise ValueError(f"{path}:{lineno}: not a rejected-sample record: {e}") from e
            seen.setdefault((rec.manifest, rec.line, rec.id, rec.reason), rec)
    return list(seen.values())


def count_rejected(path: str | Path) -> dict[str, int]:
    """Counts of distinct rejected samples per reason, most frequent first."""
    return dict(Counter(r.reason for r in read_rejected(path)).most_common())


def warn_rejected(path: str | Path, stage: str) -> dict[str, int]:
    """Emit one warning summarising ``rejected.jsonl`` (nothing when empty); return the counts."""
    counts = count_rejected(path)
    if counts:
        total = sum(counts.values())
        per_reason = ", ".join(f"{k}={v}" for k, v in counts.items())
        warnings.warn(
            f"[{stage}] {total} bad sample(s) skipped so far ({per_reason}); details in {path}",
            RuntimeWarning,
            stacklevel=2,
        )
    return counts


class BadSampleReport(L.Callback):
    """Warns, at the end of each train/validation epoch, with the per-reason counts of skipped samples."""

    def __init__(self, rejected_path: str | Path) -> None:
        self.rejected_path = Path(rejected_path)
        self.last_counts: dict[str, int] = {}

    def _report(self, trainer: L.Trainer, stage: str) -> None:
        if trainer.is_global_zero:
            self.last_counts = warn_rejected(self.rejected_path, stage)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._report(trainer, f"train epoch {trainer.current_epoch}")

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._report(trainer, "validation")
