"""Scoring: WER after the Whisper English normaliser, BLEU with sacreBLEU."""
from lightning_speechllm.evaluation.metrics import WordErrorCounts, corpus_bleu_metric, normalize_english

__all__ = ["WordErrorCounts", "corpus_bleu_metric", "normalize_english"]
