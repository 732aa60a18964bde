"""Evolutionary refinement of a budgeted plan (after EvoPress, Sieberling et al., ICML 2025).

A candidate is a set of removed units (whole layers and attention sublayers) that saves at least the budget. Its
fitness is the KL divergence ``KL(unpruned || candidate)`` of the next-token distributions on the target tokens of
the calibration batches, in nats per token (teacher-forced, lower is better): what EvoPress scores, and closer to
WER than the stream distances that the greedy rounds price units by.

The search is a (1 + λ) evolution from the greedy plan: each generation mutates the parent ``offspring`` times and
the best mutant replaces it when it scores strictly lower, so the result is never worse than the greedy plan on the
calibration batches. A mutation frees 1 to ``max_moves`` random units and adds random other units until the budget
is met again (a layer may so be traded for attention sublayers, or back), then drops random units the budget does
not need. Candidates already scored are not scored again. The random generator is seeded: the same inputs give the
same plan.
"""
from __future__ import annotations

import math
import random
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm

from lightning_speechllm.model.speechllm import IGNORE_INDEX
from lightning_speechllm.pruning.budget import Unit, UnitCosts, apply_units
from lightning_speechllm.pruning.plan import PlanError

if TYPE_CHECKING:
    from lightning_speechllm.data.batch import SpeechBatch
    from lightning_speechllm.model.speechllm import SpeechLLM

__all__ = ["PlanFitness", "evolve_units", "mutate"]


@torch.no_grad()
def _target_log_probs(speechllm: SpeechLLM, batch: SpeechBatch) -> torch.Tensor:
    """``[target tokens, vocab]`` float32 log-probabilities of the positions that predict each target token."""
    _, output, inputs = speechllm(batch, shared_prefix=False)
    window = output.logits.shape[1]
    targets = inputs.labels[:, -window:][:, 1:] != IGNORE_INDEX
    return output.logits[:, :-1][targets].float().log_softmax(dim=-1)


class PlanFitness:
    """``KL(unpruned || candidate)`` per target token on ``batches``; the unpruned log-probabilities are computed
    once (``[target tokens, vocab]`` float32 per batch, kept on the model's device)."""

    def __init__(self, speechllm: SpeechLLM, batches: Sequence[SpeechBatch]) -> None:
        self.speechllm = speechllm
        self.batches = [batch.to(speechllm.device) for batch in batches]
        apply_units(speechllm, ())
        self.reference = [_target_log_probs(speechllm, batch) for batch in self.batches]
        self.tokens = sum(len(reference) for reference in self.reference)
        if self.tokens == 0:
            raise PlanError("the calibration batches hold no target token: the evolutionary search scores plans by "
                            "the KL divergence on target tokens")
        self.scores: dict[frozenset[Unit], float] = {}

    def __call__(self, units: frozenset[Unit]) -> float:
        if units not in self.scores:
            apply_units(self.speechllm, units)
            total = 0.0
            for batch, reference in zip(self.batches, self.reference):
                candidate = _target_log_probs(self.speechllm, batch)
                total += float((reference.exp() * (reference - candidate)).sum())
            kl = total / self.tokens
            self.scores[units] = kl if math.isfinite(kl) else math.inf  # an overflowing candidate is the worst
        return self.scores[units]


def _addable(units: set[Unit], costs: UnitCosts) -> list[Unit]:
    """Units not yet removed that may go: a layer while another stays, an attention with a cost of its own."""
    num_layers = len(costs.layer)
    removed = {k for kind, k in units if kind == "layer"}
    options = [("attention", k) for k in range(num_layers)
               if k not in removed and ("attention", k) not in units and costs.attention[k] > 0]
    if len(removed) < num_layers - 1:
        options += [("layer", k) for k in range(num_layers) if k not in removed]
    return options


def _replace(units: set[Unit], freed: Unit, costs: UnitCosts, amount: float,
             rng: random.Random) -> set[Unit] | None:
    """``units`` less ``freed``, plus random other units until ``amount`` is saved (None: no other units can)."""
    units = units - {freed}
    while costs.saved(units) < amount:
        options = [unit for unit in _addable(units, costs) if unit != freed]
        if not options:
            return None
        kind, layer = rng.choice(options)
        units.discard(("attention", layer))  # a removed layer holds its attention
        units.add((kind, layer))
    return units


def mutate(parent: frozenset[Unit], costs: UnitCosts, amount: float, rng: random.Random,
           moves: int = 1) -> frozenset[Unit]:
    """``parent`` with ``moves`` random units freed and random others added until ``amount`` is saved again, then
    random units the budget does not need dropped (a removed layer replaces its own dropped attention). A unit no
    others can stand in for (near the largest budget) is not freed; when none can be, the move is skipped."""
    units = set(parent)
    for _ in range(moves):
        for freed in rng.sample(sorted(units), len(units)):  # the first unit whose place others can take
            moved = _replace(units, freed, costs, amount, rng)
            if moved is not None:
                units = moved
                break
    for unit in rng.sample(sorted(units), len(units)):
        if costs.saved(units - {unit}) >= amount:
            units.discard(unit)
    return frozenset(units)


def evolve_units(speechllm: SpeechLLM, batches: Sequence[SpeechBatch], costs: UnitCosts, amount: float,
                 start: set[Unit], generations: int = 20, offspring: int = 8, seed: int = 0, max_moves: int = 3,
                 progress: bool = True) -> tuple[set[Unit], dict[str, Any]]:
    """The best plan found from ``start`` (which must save ``amount``), and the search's record: the KL of the start
    and of the result, the best KL after each generation, and how many distinct candidates were scored. Leaves the
    model masked to the last candidate scored (the caller restores it)."""
    if generations < 1 or offspring < 1 or max_moves < 1:
        raise PlanError(f"the evolutionary search needs generations, offspring and max_moves >= 1; got {generations}, "
                        f"{offspring}, {max_moves}")
    if costs.saved(start) < amount:
        raise PlanError(f"the starting plan saves {costs.saved(start):.6g} {costs.unit}, under the budget "
                        f"{amount:.6g}")
    fitness = PlanFitness(speechllm, batches)
    rng = random.Random(seed)
    parent = frozenset(start)
    best = start_kl = fitness(parent)
    history = []
    bar = tqdm(range(generations), desc="evolutionary search", unit="generation", disable=not progress)
    for _ in bar:
        children = {mutate(parent, costs, amount, rng, moves=rng.randint(1, max_moves)) for _ in range(offspring)}
        kl, child = min((fitness(child), sorted(child)) for child in sorted(children, key=sorted))
        if kl < best:
            parent, best = frozenset(child), kl
        history.append(best)
        bar.set_postfix(kl=f"{best:.4f}", scored=len(fitness.scores))
    record = {"generations": generations, "offspring": offspring, "seed": seed, "max_moves": max_moves,
              "start_kl": start_kl, "kl": best, "history": history, "scored": len(fitness.scores),
              "start": sorted(start)}
    return set(parent), record
