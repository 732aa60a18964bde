"""Tiny random released SpeechLLMs saved with `save_pretrained` (no hub): the model, its processor and tokenizer."""
from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    Qwen2AudioConfig,
    Qwen2AudioForConditionalGeneration,
    Qwen2AudioProcessor,
    WhisperFeatureExtractor,
)

from tests.tiny_speechllm import tiny_tokenizer

QWEN2_AUDIO_TOKENS = ["<|AUDIO|>", "<|audio_bos|>", "<|audio_eos|>"]
WINDOW_SECONDS = 4
"""The tiny towers' audio window (the real ones have 30 s): 4 s keeps the tests fast."""


def save_tiny_qwen2_audio(directory: Path, layers: int = 4, seed: int = 0) -> Path:
    """A 4-layer Qwen2 decoder with a 2-layer audio tower and a 4 s window, as a stock Qwen2-Audio directory."""
    tokenizer = tiny_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": QWEN2_AUDIO_TOKENS})
    config = Qwen2AudioConfig(
        audio_config={"model_type": "qwen2_audio_encoder", "d_model": 32, "encoder_layers": 2,
                      "encoder_attention_heads": 2, "encoder_ffn_dim": 64, "num_mel_bins": 80,
                      "max_source_positions": WINDOW_SECONDS * 50},
        text_config={"model_type": "qwen2", "vocab_size": len(tokenizer), "hidden_size": 48,
                     "intermediate_size": 96, "num_hidden_layers": layers, "num_attention_heads": 4,
                     "num_key_value_heads": 2, "max_position_embeddings": 512, "tie_word_embeddings": False,
                     "initializer_range": 0.2},
        audio_token_index=tokenizer.convert_tokens_to_ids("<|AUDIO|>"),
    )
    torch.manual_seed(seed)
    model = Qwen2AudioForConditionalGeneration(config).eval()
    with torch.no_grad():  # larger random weights than HF's init, so that every layer moves the residual stream
        for name, param in model.named_parameters():
            if name.endswith("weight") and param.dim() == 2 and "language_model" in name:
                param.normal_(0.0, 0.2)
    model.generation_config.eos_token_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(directory)
    features = WhisperFeatureExtractor(feature_size=80, chunk_length=WINDOW_SECONDS)
    Qwen2AudioProcessor(feature_extractor=features, tokenizer=tokenizer).save_pretrained(directory)
    return directory
