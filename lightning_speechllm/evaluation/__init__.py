"""Scoring: WER after the Whisper English normaliser, BLEU with sacreBLEU, failure modes (loops, empties, ...); the
sweep and method comparison, efficiency benchmarks and reports, which run every other room's code.
May import: every room of the package (it is the end of the data flow); `model` imports only its metrics."""
from lightning_speechllm.evaluation.failure_modes import FAILURE_METRICS, FailureModeCounts
from lightning_speechllm.evaluation.metrics import WordErrorCounts, corpus_bleu_metric, normalize_english

__all__ = ["FAILURE_METRICS", "FailureModeCounts", "WordErrorCounts", "corpus_bleu_metric", "normalize_english"]
