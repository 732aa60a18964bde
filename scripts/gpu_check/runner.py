"""The phase runner: each phase timed and guarded, the time budget, the JSON rewritten after every phase."""
from __future__ import annotations

import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

from .context import Context


def run_phases(ctx: Context, results: dict[str, Any], phases: dict[str, tuple[Callable, tuple[str, ...]]],
               write: Callable[[], None] = lambda: None, clock: Callable[[], float] = time.perf_counter,
               meter: Any = None) -> None:
    """Run each phase timed and guarded (an exception is recorded, the next phase runs), skip those that would start
    past the time budget or whose prerequisites did not succeed; `write` after every phase."""
    started = clock()
    wanted = ctx.opts.phases or list(phases)
    for name, (function, needs) in phases.items():
        if name not in wanted:
            continue
        elapsed = clock() - started
        record: dict[str, Any]
        failed_needs = [n for n in needs if results["phases"].get(n, {}).get("status") != "ok"]
        if elapsed > ctx.opts.budget_s:
            record = {"status": "skipped", "reason": f"time budget: {elapsed:.0f} s used of {ctx.opts.budget_s:.0f} s"}
        elif failed_needs:
            record = {"status": "skipped", "reason": f"needs {', '.join(failed_needs)}"}
        else:
            print(f"\n=== gpu_check: {name} (at {elapsed:.0f} s)", flush=True)
            phase_start = clock()
            try:
                ctx.release_for(name)
                if meter is not None:
                    meter.reset()
                record = {"status": "ok", **(function(ctx) or {})}
            except Exception as error:  # noqa: BLE001 - every failure is recorded, the other phases still run
                record = {"status": "failed", "error": f"{type(error).__name__}: {error}"[:2000],
                          "traceback": traceback.format_exc()[-3000:]}
                print(record["traceback"], file=sys.stderr, flush=True)
            record["seconds"] = clock() - phase_start
            if meter is not None:
                try:
                    for key, value in meter.read().items():
                        record.setdefault(key, value)  # a phase may report its own figure
                except Exception as error:  # noqa: BLE001
                    record["memory_error"] = f"{type(error).__name__}: {error}"
        results["phases"][name] = record
        results["total_seconds"] = clock() - started
        write()
