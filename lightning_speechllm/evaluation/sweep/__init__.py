"""The pruning sweep (the ``sweep`` command): score a SpeechLLM at several pruning sizes, optionally heal each, and
apply the paper's stopping rule.

* :mod:`~lightning_speechllm.evaluation.sweep.run`: runs the sweep (evaluate, heal, resume) and scores the chosen
  point on the test sets;
* :mod:`~lightning_speechllm.evaluation.sweep.table`: the table, its JSON form and the stopping rule;
* :mod:`~lightning_speechllm.evaluation.sweep.report`: the outputs (csv, md, json, png) and the printed verdicts;
* :mod:`~lightning_speechllm.evaluation.sweep.grid`: the points visited (explicit grid, or the walk over n);
* :mod:`~lightning_speechllm.evaluation.sweep.common`: what the sweep and the method comparison share;
* :mod:`~lightning_speechllm.evaluation.sweep.cli`: the ``sweep`` command.

Every name of ``__all__`` is importable from here. They are loaded on first use (PEP 562), so that importing the
light modules (``table``, ``grid``: the error and the rule, needed by ``evaluation.resume_key``,
``evaluation.failure_modes`` and ``evaluation.report``) never loads the runner and its torch / Lightning / model
imports, nor runs into the runner importing those modules back.
"""
from __future__ import annotations

from importlib import import_module
from typing import Any

# Each public name, and the submodule that defines it.
_SOURCES: dict[str, str] = {
    **dict.fromkeys(("SweepConfig", "build_plan", "evaluate", "healed", "point_name", "run_sweep",
                     "score_chosen_on_test"), "run"),
    **dict.fromkeys(("COUNT_METRIC", "FAILURE_METRICS", "METRICS", "SWEEP_FORMAT_VERSION", "Scores", "SweepError",
                     "SweepPoint", "SweepTable", "Thresholds", "choose_fraction", "choose_point", "passes",
                     "relative_change", "scores_from_json", "scores_to_json"), "table"),
    **dict.fromkeys(("describe_choice", "describe_test", "format_markdown", "plot_curves", "write_csv",
                     "write_outputs"), "report"),
    **dict.fromkeys(("DEFAULT_WALK_STOP_AFTER", "GridError", "explicit_grid", "visit_points", "walk_layer_counts"),
                    "grid"),
    **dict.fromkeys(("COMPARISON_METHODS", "require_unpruned"), "common"),
}

__all__ = sorted(_SOURCES)


def __getattr__(name: str) -> Any:
    source = _SOURCES.get(name)
    if source is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f"{__name__}.{source}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
