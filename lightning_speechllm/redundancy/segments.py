"""Per-segment layer contributions: how much each decoder layer changes the speech, prompt and target positions.

For every active layer ``l`` and segment ``s``, the angular distance ``d(x^l, x^(l+1))`` averaged over the tokens of
``s`` (the maps' float64 arithmetic, :class:`~.metrics.AngularDistanceMetric`). A layer that barely moves the speech
positions is a candidate for skipping them there (:mod:`lightning_speechllm.model.speech_skip`, after ShortV):
:meth:`SegmentMap.lowest_speech` picks them.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from lightning_speechllm.data.batch import SpeechBatch
from lightning_speechllm.io_utils import read_json, write_json
from lightning_speechllm.model.speechllm import eval_mode
from lightning_speechllm.redundancy.measure import RedundancyAccumulator
from lightning_speechllm.redundancy.metrics import AngularDistanceMetric, select_tokens

__all__ = ["SEGMENTS", "SegmentMap", "measure_segments", "plot_segment_map"]

SEGMENT_MAP_KIND = "lightning_speechllm.segment_map"
SEGMENTS = ("speech", "prompt", "target")


@dataclass
class SegmentMap:
    """Angular distance across each active layer (``layers``, indices of the measured model), per segment."""

    layers: list[int]
    speech: list[float]
    prompt: list[float]
    target: list[float]
    num_samples: int
    model_id: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def lowest_speech(self, n: int) -> list[int]:
        """The ``n`` layers that change the speech positions least, sorted: the layers to skip them in."""
        if not 0 <= n <= len(self.layers):
            raise ValueError(f"cannot pick {n} of {len(self.layers)} layers")
        order = sorted(range(len(self.speech)), key=lambda k: (self.speech[k], k))
        return sorted(self.layers[k] for k in order[:n])

    def to_json(self, path: str | Path) -> Path:
        return write_json({"kind": SEGMENT_MAP_KIND, **asdict(self)}, path)

    @classmethod
    def from_json(cls, path: str | Path) -> "SegmentMap":
        """Read a map written by :meth:`to_json`; errors name the file."""
        data = read_json(path)
        if data.pop("kind", None) != SEGMENT_MAP_KIND:
            raise ValueError(f"{path} is not a segment map (kind {SEGMENT_MAP_KIND!r} expected)")
        try:
            result = cls(**data)
        except TypeError as error:
            raise ValueError(f"{path}: {error}") from error
        lengths = {len(getattr(result, name)) for name in ("layers", *SEGMENTS)}
        if len(lengths) != 1:
            raise ValueError(f"{path}: layers, speech, prompt and target have different lengths")
        return result


@torch.no_grad()
def measure_segments(speechllm: Any, batches: Iterable[SpeechBatch], progress: bool = True) -> SegmentMap:
    """The :class:`SegmentMap` of ``speechllm`` (as masked now) over ``batches``: one forward per batch."""
    active = list(speechllm.layer_mask.active_layers)
    metrics = {segment: AngularDistanceMetric(len(active), keep_per_sample=False) for segment in SEGMENTS}
    count = 0
    with eval_mode(speechllm):
        for batch in tqdm(batches, desc="segment map", disable=not progress, leave=False):
            states, segment_ids = RedundancyAccumulator.record(speechllm, batch.to(speechllm.device))
            for segment, metric in metrics.items():
                metric.update(states, select_tokens(segment_ids, segment))
            count += len(batch)
    if count == 0:
        raise ValueError("no batch to measure the segment map on")
    rows = {segment: metric.compute()[0].tolist() for segment, metric in metrics.items()}
    return SegmentMap(layers=active, num_samples=count, model_id=getattr(speechllm.config, "model_id", None), **rows)


def plot_segment_map(result: SegmentMap, path: str | Path, skipped: list[int] | None = None) -> Path:
    """Lines of each segment's distance per layer; ``skipped`` layers are shaded."""
    from matplotlib.figure import Figure

    from lightning_speechllm.redundancy.plots import save_figure

    figure = Figure(figsize=(max(6.0, 0.3 * len(result.layers)), 3.2), layout="tight")
    ax = figure.add_subplot()
    for segment in SEGMENTS:
        ax.plot(result.layers, getattr(result, segment), marker="o", markersize=3, label=f"{segment} tokens")
    for layer in skipped or []:
        ax.axvspan(layer - 0.5, layer + 0.5, color="grey", alpha=0.2, linewidth=0)
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("angular distance across the layer")
    ax.set_title(f"per-segment layer contribution ({result.num_samples} utterances"
                 + (", shaded: speech skipped)" if skipped else ")"))
    ax.legend()
    save_figure(figure, path)
    return Path(path)
