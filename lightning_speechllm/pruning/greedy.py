"""Greedy, re-measured pruning plans (SLEB-style): remove one block at a time, re-measuring after every removal.

Each round measures the angular-distance table ``d(l, step)`` of the *currently active* decoder layers on the same
calibration batches (one teacher-forced forward per batch), removes the block of ``step`` consecutive active layers
with the smallest distance, and repeats until ``n`` layers are gone (the last round removes fewer when ``step`` does
not divide ``n``). Since the layers are re-measured after every cut, the removed layers need not be contiguous in the
original numbering. With ``step == n`` the single round is :func:`~lightning_speechllm.pruning.plan.plan_angular` on
a map of the same batches.

The plan's ``params["rounds"]`` lists each round's removed layers (original indices) and distance; a later call with
``start_from=`` that plan reuses the rounds a fresh run would repeat, so growing ``n`` (a sweep at 20 % then 40 %)
measures only the new rounds.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm

from lightning_speechllm.model.layer_mask import DecoderLayerMask
from lightning_speechllm.pruning.plan import PlanError, PruningPlan, block_size
from lightning_speechllm.redundancy.analysis import pruning_path
from lightning_speechllm.redundancy.metrics import (
    TOKEN_SELECTIONS,
    AngularDistanceMetric,
    TokenSelection,
    select_tokens,
)

if TYPE_CHECKING:
    from lightning_speechllm.data.batch import SpeechBatch
    from lightning_speechllm.model.speechllm import SpeechLLM

__all__ = ["greedy_schedule", "measure_active_table", "plan_greedy"]


def greedy_schedule(size: int, step: int) -> list[int]:
    """Layers removed per round: ``step`` each, the remainder last (``greedy_schedule(5, 2) == [2, 2, 1]``)."""
    return [step] * (size // step) + ([size % step] if size % step else [])


@torch.no_grad()
def measure_active_table(speechllm: SpeechLLM, batches: Iterable[SpeechBatch],
                         token_selection: TokenSelection = "last") -> tuple[torch.Tensor, int]:
    """``d(l, n)`` (``[L_active, L_active]``, float64, on the CPU) of the active decoder layers over ``batches``
    (one teacher-forced forward each), and the number of batches measured."""
    from lightning_speechllm.redundancy.measure import RedundancyAccumulator

    device = speechllm.device
    metric = AngularDistanceMetric(len(speechllm.layer_mask.active_layers), keep_per_sample=False).to(device)
    count = 0
    for batch in batches:
        states, segment_ids = RedundancyAccumulator.record(speechllm, batch.to(device))
        metric.update(states, select_tokens(segment_ids, token_selection))
        count += 1
    if count == 0:
        raise PlanError("the calibration batches yielded no batch (an iterator is exhausted after one pass: give a "
                        "list or a re-iterable dataloader)")
    if int(metric.token_count) == 0:
        raise PlanError(f"token selection {token_selection!r} selects no token of the calibration batches")
    return metric.compute().cpu(), count


@contextmanager
def _restored(speechllm: SpeechLLM) -> Iterator[DecoderLayerMask]:
    """Eval mode and the model's layer selection inside; the entry selection and train/eval mode restored after."""
    mask, modes = speechllm.layer_mask, {name: module.training for name, module in speechllm.named_modules()}
    entry = mask.active_layers
    speechllm.eval()
    try:
        yield mask
    finally:
        mask.set_active_layers(entry)  # by name: the mask puts the active layers in a new ModuleList
        for name, module in speechllm.named_modules():
            module.training = modes.get(name, module.training)


def _reused_rounds(start_from: PruningPlan | None, schedule: list[int], num_layers: int, step: int,
                   token_selection: str, model_id: str | None) -> list[dict[str, Any]]:
    """The leading rounds of ``start_from`` that a fresh run with ``schedule`` would repeat (same block sizes)."""
    if start_from is None:
        return []
    if start_from.method != "greedy" or "rounds" not in start_from.params:
        raise PlanError(f"start_from must be a greedy plan with params['rounds'], got a {start_from.method} plan")
    start_from.validate_for(num_layers, model_id)
    for key, value in (("step", step), ("token_selection", token_selection)):
        if start_from.params.get(key) != value:
            raise PlanError(f"start_from was built with {key}={start_from.params.get(key)!r}, not {value!r}")
    reused: list[dict[str, Any]] = []
    for planned, done in zip(schedule, start_from.params["rounds"]):
        if len(done["removed"]) != planned:
            break
        reused.append({"removed": [int(i) for i in done["removed"]], "distance": float(done["distance"])})
    return reused


def _best_block(table: torch.Tensor, size: int, active: tuple[int, ...]) -> tuple[list[int], float]:
    """The ``size`` consecutive active layers (original indices) with the smallest ``d(l, size)``, and that d."""
    first = pruning_path(table.numpy())[size - 1]
    return list(active[first:first + size]), float(table[size - 1, first])


def plan_greedy(speechllm: SpeechLLM, batches: Iterable[SpeechBatch], n: int | None = None,
                fraction: float | None = None, step: int = 1, token_selection: TokenSelection = "last",
                model_id: str | None = None, start_from: PruningPlan | None = None,
                progress: bool = True) -> PruningPlan:
    """Greedy plan removing ``n`` (or ``round(fraction * L)``) decoder layers, ``step`` per re-measured round.

    Indices are positions in ``speechllm.layer_mask`` (``num_layers`` layers). Measuring starts from all of them
    active (less ``start_from``'s reused rounds), whatever the entry selection, which is restored at the end (also
    on error), as is train/eval mode. ``batches`` (SpeechBatch, moved to the model's device in place) is iterated
    once per measured round and must give the same batches each time. ``start_from``: an earlier greedy plan (same
    model, ``step`` and ``token_selection``) whose leading rounds of the same sizes are kept instead of re-measured.
    ``model_id`` defaults to the model's ``config.model_id``.
    """
    if isinstance(step, bool) or not isinstance(step, int) or step < 1:
        raise PlanError(f"step must be a positive int, got {step!r}")
    if token_selection not in TOKEN_SELECTIONS:
        raise PlanError(f"token_selection must be one of {TOKEN_SELECTIONS}, got {token_selection!r}")
    mask = speechllm.layer_mask
    model_id = model_id if model_id is not None else getattr(speechllm.config, "model_id", None)
    size = block_size(mask.num_layers, n, fraction)
    schedule = greedy_schedule(size, step)
    rounds = _reused_rounds(start_from, schedule, mask.num_layers, step, token_selection, model_id)
    calibration = start_from.params.get("calibration_batches") if rounds and start_from is not None else None
    removed = [i for done in rounds for i in done["removed"]]
    bar = tqdm(total=len(schedule), initial=len(rounds), desc="greedy pruning", unit="round", disable=not progress)
    with _restored(speechllm), bar:
        for block in schedule[len(rounds):]:
            mask.remove_layers(removed)
            table, count = measure_active_table(speechllm, batches, token_selection)
            if calibration is not None and count != calibration:
                raise PlanError(f"the calibration batches gave {count} batches in round {len(rounds) + 1} but "
                                f"{calibration} before: give the same batches every round")
            calibration = count
            chosen, distance = _best_block(table, block, mask.active_layers)
            rounds.append({"removed": chosen, "distance": distance})
            removed.extend(chosen)
            bar.set_postfix(removed=chosen, d=f"{distance:.4f}")
            bar.update()
    params: dict[str, Any] = {"n": size} if fraction is None else {"fraction": fraction, "n": size}
    params.update(step=step, token_selection=token_selection, calibration_batches=calibration, rounds=rounds)
    return PruningPlan(removed_layers=removed, num_layers=mask.num_layers, method="greedy", params=params,
                       model_id=model_id)
