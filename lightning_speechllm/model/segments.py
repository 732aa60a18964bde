"""Which part of the prompt each token position belongs to (shared by the model and the redundancy metrics)."""
from __future__ import annotations

from enum import IntEnum


class Segment(IntEnum):
    """Segment id of a token position in a SpeechLLM input sequence."""

    PAD = 0
    PROMPT = 1  # template / instruction tokens (chat template included)
    SPEECH = 2  # projected speech frames, or the transcript's embeddings in text-only mode
    TARGET = 3  # the target text (transcript or translation) plus its end token
