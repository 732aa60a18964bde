"""The sweep's data and the paper's stopping rule: scores, points, the table and its JSON form, and the rule.

:class:`SweepPoint` / :class:`SweepTable` (with ``to_dict`` / ``from_dict``), :class:`Thresholds`,
:func:`relative_change`, :func:`passes`, :func:`choose_point` / :func:`choose_fraction` (Moumen et al., 2026: the
largest removed fraction within ``max_rel_wer_increase`` on every ASR set and ``max_rel_bleu_drop`` on every
translation set) and :class:`SweepError`. Pure data and arithmetic: imports neither
:mod:`~lightning_speechllm.evaluation.sweep.run` nor :mod:`~lightning_speechllm.evaluation.sweep.report`, nor torch or
Lightning.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

__all__ = [
    "COUNT_METRIC",
    "FAILURE_METRICS",
    "METRICS",
    "SWEEP_FORMAT_VERSION",
    "Scores",
    "SweepError",
    "SweepPoint",
    "SweepTable",
    "Thresholds",
    "choose_fraction",
    "choose_point",
    "passes",
    "relative_change",
    "scores_from_json",
    "scores_to_json",
]

SWEEP_FORMAT_VERSION = 1
METRICS = ("wer", "bleu")
FAILURE_METRICS = ("insertion_rate", "loop_rate", "empty_rate", "max_tokens_rate")
"""Failure-mode rates (percent; insertion_rate on ASR sets only) kept in the scores next to METRICS; only METRICS
feed the stopping rule."""
COUNT_METRIC = "utterances"
"""How many utterances a set's scores are of, kept next to METRICS: a limited number of batches scores a subset,
whose WER is not the set's. Never read by the rule."""
Scores = dict[str, dict[str, float]]
"""Per evaluation set, its metrics: ``{"clean": {"wer": 4.2}, "covost": {"bleu": 31.0}}`` (percent; may also hold
FAILURE_METRICS and COUNT_METRIC)."""


class SweepError(ValueError):
    """A bad sweep configuration, or a point file that does not belong to this sweep."""


# ------------------------------------------------------------------------------------------------- the table
@dataclass
class SweepPoint:
    """One pruned model: its plan and its scores before and (when healed) after healing."""

    method: str
    value: float | int
    """The requested fraction or n."""
    kind: Literal["fraction", "n"]
    n: int
    num_layers: int
    removed_layers: list[int]
    before: Scores
    after: Scores | None = None
    heal_steps: int = 0

    @property
    def removed_fraction(self) -> float:
        """Share of the decoder layers removed: n / num_layers."""
        return self.n / self.num_layers

    @property
    def final(self) -> Scores:
        """The scores the rule judges: after healing when healing ran, else before."""
        return self.after if self.after is not None else self.before

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["before"], data["after"] = scores_to_json(self.before), scores_to_json(self.after)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "<dict>") -> "SweepPoint":
        try:
            return cls(method=data["method"], value=data["value"], kind=data["kind"], n=int(data["n"]),
                       num_layers=int(data["num_layers"]), removed_layers=[int(i) for i in data["removed_layers"]],
                       before=scores_from_json(data["before"]), after=scores_from_json(data.get("after")),
                       heal_steps=int(data.get("heal_steps", 0)))
        except KeyError as error:
            raise SweepError(f"{source}: missing key {error.args[0]!r}") from error


@dataclass
class SweepTable:
    """The baseline scores and every sweep point."""

    baseline: Scores
    num_layers: int
    points: list[SweepPoint] = field(default_factory=list)

    @property
    def healed(self) -> bool:
        return any(point.after is not None for point in self.points)

    def set_metrics(self) -> list[tuple[str, str]]:
        """``(set, metric)`` pairs of the baseline, sorted by set name, WER before BLEU."""
        return [(name, metric) for name in sorted(self.baseline) for metric in METRICS if metric in self.baseline[name]]

    def to_dict(self) -> dict[str, Any]:
        return {"format_version": SWEEP_FORMAT_VERSION, "baseline": scores_to_json(self.baseline),
                "num_layers": self.num_layers, "points": [point.to_dict() for point in self.points]}

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "<dict>") -> "SweepTable":
        if data.get("format_version") != SWEEP_FORMAT_VERSION:
            raise SweepError(f"{source}: unsupported format_version {data.get('format_version')!r}, "
                             f"expected {SWEEP_FORMAT_VERSION}")
        points = [SweepPoint.from_dict(p, f"{source}: points[{i}]") for i, p in enumerate(data.get("points", []))]
        return cls(baseline=scores_from_json(data["baseline"]) or {}, num_layers=int(data["num_layers"]),
                   points=points)


def scores_to_json(scores: Scores | None) -> dict | None:
    """``scores`` as JSON: a non-finite score (NaN, inf) becomes ``None``; ``None`` stays ``None``."""
    if scores is None:
        return None
    return {name: {k: (v if math.isfinite(v) else None) for k, v in metrics.items()}
            for name, metrics in scores.items()}


def scores_from_json(data: dict | None) -> Scores | None:
    """The inverse of :func:`scores_to_json`: ``None`` scores read back as NaN, every score as a float."""
    if data is None:
        return None
    return {name: {k: (math.nan if v is None else float(v)) for k, v in metrics.items()}
            for name, metrics in data.items()}


# ---------------------------------------------------------------------------------------------- the rule
@dataclass
class Thresholds:
    """The stopping rule's tolerances, relative to the unpruned baseline."""

    max_rel_wer_increase: float = 0.25
    """Largest allowed (WER - WER_base) / WER_base on every ASR set."""
    max_rel_bleu_drop: float = 0.10
    """Largest allowed (BLEU_base - BLEU) / BLEU_base on every translation set."""


def relative_change(value: float, baseline: float) -> float:
    """``(value - baseline) / baseline``; with a zero baseline 0 when equal, else ±inf; NaN stays NaN."""
    if math.isnan(value) or math.isnan(baseline):
        return math.nan
    if baseline == 0:
        return 0.0 if value == 0 else math.copysign(math.inf, value)
    return (value - baseline) / baseline


def _metric_passes(metric: str, change: float, thresholds: Thresholds) -> bool:
    if math.isnan(change):
        return False
    if metric == "wer":
        return change <= thresholds.max_rel_wer_increase + 1e-12
    return -change <= thresholds.max_rel_bleu_drop + 1e-12


def passes(point: SweepPoint, baseline: Scores, thresholds: Thresholds = Thresholds()) -> tuple[bool, list[str]]:
    """Whether ``point`` (its :attr:`~SweepPoint.final` scores) meets the rule on every set of ``baseline``; the
    second item lists the failures (``"clean wer +31.0%"``, ``"covost bleu missing"``)."""
    failures = []
    for name in sorted(baseline):
        for metric in METRICS:
            if metric not in baseline[name]:
                continue
            value = point.final.get(name, {}).get(metric)
            if value is None:
                failures.append(f"{name} {metric} missing")
                continue
            change = relative_change(value, baseline[name][metric])
            if not _metric_passes(metric, change, thresholds):
                failures.append(f"{name} {metric} {100 * change:+.1f}%")
    return not failures, failures


def choose_point(table: SweepTable, thresholds: Thresholds = Thresholds()) -> SweepPoint | None:
    """The paper's stopping rule: the point with the largest removed fraction that passes :func:`passes`.

    This is "largest passing", not "last before the first failure": on a non-monotone curve (say 20% fails, 30%
    passes) the 30% point is chosen. None when no point passes (or the baseline has no WER/BLEU).
    """
    if not table.set_metrics():
        return None
    passing = [point for point in table.points if passes(point, table.baseline, thresholds)[0]]
    return max(passing, key=lambda point: point.removed_fraction, default=None)


def choose_fraction(table: SweepTable, thresholds: Thresholds = Thresholds()) -> float | None:
    """The removed fraction (n / num_layers) of :func:`choose_point`, or None when no point passes."""
    point = choose_point(table, thresholds)
    return None if point is None else point.removed_fraction
