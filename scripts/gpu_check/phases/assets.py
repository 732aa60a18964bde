"""Phase ``assets``: tokenizer, random decoder and encoder saved to disk, train/val manifests of WAVs."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from ..context import Context
from ..helpers import bench
from ..options import CHATML, SAMPLE_RATE, Sizes
from ..timing import Counts


def train_tokenizer(sizes: Sizes) -> Any:
    """A byte-level BPE with ChatML specials, trained on the project's sentence generator."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from lightning_speechllm.data.sentences import unique_sentences

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer_ = trainers.BpeTrainer(vocab_size=sizes.tokenizer_vocab,
                                   special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                   initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(unique_sentences(sizes.tokenizer_sentences, seed=0), trainer=trainer_)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tokenizer.chat_template = CHATML
    return tokenizer


def write_manifest(root: Path, name: str, texts: list[str], seconds: tuple[float, float], seed: int) -> Path:
    """WAVs of noise plus a tone (16 kHz) and their JSONL manifest (lightning_speechllm.data.manifest format)."""
    import numpy as np
    import soundfile as sf

    rng = np.random.default_rng(seed)
    rows = []
    for i, text in enumerate(texts):
        samples = int(rng.uniform(*seconds) * SAMPLE_RATE)
        t = np.arange(samples) / SAMPLE_RATE
        audio = 0.05 * rng.standard_normal(samples) + 0.1 * np.sin(2 * np.pi * rng.uniform(120, 400) * t)
        sf.write(root / f"{name}_{i}.wav", audio.astype(np.float32), SAMPLE_RATE)
        rows.append({"id": f"{name}_{i}", "audio": f"{name}_{i}.wav", "text": text, "task": "asr"})
    path = root / f"{name}.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def phase_assets(ctx: Context) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config, WhisperConfig, WhisperForConditionalGeneration
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    from lightning_speechllm.data.sentences import unique_sentences

    sizes, memory = ctx.opts.sizes, bench("memory")
    root = ctx.work_dir
    started = time.perf_counter()
    tokenizer = train_tokenizer(sizes)
    out: dict[str, Any] = {"tokenizer_s": time.perf_counter() - started, "tokenizer_vocab": len(tokenizer)}

    decoder_config = Qwen2Config(**sizes.decoder)
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(decoder_config)
    decoder_params = sum(p.numel() for p in meta.parameters())
    layer_params = sum(p.numel() for p in meta.model.layers[0].parameters())
    head_params = meta.get_output_embeddings().weight.numel()
    del meta
    started = time.perf_counter()
    ctx.paths["llm"] = root / "decoder"
    memory.save_random(AutoModelForCausalLM.from_config, decoder_config, getattr(torch, ctx.opts.llm_dtype),
                        ctx.paths["llm"])
    tokenizer.save_pretrained(ctx.paths["llm"])
    out["decoder_save_s"] = time.perf_counter() - started

    whisper_config = WhisperConfig(**sizes.whisper)
    with torch.device("meta"):
        encoder = WhisperEncoder(whisper_config)
    encoder_params = sum(p.numel() for n, p in encoder.named_parameters() if not n.startswith("embed_positions"))
    del encoder
    started = time.perf_counter()
    ctx.paths["whisper"] = root / "whisper"
    # fp16 on disk, as whisper-large-v3 is published (loaded in encoder_dtype: the cast path of the loader).
    memory.save_random(WhisperForConditionalGeneration, whisper_config, torch.float16, ctx.paths["whisper"])
    out["whisper_save_s"] = time.perf_counter() - started

    started = time.perf_counter()
    data = root / "data"
    data.mkdir(parents=True, exist_ok=True)
    texts = unique_sentences(sizes.train_utterances + sizes.val_utterances, seed=1)
    ctx.paths["train"] = write_manifest(data, "train", texts[:sizes.train_utterances], sizes.seconds, seed=1)
    ctx.paths["val"] = write_manifest(data, "val", texts[sizes.train_utterances:], sizes.seconds, seed=2)
    out["data_s"] = time.perf_counter() - started

    num_layers = decoder_config.num_hidden_layers
    n_removed = max(1, round(ctx.opts.prune_fraction * num_layers))
    ctx.removed_layers = list(range(num_layers - 1 - n_removed, num_layers - 1))
    ctx.counts = Counts(layer_params=layer_params, num_layers=num_layers, head_params=head_params,
                        decoder_params=decoder_params, encoder_params=encoder_params,
                        encoder_layers=whisper_config.encoder_layers, encoder_dim=whisper_config.d_model)
    out.update(decoder_params=decoder_params, decoder_layers=num_layers, decoder_vocab=decoder_config.vocab_size,
               encoder_params=encoder_params, encoder_layers=whisper_config.encoder_layers,
               decoder_bytes_on_disk=sum(f.stat().st_size for f in ctx.paths["llm"].glob("*.safetensors")),
               whisper_bytes_on_disk=sum(f.stat().st_size for f in ctx.paths["whisper"].glob("*.safetensors")),
               train_utterances=sizes.train_utterances, val_utterances=sizes.val_utterances,
               removed_layers=ctx.removed_layers)
    return out
