"""Iterative prune-heal schedule: remove k layers, heal s steps, re-measure, remove k more, ...

:class:`IterativePruning` is a Lightning callback for a :class:`HealingModule`. At global steps ``0, s, 2s, ...``
(``rounds`` times) it measures the angular-distance map d(l, n) of the CURRENT (masked, partly healed) student on
a few validation batches (``RedundancyAccumulator`` over the active layers), takes the best block of
``layers_per_round`` consecutive ACTIVE layers (``argmin_l d(l, k)``), translates its positions to the original
layer numbering and removes it from the mask (:meth:`HealingModule.remove_more_layers`).

LoRA placement: PEFT cannot cleanly add adapters to an already wrapped model mid-training, so start the schedule
with LoRA on every layer that may receive a cut (``healing.lora.layers: null`` with no initial plan puts LoRA on
every layer). Adapters of removed layers stay (unused, never updated again). When a new receiving layer has no
adapter a warning says so. No parameter is added, so the optimizer state needs no reset.

The rounds are recorded in :meth:`state_dict` (saved in Lightning checkpoints); the module's plan is marked
``iterative`` so that a checkpoint taken after round r reloads into a module built with the initial plan, and the
callback checks that the restored mask matches its record. Under DDP every rank measures the same number of
batches and the map is synced across ranks (all ranks remove the same block). Any DDP setting works, the shipped
``find_unused_parameters: false`` included: DDP's reducer keeps the adapters of removed layers registered, so the
module adds them to the loss with weight 0 and drops their zero gradients before the optimizer step
(:meth:`HealingModule.masked_trainables`); they never update again.

YAML::

    trainer:
      callbacks:
        - class_path: lightning_speechllm.healing.iterative.IterativePruning
          init_args: {layers_per_round: 2, rounds: 4, heal_steps: 500, measure_batches: 8}
"""
from __future__ import annotations

from itertools import islice
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from lightning_speechllm.healing.module import HealingModule
from lightning_speechllm.redundancy.measure import RedundancyAccumulator
from lightning_speechllm.redundancy.metrics import TokenSelection

__all__ = ["IterativePruning", "IterativePruningError", "best_block"]


class IterativePruningError(RuntimeError):
    """The schedule cannot run (wrong module, no measurement data, too few layers, inconsistent resume)."""


def best_block(table: torch.Tensor, block: int) -> tuple[int, float]:
    """(l*, d(l*, block)): the start position minimising row ``block-1`` of a d(l, n) table (ties: smallest l)."""
    num_layers = table.shape[0]
    if not 1 <= block < num_layers:
        raise IterativePruningError(f"cannot remove a block of {block} from {num_layers} active layers "
                                    "(at least one layer must stay)")
    row = table[block - 1, : num_layers - block + 1]
    if not torch.isfinite(row).all():
        raise IterativePruningError(f"non-finite angular distances for block size {block}: {row.tolist()}")
    start = int(torch.argmin(row))
    return start, float(row[start])


class IterativePruning(L.Callback):
    """Remove ``layers_per_round`` layers every ``heal_steps`` optimizer steps, ``rounds`` times (from step 0)."""

    def __init__(self, layers_per_round: int = 1, rounds: int = 1, heal_steps: int = 500,
                 token_selection: TokenSelection = "last", measure_batches: int = 4,
                 measure_set: str | None = None) -> None:
        """`measure_set`: the validation-set name to measure on (default: the first set)."""
        super().__init__()
        for name, value in (("layers_per_round", layers_per_round), ("rounds", rounds), ("heal_steps", heal_steps),
                            ("measure_batches", measure_batches)):
            if value < 1:
                raise ValueError(f"IterativePruning {name} must be >= 1, got {value}")
        self.layers_per_round, self.rounds, self.heal_steps = layers_per_round, rounds, heal_steps
        self.token_selection, self.measure_batches, self.measure_set = token_selection, measure_batches, measure_set
        self.history: list[dict[str, Any]] = []
        self.initial_removed: list[int] | None = None

    # ------------------------------------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {"history": [dict(r) for r in self.history], "initial_removed": self.initial_removed}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = [dict(r) for r in state_dict.get("history", [])]
        self.initial_removed = state_dict.get("initial_removed")

    @property
    def removed_by_rounds(self) -> list[int]:
        return sorted(i for r in self.history for i in r["removed"])

    # ------------------------------------------------------------------------------------------------ hooks
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        module = self._healing_module(pl_module)
        current = list(module.plan["removed_layers"])
        if self.initial_removed is None:
            self.initial_removed = current
        expected = sorted({*self.initial_removed, *self.removed_by_rounds})
        if current != expected:
            raise IterativePruningError(f"the module removes layers {current}, but the schedule's record says "
                                        f"{expected} (initial {self.initial_removed}, rounds {self.history})")

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        step = trainer.global_step
        done = len(self.history)
        if done >= self.rounds or step != done * self.heal_steps:
            return
        self.prune_round(trainer, self._healing_module(pl_module), step)

    # ------------------------------------------------------------------------------------------------ a round
    def prune_round(self, trainer: L.Trainer, module: HealingModule, step: int) -> dict[str, Any]:
        """Measure the current student, remove its best block of `layers_per_round`, record and log the round."""
        active = list(module.speechllm.layer_mask.active_layers)
        table = self.measure(trainer, module)
        start, distance = best_block(table, self.layers_per_round)
        removed = active[start:start + self.layers_per_round]
        module.remove_more_layers(removed)
        record = {"round": len(self.history) + 1, "step": step, "removed": removed, "distance": distance,
                  "active_before": active}
        self.history.append(record)
        self._warn_missing_adapters(module)
        rank_zero_info(f"iterative pruning round {record['round']} at step {step}: removed layers {removed} "
                       f"(d={distance:.4f}); now removed {module.plan['removed_layers']}")
        module.log_dict({"iterative/round": float(record["round"]), "iterative/distance": distance,
                         "iterative/num_removed": float(len(module.plan["removed_layers"]))},
                        on_step=True, on_epoch=False, batch_size=1)
        return record

    @torch.no_grad()
    def measure(self, trainer: L.Trainer, module: HealingModule) -> torch.Tensor:
        """d(l, n) of the current student (active layers only) on `measure_batches` validation batches per rank,
        synced over the ranks. Every rank measures the same number of batches (the fewest any rank has), so that
        sharded forwards stay in lock-step and a rank without data fails every rank instead of leaving the others
        waiting in the all-gather."""
        batches = list(islice(self._measure_loader(trainer), self.measure_batches))
        count = self._fewest_on_any_rank(trainer, module, len(batches))
        if count == 0:
            raise IterativePruningError("the measurement dataloader yielded no batches on some rank "
                                        f"(this rank: {len(batches)})")
        sl = module.speechllm
        accumulator = RedundancyAccumulator(len(sl.layer_mask.active_layers), self.token_selection,
                                            keep_per_sample=False).to(module.device)
        was_training = module.training
        module.eval()
        try:
            # The bare SpeechLLM, not the DDP wrapper: no reducer bookkeeping for a no-grad forward.
            for batch in batches[:count]:
                accumulator.update(sl, trainer.strategy.batch_to_device(batch, module.device))
        finally:
            module.train(was_training)
        return accumulator.angular.compute().cpu()  # sums synced over the ranks: the same map on every rank

    @staticmethod
    def _fewest_on_any_rank(trainer: L.Trainer, module: HealingModule, count: int) -> int:
        """min over the ranks of `count` (a collective: every rank calls it at the same step)."""
        local = torch.tensor(float(count), device=module.device)
        return int(trainer.strategy.reduce(local, reduce_op="min"))

    # ------------------------------------------------------------------------------------------------ helpers
    def _measure_loader(self, trainer: L.Trainer) -> Any:
        datamodule = getattr(trainer, "datamodule", None)
        loaders = datamodule.val_dataloader() if datamodule is not None else trainer.val_dataloaders
        if loaders is None:
            raise IterativePruningError("IterativePruning needs validation data to measure on (a datamodule with "
                                        "val_dataloader() or val_dataloaders passed to fit)")
        loaders = list(loaders) if isinstance(loaders, (list, tuple)) else [loaders]
        names = list(getattr(datamodule, "val_set_names", None) or [])
        if self.measure_set is None:
            index = 0
        elif self.measure_set in names:
            index = names.index(self.measure_set)
        else:
            raise IterativePruningError(f"measure_set {self.measure_set!r} is not a validation set (sets: {names})")
        if not loaders:
            raise IterativePruningError("no validation dataloader to measure on")
        return loaders[index]

    @staticmethod
    def _healing_module(pl_module: L.LightningModule) -> HealingModule:
        if not isinstance(pl_module, HealingModule):
            raise IterativePruningError(f"IterativePruning needs a HealingModule, got {type(pl_module).__name__}")
        return pl_module

    @staticmethod
    def _warn_missing_adapters(module: HealingModule) -> None:
        lora = module.speechllm.config.lora
        if lora is None or lora.layers is None:
            return
        missing = sorted(set(module.plan["receiving_layers"]) - set(lora.layers))
        if missing:
            rank_zero_warn(f"receiving layer(s) {missing} carry no LoRA adapter (LoRA layers {lora.layers}); "
                           "start iterative healing with healing.lora.layers: null to adapt every layer")
