"""Which points a pruning sweep visits: an explicit grid (``fractions`` or ``ns``) or the default walk over layer
counts n = 1, 2, ... that stops once the paper's rule has failed ``walk_stop_after`` (2) times in a row.

Why a walk: fractions of the decoder cannot hit the paper's points in general (14/32 or 1/16 are no multiple of
0.1), while the rule's answer is a layer count; walking n one layer at a time finds the largest passing n exactly,
and the two-failure stop lets one noisy failing point (the curves need not be monotone) be followed by a pass.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal, TypeVar

__all__ = ["DEFAULT_WALK_STOP_AFTER", "GridError", "explicit_grid", "visit_points", "walk_layer_counts"]

DEFAULT_WALK_STOP_AFTER = 2
"""Consecutive failing points after which the default walk stops (the paper's "failed twice in a row")."""

PointKind = Literal["fraction", "n"]
PointT = TypeVar("PointT")  # the sweep passes SweepPoint; tests may pass anything


class GridError(ValueError):
    """A bad sweep grid: both ``fractions`` and ``ns``, or a value out of range."""


def explicit_grid(fractions: Sequence[float] | None, ns: Sequence[int] | None
                  ) -> list[tuple[PointKind, float | int]] | None:
    """The given grid as ``("fraction", f)`` / ``("n", n)`` points in the given order; None when neither
    ``fractions`` nor ``ns`` is given (the sweep then walks n = 1, 2, ...: :func:`walk_layer_counts`)."""
    if fractions is not None and ns is not None:
        raise GridError(f"sweep.fractions and sweep.ns are mutually exclusive: give one of them, or neither to walk "
                        f"n = 1, 2, ... (got fractions={list(fractions)}, ns={list(ns)})")
    if ns is not None:
        bad = [n for n in ns if isinstance(n, bool) or not isinstance(n, int) or n < 1]
        if bad or not ns:
            raise GridError(f"sweep.ns must be a non-empty list of positive ints, got {list(ns)}")
        return [("n", n) for n in ns]
    if fractions is not None:
        bad = [f for f in fractions if not 0.0 < float(f) < 1.0]
        if bad or not fractions:
            raise GridError(f"sweep.fractions must be a non-empty list of values in (0, 1), got {list(fractions)}")
        return [("fraction", float(f)) for f in fractions]
    return None


def walk_layer_counts(num_layers: int, run_point: Callable[[int], PointT], passes: Callable[[PointT], bool],
                      stop_after: int = DEFAULT_WALK_STOP_AFTER) -> list[PointT]:
    """Run ``run_point(n)`` for n = 1, 2, ..., num_layers - 1 (at least one layer stays) and stop after
    ``stop_after`` consecutive points that fail ``passes``; returns the points run, in order."""
    if stop_after < 1:
        raise GridError(f"sweep.walk_stop_after must be >= 1, got {stop_after}")
    points, failures = [], 0
    for n in range(1, num_layers):
        point = run_point(n)
        points.append(point)
        failures = 0 if passes(point) else failures + 1
        if failures >= stop_after:
            break
    return points


def visit_points(grid: list[tuple[PointKind, float | int]] | None, num_layers: int,
                 run_point: Callable[[PointKind, float | int], PointT], passes: Callable[[PointT], bool],
                 stop_after: int = DEFAULT_WALK_STOP_AFTER) -> list[PointT]:
    """Every point of an explicit ``grid``, or (``grid`` None) the walk over n of :func:`walk_layer_counts`."""
    if grid is not None:
        return [run_point(kind, value) for kind, value in grid]
    return walk_layer_counts(num_layers, lambda n: run_point("n", n), passes, stop_after)

