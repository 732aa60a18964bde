"""Plans under a parameter budget: mixed plans of whole layers and attention sublayers, greedy with re-measurement
(after Minitron's mixed depth/width choices and EvoPress's budgeted search; SLEB's one-unit-per-round re-measurement).

Each round records the interleaved residual stream ``x_0, m_0, x_1, ..., x_K`` of the model pruned so far
(:func:`~lightning_speechllm.redundancy.sublayers.record_sublayer_stream`, one teacher-forced forward per calibration
batch) and prices every unit still there by the stream change it makes per decoder parameter it holds:

* a whole active layer ``k``: ``d(x_k, x_(k+1))`` over the parameters its removal saves (its MLP and norms only when
  its attention is already gone);
* the attention sublayer of an active layer ``k``: ``d(x_k, m_k)`` over the attention's parameters.

The cheapest unit goes, and rounds repeat until the removed parameters reach the budget (the last unit may overshoot
it; the plan records what was removed). ``d`` is the maps' angular distance, with their token selections.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from torch import nn
from tqdm.auto import tqdm

from lightning_speechllm.model.layer_mask import get_layer_mask_state
from lightning_speechllm.model.sublayer_mask import attention_module
from lightning_speechllm.pruning.plan import PlanError, PruningPlan
from lightning_speechllm.redundancy.metrics import TOKEN_SELECTIONS, TokenSelection
from lightning_speechllm.redundancy.sublayers import sublayer_table

if TYPE_CHECKING:
    from lightning_speechllm.data.batch import SpeechBatch
    from lightning_speechllm.model.speechllm import SpeechLLM

__all__ = ["decoder_layer_parameters", "plan_budget"]


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def decoder_layer_parameters(speechllm: SpeechLLM) -> tuple[list[int], list[int]]:
    """Parameters of each decoder layer and of its attention sublayer (original numbering)."""
    layers = get_layer_mask_state(speechllm.layer_mask.model).layer_list
    return [_count(layer) for layer in layers], [_count(attention_module(layer)) for layer in layers]


def _unit_distances(speechllm: SpeechLLM, batches: Iterable[SpeechBatch],
                    token_selection: TokenSelection) -> tuple[list[float], list[float]]:
    """Per active layer: ``d(x_k, x_(k+1))`` (whole layer) and ``d(x_k, m_k)`` (its attention)."""
    try:
        table, _ = sublayer_table(speechllm, batches, token_selection, progress=False)
    except ValueError as error:
        raise PlanError(f"budgeted plan: {error}") from error
    steps = range(0, table.shape[0], 2)
    return [float(table[1, k]) for k in steps], [float(table[0, k]) for k in steps]


def _cheapest(active: tuple[int, ...], whole: list[float], attention: list[float], dropped: set[int],
              layer_params: list[int], attention_params: list[int],
              last_layer: bool) -> tuple[str, int, float, int]:
    """The unit with the least stream change per parameter saved: ``(kind, layer, d, parameters saved)``."""
    options = []
    for k, layer in enumerate(active):
        if not last_layer:
            saved = layer_params[layer] - (attention_params[layer] if layer in dropped else 0)
            options.append((whole[k] / max(saved, 1), "layer", layer, whole[k], saved))
        if layer not in dropped and attention_params[layer]:
            options.append((attention[k] / attention_params[layer], "attention", layer, attention[k],
                            attention_params[layer]))
    if not options:
        raise PlanError("nothing left to remove: one layer without attention remains")
    _, kind, layer, distance, saved = min(options)
    return kind, layer, distance, saved


def plan_budget(speechllm: SpeechLLM, batches: Iterable[SpeechBatch], remove_params: int | None = None,
                fraction: float | None = None, token_selection: TokenSelection = "last",
                model_id: str | None = None, progress: bool = True) -> PruningPlan:
    """A mixed plan removing at least ``remove_params`` decoder-layer parameters (or ``fraction`` of them).

    Starts from the unpruned model whatever its entry masks, which are restored at the end (also on error), as is
    train/eval mode. ``batches`` is iterated once per round and must give the same batches each time.
    """
    if (remove_params is None) == (fraction is None):
        raise PlanError("give exactly one of remove_params and fraction")
    if token_selection not in TOKEN_SELECTIONS:
        raise PlanError(f"token_selection must be one of {TOKEN_SELECTIONS}, got {token_selection!r}")
    layer_params, attention_params = decoder_layer_parameters(speechllm)
    total = sum(layer_params)
    if fraction is not None:
        if not 0.0 < fraction < 1.0:
            raise PlanError(f"fraction must be in (0, 1), got {fraction}")
        remove_params = round(fraction * total)
    if not 0 < remove_params < total:
        raise PlanError(f"remove_params must be in (0, {total}) (the decoder layers' parameters), got {remove_params}")
    mask, sublayers = speechllm.layer_mask, speechllm.sublayer_mask
    entry = (mask.active_layers, sublayers.dropped_attention, sublayers.dropped_mlp)
    modes = [(module, module.training) for module in speechllm.modules()]
    removed: list[int] = []
    dropped: set[int] = set()
    rounds: list[dict[str, Any]] = []
    saved = 0
    bar = tqdm(total=remove_params, desc="budgeted plan", unit="param", unit_scale=True, disable=not progress)
    speechllm.eval()
    try:
        while saved < remove_params:
            sublayers.reset()
            mask.remove_layers(removed)
            sublayers.drop(sorted(dropped))
            whole, attention = _unit_distances(speechllm, batches, token_selection)
            kind, layer, distance, gain = _cheapest(mask.active_layers, whole, attention, dropped, layer_params,
                                                    attention_params, last_layer=len(mask.active_layers) == 1)
            if kind == "layer":
                removed.append(layer)
                dropped.discard(layer)
            else:
                dropped.add(layer)
            saved += gain
            rounds.append({"kind": kind, "layer": layer, "distance": distance, "params": gain})
            bar.update(min(gain, remove_params - bar.n))
            bar.set_postfix(last=f"{kind} {layer}", d=f"{distance:.4f}")
    finally:
        bar.close()
        sublayers.reset()
        mask.set_active_layers(entry[0])
        sublayers.drop(entry[1], entry[2])
        for module, training in modes:
            module.training = training
    params: dict[str, Any] = {"remove_params": remove_params, "removed_params": saved, "total_params": total,
                              "token_selection": token_selection, "rounds": rounds}
    if fraction is not None:
        params["fraction"] = fraction
    model_id = model_id if model_id is not None else getattr(speechllm.config, "model_id", None)
    return PruningPlan(removed_layers=removed, num_layers=mask.num_layers, method="budget", params=params,
                       model_id=model_id, removed_attention=sorted(dropped))
