"""WER (jiwer alignment, Whisper English normaliser) and BLEU (sacreBLEU) as DDP-syncable torchmetrics."""
from __future__ import annotations

from functools import lru_cache

import jiwer
import torch
from torchmetrics import Metric
from torchmetrics.text import SacreBLEUScore


@lru_cache(maxsize=1)
def _english_normalizer():
    from whisper_normalizer.english import EnglishTextNormalizer

    return EnglishTextNormalizer()


def normalize_english(text: str) -> str:
    """The Whisper English text normaliser (as used for LibriSpeech WER in the paper)."""
    return _english_normalizer()(text)


class WordErrorCounts(Metric):
    """Corpus WER with substitution / deletion / insertion counts, summed across ranks.

    `compute()` returns a dict: wer, substitutions, deletions, insertions, reference_words.
    """

    full_state_update = False

    def __init__(self, normalize: bool = True, **kwargs) -> None:
        super().__init__(**kwargs)
        self.normalize = normalize
        for name in ("substitutions", "deletions", "insertions", "reference_words"):
            self.add_state(name, default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, hypotheses: list[str], references: list[str]) -> None:
        if len(hypotheses) != len(references):
            raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references")
        if self.normalize:
            hypotheses = [normalize_english(h) for h in hypotheses]
            references = [normalize_english(r) for r in references]
        for hyp, ref in zip(hypotheses, references):
            self._add_pair(hyp, ref)

    def _add_pair(self, hyp: str, ref: str) -> None:
        ref_words = len(ref.split())
        if ref_words == 0:  # jiwer refuses empty references; every hypothesis word is an insertion
            self.insertions += len(hyp.split())
            return
        out = jiwer.process_words(ref, hyp if hyp.strip() else "")
        self.substitutions += out.substitutions
        self.deletions += out.deletions
        self.insertions += out.insertions
        self.reference_words += ref_words

    def compute(self) -> dict[str, torch.Tensor]:
        errors = self.substitutions + self.deletions + self.insertions
        wer = errors.float() / self.reference_words.clamp(min=1).float()
        return {"wer": wer, "substitutions": self.substitutions, "deletions": self.deletions,
                "insertions": self.insertions, "reference_words": self.reference_words}


def corpus_bleu_metric() -> SacreBLEUScore:
    """Corpus BLEU with sacreBLEU's default 13a tokenisation (states are n-gram counts, so it syncs under DDP).

    `update(hypotheses, [[ref] for ref in references])`; `compute()` returns BLEU in [0, 1] (x100 for sacreBLEU's scale).
    """
    return SacreBLEUScore(tokenize="13a")
