"""Factory of tiny, seeded, fp32 HuggingFace causal LMs built from configs (no weights, no hub) for CPU tests.

Each architecture keeps the features that make decoder-layer masking non-trivial: Gemma's scaled embeddings and
tied head, per-layer ``layer_types`` with sliding-window layers (Qwen2/Qwen3/Gemma2/Gemma3), a global sliding window
(Mistral), grouped-query attention and Qwen3/Gemma3 q/k norms.
"""
from __future__ import annotations

import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma3TextConfig,
    GemmaConfig,
    LlamaConfig,
    MistralConfig,
    PreTrainedConfig,
    PreTrainedModel,
    Qwen2Config,
    Qwen3Config,
)

TINY_ARCHS: tuple[str, ...] = ("llama", "qwen2", "qwen3", "mistral", "gemma", "gemma2", "gemma3_text")

VOCAB_SIZE = 256
PAD_TOKEN_ID = 0
BOS_TOKEN_ID = 1
EOS_TOKEN_ID = 2

_COMMON: dict = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=32,
    intermediate_size=64,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    pad_token_id=PAD_TOKEN_ID,
    bos_token_id=BOS_TOKEN_ID,
    eos_token_id=EOS_TOKEN_ID,
)

# A sliding window shorter than the test prompts, so the sliding-window mask and cache paths really cut context.
SLIDING_WINDOW = 4


def tiny_config(arch: str, num_layers: int = 6, layer_types: list[str] | None = None) -> PreTrainedConfig:
    """Config of a tiny ``arch`` causal LM with ``num_layers`` decoder layers (eager attention).

    ``layer_types`` overrides the arch's default per-layer pattern (archs with per-layer attention kinds only).
    """
    common = dict(_COMMON, num_hidden_layers=num_layers)
    if layer_types is not None and arch not in ("qwen2", "qwen3", "gemma2", "gemma3_text"):
        raise ValueError(f"tiny arch {arch!r} has no per-layer layer_types")
    if arch == "llama":
        config = LlamaConfig(**common, tie_word_embeddings=False)
    elif arch == "qwen2":
        config = Qwen2Config(
            **common,
            use_sliding_window=True,
            sliding_window=SLIDING_WINDOW,
            max_window_layers=num_layers // 2,
            layer_types=layer_types,
            tie_word_embeddings=False,
        )
    elif arch == "qwen3":
        layer_types = layer_types or ["sliding_attention" if i % 2 else "full_attention" for i in range(num_layers)]
        config = Qwen3Config(
            **common,
            head_dim=8,
            use_sliding_window=True,
            sliding_window=SLIDING_WINDOW,
            layer_types=layer_types,
            tie_word_embeddings=True,
        )
    elif arch == "mistral":
        config = MistralConfig(**common, head_dim=8, sliding_window=SLIDING_WINDOW, tie_word_embeddings=False)
    elif arch == "gemma":
        config = GemmaConfig(**common, head_dim=8, tie_word_embeddings=True)
    elif arch == "gemma2":
        layer_types = layer_types or [
            "sliding_attention" if i % 2 == 0 else "full_attention" for i in range(num_layers)
        ]
        config = Gemma2Config(
            **common, head_dim=8, sliding_window=SLIDING_WINDOW, layer_types=layer_types, query_pre_attn_scalar=8
        )
    elif arch == "gemma3_text":
        layer_types = layer_types or [
            "full_attention" if (i + 1) % 3 == 0 else "sliding_attention" for i in range(num_layers)
        ]
        config = Gemma3TextConfig(
            **common, head_dim=8, sliding_window=SLIDING_WINDOW, layer_types=layer_types, query_pre_attn_scalar=8
        )
    else:
        raise ValueError(f"unknown tiny arch {arch!r}; expected one of {TINY_ARCHS}")
    config._attn_implementation = "eager"
    return config


def tiny_causal_lm(
    arch: str, num_layers: int = 6, seed: int = 0, layer_types: list[str] | None = None
) -> PreTrainedModel:
    """A randomly initialised, seeded, fp32 tiny causal LM of ``arch`` in eval mode.

    Norm weights are randomised as well (HF initialises them to constants), so that every layer matters.
    """
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, num_layers, layer_types), dtype=torch.float32)
    generator = torch.Generator().manual_seed(seed + 1)
    gain_offset = 1.0 if arch.startswith("gemma") else 0.0  # Gemma norms scale by (1 + weight)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:  # gains uniform in [0.75, 1.25)
                param.copy_(torch.rand(param.shape, generator=generator) * 0.5 + 0.75 - gain_offset)
    return model.eval()


def tiny_input_ids(batch: int = 2, length: int = 10, seed: int = 0) -> torch.Tensor:
    """Random token ids avoiding the special ids, ``[batch, length]``."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB_SIZE, (batch, length), generator=generator)
