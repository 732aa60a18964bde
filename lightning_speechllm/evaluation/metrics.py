"""WER (jiwer alignment, Whisper English normaliser) and BLEU (sacreBLEU) as DDP-syncable torchmetrics."""
from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import jiwer
import torch
from sacrebleu.metrics import BLEU
from torchmetrics import Metric


@lru_cache(maxsize=1)
def _english_normalizer():
    from whisper_normalizer.english import EnglishTextNormalizer

    return EnglishTextNormalizer()


def normalize_english(text: str) -> str:
    """The Whisper English text normaliser (as used for LibriSpeech WER in the paper)."""
    return _english_normalizer()(text)


class WordErrorCounts(Metric):
    """Corpus WER with substitution / deletion / insertion counts, summed across ranks.

    `compute()` returns a dict: wer, substitutions, deletions, insertions, reference_words, and insertion_rate
    (insertions / reference words: the hallucinated words of pruned models).
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
        words = self.reference_words.clamp(min=1).float()
        return {"wer": errors.float() / words, "substitutions": self.substitutions, "deletions": self.deletions,
                "insertions": self.insertions, "reference_words": self.reference_words,
                "insertion_rate": self.insertions.float() / words}


class CorpusBLEU(Metric):
    """Corpus BLEU exactly as ``sacrebleu.corpus_bleu(hypotheses, [references]).score`` computes it (its defaults:
    13a tokenisation, ``exp`` smoothing, 4-gram), as a torchmetric whose states sync across DDP ranks.

    The states are sacreBLEU's sufficient statistics, summed over utterances and ranks: matched and total n-grams per
    order, hypothesis length and closest-reference length; :meth:`compute` hands them to
    ``sacrebleu.metrics.BLEU.compute_bleu``, so the sharded corpus scores what the whole corpus would.

    torchmetrics' ``SacreBLEUScore`` differs: it does not smooth (``smooth=False``), so a corpus with no matching
    4-gram (short utterances, early training) scores 0 where sacreBLEU's ``exp`` smoothing gives a positive score.

    ``update(hypotheses, references)`` takes one list of reference strings per hypothesis (``[[ref] for ref in refs]``),
    the same number for each; ``compute()`` returns BLEU in [0, 1] (x100 for sacreBLEU's scale) as float64.
    """

    full_state_update = False

    def __init__(self, tokenize: str = "13a", smooth_method: str = "exp", max_ngram_order: int = 4, **kwargs) -> None:
        super().__init__(**kwargs)
        self.bleu = BLEU(tokenize=tokenize, smooth_method=smooth_method, max_ngram_order=max_ngram_order)
        for name in ("correct", "total"):
            self.add_state(name, default=torch.zeros(max_ngram_order, dtype=torch.long), dist_reduce_fx="sum")
        for name in ("sys_len", "ref_len"):
            self.add_state(name, default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> None:
        if len(hypotheses) != len(references):
            raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} reference lists")
        if not hypotheses:
            return
        counts = {len(refs) for refs in references}
        if len(counts) != 1 or 0 in counts:
            raise ValueError(f"every hypothesis needs the same number (>= 1) of references, got {sorted(counts)}")
        streams = [list(stream) for stream in zip(*references)]  # sacreBLEU's layout: one list per reference
        stats = self.bleu.corpus_score(list(hypotheses), streams)
        self.correct += torch.tensor(stats.counts, dtype=torch.long, device=self.correct.device)
        self.total += torch.tensor(stats.totals, dtype=torch.long, device=self.total.device)
        self.sys_len += int(stats.sys_len)
        self.ref_len += int(stats.ref_len)

    def compute(self) -> torch.Tensor:
        score = BLEU.compute_bleu(correct=self.correct.tolist(), total=self.total.tolist(),
                                  sys_len=int(self.sys_len), ref_len=int(self.ref_len),
                                  smooth_method=self.bleu.smooth_method, smooth_value=self.bleu.smooth_value,
                                  max_ngram_order=self.bleu.max_ngram_order).score
        dtype = torch.float32 if self.correct.device.type == "mps" else torch.float64
        return torch.tensor(score / 100.0, dtype=dtype, device=self.correct.device)


def corpus_bleu_metric() -> CorpusBLEU:
    """Corpus BLEU with sacreBLEU's defaults (13a, exp smoothing): :class:`CorpusBLEU`.

    `update(hypotheses, [[ref] for ref in references])`; `compute()` returns BLEU in [0, 1] (x100 for sacreBLEU's scale).
    """
    return CorpusBLEU()
