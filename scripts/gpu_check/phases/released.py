"""Phase ``released``: a released SpeechLLM at full size (Qwen2-Audio-7B's shapes, random weights, bfloat16) built in
memory and run through the framework's parts: the speech-input map over a few utterances, one healing step's peak
memory (LoRA on the receiving layer + the projector, cross-entropy), and the pruned, merged model exported in its own
class (seconds, GiB on disk)."""
from __future__ import annotations

import shutil
import time
from typing import Any

from ..context import Context
from ..helpers import PeakMemory, free, sync

# Qwen2-Audio-7B: a Whisper large-v3-shaped tower (128 mel bins, 30 s) and a Qwen2-7B decoder.
FULL_AUDIO = {"model_type": "qwen2_audio_encoder", "d_model": 1280, "encoder_layers": 32, "encoder_attention_heads": 20,
              "encoder_ffn_dim": 5120, "num_mel_bins": 128, "max_source_positions": 1500}
FULL_TEXT = {"model_type": "qwen2", "vocab_size": 156_032, "hidden_size": 4096, "intermediate_size": 11008,
             "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
             "max_position_embeddings": 8192, "tie_word_embeddings": False}
TINY_AUDIO = {**FULL_AUDIO, "d_model": 32, "encoder_layers": 2, "encoder_attention_heads": 2, "encoder_ffn_dim": 64}
TINY_TEXT = {**FULL_TEXT, "vocab_size": 1024, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4,
             "num_attention_heads": 4, "num_key_value_heads": 2}
AUDIO_TOKENS = ["<|AUDIO|>", "<|audio_bos|>", "<|audio_eos|>"]


def _build(ctx: Context) -> Any:
    """The SpeechLLM on an in-memory random Qwen2-Audio (the check's tokenizer plus the audio tokens)."""
    import torch
    from transformers import (
        AutoTokenizer,
        Qwen2AudioConfig,
        Qwen2AudioForConditionalGeneration,
        Qwen2AudioProcessor,
        WhisperFeatureExtractor,
    )

    from lightning_speechllm.model.released import parts_from_model
    from lightning_speechllm.model.speechllm import SpeechLLM

    tokenizer = AutoTokenizer.from_pretrained(ctx.paths["llm"])
    tokenizer.add_special_tokens({"additional_special_tokens": AUDIO_TOKENS})
    text = dict(TINY_TEXT if ctx.opts.tiny else FULL_TEXT)
    text["vocab_size"] = max(text["vocab_size"], len(tokenizer))
    config = Qwen2AudioConfig(audio_config=TINY_AUDIO if ctx.opts.tiny else FULL_AUDIO, text_config=text,
                              audio_token_index=tokenizer.convert_tokens_to_ids("<|AUDIO|>"))
    dtype = getattr(torch, ctx.opts.llm_dtype)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(ctx.opts.device):
            model = Qwen2AudioForConditionalGeneration(config).eval()
    finally:
        torch.set_default_dtype(default)
    processor = Qwen2AudioProcessor(feature_extractor=WhisperFeatureExtractor(feature_size=128), tokenizer=tokenizer)
    return SpeechLLM.from_released_parts(parts_from_model(model, processor))


def _batch(ctx: Context, count: int, seed: int) -> Any:
    import torch

    from lightning_speechllm.data.batch import SpeechBatch

    generator = torch.Generator().manual_seed(seed)
    seconds = ctx.opts.sizes.seconds
    lens = torch.tensor([int(16000 * (seconds[0] + (seconds[1] - seconds[0]) * i / max(count - 1, 1)))
                         for i in range(count)])
    audio = 0.1 * torch.randn(count, int(lens.max()), generator=generator)
    texts = ["the quick brown fox jumps over the lazy dog"] * count
    return SpeechBatch(ids=[f"r{seed}-{i}" for i in range(count)], audio=audio, audio_lens=lens, texts=texts,
                       tasks=["asr"] * count, transcripts=list(texts), tgt_langs=[None] * count)


def phase_released(ctx: Context) -> dict[str, Any]:
    import torch

    from lightning_speechllm.model.released.export import save_released
    from lightning_speechllm.model.speechllm import LoraConfig
    from lightning_speechllm.pruning.plan import plan_angular
    from lightning_speechllm.redundancy.measure import RedundancyAccumulator

    sizes, meter, out = ctx.opts.sizes, PeakMemory(ctx.opts), {}
    started = time.perf_counter()
    speechllm = _build(ctx)
    out["build_s"] = time.perf_counter() - started
    out["decoder_layers"] = speechllm.layer_mask.num_layers
    out["parameters_b"] = sum(p.numel() for p in speechllm.parameters()) / 1e9

    meter.reset()
    started = time.perf_counter()
    accumulator = RedundancyAccumulator(speechllm.layer_mask.num_layers, "last").to(ctx.opts.device)
    with torch.no_grad():
        for seed in range(2):
            accumulator.update(speechllm, _batch(ctx, sizes.max_cuts, seed))
    sync(ctx.opts)
    result = accumulator.result(model_id="qwen2-audio-7b-shaped (random)", set_name="random", modality="speech")
    plan = plan_angular(result, fraction=ctx.opts.prune_fraction)
    removed, receiving = plan.removed_layers, plan.receiving_layers
    out["map"] = {"seconds": time.perf_counter() - started, "utterances": result.num_samples,
                  "removed_layers": removed, **meter.read()}

    speechllm.layer_mask.remove_layers(removed)
    speechllm.add_lora(LoraConfig(layers=receiving, r=sizes.lora_r, alpha=sizes.lora_r, dropout=0.0))
    speechllm.train()
    trainable = [p for p in speechllm.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-5)
    meter.reset()
    started = time.perf_counter()
    loss, _, _ = speechllm(_batch(ctx, sizes.memory_batch_size, 7))
    loss.backward()
    optimizer.step()
    sync(ctx.opts)
    out["heal_step"] = {"seconds": time.perf_counter() - started, "loss": float(loss),
                        "batch_size": sizes.memory_batch_size, "receiving_layers": receiving,
                        "trainable_m": sum(p.numel() for p in trainable) / 1e6, **meter.read()}
    del optimizer, loss
    speechllm.eval()

    speechllm.merge_lora()
    target = ctx.work_dir / "released_export"
    started = time.perf_counter()
    save_released(speechllm, target)
    out["export"] = {"seconds": time.perf_counter() - started,
                     "gib": sum(f.stat().st_size for f in target.rglob("*") if f.is_file()) / 2**30,
                     "num_hidden_layers": result.num_layers - len(removed)}
    shutil.rmtree(target, ignore_errors=True)
    del speechllm
    free(ctx.opts)
    return out
