"""Crash-safe file output (a failure mid-write never leaves a half-written file or directory behind) and JSON files
whose read errors name the file and line. Imports nothing from the package: every room may use it."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def atomic_write_text(text: str, path: str | Path) -> Path:
    """Write `text` to a temporary sibling, then rename it over `path`; returns `path`."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w", encoding="utf-8", newline="") as stream:
            stream.write(text)
        os.chmod(temp, 0o666 & ~_umask())  # mkstemp creates 0600; a plain open() would honour the umask
        os.replace(temp, target)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    return target


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def replace_dir(src: Path, dst: Path) -> None:
    """Move the finished directory `src` to `dst`; an existing `dst` is swapped out first and deleted afterwards,
    and put back if the move fails."""
    backup = None
    if dst.exists():
        backup = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        os.replace(dst, backup)
    try:
        os.replace(src, dst)
    except BaseException:
        if backup is not None:
            os.replace(backup, dst)
        raise
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True)


@contextmanager
def atomic_directory(out: str | Path, error: type[Exception] = ValueError) -> Iterator[Path]:
    """A temporary sibling of `out` to fill; on a clean exit it replaces `out` (:func:`replace_dir`), on an error it
    is deleted and `out` is left as it was. An `out` that exists and is not a directory is refused with `error`."""
    target = Path(out).expanduser().resolve()
    if target.exists() and not target.is_dir():
        raise error(f"export target {target} exists and is not a directory")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        replace_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_json(data: dict[str, Any], path: str | Path) -> Path:
    """Write ``data`` as strict JSON (``allow_nan=False``: convert NaN first) atomically."""
    return atomic_write_text(json.dumps(data, indent=2, allow_nan=False) + "\n", path)


def read_json(path: str | Path) -> dict[str, Any]:
    """Read a JSON object from ``path``; errors name the file and line."""
    source = Path(path)
    try:
        data = json.loads(source.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{source}:{error.lineno}:{error.colno}: invalid JSON ({error.msg})") from error
    if not isinstance(data, dict):
        raise ValueError(f"{source}: expected a JSON object at top level, got {type(data).__name__}")
    return data
