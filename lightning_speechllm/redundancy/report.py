"""JSON and CSV writing of redundancy results (NaN-safe, atomic writes, readable errors).

Below ``analysis`` (which imports it): nothing here imports ``analysis``; :func:`write_summary_csv` reads any object
with :class:`SummaryRow`'s attributes, such as ``analysis.RedundancyResult``."""
from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from io import StringIO
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from lightning_speechllm.io_utils import atomic_write_text, read_json, write_json  # noqa: F401 (re-exported)


class SummaryRow(Protocol):
    """What :func:`write_summary_csv` reads of a redundancy result."""

    model_id: str
    set_name: str
    modality: str
    token_selection: str
    reduction: str
    epoch: int | None
    num_layers: int
    num_samples: int
    table: np.ndarray
    path: list[int]
    bi_ranking: list[int]


def array_to_json(array: np.ndarray) -> list:
    """Nested lists of floats with NaN/inf written as ``None`` (JSON has no NaN)."""
    values = np.asarray(array, dtype=float)
    return np.where(np.isfinite(values), values, None).tolist()


def array_from_json(data: Any, where: str = "<json>") -> np.ndarray:
    """Inverse of :func:`array_to_json`: ``None`` becomes NaN; ``where`` names the source in errors."""
    try:
        return np.array(data, dtype=float)  # None -> nan
    except (TypeError, ValueError) as error:
        raise ValueError(f"{where}: not a rectangular numeric array ({error})") from error


def _cell(value: float) -> str:
    return "" if value is None or not math.isfinite(value) else repr(float(value))


def write_table_csv(
    table: np.ndarray,
    path: str | Path,
    ci_low: np.ndarray | None = None,
    ci_high: np.ndarray | None = None,
) -> Path:
    """Long-format CSV ``l, n, d, ci_low, ci_high`` of the defined cells (``l + n <= L``) of a table.

    Missing CIs are written as empty fields.
    """
    table = np.asarray(table, dtype=float)
    num_layers = table.shape[0]
    lines = [["l", "n", "d", "ci_low", "ci_high"]]
    for block in range(1, num_layers + 1):
        for first in range(0, num_layers - block + 1):
            row = block - 1
            lines.append([str(first), str(block), _cell(table[row, first]),
                          "" if ci_low is None else _cell(ci_low[row, first]),
                          "" if ci_high is None else _cell(ci_high[row, first])])
    return _write_csv(lines, path)


def _write_csv(lines: list[list[str]], path: str | Path) -> Path:
    buffer = StringIO()
    csv.writer(buffer, lineterminator="\n").writerows(lines)
    return atomic_write_text(buffer.getvalue(), path)


def write_summary_csv(results: Sequence[SummaryRow], path: str | Path) -> Path:
    """One row per result: ids, sample count, best block of each size, and the BI ranking.

    Columns: model_id, set_name, modality, token_selection, reduction, epoch, num_layers, num_samples,
    path (``l*(1) l*(2) …``), min_d_per_n (``d(l*(n), n)`` per n), bi_ranking.
    """
    lines = [["model_id", "set_name", "modality", "token_selection", "reduction", "epoch", "num_layers",
              "num_samples", "path", "min_d_per_n", "bi_ranking"]]
    for result in results:
        best = [result.table[block - 1, first] for block, first in enumerate(result.path, start=1)]
        lines.append([result.model_id, result.set_name, result.modality, result.token_selection,
                      result.reduction, "" if result.epoch is None else str(result.epoch),
                      str(result.num_layers), str(result.num_samples),
                      " ".join(str(first) for first in result.path),
                      " ".join(f"{value:.6f}" for value in best),
                      " ".join(str(layer) for layer in result.bi_ranking)])
    return _write_csv(lines, path)
