"""The sweep's outputs: ``sweep.csv``, ``sweep.md``, ``sweep.json`` and ``sweep.png``, and the printed verdicts.

:func:`write_outputs` writes all four for a :class:`~lightning_speechllm.evaluation.sweep.table.SweepTable`;
:func:`describe_choice` states the rule and its outcome, :func:`describe_test` the test-set scores of
:func:`~lightning_speechllm.evaluation.sweep.run.score_chosen_on_test`. Imports
:mod:`~lightning_speechllm.evaluation.sweep.table` (never :mod:`~lightning_speechllm.evaluation.sweep.run`, which
imports this module); matplotlib only inside :func:`plot_curves`.
"""
from __future__ import annotations

import csv
import io
import math
from dataclasses import asdict
from pathlib import Path
from typing import Any

from lightning_speechllm.evaluation.sweep.table import (
    COUNT_METRIC,
    METRICS,
    SweepError,
    SweepPoint,
    SweepTable,
    Thresholds,
    passes,
    relative_change,
    scores_from_json,
)
from lightning_speechllm.io_utils import atomic_write_text, write_json

__all__ = ["describe_choice", "describe_test", "format_markdown", "plot_curves", "write_csv", "write_outputs"]


def describe_test(result: dict[str, Any]) -> str:
    """The scores of :func:`score_chosen_on_test`, one line per set and metric: baseline -> chosen (relative change)."""
    baseline, final = scores_from_json(result["baseline"]) or {}, scores_from_json(result["chosen"]) or {}
    lines = [f"test sets (scored once, after the rule chose {result['requested']} on the validation sets; "
             f"layers {result['removed_layers']}{', healed again' if result['healed'] else ''}):"]
    for name in sorted(baseline):
        for metric in METRICS:
            if metric in baseline[name]:
                base, value = baseline[name][metric], final.get(name, {}).get(metric, math.nan)
                count = baseline[name].get(COUNT_METRIC)  # absent from results of earlier versions
                lines.append(f"  {name} {metric}: {base:.2f} -> {value:.2f} "
                             f"({100 * relative_change(value, base):+.1f}%)"
                             + ("" if count is None else f" on {int(count)} utterances"))
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ outputs
def _columns(table: SweepTable) -> list[str]:
    columns = ["method", "requested", "n", "removed_fraction", "removed_layers", "passes"]
    stages = ("before", "after") if table.healed else ("before",)
    for name, metric in table.set_metrics():
        for stage in stages:
            columns += [f"{name}/{metric}_{stage}", f"{name}/rel_d{metric}_{stage}"]
    return columns


def _rows(table: SweepTable, thresholds: Thresholds) -> list[dict[str, Any]]:
    base_row: dict[str, Any] = {"method": "baseline", "requested": "", "n": 0, "removed_fraction": 0.0,
                                "removed_layers": "", "passes": ""}
    for name, metric in table.set_metrics():
        for stage in ("before", "after"):
            base_row[f"{name}/{metric}_{stage}"] = table.baseline[name][metric]
            base_row[f"{name}/rel_d{metric}_{stage}"] = 0.0
    rows = [base_row]
    for point in sorted(table.points, key=lambda p: (p.removed_fraction, str(p.value))):
        row: dict[str, Any] = {"method": point.method, "requested": f"{point.kind}={point.value:g}", "n": point.n,
                               "removed_fraction": point.removed_fraction,
                               "removed_layers": " ".join(str(i) for i in point.removed_layers),
                               "passes": passes(point, table.baseline, thresholds)[0]}
        for name, metric in table.set_metrics():
            for stage, scores in (("before", point.before), ("after", point.after)):
                value = (scores or {}).get(name, {}).get(metric, math.nan)
                row[f"{name}/{metric}_{stage}"] = value
                row[f"{name}/rel_d{metric}_{stage}"] = relative_change(value, table.baseline[name][metric])
        rows.append(row)
    return rows


def _fmt(value: Any, percent: bool = False) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        return f"{100 * value:+.1f}%" if percent else f"{value:.2f}"
    return str(value)


def write_csv(table: SweepTable, path: str | Path, thresholds: Thresholds = Thresholds()) -> Path:
    """One row per point (and the baseline first), columns from :func:`_columns`; empty cells for NaN."""
    columns = _columns(table)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in _rows(table, thresholds):
        writer.writerow({k: ("" if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()})
    return atomic_write_text(buffer.getvalue(), path)


def format_markdown(table: SweepTable, thresholds: Thresholds = Thresholds(),
                    chosen: SweepPoint | None = None) -> str:
    """The sweep as a Markdown table plus the rule's verdict."""
    columns = _columns(table)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in _rows(table, thresholds):
        lines.append("| " + " | ".join(_fmt(row.get(c, ""), percent="/rel_d" in c) for c in columns) + " |")
    lines.append("")
    lines.append(describe_choice(table, thresholds, chosen))
    return "\n".join(lines) + "\n"


def describe_choice(table: SweepTable, thresholds: Thresholds, chosen: SweepPoint | None) -> str:
    """One sentence stating the rule and its outcome."""
    judged = "after healing" if table.healed else "without healing"
    rule = (f"rule: largest removed fraction with relative WER increase <= {thresholds.max_rel_wer_increase:.0%} on "
            f"every ASR set and relative BLEU drop <= {thresholds.max_rel_bleu_drop:.0%} on every AST set, {judged}")
    if chosen is None:
        return f"No sweep point passes ({rule})."
    return (f"Chosen: remove {chosen.n}/{chosen.num_layers} layers ({chosen.removed_fraction:.1%}), layers "
            f"{chosen.removed_layers} ({rule}).")


def plot_curves(table: SweepTable, path: str | Path, thresholds: Thresholds = Thresholds(),
                chosen: SweepPoint | None = None) -> Path:
    """WER/BLEU vs removed fraction per set: before (and after) healing, the baseline and the allowed band."""
    from matplotlib.figure import Figure

    from lightning_speechllm.redundancy.plots import save_figure

    pairs = table.set_metrics()
    if not pairs:
        raise SweepError("nothing to plot: the baseline has no WER/BLEU")
    figure = Figure(figsize=(4.2 * len(pairs), 3.4), layout="tight")
    axes = figure.subplots(1, len(pairs), squeeze=False)
    points = sorted(table.points, key=lambda p: p.removed_fraction)
    for ax, (name, metric) in zip(axes[0], pairs):
        base = table.baseline[name][metric]
        xs = [0.0] + [p.removed_fraction for p in points]
        before = [base] + [p.before.get(name, {}).get(metric, math.nan) for p in points]
        ax.plot(xs, before, "o-", label="pruned")
        if table.healed:
            after = [base] + [(p.after or {}).get(name, {}).get(metric, math.nan) for p in points]
            ax.plot(xs, after, "s--", label="pruned + healed")
        ax.axhline(base, color="grey", lw=1, label="baseline")
        if metric == "wer":
            ax.axhspan(base, base * (1 + thresholds.max_rel_wer_increase), color="green", alpha=0.12,
                       label=f"allowed (+{thresholds.max_rel_wer_increase:.0%})")
        else:
            ax.axhspan(base * (1 - thresholds.max_rel_bleu_drop), base, color="green", alpha=0.12,
                       label=f"allowed (-{thresholds.max_rel_bleu_drop:.0%})")
        if chosen is not None:
            ax.axvline(chosen.removed_fraction, color="red", ls=":", lw=1, label="chosen")
        ax.set_xlabel("fraction of decoder layers removed")
        ax.set_ylabel(f"{metric.upper()} (%)")
        ax.set_title(name)
        ax.legend(fontsize=7)
    save_figure(figure, path, dpi=110)
    return Path(path)


def write_outputs(table: SweepTable, out_dir: str | Path, thresholds: Thresholds = Thresholds(),
                  chosen: SweepPoint | None = None) -> dict[str, Path]:
    """``sweep.csv``, ``sweep.md``, ``sweep.json`` (table, thresholds, chosen) and ``sweep.png`` in ``out_dir``."""
    out = Path(out_dir)
    paths = {"csv": write_csv(table, out / "sweep.csv", thresholds),
             "md": atomic_write_text(format_markdown(table, thresholds, chosen), out / "sweep.md")}
    summary = table.to_dict()
    summary["thresholds"] = asdict(thresholds)
    summary["chosen"] = None if chosen is None else {
        "n": chosen.n, "removed_fraction": chosen.removed_fraction, "removed_layers": chosen.removed_layers,
        "requested": f"{chosen.kind}={chosen.value:g}"}
    summary["rule"] = describe_choice(table, thresholds, chosen)
    paths["json"] = write_json(summary, out / "sweep.json")
    if table.set_metrics():
        paths["png"] = plot_curves(table, out / "sweep.png", thresholds, chosen)
    return paths
