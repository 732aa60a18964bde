"""``python -m lightning_speechllm compare``: pairwise agreement of N redundancy maps (tasks, encoders, languages).

Examples::

    python -m lightning_speechllm compare runs/redundancy/dev/speech/epoch=2.json \\
        runs/redundancy/ast_dev/speech/epoch=2.json --labels asr ast --out compare/
    python -m lightning_speechllm compare a.json b.json c.json --out compare/ --n_perm 2000

For every pair of maps (``RedundancyResult`` JSONs of the same layer count) it writes Spearman ρ of the d(l, n)
tables, the pruning paths' overlap, same-best-block fraction (share of block sizes n with the same l*(n)) and mean
Jaccard, each beside a surrogate null (``analysis.surrogate_tables`` of the second map: p-value and the null's 95%
quantile) and, where both maps have per-utterance tables beside them (``<stem>_per_sample.npy``, written by the
redundancy callback), bootstrap CIs. Outputs: ``compare.json``, ``compare.md`` and ``compare.png`` (the maps with
their paths on one colour scale) under ``--out``.
"""
from __future__ import annotations

import argparse
import itertools
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from lightning_speechllm.io_utils import write_json
from lightning_speechllm.redundancy.analysis import (
    RedundancyResult,
    bootstrap_agreement,
    path_agreement,
    path_nulls,
    per_sample_digest,
    per_sample_path,
    spearman_null,
    valid_cells,
)
from lightning_speechllm.redundancy.plots import draw_redundancy_heatmap, save_figure

NULL_DESCRIPTION = ("surrogates of the second map: its interior layers' own deviations from its depth trend "
                    "shuffled, every block re-summed from its layers (keeps each map's shape, breaks only the "
                    "alignment); one-sided mid-p value")

__all__ = ["NULL_DESCRIPTION", "LoadedMap", "build_parser", "compare_maps", "compare_pair", "format_markdown",
           "load_maps", "main", "plot_grid"]


@dataclass
class LoadedMap:
    """One map to compare: its label, source file, result and (if found beside it) per-utterance tables."""

    label: str
    path: Path
    result: RedundancyResult
    per_sample: np.ndarray | None
    per_sample_note: str | None = None
    """Why ``per_sample`` cannot give CIs (e.g. a file from before utterance keys), else ``None``."""


def _default_label(result: RedundancyResult) -> str:
    return f"{result.set_name}/{result.modality}/{result.token_selection}"


def load_maps(paths: list[str | Path], labels: list[str] | None = None) -> list[LoadedMap]:
    """Read the maps; refuse fewer than two, label-count mismatches and maps of different layer counts (naming both
    files: their tables cannot be compared cell by cell)."""
    if len(paths) < 2:
        raise ValueError(f"compare needs at least two maps, got {len(paths)}")
    if labels is not None and len(labels) != len(paths):
        raise ValueError(f"--labels gives {len(labels)} label(s) for {len(paths)} map(s)")
    loaded = []
    for index, path in enumerate(map(Path, paths)):
        result = RedundancyResult.from_json(path)
        per_sample_file = per_sample_path(path)
        per_sample = load_per_sample(per_sample_file, result) if per_sample_file.is_file() else None
        note = None
        if per_sample is not None and result.per_sample_keys is None:
            note = (f"{per_sample_file} has no utterance keys (written before they were recorded): which rows pair "
                    "with the other map's is unknown; re-measure for CIs")
        label = labels[index] if labels is not None else _default_label(result)
        loaded.append(LoadedMap(label, path, result, per_sample, note))
    first = loaded[0]
    for other in loaded[1:]:
        if other.result.num_layers != first.result.num_layers:
            raise ValueError(f"maps of different layer counts cannot be compared: {first.path} has "
                             f"{first.result.num_layers} layers, {other.path} has {other.result.num_layers}")
    _deduplicate_labels(loaded)
    return loaded


SINGLE_TOKEN_SELECTIONS = ("last", "last_prompt")


def load_per_sample(file: Path, result: RedundancyResult) -> np.ndarray:
    """The per-utterance tables beside a map, refused (naming the file) when they cannot be that map's: wrong shape,
    a digest other than the one the map recorded, or a mean that differs from the table where the table is the
    utterance mean (one token per utterance, or utterance reduction)."""
    tables = np.load(file)
    expected = (result.num_samples, result.num_layers, result.num_layers)
    if tables.shape != expected:
        raise ValueError(f"{file} is stale or belongs to another map: shape {tables.shape}, expected {expected} "
                         f"for {result.num_samples} utterances of {result.num_layers} layers")
    if result.per_sample_sha256 is not None and per_sample_digest(tables, result.per_sample_keys) \
            != result.per_sample_sha256:
        raise ValueError(f"{file} is stale: its digest differs from the one its map recorded")
    if result.reduction == "utterance" or result.token_selection in SINGLE_TOKEN_SELECTIONS:
        valid = valid_cells(result.num_layers)
        gap = float(np.max(np.abs(tables.mean(axis=0)[valid] - result.table[valid])))
        if not gap <= 1e-5:  # float32 rows: their mean is exact to ~1e-7
            raise ValueError(f"{file} is stale: its mean differs from the map's table by up to {gap:.3g}")
    return tables


def _paired_rows(a: LoadedMap, b: LoadedMap) -> np.ndarray | None:
    """Row order of ``b`` that lines its utterances up with ``a``'s, or ``None`` when the two sets of utterances
    differ (then they are resampled independently)."""
    keys_a, keys_b = a.result.per_sample_keys, b.result.per_sample_keys
    if len(keys_a) != len(keys_b) or len(set(keys_a.tolist())) != len(keys_a) \
            or set(keys_a.tolist()) != set(keys_b.tolist()):
        return None
    position = {key: row for row, key in enumerate(keys_b.tolist())}
    return np.array([position[key] for key in keys_a.tolist()])


def _deduplicate_labels(loaded: list[LoadedMap]) -> None:
    """Equal default labels (e.g. the same set of two models) get a ``#k`` suffix so the table stays readable."""
    seen: dict[str, int] = {}
    for item in loaded:
        seen[item.label] = seen.get(item.label, 0) + 1
    counts: dict[str, int] = {}
    for item in loaded:
        if seen[item.label] > 1:
            counts[item.label] = counts.get(item.label, 0) + 1
            item.label = f"{item.label}#{counts[item.label]}"


def compare_pair(a: LoadedMap, b: LoadedMap, n_perm: int = 1000, n_boot: int = 1000, alpha: float = 0.05,
                 seed: int = 0) -> dict[str, Any]:
    """The agreement statistics of two maps with their permutation nulls and (when available) bootstrap CIs."""
    paths = path_agreement(a.result.path, b.result.path)
    rho = spearman_null(a.result.table, b.result.table, n_perm, seed)
    nulls = path_nulls(a.result.table, b.result.table, n_perm, seed)
    row: dict[str, Any] = {
        "a": a.label, "b": b.label, "file_a": str(a.path), "file_b": str(b.path),
        "spearman_rho": rho.observed, "path_overlap": paths.overlap, "same_best_block": paths.exact,
        "path_mean_jaccard": paths.mean_jaccard,
        "null": {"spearman_rho": rho.to_dict(),
                 "path_overlap": nulls["overlap"].to_dict(), "same_best_block": nulls["exact"].to_dict(),
                 "path_mean_jaccard": nulls["jaccard"].to_dict()},
        "ci": None,
    }
    notes = [note for note in (a.per_sample_note, b.per_sample_note) if note]
    if notes:
        row["ci_note"] = "; ".join(notes)
    elif a.per_sample is not None and b.per_sample is not None:
        order = _paired_rows(a, b)  # the same utterances behind both maps: resample them together
        per_b = b.per_sample if order is None else b.per_sample[order]
        ci = bootstrap_agreement(a.per_sample, per_b, n_boot=n_boot, alpha=alpha, seed=seed, paired=order is not None)
        row["ci"] = {"spearman_rho": list(ci.spearman_rho), "path_overlap": list(ci.path_overlap),
                     "same_best_block": list(ci.same_best_block), "n_boot": n_boot, "alpha": alpha,
                     "resampling": "paired" if ci.paired else "independent"}
    return row


def compare_maps(loaded: list[LoadedMap], n_perm: int = 1000, n_boot: int = 1000, alpha: float = 0.05,
                 seed: int = 0) -> dict[str, Any]:
    """Every unordered pair of ``loaded`` (in input order), plus a description of each map."""
    maps = [{"label": item.label, "file": str(item.path), "model_id": item.result.model_id,
             "set_name": item.result.set_name, "modality": item.result.modality,
             "token_selection": item.result.token_selection, "num_layers": item.result.num_layers,
             "num_samples": item.result.num_samples, "path": list(item.result.path),
             "per_sample_tables": item.per_sample is not None} for item in loaded]
    pairs = [compare_pair(a, b, n_perm=n_perm, n_boot=n_boot, alpha=alpha, seed=seed)
             for a, b in itertools.combinations(loaded, 2)]
    return {"kind": "lightning_speechllm.compare", "maps": maps, "pairs": pairs,
            "null": NULL_DESCRIPTION,
            "n_perm": n_perm, "seed": seed}


def _with_ci(value: float, ci: dict | None, key: str, fmt: str) -> str:
    text = format(value, fmt)
    if ci is not None:
        low, high = ci[key]
        text += f" [{format(low, fmt)}, {format(high, fmt)}]"
    return text


def _p(value: float) -> str:
    return f"{value:.3f}" if value >= 0.001 else f"{value:.1e}"


def format_markdown(comparison: dict[str, Any]) -> str:
    """The maps, then one row per pair: each statistic (with its CI), the null's 95% quantile and p-value."""
    lines = ["| map | model | set | modality | tokens | N |", "|---|---|---|---|---|---:|"]
    for item in comparison["maps"]:
        lines.append(f"| {item['label']} | {item['model_id']} | {item['set_name']} | {item['modality']} | "
                     f"{item['token_selection']} | {item['num_samples']} |")
    lines += ["", "| a | b | Spearman ρ | ρ null q95 | p(ρ) | path overlap | overlap null q95 | p(overlap) | "
              "same best block | same-best null q95 | p(same best) |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for pair in comparison["pairs"]:
        null, ci = pair["null"], pair["ci"]
        cells = []
        for key in ("spearman_rho", "path_overlap", "same_best_block"):
            fmt = ".3f" if key == "spearman_rho" else ".2f"
            cells += [_with_ci(pair[key], ci, key, fmt), format(null[key]["null_q95"], fmt), _p(null[key]["p_value"])]
        lines.append(f"| {pair['a']} | {pair['b']} | " + " | ".join(cells) + " |")
    lines += ["", f"Null: {comparison['null']} ({comparison['n_perm']} permutations, seed {comparison['seed']}). "
              "Brackets: bootstrap CI over utterances, where both maps have per-utterance tables (utterances "
              "resampled together when both maps measured the same ones, independently otherwise)."]
    lines += [f"No CI for {pair['a']} vs {pair['b']}: {pair['ci_note']}" for pair in comparison["pairs"]
              if pair.get("ci_note")]
    return "\n".join(lines) + "\n"


def plot_grid(loaded: list[LoadedMap], save_to: str | Path | None = None, dpi: int = 120) -> Figure:
    """The maps side by side (at most 4 per row) on one colour scale, each with its pruning path."""
    columns = min(4, len(loaded))
    rows = -(-len(loaded) // columns)
    finite = np.concatenate([item.result.table[np.isfinite(item.result.table)] for item in loaded])
    figure = Figure(figsize=(4.2 * columns + 1.0, 3.8 * rows), layout="constrained")
    axes = np.atleast_1d(figure.subplots(rows, columns, squeeze=False)).ravel()
    image = None
    for ax, item in zip(axes, loaded):
        image = draw_redundancy_heatmap(ax, item.result.table, path=item.result.path, vmin=float(finite.min()),
                                        vmax=float(finite.max()))
        ax.set_title(f"{item.label} (N={item.result.num_samples})", fontsize="medium")
    for ax in axes[len(loaded):]:
        ax.set_visible(False)
    figure.colorbar(image, ax=list(axes[:len(loaded)]), label="angular distance $d(l, n)$")
    save_figure(figure, save_to, dpi)
    return figure


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m lightning_speechllm compare", description=__doc__.split("\n")[0])
    parser.add_argument("maps", nargs="+", help="redundancy map JSONs (RedundancyResult), two or more")
    parser.add_argument("--out", required=True, help="output directory for compare.{json,md,png}")
    parser.add_argument("--labels", nargs="+", default=None, help="one label per map (default set/modality/tokens)")
    parser.add_argument("--n_perm", type=int, default=1000, help="permutations of the null (default 1000)")
    parser.add_argument("--n_boot", type=int, default=1000, help="bootstrap resamples for CIs (default 1000)")
    parser.add_argument("--alpha", type=float, default=0.05, help="CI level 1 - alpha (default 0.05)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the null and the bootstrap")
    return parser


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Load, compare, write ``compare.json`` / ``compare.md`` / ``compare.png``; return the comparison."""
    loaded = load_maps(args.maps, args.labels)
    comparison = compare_maps(loaded, n_perm=args.n_perm, n_boot=args.n_boot, alpha=args.alpha, seed=args.seed)
    out = Path(args.out)
    write_json(comparison, out / "compare.json")
    (out / "compare.md").write_text(format_markdown(comparison), encoding="utf-8")
    plot_grid(loaded, save_to=out / "compare.png")
    return comparison


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m lightning_speechllm compare``; returns an exit code (2 on bad input)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as stop:  # --help or a parse error already reported by argparse
        return stop.code if isinstance(stop.code, int) else 0
    if args.n_perm < 1 or args.n_boot < 1:
        print("compare: error: --n_perm and --n_boot must be >= 1", file=sys.stderr)
        return 2
    try:
        comparison = run(args)
    except (FileNotFoundError, KeyError, ValueError) as error:
        print(f"compare: error: {error}", file=sys.stderr)
        return 2
    print(format_markdown(comparison), end="")
    print(f"results in {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
