"""What :meth:`~lightning_speechllm.model.speechllm.SpeechLLM.generate_with_details` returns: the texts and, per
hypothesis, how many tokens it generated and whether a stop token ended it."""
from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

import torch


@dataclass
class GenerationOutput:
    """Decoded hypotheses with their generation lengths."""

    texts: list[str]
    """The hypotheses, special tokens dropped, stripped."""
    num_tokens: list[int]
    """Tokens generated per hypothesis: up to and including its first stop token, padding after it excluded."""
    stopped: list[bool]
    """Whether a stop token ended the hypothesis."""
    max_new_tokens: int
    """The generation budget."""

    @property
    def hit_max_tokens(self) -> list[bool]:
        """Per hypothesis: it used all ``max_new_tokens`` without emitting a stop token (cut off, e.g. a loop)."""
        return [not stop and n >= self.max_new_tokens for n, stop in zip(self.num_tokens, self.stopped)]


def generated_lengths(new_ids: torch.Tensor, stop_ids: Collection[int]) -> tuple[list[int], list[bool]]:
    """Per row of ``new_ids`` (the generated tokens only, [B, T]): tokens up to and including the first stop token
    (T when there is none), and whether there is one. Padding follows a stop token, so it is never counted."""
    is_stop = torch.isin(new_ids, torch.tensor(sorted(stop_ids), dtype=new_ids.dtype, device=new_ids.device))
    stopped = is_stop.any(dim=1)
    first = is_stop.int().argmax(dim=1)  # the first True (0 when none: replaced below)
    lengths = torch.where(stopped, first + 1, torch.full_like(first, new_ids.shape[1]))
    return lengths.tolist(), stopped.tolist()
