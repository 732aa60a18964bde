"""Crash-safe writes: atomic, and readable by whoever the umask allows (reports are shared on clusters)."""
from __future__ import annotations

import os
import stat

import pytest

from lightning_speechllm.io_utils import atomic_write_text


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_atomic_write_text_honours_the_umask(tmp_path, umask, mode):
    previous = os.umask(umask)
    try:
        path = atomic_write_text("report", tmp_path / "report.md")
    finally:
        os.umask(previous)
    assert path.read_text() == "report" and stat.S_IMODE(path.stat().st_mode) == mode
    assert [p.name for p in tmp_path.iterdir()] == ["report.md"]  # no temporary file left behind


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = atomic_write_text("old", tmp_path / "scores.json")

    with pytest.raises(TypeError):
        atomic_write_text(b"not text", path)  # type: ignore[arg-type]
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["scores.json"]
