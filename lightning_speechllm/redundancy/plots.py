"""Figures of layer redundancy: d(l, n) heatmap with the pruning path, BI bars, speech-vs-text maps.

Figures are built with :class:`matplotlib.figure.Figure` directly (no pyplot, no global backend
state), which renders through Agg when saved, so it works headless and in parallel workers.
"""
from __future__ import annotations

from pathlib import Path
from typing import Union

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from lightning_speechllm.redundancy.analysis import (
    RedundancyResult,
    as_table,
    pruning_path,
    spearman_rho,
    valid_cells,
)

ArrayLike = Union[np.ndarray, torch.Tensor, list]


def save_figure(figure: Figure, path: str | Path | None, dpi: int = 120) -> None:
    """Write ``figure`` to ``path`` (parents created; nothing when ``path`` is None)."""
    if path is not None:
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(target, dpi=dpi, bbox_inches="tight")


def draw_redundancy_heatmap(
    ax: Axes,
    table: ArrayLike,
    path: list[int] | None = None,
    vmin: float | None = None,
    vmax: float | None = None,
    cmap: str = "viridis",
    show_path: bool = True,
):
    """Draw d(l, n) on ``ax`` (x: first layer l, y: block size n; undefined cells blank) plus l*(n).

    Returns the image artist (for a colourbar).
    """
    array = as_table(table)
    num_layers = array.shape[0]
    shown = np.ma.masked_where(~valid_cells(num_layers) | ~np.isfinite(array), array)
    colour_map = colormaps[cmap].with_extremes(bad=(0.0, 0.0, 0.0, 0.0))
    image = ax.imshow(shown, origin="lower", aspect="auto", cmap=colour_map, vmin=vmin, vmax=vmax,
                      extent=(-0.5, num_layers - 0.5, 0.5, num_layers + 0.5), interpolation="nearest")
    if show_path:
        best = pruning_path(array) if path is None else path
        blocks = np.arange(1, num_layers + 1)
        ax.plot(best, blocks, color="white", linewidth=2.2, zorder=2)
        ax.plot(best, blocks, color="crimson", linewidth=1.2, marker="o", markersize=3.5,
                label="pruning path $l^*(n)$", zorder=3)
        ax.legend(loc="upper right", fontsize="small", framealpha=0.8)
    ax.set_xlim(-0.5, num_layers - 0.5)
    ax.set_ylim(0.5, num_layers + 0.5)
    ax.set_xlabel("first layer $l$")
    ax.set_ylabel("block size $n$")
    return image


def plot_redundancy_heatmap(
    table: ArrayLike,
    path: list[int] | None = None,
    title: str | None = None,
    save_to: str | Path | None = None,
    cmap: str = "viridis",
    dpi: int = 150,
) -> Figure:
    """Heatmap of the angular distance d(l, n) with the pruning path (cf. Gromov et al. Fig. 1c)."""
    figure = Figure(figsize=(6.0, 5.0), layout="constrained")
    ax = figure.add_subplot()
    image = draw_redundancy_heatmap(ax, table, path=path, cmap=cmap)
    figure.colorbar(image, ax=ax, label="angular distance $d(l, n)$")
    if title:
        ax.set_title(title)
    save_figure(figure, save_to, dpi)
    return figure


def plot_result_heatmap(result: RedundancyResult, save_to: str | Path | None = None, dpi: int = 150) -> Figure:
    """:func:`plot_redundancy_heatmap` titled with the result's model, set, modality and selection."""
    title = (f"{result.model_id} — {result.set_name} ({result.modality}, "
             f"{result.token_selection} tokens, N={result.num_samples})")
    return plot_redundancy_heatmap(result.table, path=result.path, title=title, save_to=save_to, dpi=dpi)


def plot_block_influence(
    block_influence: ArrayLike,
    num_marked: int = 0,
    title: str | None = None,
    save_to: str | Path | None = None,
    dpi: int = 150,
) -> Figure:
    """Bar plot of Block Influence per layer; the ``num_marked`` lowest-BI layers are highlighted."""
    values = block_influence.detach().cpu().double().numpy() if isinstance(block_influence, torch.Tensor) \
        else np.asarray(block_influence, float)
    if values.ndim != 1:
        raise ValueError(f"block_influence must be 1-D [L], got shape {values.shape}")
    if not 0 <= num_marked <= values.size:
        raise ValueError(f"num_marked must be in [0, {values.size}], got {num_marked}")
    colours = np.full(values.size, "tab:blue", dtype=object)
    colours[np.argsort(values, kind="stable")[:num_marked]] = "tab:red"
    figure = Figure(figsize=(max(5.0, 0.22 * values.size + 2.0), 3.5), layout="constrained")
    ax = figure.add_subplot()
    ax.bar(np.arange(values.size), values, color=list(colours))
    ax.set_xlabel("layer $i$")
    ax.set_ylabel("Block Influence $BI_i$")
    ax.set_xlim(-0.7, values.size - 0.3)
    if title:
        ax.set_title(title)
    save_figure(figure, save_to, dpi)
    return figure


def plot_speech_vs_text(
    speech: RedundancyResult | ArrayLike,
    text: RedundancyResult | ArrayLike,
    title: str | None = None,
    save_to: str | Path | None = None,
    dpi: int = 150,
) -> Figure:
    """Speech and text d(l, n) maps side by side on one colour scale; Spearman ρ in the title."""
    tables = [as_table(item.table if isinstance(item, RedundancyResult) else item) for item in (speech, text)]
    paths = [item.path if isinstance(item, RedundancyResult) else None for item in (speech, text)]
    rho = spearman_rho(tables[0], tables[1])
    finite = np.concatenate([table[np.isfinite(table)] for table in tables])
    vmin, vmax = float(finite.min()), float(finite.max())
    figure = Figure(figsize=(11.0, 4.8), layout="constrained")
    axes = figure.subplots(1, 2, sharey=True)
    image = None
    for ax, table, path, name in zip(axes, tables, paths, ("speech input", "text input")):
        image = draw_redundancy_heatmap(ax, table, path=path, vmin=vmin, vmax=vmax)
        ax.set_title(name)
    axes[1].set_ylabel("")
    figure.colorbar(image, ax=list(axes), label="angular distance $d(l, n)$")
    prefix = f"{title} — " if title else ""
    figure.suptitle(f"{prefix}Spearman $\\rho$ = {rho:.3f}")
    save_figure(figure, save_to, dpi)
    return figure
