"""Sub-layer redundancy: the angular distance across each attention and each MLP sublayer (LLM-Drop).

One teacher-forced forward records the interleaved residual stream ``x_0, m_0, x_1, m_1, ..., x_K`` of the active
layers, where ``m_i`` is the state between layer ``i``'s attention and its MLP (the input of its pre-MLP norm). The
angular distance ``d(x_i, m_i)`` is the attention sublayer's, ``d(m_i, x_(i+1))`` the MLP's, with the same token
selections and float64 arithmetic as the layer maps (:class:`~.metrics.AngularDistanceMetric` on the 2K-step stream).
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from lightning_speechllm.data.batch import SpeechBatch
from lightning_speechllm.io_utils import read_json, write_json
from lightning_speechllm.model.layer_mask import LayerMaskError, find_decoder_layers
from lightning_speechllm.model.speechllm import eval_mode
from lightning_speechllm.model.sublayer_mask import pre_mlp_norm
from lightning_speechllm.redundancy.metrics import AngularDistanceMetric, TokenSelection, select_tokens

__all__ = ["SublayerMap", "measure_sublayers", "plot_sublayer_map", "record_sublayer_stream", "sublayer_table"]

SUBLAYER_MAP_KIND = "lightning_speechllm.sublayer_map"


@contextmanager
def record_sublayer_stream(llm: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Inside the context, the yielded list holds ``[x_0, m_0, x_1, m_1, ..., x_K]`` of the latest forward call."""
    parent, name = find_decoder_layers(llm)
    layers = list(getattr(parent, name))
    stream: list[torch.Tensor] = []

    def layer_input(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else kwargs.get("hidden_states")
        if _module is layers[0]:
            stream.clear()
        stream.append(hidden.detach())

    def middle(_module: nn.Module, args: tuple) -> None:
        stream.append(args[0].detach())

    def last_output(_module: nn.Module, _args: tuple, output: Any) -> None:
        stream.append((output[0] if isinstance(output, (tuple, list)) else output).detach())

    handles = []
    try:
        for layer in layers:
            handles.append(layer.register_forward_pre_hook(layer_input, with_kwargs=True))
            handles.append(pre_mlp_norm(layer).register_forward_pre_hook(middle))
        handles.append(layers[-1].register_forward_hook(last_output))
        yield stream
    finally:
        for handle in handles:
            handle.remove()


@dataclass
class SublayerMap:
    """Angular distance across each sublayer of the active layers ``layers`` (indices of the measured model)."""

    layers: list[int]
    attention: list[float]
    mlp: list[float]
    token_selection: str
    num_samples: int
    model_id: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def lowest(self, kind: str, n: int) -> list[int]:
        """The ``n`` layers whose ``kind`` ('attention' or 'mlp') sublayer changes the stream least, sorted."""
        values = {"attention": self.attention, "mlp": self.mlp}.get(kind)
        if values is None:
            raise ValueError(f"sublayer kind must be 'attention' or 'mlp', got {kind!r}")
        if not 1 <= n <= len(self.layers):
            raise ValueError(f"cannot pick {n} of {len(self.layers)} {kind} sublayers")
        order = sorted(range(len(values)), key=lambda k: (values[k], k))
        return sorted(self.layers[k] for k in order[:n])

    def to_dict(self) -> dict[str, Any]:
        return {"kind": SUBLAYER_MAP_KIND, **asdict(self)}

    def to_json(self, path: str | Path) -> Path:
        return write_json(self.to_dict(), path)

    @classmethod
    def from_json(cls, path: str | Path) -> "SublayerMap":
        """Read a map written by :meth:`to_json`; errors name the file."""
        data = read_json(path)
        if data.pop("kind", None) != SUBLAYER_MAP_KIND:
            raise ValueError(f"{path} is not a sublayer map (kind {SUBLAYER_MAP_KIND!r} expected)")
        try:
            result = cls(**data)
        except TypeError as error:
            raise ValueError(f"{path}: {error}") from error
        if not len(result.layers) == len(result.attention) == len(result.mlp):
            raise ValueError(f"{path}: layers, attention and mlp have different lengths "
                             f"({len(result.layers)}, {len(result.attention)}, {len(result.mlp)})")
        return result


@torch.no_grad()
def sublayer_table(speechllm: Any, batches: Iterable[SpeechBatch], token_selection: TokenSelection = "last_prompt",
                   progress: bool = True, desc: str = "sublayer map") -> tuple[torch.Tensor, int]:
    """``d(l, n)`` over the interleaved stream ``x_0, m_0, x_1, ..., x_K`` of the active layers (``[2K, 2K]``, float64,
    CPU; row 0 holds each sublayer's distance, row 1 at even ``l`` each whole layer's) and the utterances measured."""
    llm = speechllm.llm
    active = list(speechllm.layer_mask.active_layers)
    if any(i not in active for i in speechllm.layer_mask.replacements):  # a replacement is in the layer list
        raise LayerMaskError("sublayer maps of a decoder with replacement modules are not defined")
    metric = AngularDistanceMetric(2 * len(active))
    count = 0
    with eval_mode(speechllm):  # no dropout (nor SpecAugment) in the measured pass
        for batch in tqdm(batches, desc=desc, disable=not progress, leave=False):
            inputs = speechllm.build_inputs(batch.to(speechllm.device), with_targets=True)
            with record_sublayer_stream(llm) as stream:
                llm(inputs_embeds=inputs.inputs_embeds, attention_mask=inputs.attention_mask,
                    position_ids=inputs.position_ids, use_cache=False, logits_to_keep=1)
            metric.update(list(stream), select_tokens(inputs.segment_ids, token_selection))
            count += len(batch)
    if count == 0:
        raise ValueError("no batch to measure the sublayer map on")
    if int(metric.token_count) == 0:
        raise ValueError(f"token selection {token_selection!r} selects no token of the batches")
    return metric.compute().cpu(), count


def measure_sublayers(speechllm: Any, batches: Iterable[SpeechBatch], token_selection: TokenSelection = "last_prompt",
                      progress: bool = True) -> SublayerMap:
    """The :class:`SublayerMap` of ``speechllm`` (as masked now) over ``batches``: one forward per batch."""
    table, count = sublayer_table(speechllm, batches, token_selection, progress)
    first_row = table[0].tolist()
    return SublayerMap(layers=list(speechllm.layer_mask.active_layers), attention=first_row[0::2],
                       mlp=first_row[1::2], token_selection=token_selection, num_samples=count,
                       model_id=getattr(speechllm.config, "model_id", None))


def plot_sublayer_map(result: SublayerMap, path: str | Path) -> Path:
    """Bars of the attention and MLP distances per layer."""
    from matplotlib.figure import Figure

    from lightning_speechllm.redundancy.plots import save_figure

    figure = Figure(figsize=(max(6.0, 0.3 * len(result.layers)), 3.2), layout="tight")
    ax = figure.add_subplot()
    positions = torch.arange(len(result.layers), dtype=torch.float64)
    ax.bar(positions - 0.2, result.attention, width=0.4, label="attention")
    ax.bar(positions + 0.2, result.mlp, width=0.4, label="MLP")
    ax.set_xticks(positions.tolist(), [str(i) for i in result.layers], fontsize=7)
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("angular distance across sublayer")
    ax.set_title(f"sublayer redundancy ({result.token_selection}, {result.num_samples} utterances)")
    ax.legend()
    save_figure(figure, path)
    return Path(path)
