"""User-defined healing losses, loaded by class_path in the healing tests (importable in spawned processes)."""
from __future__ import annotations

import torch
from torch import Tensor

from lightning_speechllm.healing.losses import HealingInputs, HealingLoss


class LogitL2(HealingLoss):
    """Mean squared logit difference to the teacher on target tokens (a user-defined distillation loss)."""

    needs_teacher = True

    def __init__(self, scale: float = 1.0) -> None:
        super().__init__()
        self.scale = scale

    def forward(self, inputs: HealingInputs) -> tuple[Tensor, dict[str, Tensor]]:
        diff = inputs.student_logits[inputs.target_mask] - inputs.teacher_logits[inputs.target_mask]
        return self.scale * diff.pow(2).mean(), {}


class NonFiniteLoss(HealingLoss):
    """Goes NaN from call number `from_call` on (0-based); zero before, attached to the student graph."""

    def __init__(self, from_call: int = 0) -> None:
        super().__init__()
        self.from_call, self.calls = from_call, 0

    def forward(self, inputs: HealingInputs) -> tuple[Tensor, dict[str, Tensor]]:
        value = 0.0 * inputs.student_logits.sum()
        self.calls += 1
        return (value + float("nan") if self.calls > self.from_call else value), {}


class NotALoss(torch.nn.Module):
    """A module that is not a HealingLoss (load_loss must refuse it)."""


class NonFiniteOnRank(HealingLoss):
    """NaN on one DDP rank only, at its `at_call`-th call (0-based); zero elsewhere, attached to the student graph."""

    def __init__(self, rank: int = 1, at_call: int = 0) -> None:
        super().__init__()
        self.rank, self.at_call, self.calls = rank, at_call, 0

    def forward(self, inputs: HealingInputs) -> tuple[Tensor, dict[str, Tensor]]:
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        value = 0.0 * inputs.student_logits.sum()
        nan = rank == self.rank and self.calls == self.at_call
        self.calls += 1
        return (value + float("nan") if nan else value), {}
