"""Scoring: WER after the Whisper English normaliser, BLEU with sacreBLEU, failure modes (loops, empties, ...)."""
from lightning_speechllm.evaluation.failure_modes import FAILURE_METRICS, FailureModeCounts
from lightning_speechllm.evaluation.metrics import WordErrorCounts, corpus_bleu_metric, normalize_english

__all__ = ["FAILURE_METRICS", "FailureModeCounts", "WordErrorCounts", "corpus_bleu_metric", "normalize_english"]
