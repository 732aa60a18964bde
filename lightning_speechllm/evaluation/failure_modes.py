"""How pruned SpeechLLMs fail: loops, empty outputs and hypotheses cut off at ``max_new_tokens``, as a DDP-syncable
torchmetric (the insertion rate comes from :class:`~lightning_speechllm.evaluation.metrics.WordErrorCounts`).

Definitions (per hypothesis; the rates are shares of the scored hypotheses):

* **loop**: some word n-gram, ``1 <= n <= max_ngram`` (default 4), occurs at least ``min_repeats`` (default 4) times
  back to back ("a b a b a b a b" is the 2-gram "a b" 4 times). Words are the case-folded runs of letters/digits
  (apostrophes inside a word kept), so punctuation and case do not hide a loop. 4 copies, not 3, so that natural
  triples ("no no no", "very very very") are not counted.
* **empty**: nothing but whitespace; for ASR (``normalize=True``) also nothing left after the Whisper English
  normaliser (which drops punctuation and fillers such as "uh", "hmm").
* **max tokens**: generation stopped at ``max_new_tokens`` without a stop token (see
  :class:`~lightning_speechllm.model.generation.GenerationOutput`).
"""
from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from torchmetrics import Metric

from lightning_speechllm.evaluation.metrics import normalize_english
from lightning_speechllm.evaluation.sweep.table import FAILURE_METRICS

__all__ = ["FAILURE_METRICS", "FailureModeCounts", "has_loop", "is_empty", "words"]

_WORD = re.compile(r"[^\W_]+(?:['’][^\W_]+)*")


def words(text: str) -> list[str]:
    """Case-folded words of ``text``: runs of letters/digits, punctuation dropped ("Don't!" -> ["don't"])."""
    return _WORD.findall(text.casefold())


def has_loop(text: str, max_ngram: int = 4, min_repeats: int = 4) -> bool:
    """Whether some word n-gram (n <= ``max_ngram``) occurs ``min_repeats`` or more times in a row in ``text``."""
    if max_ngram < 1 or min_repeats < 2:
        raise ValueError(f"need max_ngram >= 1 and min_repeats >= 2, got {max_ngram} and {min_repeats}")
    tokens = words(text)
    for n in range(1, max_ngram + 1):
        for start in range(len(tokens) - n * min_repeats + 1):
            if _copies(tokens, start, n, min_repeats) >= min_repeats:
                return True
    return False


def _copies(tokens: list[str], start: int, n: int, enough: int) -> int:
    """How many times ``tokens[start:start + n]`` occurs back to back from ``start`` (counting stops at ``enough``)."""
    gram, count, at = tokens[start:start + n], 1, start + n
    while count < enough and tokens[at:at + n] == gram:
        count, at = count + 1, at + n
    return count


def is_empty(text: str, normalize: bool = False) -> bool:
    """Whether ``text`` is blank (with ``normalize``: or blank after the Whisper English normaliser)."""
    return not text.strip() or (normalize and not normalize_english(text).strip())


class FailureModeCounts(Metric):
    """Counts of looping, empty and ``max_new_tokens``-truncated hypotheses, summed across ranks.

    ``update(hypotheses, hit_max_tokens, normalize)``; ``compute()`` returns a dict: loop_rate, empty_rate,
    max_tokens_rate (fractions in [0, 1]; 0 when nothing was scored) and hypotheses (the count).
    """

    full_state_update = False

    def __init__(self, max_ngram: int = 4, min_repeats: int = 4, **kwargs) -> None:
        super().__init__(**kwargs)
        has_loop("", max_ngram, min_repeats)  # validates the parameters
        self.max_ngram, self.min_repeats = max_ngram, min_repeats
        for name in ("hypotheses", "loops", "empties", "max_tokens"):
            self.add_state(name, default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, hypotheses: Sequence[str], hit_max_tokens: Sequence[bool], normalize: bool = False) -> None:
        """Count ``hypotheses``; ``hit_max_tokens[i]``: the i-th ran to ``max_new_tokens`` without a stop token;
        ``normalize``: also call empty what the Whisper English normaliser empties (ASR)."""
        if len(hypotheses) != len(hit_max_tokens):
            raise ValueError(f"{len(hypotheses)} hypotheses but {len(hit_max_tokens)} hit_max_tokens flags")
        self.hypotheses += len(hypotheses)
        self.loops += sum(has_loop(h, self.max_ngram, self.min_repeats) for h in hypotheses)
        self.empties += sum(is_empty(h, normalize) for h in hypotheses)
        self.max_tokens += sum(bool(hit) for hit in hit_max_tokens)

    def compute(self) -> dict[str, torch.Tensor]:
        total = self.hypotheses.clamp(min=1).float()
        return {"loop_rate": self.loops / total, "empty_rate": self.empties / total,
                "max_tokens_rate": self.max_tokens / total, "hypotheses": self.hypotheses}
