"""Pure analysis of angular-distance tables: pruning path, BI ranking, bootstrap CIs, agreement statistics.

Tables follow the layout of :class:`~lightning_speechllm.redundancy.metrics.AngularDistanceMetric`:
``[L, L]``, row ``n-1`` = block size ``n``, column ``l`` = first layer, NaN where ``l + n > L``.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args

import numpy as np
import torch
from scipy.stats import rankdata, spearmanr

from lightning_speechllm.io_utils import read_json, write_json
from lightning_speechllm.redundancy import report

ArrayLike = Union[np.ndarray, torch.Tensor, list]
Modality = Literal["speech", "text"]
FORMAT_VERSION = 1


def as_table(table: ArrayLike, name: str = "table") -> np.ndarray:
    """``table`` as a square float64 numpy array, with a clear error otherwise."""
    array = table.detach().cpu().double().numpy() if isinstance(table, torch.Tensor) else np.asarray(table, float)
    if array.ndim != 2 or array.shape[0] != array.shape[1] or array.shape[0] < 1:
        raise ValueError(f"{name} must be a square [L, L] table (row n-1, column l), got shape {array.shape}")
    return array


def valid_cells(num_layers: int) -> np.ndarray:
    """Boolean ``[L, L]`` mask of the defined cells (``l + n <= L``) of a table."""
    block = np.arange(1, num_layers + 1)[:, None]
    first = np.arange(num_layers)[None, :]
    return first + block <= num_layers


def pruning_path(table: ArrayLike) -> list[int]:
    """``l*(n) = argmin_l d(l, n)`` for ``n = 1..L`` (list index ``n-1``); ties go to the smallest ``l``."""
    array = as_table(table)
    valid = valid_cells(array.shape[0])
    bad = valid & ~np.isfinite(array)
    if bad.any():
        row, col = np.argwhere(bad)[0]
        raise ValueError(f"table has a non-finite value in a defined cell: n={row + 1}, l={col}")
    masked = np.where(valid, array, np.inf)
    return [int(index) for index in np.argmin(masked, axis=1)]


def block_influence_ranking(block_influence: ArrayLike) -> list[int]:
    """Layer indices ordered from least to most influential (prune from the front); ties keep layer order."""
    values = block_influence.detach().cpu().double().numpy() if isinstance(block_influence, torch.Tensor) \
        else np.asarray(block_influence, float)
    if values.ndim != 1 or not np.isfinite(values).all():
        raise ValueError(f"block_influence must be a finite 1-D array [L], got shape {values.shape}")
    return [int(index) for index in np.argsort(values, kind="stable")]


def bootstrap_ci(
    per_sample_tables: ArrayLike,
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Percentile bootstrap CI of the mean table over utterances, per cell.

    ``per_sample_tables`` is ``[S, L, L]``; utterances are resampled with replacement (multinomial
    counts, so all ``n_boot`` resampled means are one matrix product). Returns ``(low, high)``, each
    ``[L, L]``, NaN where ``l + n > L``.
    """
    tables = per_sample_tables.detach().cpu().double().numpy() if isinstance(per_sample_tables, torch.Tensor) \
        else np.asarray(per_sample_tables, float)
    if tables.ndim != 3 or tables.shape[1] != tables.shape[2] or tables.shape[0] < 1:
        raise ValueError(f"per_sample_tables must be [S, L, L] with S >= 1, got shape {tables.shape}")
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    num_samples, num_layers = tables.shape[0], tables.shape[1]
    valid = valid_cells(num_layers)
    values = tables[:, valid]  # [S, V]
    if not np.isfinite(values).all():
        sample, cell = np.argwhere(~np.isfinite(values))[0]
        raise ValueError(f"per_sample_tables[{sample}] has a non-finite value in defined cell #{cell}")
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(num_samples, np.full(num_samples, 1.0 / num_samples), size=n_boot)  # [n_boot, S]
    means = counts @ values / num_samples  # [n_boot, V]
    low_values, high_values = np.quantile(means, [alpha / 2, 1 - alpha / 2], axis=0)
    low = np.full((num_layers, num_layers), np.nan)
    high = np.full((num_layers, num_layers), np.nan)
    low[valid], high[valid] = low_values, high_values
    return low, high


def spearman_rho(table_a: ArrayLike, table_b: ArrayLike) -> float:
    """Spearman rank correlation of two tables over the cells defined and finite in both."""
    a, b = as_table(table_a, "table_a"), as_table(table_b, "table_b")
    if a.shape != b.shape:
        raise ValueError(f"tables differ in shape: {a.shape} vs {b.shape}")
    keep = valid_cells(a.shape[0]) & np.isfinite(a) & np.isfinite(b)
    if keep.sum() < 2:
        raise ValueError(f"need >= 2 common defined cells for a rank correlation, got {int(keep.sum())}")
    return float(spearmanr(a[keep], b[keep]).statistic)


@dataclass(frozen=True)
class PathAgreement:
    """Agreement of two pruning paths over block sizes ``n = 1..L``.

    ``exact``: share of n where both paths pick the same block; ``overlap``: share of n where the two
    blocks ``[l, l+n)`` share at least one layer; ``mean_jaccard``: mean layer-set IoU of the two blocks.
    """

    exact: float
    overlap: float
    mean_jaccard: float


def path_agreement(path_a: list[int], path_b: list[int]) -> PathAgreement:
    """Compare two pruning paths (``path[n-1] = l*(n)``) of the same model."""
    if len(path_a) != len(path_b) or not path_a:
        raise ValueError(f"paths must be non-empty and of equal length, got {len(path_a)} and {len(path_b)}")
    exact, overlap, jaccard = [], [], []
    for block, (first_a, first_b) in enumerate(zip(path_a, path_b), start=1):
        shared = max(0, min(first_a, first_b) + block - max(first_a, first_b))
        exact.append(first_a == first_b)
        overlap.append(shared > 0)
        jaccard.append(shared / (2 * block - shared))
    return PathAgreement(float(np.mean(exact)), float(np.mean(overlap)), float(np.mean(jaccard)))


def _array_equal(a: np.ndarray | None, b: np.ndarray | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return a.shape == b.shape and bool(np.array_equal(a, b, equal_nan=True))


def per_sample_digest(tables: np.ndarray, keys: np.ndarray | None) -> str:
    """SHA-256 of per-utterance tables (float64) and their keys (int64): the JSON records it, so a
    ``<stem>_per_sample.npy`` left over from another run is recognised as stale."""
    digest = hashlib.sha256(np.ascontiguousarray(tables, dtype=np.float64).tobytes())
    if keys is not None:
        digest.update(np.ascontiguousarray(keys, dtype=np.int64).tobytes())
    return digest.hexdigest()


def per_sample_path(json_path: str | Path) -> Path:
    """Where the per-utterance tables of the map ``<stem>.json`` live: ``<stem>_per_sample.npy`` beside it."""
    path = Path(json_path)
    return path.with_name(f"{path.stem}_per_sample.npy")


@dataclass(eq=False)
class RedundancyResult:
    """Everything measured for one (model, data set, modality, token selection): the pruning-plan input.

    ``table``/``ci_low``/``ci_high`` are ``[L, L]`` (row n-1 = block size n, column l = first layer,
    NaN where ``l + n > L``); ``path[n-1] = l*(n)``; ``block_influence[i]`` = BI of layer i;
    ``bi_ranking`` = layers from least to most influential. ``reduction`` says how tokens were averaged
    ("token" or "utterance"); CIs are always over utterances.
    """

    model_id: str
    num_layers: int
    token_selection: str
    set_name: str
    modality: Modality
    num_samples: int
    table: np.ndarray
    path: list[int]
    block_influence: np.ndarray
    bi_ranking: list[int]
    ci_low: np.ndarray | None = None
    ci_high: np.ndarray | None = None
    epoch: int | None = None
    reduction: str = "token"
    extra: dict[str, Any] = field(default_factory=dict)
    per_sample_tables: np.ndarray | None = field(default=None, repr=False)
    """``[S, L, L]`` per-utterance tables when measured with them (not in the JSON: :meth:`save_per_sample` writes
    them beside it, where ``compare`` finds them for bootstrap CIs of the agreement)."""
    per_sample_keys: np.ndarray | None = field(default=None, repr=False)
    """``[S]`` int64 utterance keys of those rows, in row order (in the JSON): maps of the same utterances pair up."""
    per_sample_sha256: str | None = None
    """:func:`per_sample_digest` of the per-utterance tables and keys (in the JSON)."""

    def __post_init__(self) -> None:
        if self.modality not in get_args(Modality):
            raise ValueError(f"modality must be one of {get_args(Modality)}, got {self.modality!r}")
        self.table = as_table(self.table)
        self.block_influence = np.asarray(self.block_influence, float)
        self.ci_low = None if self.ci_low is None else as_table(self.ci_low, "ci_low")
        self.ci_high = None if self.ci_high is None else as_table(self.ci_high, "ci_high")
        shapes = {"table": self.table.shape, "ci_low": None if self.ci_low is None else self.ci_low.shape,
                  "ci_high": None if self.ci_high is None else self.ci_high.shape}
        for name, shape in shapes.items():
            if shape is not None and shape != (self.num_layers, self.num_layers):
                raise ValueError(f"{name} has shape {shape}, expected ({self.num_layers}, {self.num_layers})")
        if self.per_sample_keys is not None:
            self.per_sample_keys = np.asarray(self.per_sample_keys, dtype=np.int64)
            if self.per_sample_tables is not None and len(self.per_sample_keys) != len(self.per_sample_tables):
                raise ValueError(f"per_sample_keys has {len(self.per_sample_keys)} entries for "
                                 f"{len(self.per_sample_tables)} per-sample tables")
        if self.per_sample_tables is not None and self.per_sample_sha256 is None:
            self.per_sample_sha256 = per_sample_digest(self.per_sample_tables, self.per_sample_keys)
        for name, size in (("path", len(self.path)), ("block_influence", self.block_influence.size),
                           ("bi_ranking", len(self.bi_ranking))):
            if size != self.num_layers:
                raise ValueError(f"{name} has {size} entries, expected num_layers = {self.num_layers}")

    @classmethod
    def from_tables(
        cls,
        table: ArrayLike,
        block_influence: ArrayLike,
        *,
        model_id: str,
        token_selection: str,
        set_name: str,
        modality: Modality,
        num_samples: int,
        per_sample_tables: ArrayLike | None = None,
        per_sample_keys: ArrayLike | None = None,
        epoch: int | None = None,
        reduction: str = "token",
        n_boot: int = 1000,
        alpha: float = 0.05,
        seed: int = 0,
        extra: dict[str, Any] | None = None,
    ) -> "RedundancyResult":
        """Build a result from a metric table and BI vector; derives path, ranking and (optionally) CIs."""
        array = as_table(table)
        ci_low = ci_high = None
        metadata = dict(extra or {})
        if per_sample_tables is not None:
            ci_low, ci_high = bootstrap_ci(per_sample_tables, n_boot=n_boot, alpha=alpha, seed=seed)
            metadata.update(ci_alpha=alpha, ci_n_boot=n_boot, ci_seed=seed)
        bi = block_influence.detach().cpu().double().numpy() if isinstance(block_influence, torch.Tensor) \
            else np.asarray(block_influence, float)
        return cls(model_id=model_id, num_layers=array.shape[0], token_selection=token_selection,
                   set_name=set_name, modality=modality, num_samples=num_samples, table=array,
                   path=pruning_path(array), block_influence=bi, bi_ranking=block_influence_ranking(bi),
                   ci_low=ci_low, ci_high=ci_high, epoch=epoch, reduction=reduction, extra=metadata,
                   per_sample_tables=None if per_sample_tables is None else np.asarray(
                       per_sample_tables.detach().cpu().double().numpy() if isinstance(per_sample_tables, torch.Tensor)
                       else per_sample_tables, float),
                   per_sample_keys=None if per_sample_tables is None or per_sample_keys is None
                   else np.asarray(per_sample_keys, dtype=np.int64))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, RedundancyResult):
            return NotImplemented
        scalars = ("model_id", "num_layers", "token_selection", "set_name", "modality", "num_samples",
                   "path", "bi_ranking", "epoch", "reduction", "extra", "per_sample_sha256")
        return (all(getattr(self, name) == getattr(other, name) for name in scalars)
                and _array_equal(self.table, other.table)
                and _array_equal(self.block_influence, other.block_influence)
                and _array_equal(self.ci_low, other.ci_low) and _array_equal(self.ci_high, other.ci_high)
                and _array_equal(self.per_sample_keys, other.per_sample_keys))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, self-describing dict (``format_version`` 1; NaN cells become ``null``)."""
        return {
            "format_version": FORMAT_VERSION,
            "kind": "lightning_speechllm.redundancy",
            "layout": {
                "table": "rows: block size n = 1..L (row n-1); columns: first layer l = 0..L-1; null where l+n > L",
                "d": "d(l, n) = arccos(cos(x^l, x^(l+n))) / pi on the pre-final-norm residual stream",
                "path": "path[n-1] = l*(n) = argmin_l d(l, n); pruning it removes layers l*(n) .. l*(n)+n-1",
                "block_influence": "BI_i = 1 - E_t[cos(x^i_t, x^(i+1)_t)] for layer i = 0..L-1",
                "bi_ranking": "layer indices from lowest to highest BI",
            },
            "model_id": self.model_id,
            "num_layers": self.num_layers,
            "token_selection": self.token_selection,
            "reduction": self.reduction,
            "set_name": self.set_name,
            "modality": self.modality,
            "num_samples": self.num_samples,
            "epoch": self.epoch,
            "path": list(self.path),
            "block_influence": report.array_to_json(self.block_influence),
            "bi_ranking": list(self.bi_ranking),
            "table": report.array_to_json(self.table),
            "ci_low": None if self.ci_low is None else report.array_to_json(self.ci_low),
            "ci_high": None if self.ci_high is None else report.array_to_json(self.ci_high),
            # rows of <stem>_per_sample.npy: their utterance keys in order, and a digest against stale files
            "per_sample_keys": None if self.per_sample_keys is None else [int(k) for k in self.per_sample_keys],
            "per_sample_sha256": self.per_sample_sha256,
            "extra": self.extra,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "<dict>") -> "RedundancyResult":
        """Inverse of :meth:`to_dict`; ``source`` names the file in error messages."""
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise ValueError(f"{source}: unsupported format_version {version!r}, expected {FORMAT_VERSION}")
        required = ("model_id", "num_layers", "token_selection", "set_name", "modality", "num_samples",
                    "table", "path", "block_influence", "bi_ranking")
        missing = [key for key in required if key not in data]
        if missing:
            raise KeyError(f"{source}: missing key(s) {missing}")

        def optional_table(key: str) -> np.ndarray | None:
            return None if data.get(key) is None else report.array_from_json(data[key], f"{source}:{key}")

        return cls(model_id=data["model_id"], num_layers=int(data["num_layers"]),
                   token_selection=data["token_selection"], set_name=data["set_name"],
                   modality=data["modality"], num_samples=int(data["num_samples"]),
                   table=report.array_from_json(data["table"], f"{source}:table"),
                   path=[int(v) for v in data["path"]],
                   block_influence=report.array_from_json(data["block_influence"], f"{source}:block_influence"),
                   bi_ranking=[int(v) for v in data["bi_ranking"]],
                   ci_low=optional_table("ci_low"), ci_high=optional_table("ci_high"),
                   epoch=data.get("epoch"), reduction=data.get("reduction", "token"),
                   extra=dict(data.get("extra") or {}),
                   per_sample_keys=None if data.get("per_sample_keys") is None
                   else np.asarray(data["per_sample_keys"], dtype=np.int64),
                   per_sample_sha256=data.get("per_sample_sha256"))

    def to_json(self, path: str | Path) -> Path:
        """Write the result as JSON (atomically); returns the path."""
        return write_json(self.to_dict(), path)

    def save_per_sample(self, json_path: str | Path) -> Path | None:
        """Write :attr:`per_sample_tables` to :func:`per_sample_path` of ``json_path`` (nothing without them)."""
        if self.per_sample_tables is None:
            return None
        target = per_sample_path(json_path)
        target.parent.mkdir(parents=True, exist_ok=True)
        np.save(target, self.per_sample_tables)
        return target

    @classmethod
    def from_json(cls, path: str | Path) -> "RedundancyResult":
        """Read a result written by :meth:`to_json`."""
        return cls.from_dict(read_json(path), source=str(path))

    def to_csv(self, path: str | Path) -> Path:
        """Write the defined cells in long format: columns ``l, n, d, ci_low, ci_high``."""
        return report.write_table_csv(self.table, path, ci_low=self.ci_low, ci_high=self.ci_high)


# ------------------------------------------------------------------------------------------ surrogate null
# Why not shuffle cells: d(l, n) is smooth in l (neighbouring blocks share n - 1 layers) and tied across n (a block's
# angle is built from its layers' own angles), and every map of a pre-norm LLM shares a generic shape (d grows with
# n, layer 0 and the last layer stand out, a trend with depth). A null that destroys that structure calls unrelated
# maps related. The surrogates below keep it and move only *which layer* carries which layer-specific deviation.
SATURATION_D = 0.45
"""Above this angular distance the additive scale :func:`additive_scale` continues linearly (``-log cos`` diverges at
d = 0.5, and real maps reach d > 0.5 between the embeddings and late layers)."""


def additive_scale(distance: ArrayLike) -> np.ndarray:
    """``q = -log cos(π d)``, continued linearly (same value and slope) above :data:`SATURATION_D`.

    Derivation: when the updates of a block are orthogonal to the stream and to each other (independent random
    increments), ``cos`` of the block's angle is the product of its layers' cosines, so ``q(l, n)`` is the *sum* of
    the layers' ``q(k, 1)``. ``q`` is strictly increasing in ``d``: ranks and argmins on it are those of ``d``."""
    d = np.asarray(distance, float)
    slope = np.pi * np.tan(np.pi * SATURATION_D)
    linear = -np.log(np.cos(np.pi * SATURATION_D)) + slope * (d - SATURATION_D)
    with np.errstate(invalid="ignore"):
        exact = -np.log(np.cos(np.pi * np.minimum(d, SATURATION_D)))
    return np.where(d <= SATURATION_D, exact, linear)


def block_design(num_layers: int) -> np.ndarray:
    """``[V, L]`` 0/1 matrix: row v (the v-th defined cell in row-major order of :func:`valid_cells`) marks the layers
    ``l .. l+n-1`` of its block."""
    rows, firsts = np.nonzero(valid_cells(num_layers))
    layers = np.arange(num_layers)[None, :]
    return ((layers >= firsts[:, None]) & (layers <= firsts[:, None] + rows[:, None])).astype(float)


@dataclass(frozen=True)
class LayerDecomposition:
    """A map on the additive scale, split as ``q = design @ contribution + remainder``.

    ``contribution[k]``: layer k's least-squares share of every block that contains it; ``remainder``: what is not
    additive over layers (saturation, interactions), kept in place by the surrogates. ``trend``: the smooth depth
    trend of the interior layers' ``log contribution`` (quadratic); ``deviation``: each interior layer's own
    log-factor around it. Layers 0 and L-1 are never moved: embeddings and last layer stand out in every LLM."""

    contribution: np.ndarray
    remainder: np.ndarray
    interior: np.ndarray
    trend: np.ndarray
    deviation: np.ndarray


def decompose_layers(table: ArrayLike) -> LayerDecomposition:
    """The :class:`LayerDecomposition` of one finite map (see :func:`surrogate_tables`)."""
    array = as_table(table)
    num_layers = array.shape[0]
    q = additive_scale(array[valid_cells(num_layers)])
    design = block_design(num_layers)
    contribution = np.linalg.lstsq(design, q, rcond=None)[0]
    remainder = q - design @ contribution
    interior = np.arange(1, num_layers - 1)
    if interior.size == 0:
        return LayerDecomposition(contribution, remainder, interior, np.zeros(0), np.zeros(0))
    # log: a layer's own strength multiplies the generic one; the floor keeps a non-positive fit finite
    floor = max(float(np.abs(contribution).max()), 1e-12) * 1e-6
    log_share = np.log(np.maximum(contribution[interior], floor))
    degree = min(2, interior.size - 1)
    trend = np.polyval(np.polyfit(interior.astype(float), log_share, degree), interior.astype(float))
    return LayerDecomposition(contribution, remainder, interior, trend, log_share - trend)


def surrogate_tables(table: ArrayLike, n_perm: int, seed: int | np.random.Generator = 0) -> np.ndarray:
    """``[n_perm, L, L]`` surrogates of ``table`` on the :func:`additive_scale` (NaN where ``l + n > L``).

    Each surrogate shuffles the interior layers' deviations from their depth trend (one permutation of layers per
    surrogate) and re-sums every block from its layers, plus the map's own non-additive remainder in place. So each
    surrogate keeps what the map shares with any other map (d grows with n, the smoothness in l, the ties across n,
    the depth trend, layers 0 and L-1) and loses only where its particular redundant layers sit. The identity
    permutation gives back ``table`` on that scale. Assumes the deviations are exchangeable across interior layers
    (true for layers of independent random strength); the suite's simulation checks the calibration."""
    if n_perm < 1:
        raise ValueError(f"n_perm must be >= 1, got {n_perm}")
    parts = decompose_layers(table)
    num_layers = parts.contribution.size
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    contributions = np.tile(parts.contribution, (n_perm, 1))
    if parts.interior.size:
        order = np.argsort(rng.random((n_perm, parts.interior.size)), axis=1)
        contributions[:, parts.interior] = np.exp(parts.trend + parts.deviation[order])
    baseline = np.exp(parts.trend + parts.deviation) if parts.interior.size else np.zeros(0)
    # re-sum on top of the remainder relative to the map's own (floored) contributions, so identity is exact
    shift = np.zeros(num_layers)
    shift[parts.interior] = parts.contribution[parts.interior] - baseline
    values = (contributions + shift) @ block_design(num_layers).T + parts.remainder
    out = np.full((n_perm, num_layers, num_layers), np.nan)
    out[:, valid_cells(num_layers)] = values
    return out


@dataclass(frozen=True)
class PermutationNull:
    """A statistic beside its surrogate null: ``p_value`` = the one-sided mid-p value (agreement larger than chance)
    ``(#{null > observed} + ½ (#{null = observed} + 1)) / (1 + n_perm)``: the path statistics take few values, and
    counting every tie against agreement makes them far more conservative than α; ``null_q95`` = the null's 95%
    quantile (the value chance alone reaches 5% of the time)."""

    observed: float
    p_value: float
    null_mean: float
    null_q95: float
    n_perm: int
    seed: int

    def to_dict(self) -> dict[str, float | int]:
        return {"observed": self.observed, "p_value": self.p_value, "null_mean": self.null_mean,
                "null_q95": self.null_q95, "n_perm": self.n_perm, "seed": self.seed}


def _null(observed: float, null: np.ndarray, seed: int) -> PermutationNull:
    tie = np.abs(null - observed) <= 1e-12
    above = int(np.sum((null > observed) & ~tie))
    p_value = (above + 0.5 * (int(tie.sum()) + 1)) / (1 + null.size)
    return PermutationNull(float(observed), p_value, float(null.mean()), float(np.quantile(null, 0.95)),
                           int(null.size), seed)


def _check_pair(table_a: ArrayLike, table_b: ArrayLike, n_perm: int) -> tuple[np.ndarray, np.ndarray]:
    if n_perm < 1:
        raise ValueError(f"n_perm must be >= 1, got {n_perm}")
    a, b = as_table(table_a, "table_a"), as_table(table_b, "table_b")
    if a.shape != b.shape:
        raise ValueError(f"tables differ in shape: {a.shape} vs {b.shape}")
    if not (np.isfinite(a[valid_cells(a.shape[0])]).all() and np.isfinite(b[valid_cells(b.shape[0])]).all()):
        raise ValueError("a surrogate null needs every defined cell of both tables to be finite")
    return a, b


def spearman_null(table_a: ArrayLike, table_b: ArrayLike, n_perm: int = 1000, seed: int = 0) -> PermutationNull:
    """Spearman ρ of two tables against ρ of ``table_a`` with :func:`surrogate_tables` of ``table_b``. Both share
    the generic shape, so the null's ρ is high too: read ρ against ``null_q95``, not against 0."""
    a, b = _check_pair(table_a, table_b, n_perm)
    valid = valid_cells(a.shape[0])
    rank_a = rankdata(a[valid])
    rank_a -= rank_a.mean()
    ranks = rankdata(surrogate_tables(b, n_perm, seed)[:, valid], axis=1)  # average ranks, as spearmanr
    ranks -= ranks.mean(axis=1, keepdims=True)
    scale = np.sqrt((ranks ** 2).sum(axis=1) * (rank_a ** 2).sum())
    null = np.divide(ranks @ rank_a, scale, out=np.zeros(n_perm), where=scale > 0)
    return _null(spearman_rho(a, b), null, seed)


def path_nulls(table_a: ArrayLike, table_b: ArrayLike, n_perm: int = 1000,
               seed: int = 0) -> dict[str, PermutationNull]:
    """``{"overlap", "exact", "jaccard"}``: path overlap, same-best-block fraction and mean Jaccard of two tables'
    pruning paths, each against the paths of the same :func:`surrogate_tables` of ``table_b`` as
    :func:`spearman_null` (a surrogate's best block is the argmin of its row)."""
    a, b = _check_pair(table_a, table_b, n_perm)
    num_layers = a.shape[0]
    block = np.arange(1, num_layers + 1)
    path_a = np.asarray(pruning_path(a))
    surrogates = np.nan_to_num(surrogate_tables(b, n_perm, seed), nan=np.inf)
    paths_b = np.argmin(surrogates, axis=2)  # [n_perm, L]; ties to the smallest l, as pruning_path
    shared = np.clip(np.minimum(paths_b, path_a) + block - np.maximum(paths_b, path_a), 0, None)
    agreement = path_agreement(list(path_a), pruning_path(b))
    return {"overlap": _null(agreement.overlap, (shared > 0).mean(axis=1), seed),
            "exact": _null(agreement.exact, (paths_b == path_a).mean(axis=1), seed),
            "jaccard": _null(agreement.mean_jaccard, (shared / (2 * block - shared)).mean(axis=1), seed)}


def path_null(table_a: ArrayLike, table_b: ArrayLike, n_perm: int = 1000, seed: int = 0,
              statistic: Literal["overlap", "exact", "jaccard"] = "overlap") -> PermutationNull:
    """One statistic of :func:`path_nulls`."""
    return path_nulls(table_a, table_b, n_perm, seed)[statistic]


@dataclass(frozen=True)
class AgreementCI:
    """Percentile bootstrap intervals of ρ, path overlap and same-best-block fraction between two maps; ``paired``:
    whether both maps' utterances were resampled together (the same utterances behind both maps)."""

    spearman_rho: tuple[float, float]
    path_overlap: tuple[float, float]
    same_best_block: tuple[float, float]
    n_boot: int
    alpha: float
    seed: int
    paired: bool = False


def _resample_counts(num_samples: int, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    return rng.multinomial(num_samples, np.full(num_samples, 1.0 / num_samples), size=n_boot)  # [n_boot, S]


def _resampled_means(tables: np.ndarray, counts: np.ndarray) -> np.ndarray:
    return np.einsum("bs,sij->bij", counts, np.nan_to_num(tables)) / len(tables)


def bootstrap_agreement(per_sample_a: ArrayLike, per_sample_b: ArrayLike, n_boot: int = 1000, alpha: float = 0.05,
                        seed: int = 0, paired: bool = False) -> AgreementCI:
    """Bootstrap CIs of the agreement statistics: utterances are resampled, the mean tables recomputed, and ρ /
    overlap / same-best measured per resample.

    ``paired=True`` when row i of both arrays is the same utterance (speech vs text of one set, two models on one
    set): one resample draws the same utterances for both maps, so a map against itself gives [1, 1]. Otherwise
    (different sets) each map's utterances are resampled independently."""
    tables = [np.asarray(t.detach().cpu().double().numpy() if isinstance(t, torch.Tensor) else t, float)
              for t in (per_sample_a, per_sample_b)]
    for name, table in zip(("per_sample_a", "per_sample_b"), tables):
        if table.ndim != 3 or table.shape[1] != table.shape[2] or len(table) < 2:
            raise ValueError(f"{name} must be [S, L, L] with S >= 2, got shape {table.shape}")
    if tables[0].shape[1:] != tables[1].shape[1:]:
        raise ValueError(f"per-sample tables differ in layer count: {tables[0].shape[1:]} vs {tables[1].shape[1:]}")
    if paired and len(tables[0]) != len(tables[1]):
        raise ValueError(f"paired resampling needs the same utterances: {len(tables[0])} vs {len(tables[1])} rows")
    if n_boot < 1 or not 0.0 < alpha < 1.0:
        raise ValueError(f"need n_boot >= 1 and alpha in (0, 1), got {n_boot}, {alpha}")
    rng = np.random.default_rng(seed)
    valid = valid_cells(tables[0].shape[1])
    counts_a = _resample_counts(len(tables[0]), n_boot, rng)
    counts_b = counts_a if paired else _resample_counts(len(tables[1]), n_boot, rng)
    means_a, means_b = _resampled_means(tables[0], counts_a), _resampled_means(tables[1], counts_b)
    stats = np.empty((n_boot, 3))
    for index in range(n_boot):
        a, b = (np.where(valid, means[index], np.nan) for means in (means_a, means_b))
        paths = path_agreement(pruning_path(a), pruning_path(b))
        stats[index] = spearman_rho(a, b), paths.overlap, paths.exact
    low, high = np.quantile(stats, [alpha / 2, 1 - alpha / 2], axis=0)
    rho, overlap, exact = ((float(low[i]), float(high[i])) for i in range(3))
    return AgreementCI(rho, overlap, exact, n_boot, alpha, seed, paired)
