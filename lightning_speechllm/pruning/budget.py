"""Plans under a budget of decoder parameters or of decode latency: mixed plans of whole layers and attention
sublayers, greedy with re-measurement, optionally refined by an evolutionary search (after Minitron's mixed
depth/width choices, EvoPress's budgeted search and SLEB's one-unit-per-round re-measurement).

Each greedy round records the interleaved residual stream ``x_0, m_0, x_1, ..., x_K`` of the model pruned so far
(:func:`~lightning_speechllm.redundancy.sublayers.record_sublayer_stream`, one teacher-forced forward per calibration
batch) and prices every unit still there by the stream change it makes per unit of cost its removal saves:

* a whole active layer ``k``: ``d(x_k, x_(k+1))`` over what removing it saves (its MLP and norms only when its
  attention is already gone);
* the attention sublayer of an active layer ``k``: ``d(x_k, m_k)`` over the attention's cost.

The cheapest unit goes, and rounds repeat until the saving reaches the budget (the last unit may overshoot it; the
plan records what was removed). ``d`` is the maps' angular distance, with their token selections. The cost of a unit
is its parameter count (:func:`parameter_costs`) or its measured decode time (:func:`latency_costs`).

``search='evolutionary'`` then starts from the greedy plan and keeps mutating it (:mod:`.evolution`): a candidate
is scored by the KL divergence of its next-token distributions from the unpruned model's, on the target tokens of the
calibration batches, and replaces its parent when it scores lower.
"""
from __future__ import annotations

import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from torch import nn
from tqdm.auto import tqdm

from lightning_speechllm.model.layer_mask import get_layer_mask_state
from lightning_speechllm.model.sublayer_mask import attention_module
from lightning_speechllm.pruning.latency import time_decode_units
from lightning_speechllm.pruning.plan import PlanError, PruningPlan, apply_plan
from lightning_speechllm.redundancy.metrics import TOKEN_SELECTIONS, TokenSelection
from lightning_speechllm.redundancy.sublayers import sublayer_table

if TYPE_CHECKING:
    from lightning_speechllm.data.batch import SpeechBatch
    from lightning_speechllm.model.speechllm import SpeechLLM

__all__ = ["BUDGET_SEARCHES", "Unit", "UnitCosts", "apply_units", "budget_summary", "decoder_layer_parameters",
           "latency_costs", "measured_speedup", "parameter_costs", "plan_budget"]

BUDGET_SEARCHES = ("greedy", "evolutionary")
Unit = tuple[str, int]
"""``("layer", k)`` (the whole layer) or ``("attention", k)`` (its attention sublayer only), original numbering."""


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def decoder_layer_parameters(speechllm: SpeechLLM) -> tuple[list[int], list[int]]:
    """Parameters of each decoder layer and of its attention sublayer (original numbering)."""
    layers = get_layer_mask_state(speechllm.layer_mask.model).layer_list
    return [_count(layer) for layer in layers], [_count(attention_module(layer)) for layer in layers]


@dataclass(frozen=True)
class UnitCosts:
    """What removing each decoder unit saves, in ``unit``: ``"params"`` (parameters) or ``"ms"`` (milliseconds per
    cached decoding step). ``total`` is what a fractional budget is a share of: all decoder layers' parameters, or
    the whole decoding step (embedding, final norm and LM head included, which no plan removes)."""

    layer: tuple[float, ...]
    """Each whole layer, its attention included."""
    attention: tuple[float, ...]
    total: float
    unit: Literal["params", "ms"]

    def saving(self, unit: Unit, dropped: Iterable[int] = ()) -> float:
        """What removing ``unit`` saves when the attention of the layers in ``dropped`` is already gone."""
        kind, layer = unit
        if kind == "attention":
            return self.attention[layer]
        return self.layer[layer] - (self.attention[layer] if layer in set(dropped) else 0.0)

    def saved(self, units: Iterable[Unit]) -> float:
        """What a set of units saves (a layer and its own attention counted once)."""
        units = set(units)
        return sum(self.layer[k] if kind == "layer" else self.attention[k] for kind, k in units
                   if kind == "layer" or ("layer", k) not in units)

    def to_dict(self) -> dict[str, Any]:
        return {"unit": self.unit, "total": self.total, "layer": list(self.layer), "attention": list(self.attention)}


def parameter_costs(speechllm: SpeechLLM) -> UnitCosts:
    """Each unit's parameter count; a fraction is a share of all decoder layers' parameters."""
    layers, attention = decoder_layer_parameters(speechllm)
    return UnitCosts(tuple(map(float, layers)), tuple(map(float, attention)), float(sum(layers)), "params")


def latency_costs(speechllm: SpeechLLM, batches: Sequence[SpeechBatch], new_tokens: int = 16,
                  repeats: int = 3) -> UnitCosts:
    """Each unit's measured decode time of the unpruned model (every unit active while timed); a fraction is a share
    of the whole decoding step. A layer's time holds its attention's (nested hooks; medians keep the order)."""
    mask, sublayers = speechllm.layer_mask, speechllm.sublayer_mask
    with mask.active(range(mask.num_layers)), sublayers.suspended():
        timing = time_decode_units(speechllm, batches, new_tokens=new_tokens, repeats=repeats)
    return UnitCosts(timing.layer_ms, timing.attention_ms, timing.step_ms, "ms")


def measured_speedup(speechllm: SpeechLLM, batches: Sequence[SpeechBatch], plan: PruningPlan, new_tokens: int = 16,
                     rounds: int = 3) -> dict[str, float]:
    """The decoding step of the unpruned model and of ``plan`` applied, timed in interleaved rounds (medians, after
    one warm-up round) so that machine load hits both alike, with the LLM forward alone hooked; beside it, the
    speed-up a latency plan predicted (``total / (total - removed)`` of its unit costs). The model is left
    unpruned."""
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    full, pruned = [], []
    try:
        for index in range(rounds + 1):
            speechllm.layer_mask.reset()
            speechllm.sublayer_mask.reset()
            unpruned = time_decode_units(speechllm, batches, new_tokens, repeats=1, warmup=0, units=False).step_ms
            apply_plan(speechllm, plan)
            cut = time_decode_units(speechllm, batches, new_tokens, repeats=1, warmup=0, units=False).step_ms
            if index:
                full.append(unpruned)
                pruned.append(cut)
    finally:
        speechllm.layer_mask.reset()
        speechllm.sublayer_mask.reset()
    result = {"unpruned_step_ms": statistics.median(full), "pruned_step_ms": statistics.median(pruned)}
    result["speedup"] = result["unpruned_step_ms"] / result["pruned_step_ms"]
    if plan.params.get("budget_unit") == "ms":
        result["predicted_speedup"] = plan.params["total"] / (plan.params["total"] - plan.params["removed"])
    return result


def budget_summary(plan: PruningPlan) -> str:
    """What a budget plan saved, what its search found and, when timed, the decoding step before and after."""
    params = plan.params
    unit = "parameters" if params["budget_unit"] == "params" else "ms of the decoding step"
    share = params["removed"] / params["total"]
    saved = f"{params['removed']:,.6g} of {params['total']:,.6g} {unit}"
    lines = [f"budget: removed {saved} ({share:.1%}; budget {params['remove']:,.6g})"]
    if "evolution" in params:
        record = params["evolution"]
        lines.append(f"evolutionary search: KL to the unpruned model {record['start_kl']:.4f} (greedy) -> "
                     f"{record['kl']:.4f} nats/token after {record['generations']} generations, {record['scored']} "
                     "plans scored")
    if "measured" in params:
        measured = params["measured"]
        predicted = (f" (the unit costs predicted {measured['predicted_speedup']:.2f}x)"
                     if "predicted_speedup" in measured else "")
        lines.append(f"decoding step measured: {measured['unpruned_step_ms']:.1f} -> {measured['pruned_step_ms']:.1f} "
                     f"ms, {measured['speedup']:.2f}x{predicted}")
    return "\n".join(lines)


def apply_units(speechllm: SpeechLLM, units: Iterable[Unit]) -> None:
    """Mask ``speechllm`` to the unpruned model less ``units``."""
    units = set(units)
    removed = sorted(k for kind, k in units if kind == "layer")
    speechllm.sublayer_mask.reset()
    speechllm.layer_mask.set_active_layers([k for k in range(speechllm.layer_mask.num_layers) if k not in removed])
    speechllm.sublayer_mask.drop(sorted(k for kind, k in units if kind == "attention" and k not in removed))


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
              costs: UnitCosts, last_layer: bool) -> tuple[Unit, float, float]:
    """The unit with the least stream change per unit of cost saved: ``(unit, d, saving)``."""
    options = []
    for k, layer in enumerate(active):
        if not last_layer:
            saving = costs.saving(("layer", layer), dropped)
            options.append((whole[k] / max(saving, 1e-12), ("layer", layer), whole[k], saving))
        if layer not in dropped and costs.attention[layer] > 0:
            options.append((attention[k] / costs.attention[layer], ("attention", layer), attention[k],
                            costs.attention[layer]))
    if not options:
        raise PlanError("nothing left to remove before the budget is met: one layer without attention remains (the "
                        "greedy rounds do not choose which layer survives; give a smaller budget)")
    _, unit, distance, saving = min(options)
    return unit, distance, saving


def _budget_amount(costs: UnitCosts, amount: float | None, fraction: float | None) -> float:
    if (amount is None) == (fraction is None):
        raise PlanError("give exactly one of remove (an amount) and fraction")
    if fraction is not None:
        if not 0.0 < fraction < 1.0:
            raise PlanError(f"fraction must be in (0, 1), got {fraction}")
        amount = fraction * costs.total
    kept = min(whole - attention for whole, attention in zip(costs.layer, costs.attention))
    removable = sum(costs.layer) - kept  # every layer but one, and that one's attention
    if not 0 < amount < removable:
        raise PlanError(f"the budget must be in (0, {removable:.6g}) {costs.unit} (every decoder layer but one, and "
                        f"its attention), got {amount:.6g} {costs.unit}")
    return amount


def _greedy_units(speechllm: SpeechLLM, batches: Iterable[SpeechBatch], costs: UnitCosts, amount: float,
                  token_selection: TokenSelection, progress: bool) -> tuple[set[Unit], list[dict[str, Any]]]:
    """The greedy rounds (the model's masks are left as the last round set them)."""
    mask = speechllm.layer_mask
    removed: list[int] = []
    dropped: set[int] = set()
    rounds: list[dict[str, Any]] = []
    saved = 0.0
    with tqdm(total=amount, desc=f"budgeted plan ({costs.unit})", disable=not progress) as bar:
        while saved < amount:
            apply_units(speechllm, [("layer", k) for k in removed] + [("attention", k) for k in dropped])
            whole, attention = _unit_distances(speechllm, batches, token_selection)
            unit, distance, saving = _cheapest(mask.active_layers, whole, attention, dropped, costs,
                                               last_layer=len(mask.active_layers) == 1)
            kind, layer = unit
            if kind == "layer":
                removed.append(layer)
                dropped.discard(layer)
            else:
                dropped.add(layer)
            saved += saving
            rounds.append({"kind": kind, "layer": layer, "distance": distance, costs.unit: saving})
            bar.update(min(saving, amount - bar.n))
            bar.set_postfix(last=f"{kind} {layer}", d=f"{distance:.4f}")
    return {("layer", k) for k in removed} | {("attention", k) for k in dropped}, rounds


def plan_budget(speechllm: SpeechLLM, batches: Sequence[SpeechBatch], remove: float | None = None,
                fraction: float | None = None, costs: UnitCosts | None = None, token_selection: TokenSelection = "last",
                search: Literal["greedy", "evolutionary"] = "greedy", generations: int = 20, offspring: int = 8,
                seed: int = 0, model_id: str | None = None, progress: bool = True) -> PruningPlan:
    """A mixed plan saving at least ``remove`` of ``costs`` (or ``fraction`` of its total); parameter counts when
    ``costs`` is None. ``search='evolutionary'`` refines the greedy plan for ``generations`` rounds of
    ``offspring`` mutants (:func:`~lightning_speechllm.pruning.evolution.evolve_units`).

    Starts from the unpruned model whatever its entry masks, which are restored at the end (also on error), as is
    train/eval mode. ``batches`` is iterated once per round and must give the same batches each time.
    """
    if token_selection not in TOKEN_SELECTIONS:
        raise PlanError(f"token_selection must be one of {TOKEN_SELECTIONS}, got {token_selection!r}")
    if search not in BUDGET_SEARCHES:
        raise PlanError(f"search must be one of {BUDGET_SEARCHES}, got {search!r}")
    if search == "evolutionary" and (generations < 1 or offspring < 1):
        raise PlanError(f"the evolutionary search needs generations and offspring >= 1, got {generations} and "
                        f"{offspring}")
    costs = costs if costs is not None else parameter_costs(speechllm)
    amount = _budget_amount(costs, remove, fraction)
    mask, sublayers = speechllm.layer_mask, speechllm.sublayer_mask
    entry = (mask.active_layers, sublayers.dropped_attention, sublayers.dropped_mlp)
    modes = [(module, module.training) for module in speechllm.modules()]
    speechllm.eval()
    params: dict[str, Any] = {"budget_unit": costs.unit, "remove": amount, "total": costs.total,
                              "token_selection": token_selection, "search": search}
    try:
        units, params["rounds"] = _greedy_units(speechllm, batches, costs, amount, token_selection, progress)
        if search == "evolutionary":
            from lightning_speechllm.pruning.evolution import evolve_units

            units, params["evolution"] = evolve_units(speechllm, batches, costs, amount, units,
                                                      generations=generations, offspring=offspring, seed=seed,
                                                      progress=progress)
    finally:
        sublayers.reset()
        mask.set_active_layers(entry[0])
        sublayers.drop(entry[1], entry[2])
        for module, training in modes:
            module.training = training
    params["removed"] = costs.saved(units)
    if costs.unit == "params":  # the names plans have carried since parameter budgets came first
        params.update(remove_params=round(amount), removed_params=round(params["removed"]),
                      total_params=round(costs.total))
    else:
        params["unit_costs"] = costs.to_dict()
    if fraction is not None:
        params["fraction"] = fraction
    model_id = model_id if model_id is not None else getattr(speechllm.config, "model_id", None)
    removed = sorted(k for kind, k in units if kind == "layer")
    return PruningPlan(removed_layers=removed, num_layers=mask.num_layers, method="budget", params=params,
                       model_id=model_id, removed_attention=sorted(k for kind, k in units
                                                                   if kind == "attention" and k not in removed))
