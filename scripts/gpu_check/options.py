"""What the GPU check runs with: the model sizes (real and tiny) and the command-line options."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]


CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


SAMPLE_RATE = 16_000


H100_BF16_DENSE_TFLOPS = 989.0


@dataclass
class Sizes:
    """Everything that differs between the real check and the CPU smoke test."""

    decoder: dict[str, Any]
    """Qwen2Config keyword arguments."""
    whisper: dict[str, Any]
    """WhisperConfig keyword arguments (the encoder is what matters; the decoder is never read)."""
    projector_hidden: int
    tokenizer_vocab: int
    tokenizer_sentences: int
    train_utterances: int
    val_utterances: int
    seconds: tuple[float, float]
    """Utterance durations, uniform in this range."""
    max_duration: float
    """Seconds of audio per batch."""
    max_cuts: int
    """Utterances per batch at most."""
    fit_steps: int
    heal_steps: int
    fsdp_steps: int
    warmup_steps: int
    max_new_tokens: int
    memory_batch_size: int
    memory_steps: int
    lora_r: int
    num_workers: int
    matmul_size: int


FULL = Sizes(
    decoder=dict(vocab_size=151_936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                 num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=32_768,
                 tie_word_embeddings=True),
    whisper=dict(d_model=1280, encoder_layers=32, encoder_attention_heads=20, encoder_ffn_dim=5120,
                 decoder_layers=1, decoder_attention_heads=20, decoder_ffn_dim=5120, num_mel_bins=128,
                 max_source_positions=1500, max_target_positions=448, vocab_size=51_866),
    projector_hidden=2048, tokenizer_vocab=4000, tokenizer_sentences=3000, train_utterances=192, val_utterances=8,
    seconds=(4.0, 12.0), max_duration=80.0, max_cuts=8, fit_steps=20, heal_steps=20, fsdp_steps=10, warmup_steps=5,
    max_new_tokens=24, memory_batch_size=8, memory_steps=2, lora_r=64, num_workers=4, matmul_size=8192,
)


TINY = Sizes(
    decoder=dict(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=True),
    whisper=dict(d_model=32, encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=64, decoder_layers=1,
                 decoder_attention_heads=2, decoder_ffn_dim=64, num_mel_bins=128, max_source_positions=1500,
                 max_target_positions=64, vocab_size=51_866),
    projector_hidden=64, tokenizer_vocab=500, tokenizer_sentences=300, train_utterances=8, val_utterances=2,
    seconds=(1.0, 2.0), max_duration=4.0, max_cuts=2, fit_steps=4, heal_steps=4, fsdp_steps=2, warmup_steps=1,
    max_new_tokens=4, memory_batch_size=2, memory_steps=1, lora_r=4, num_workers=0, matmul_size=256,
)


@dataclass
class Options:
    """Command-line options (see ``build_parser``)."""

    tiny: bool = False
    device: str = "cuda"
    precision: str = "bf16-mixed"
    llm_dtype: str = "bfloat16"
    encoder_dtype: str = "bfloat16"
    budget_s: float = 450.0
    peak_tflops: float = H100_BF16_DENSE_TFLOPS
    prune_fraction: float = 0.25
    phases: list[str] = field(default_factory=list)
    json_out: str | None = None
    work_dir: str | None = None
    fit_steps: int | None = None
    heal_steps: int | None = None
    fsdp_steps: int | None = None

    @property
    def sizes(self) -> Sizes:
        sizes = TINY if self.tiny else FULL
        overrides = {k: getattr(self, k) for k in ("fit_steps", "heal_steps", "fsdp_steps") if getattr(self, k)}
        return Sizes(**{**asdict(sizes), **overrides}) if overrides else sizes

    @property
    def cuda(self) -> bool:
        return self.device.startswith("cuda")
