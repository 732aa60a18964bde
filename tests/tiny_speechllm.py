"""Tiny, seeded SpeechLLM parts for CPU tests: a byte-level BPE tokenizer with a ChatML template, a tiny Whisper
encoder and a tiny decoder, all built from configs (no downloads)."""
from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast, WhisperConfig, WhisperModel

from lightning_speechllm.model.encoders import WhisperSpeechEncoder
from lightning_speechllm.model.projector import ProjectorConfig
from lightning_speechllm.model.speechllm import SpeechLLM, SpeechLLMConfig

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    "the cat sat on the mat", "a quick brown fox jumps over the lazy dog", "transcribe the audio",
    "translate the audio into french", "le chat est sur le tapis", "one two three four five six seven eight",
    "user assistant system answer", "hello world this is a test of the speech model",
]


@functools.lru_cache(maxsize=2)
def _tokenizer_json(chat: bool) -> str:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=360, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    return tok.to_str()


def tiny_tokenizer(chat: bool = True) -> PreTrainedTokenizerFast:
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(_tokenizer_json(chat)),
                                        eos_token="<|im_end|>" if chat else "<|endoftext|>",
                                        pad_token="<|endoftext|>")
    if chat:
        tokenizer.chat_template = CHATML
    return tokenizer


def tiny_whisper_config(d_model: int = 32, window_seconds: int = 4) -> WhisperConfig:
    return WhisperConfig(d_model=d_model, encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=64,
                         decoder_layers=1, decoder_attention_heads=2, decoder_ffn_dim=64, num_mel_bins=80,
                         max_source_positions=window_seconds * 50, vocab_size=64, max_target_positions=32)


def tiny_llama(vocab_size: int = 360, layers: int = 4, seed: int = 0):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=48, intermediate_size=96, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=False, initializer_range=0.2)
    return AutoModelForCausalLM.from_config(config).eval()


def tiny_speechllm(seed: int = 0, chat: bool = True, layers: int = 4, **config_kwargs) -> SpeechLLM:
    torch.manual_seed(seed)
    encoder = WhisperSpeechEncoder(tiny_whisper_config())
    config = SpeechLLMConfig(llm_path="<memory>", encoder_path="<memory>",
                             projector=ProjectorConfig(downsample=2, hidden_dim=64), **config_kwargs)
    return SpeechLLM(tiny_llama(layers=layers, seed=seed), tiny_tokenizer(chat), encoder, config)


def save_tiny_assets(root: Path, texts: list[str], samples: list[int], layers: int = 4,
                     manifest: str = "train.jsonl") -> dict[str, Path]:
    """On disk: a tiny llama + tokenizer dir, a tiny Whisper dir and a JSONL manifest of noise WAVs (one per text)."""
    root.mkdir(parents=True, exist_ok=True)
    tiny_llama(layers=layers).save_pretrained(root / "llm")
    tiny_tokenizer().save_pretrained(root / "llm")
    whisper_config = tiny_whisper_config()
    whisper_config.update({"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "decoder_start_token_id": 1})
    whisper_config.suppress_tokens = whisper_config.begin_suppress_tokens = None
    WhisperModel(whisper_config).save_pretrained(root / "whisper")
    rng = np.random.default_rng(0)
    rows = []
    for i, (text, count) in enumerate(zip(texts, samples)):
        sf.write(root / f"u{i}.wav", (0.05 * rng.standard_normal(count)).astype(np.float32), 16000)
        rows.append({"id": f"u{i}", "audio": f"u{i}.wav", "text": text, "task": "asr"})
    (root / manifest).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"root": root, "llm": root / "llm", "whisper": root / "whisper", "manifest": root / manifest}
