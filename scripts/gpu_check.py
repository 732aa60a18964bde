"""The GPU check's entry point: ``python scripts/gpu_check.py [options]`` (``--help`` lists them).

The check is the ``scripts/gpu_check/`` package next to this file; its docstring, which ``--help`` prints, says what
each phase measures and how a lent device runs it. One module per part: ``options.py`` (sizes, options),
``context.py`` (the run state), ``timing.py`` (step timing, FLOPs, MFU), ``helpers.py`` (device and peak memory),
``phases/`` (one module per phase), ``runner.py`` (the guarded, timed phase runner), ``summary.py``, ``wheels.py``
(``--download_wheels``) and ``main.py`` (the command line). This file puts the repository and the package on
``sys.path``, re-exports the package's names (as the single-file script had them) and runs its ``main``.
"""
from __future__ import annotations

import sys
from pathlib import Path

for _path in (Path(__file__).resolve().parents[1], Path(__file__).resolve().parent):  # the repo, then scripts/
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from gpu_check import *  # noqa: E402,F403 - the package's API, importable from this file as before
from gpu_check.main import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
