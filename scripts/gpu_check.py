"""GPU check (issue 10, item 9): one call on a lent GPU machine runs the whole training path at scale and prints
the numbers a closing note needs.

A random-weight SpeechLLM at real size, built from configs (no download): a Whisper large-v3-shaped speech encoder
(d_model 1280, 32 layers, 20 heads, ffn 5120, 128 mel bins, 1500 positions; its decoder, never read, cut to one
layer) and a Qwen2.5-1.5B-shaped decoder (hidden 1536, 28 layers, 12 heads, 2 KV heads, ffn 8960, vocabulary
151,936, tied embeddings), saved with ``save_pretrained`` into a work directory and loaded by path as users load
theirs; a byte-level BPE tokenizer trained on the project's sentence generator (about 1k tokens, far fewer than the
decoder's 152k-row embedding table and LM head: fine for speed and memory, which the table sizes set); synthetic
WAVs (noise + a tone) in JSONL manifests read by the real ``SpeechDataModule``. Everything runs in ``bf16-mixed``
with the frozen decoder and encoder in bfloat16.

Phases (each timed, guarded: a failing phase records its error and the others still run; a phase that would start
after ``--budget_s`` seconds is skipped; on CUDA the peak memory is ``torch.cuda.max_memory_allocated``, reset at
every phase start; on the CPU it is the process's peak RSS, VmHWM, reset the same way, or null where the kernel
refuses the reset):

  environment  versions, the GPU, a bf16 8192^3 matmul's TFLOP/s (what this card reaches at best)
  assets       tokenizer, random decoder and encoder saved to disk, train/val manifests of WAVs
  fit          ``SpeechLLMModule`` + ``SpeechDataModule`` through ``Trainer.fit`` (frozen encoder and decoder, the
               projector trains): tokens/s, MFU, peak memory
  validate     ``Trainer.validate`` with generation (greedy, a few utterances): loss, WER, seconds
  checkpoint   ``trainer.save_checkpoint`` then ``lightning_speechllm.checkpoints.load_module``: the trainable
               weights equal, the same loss on one batch
  heal         ``HealingModule`` on the reloaded model with a pruning plan removing 25% of the layers (a block ending
               before the last layer), LoRA on the receiving layer, losses TaskCrossEntropy + KLDivergence (the
               shared-weight teacher): tokens/s, MFU, peak memory
  heal_memory  ``scripts/bench/healing.py``'s worker, in this process: peak memory of a healing step (text-only
               batches) student-only (TaskCrossEntropy: no teacher) vs shared teacher (+ KL) vs a teacher copy
  fsdp         ``fit`` under ``lightning_speechllm.model.sharding.FSDP2Strategy`` at world size 1 (nccl on the GPU,
               gloo on the CPU), then its single-file checkpoint read back

Throughput is measured between successive step starts (data loading, forward, backward, optimizer; the first
``warmup`` steps left out). tokens = the LLM's input tokens without padding (speech + prompt + target). MFU is
reported two ways, both against ``--peak_tflops`` (H100 SXM dense bf16: 989):

  mfu_6n      model FLOPs per step = 6 * N_dec * tokens [+ 2 * N_full * tokens: the teacher's forward, when healing
              with KD] + 2 * N_enc * frames + 4 * L_enc * d_enc * sum(window_frames^2)
              N_dec = parameters of the active decoder layers + the LM head (the input embedding is a lookup) + the
              trainable ones (projector, LoRA); N_full the same with every layer; N_enc = the Whisper encoder's
              weights (forward only: frozen, no gradient reaches it) over every frame of its 30 s window (1500 per
              utterance), and the last term its attention. 6N counts a full backward (4N: input and weight gradients)
              even for frozen weights, whose backward computes input gradients only (2N), so mfu_6n is the
              conventional, optimistic figure.
  mfu_counted the FLOPs torch's FlopCounterMode counts in one training step (forward + backward as executed: matmuls,
              convolutions, attention), per token, times the measured tokens/s.

How a lent device runs it (no network there; only the git working tree travels, 64 MiB; its image has torch,
torchaudio, lightning, transformers, peft, torchmetrics, sacrebleu, tokenizers and safetensors, so the rest of this
project's dependencies travel as ~10 MB of wheels). Here, once, from the repo root::

    echo /.whl/ >> .git/info/exclude
    .venv/bin/python scripts/gpu_check.py --download_wheels .whl

then the device call, with ``carry: [".whl"]`` and ``timeout_s: 560`` (expected to take 3 to 5 minutes, not yet
measured on a GPU; phases that would start after 450 s are skipped)::

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl &&
        PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 python3 scripts/gpu_check.py

The JSON lands in ``$OUT/gpu_check.json`` (it comes back with the call; written after every phase, so a cut-off run
still returns what it measured) and on stdout, followed by a short summary. Where the machine has network,
``pip install -e . && python scripts/gpu_check.py`` does the same. On this machine::

    .venv/bin/python scripts/gpu_check.py --tiny --device cpu     # the smoke test (tests/test_gpu_check.py)
"""
from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import logging
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SAMPLE_RATE = 16_000
H100_BF16_DENSE_TFLOPS = 989.0

# Modules the run imports that the device image lacks, and the distributions that bring them (--download_wheels).
DEVICE_WHEELS = ("lhotse", "cytoolz", "intervaltree", "soundfile", "cffi", "pycparser", "jiwer", "rapidfuzz",
                 "jsonargparse", "typeshed_client", "docstring_parser", "whisper_normalizer", "more_itertools")
REQUIRED_MODULES = ("torch", "torchaudio", "lightning", "transformers", "peft", "tokenizers", "safetensors",
                    "torchmetrics", "sacrebleu", "numpy", "yaml", "lhotse", "cytoolz", "intervaltree", "soundfile",
                    "jiwer", "rapidfuzz", "jsonargparse", "whisper_normalizer", "more_itertools")
WHEEL_PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
                   "manylinux1_x86_64")


# --------------------------------------------------------------------------------------------------- options
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


# ----------------------------------------------------------------------------------------------- helpers
def _bench(name: str) -> Any:
    """``scripts/bench/<name>.py`` as a module (reused, not copied)."""
    module_name = f"gpu_check_bench_{name}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, REPO / "scripts" / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


def _sync(opts: Options) -> None:
    if opts.cuda:
        import torch

        torch.cuda.synchronize()


def _autocast(opts: Options) -> Any:
    import torch

    if "bf16" not in opts.precision and "16-mixed" not in opts.precision:
        return nullcontext()
    dtype = torch.bfloat16 if "bf16" in opts.precision else torch.float16
    return torch.autocast(device_type="cuda" if opts.cuda else "cpu", dtype=dtype)


def _free(opts: Options) -> None:
    gc.collect()
    if opts.cuda:
        import torch

        torch.cuda.empty_cache()


def _gib(value: float | None) -> str:
    return "-" if value is None else f"{value / 2**30:.2f} GiB"


def _float(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


class PeakMemory:
    """Peak memory of one phase: torch.cuda.max_memory_allocated on CUDA; VmHWM (peak RSS) on the CPU, reset at the
    phase start through /proc/self/clear_refs (None where the kernel refuses)."""

    def __init__(self, opts: Options) -> None:
        self.cuda = opts.cuda
        self.resettable = True
        self.start_bytes = 0

    def reset(self) -> None:
        gc.collect()
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            self.start_bytes = int(torch.cuda.memory_allocated())
        else:
            memory = _bench("memory")
            self.resettable = memory.reset_peak_rss()
            self.start_bytes = memory.rss_bytes()

    def read(self) -> dict[str, Any]:
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            return {"peak_memory_bytes": int(torch.cuda.max_memory_allocated()),
                    "peak_reserved_bytes": int(torch.cuda.max_memory_reserved()),
                    "memory_at_start_bytes": self.start_bytes, "memory_source": "torch.cuda.max_memory_allocated"}
        peak = _bench("memory").vm_hwm_bytes() if self.resettable else None
        return {"peak_memory_bytes": peak, "memory_at_start_bytes": self.start_bytes,
                "memory_source": "VmHWM (peak RSS) after a reset" if self.resettable else None}


# ------------------------------------------------------------------------------------------- step timing
def _encoder_windows(pl_module: Any, batch: Any) -> list[int]:
    """Encoder frames computed per utterance: its whole window (Whisper pads to it), in encoder frames."""
    encoder = getattr(pl_module.speechllm, "encoder", None)
    if encoder is None or batch.text_only or not hasattr(encoder, "windows"):
        return []
    return [int(w) // 320 for w in encoder.windows(batch.audio_lens).tolist()]  # 160 samples/mel frame, stride 2


def _make_step_timer(opts: Options) -> Any:
    import lightning as L

    class StepTimer(L.Callback):
        """Step starts (synchronised) and what each step processed: LLM tokens, utterances, encoder frames."""

        def __init__(self) -> None:
            self.starts: list[float] = []
            self.ends: list[float] = []
            self.steps: list[dict[str, float]] = []
            self.last_batch: Any = None

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            _sync(opts)
            self.starts.append(time.perf_counter())
            windows = _encoder_windows(pl_module, batch)
            self._step = {"utterances": len(batch), "audio_seconds": float(batch.audio_lens.sum()) / SAMPLE_RATE,
                          "encoder_frames": sum(windows), "encoder_frames_sq": sum(w * w for w in windows)}
            self.last_batch = batch

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            _sync(opts)
            self.ends.append(time.perf_counter())
            self._step["tokens"] = int(pl_module.tokens_in_last_batch)
            self.steps.append(self._step)

        def intervals(self) -> list[float]:
            """Step i: from its start to the next step's start (the last one: to its end)."""
            nxt = self.starts[1:len(self.ends)] + self.ends[-1:]
            return [b - a for a, b in zip(self.starts, nxt)]

    return StepTimer()


@dataclass
class Counts:
    """Parameter counts for the FLOP formulas (from meta-device builds of the configs)."""

    layer_params: int
    num_layers: int
    head_params: int
    decoder_params: int
    encoder_params: int
    encoder_layers: int
    encoder_dim: int


def model_flops(counts: Counts, step: dict[str, float], active_layers: int, trainable: int, teacher: bool) -> float:
    """The mfu_6n formula of the module docstring for one step."""
    student = active_layers * counts.layer_params + counts.head_params + trainable
    flops = 6 * student * step["tokens"]
    if teacher:
        flops += 2 * (counts.num_layers * counts.layer_params + counts.head_params) * step["tokens"]
    flops += 2 * counts.encoder_params * step["encoder_frames"]
    flops += 4 * counts.encoder_layers * counts.encoder_dim * step["encoder_frames_sq"]
    return float(flops)


def counted_flops(opts: Options, module: Any, batch: Any, step: Callable[[Any], tuple[Any, int]]) -> dict[str, Any]:
    """FLOPs of one training step (forward + backward as executed) by torch's FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    module.to(opts.device)  # Lightning's single-device teardown left it on the CPU
    module.train()
    counter = FlopCounterMode(display=False)
    with counter:
        with _autocast(opts):
            loss, tokens = step(batch)
        loss.backward()
    module.zero_grad(set_to_none=True)
    flops = int(counter.get_total_flops())
    return {"counted_flops_per_step": flops, "counted_tokens": tokens,
            "counted_flops_per_token": flops / max(tokens, 1)}


def throughput(opts: Options, timer: Any, counts: Counts, active_layers: int, trainable: int,
               teacher: bool, warmup: int) -> dict[str, Any]:
    """tokens/s, utterances/s, step times and mfu_6n over the steps after `warmup`."""
    intervals = timer.intervals()
    measured = list(zip(timer.steps, intervals))[warmup:] or list(zip(timer.steps, intervals))
    seconds = sum(s for _, s in measured)
    tokens = sum(step["tokens"] for step, _ in measured)
    flops = sum(model_flops(counts, step, active_layers, trainable, teacher) for step, _ in measured)
    step_s = [s for _, s in measured]
    return {
        "steps": len(timer.steps), "measured_steps": len(measured), "warmup_steps": len(timer.steps) - len(measured),
        "step_s_median": statistics.median(step_s) if step_s else None,
        "step_s_mean": seconds / len(step_s) if step_s else None,
        "tokens_per_step_mean": tokens / len(measured) if measured else None,
        "utterances_per_step_mean": sum(s["utterances"] for s, _ in measured) / max(len(measured), 1),
        "tokens_per_s": tokens / seconds if seconds else None,
        "utterances_per_s": sum(s["utterances"] for s, _ in measured) / seconds if seconds else None,
        "audio_seconds_per_s": sum(s["audio_seconds"] for s, _ in measured) / seconds if seconds else None,
        "model_flops_per_step_6n": flops / max(len(measured), 1),
        "model_tflops_per_s_6n": flops / seconds / 1e12 if seconds else None,
        "mfu_6n": flops / seconds / (opts.peak_tflops * 1e12) if seconds else None,
        "active_layers": active_layers, "trainable_params": trainable,
        "step_s": [round(s, 4) for s in intervals],  # every step, the warm-up ones included
    }


def add_counted_mfu(opts: Options, out: dict[str, Any], counted: dict[str, Any]) -> None:
    out.update(counted)
    if out.get("tokens_per_s"):
        achieved = counted["counted_flops_per_token"] * out["tokens_per_s"]
        out["counted_tflops_per_s"] = achieved / 1e12
        out["mfu_counted"] = achieved / (opts.peak_tflops * 1e12)


# ------------------------------------------------------------------------------------------- the run state
@dataclass
class Context:
    """What the phases hand on to each other."""

    opts: Options
    work_dir: Path
    paths: dict[str, Path] = field(default_factory=dict)
    counts: Counts | None = None
    removed_layers: list[int] = field(default_factory=list)
    fit: dict[str, Any] = field(default_factory=dict)
    reloaded: Any = None
    fit_step_s: float | None = None

    def release_for(self, phase: str) -> None:
        """Drop what `phase` does not use (the fitted model, the reloaded one) before its peak memory is reset."""
        if phase not in ("validate", "checkpoint"):
            self.fit.clear()
        if phase != "heal":
            self.reloaded = None


def model_config(ctx: Context) -> Any:
    from lightning_speechllm.model.projector import ProjectorConfig
    from lightning_speechllm.model.speechllm import SpeechLLMConfig

    return SpeechLLMConfig(llm_path=str(ctx.paths["llm"]), encoder_path=str(ctx.paths["whisper"]),
                           llm_dtype=ctx.opts.llm_dtype, encoder_dtype=ctx.opts.encoder_dtype,
                           projector=ProjectorConfig(downsample=5, hidden_dim=ctx.opts.sizes.projector_hidden))


def datamodule(ctx: Context) -> Any:
    from lightning_speechllm.data.datamodule import SpeechDataModule

    sizes = ctx.opts.sizes
    return SpeechDataModule(train=str(ctx.paths["train"]), val_sets={"val": str(ctx.paths["val"])},
                            max_duration=sizes.max_duration, max_cuts=sizes.max_cuts, seed=0,
                            num_workers=sizes.num_workers, pin_memory=ctx.opts.cuda)


def trainer(ctx: Context, name: str, max_steps: int = -1, callbacks: list | None = None, strategy: Any = "auto",
            validate: bool = False) -> Any:
    import lightning as L

    return L.Trainer(accelerator="gpu" if ctx.opts.cuda else "cpu", devices=1, strategy=strategy,
                     precision=ctx.opts.precision, max_steps=max_steps, limit_val_batches=None if validate else 0,
                     num_sanity_val_steps=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, use_distributed_sampler=False, log_every_n_steps=1,
                     callbacks=callbacks or [], default_root_dir=str(ctx.work_dir / "runs" / name))


def optim_config() -> Any:
    from lightning_speechllm.model.module import OptimConfig

    return OptimConfig(lr=1e-4, warmup_steps=2, schedule="constant")


def decoding_config(ctx: Context, generate: bool = True) -> Any:
    from lightning_speechllm.model.module import DecodingConfig

    return DecodingConfig(max_new_tokens=ctx.opts.sizes.max_new_tokens, generate_in_validation=generate)


def trainable_params(module: Any) -> int:
    mask = module.speechllm.layer_mask
    with mask.active(range(mask.num_layers)):
        return sum(p.numel() for p in module.parameters() if p.requires_grad)


# ------------------------------------------------------------------------------------------------ phases
def phase_environment(ctx: Context) -> dict[str, Any]:
    import lightning
    import peft
    import torch
    import transformers

    opts = ctx.opts
    out: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                           "transformers": transformers.__version__, "lightning": lightning.__version__,
                           "peft": peft.__version__, "cpu_count": os.cpu_count(), "device": opts.device,
                           "precision": opts.precision, "peak_tflops": opts.peak_tflops}
    if opts.cuda:
        if not torch.cuda.is_available():
            raise RuntimeError("--device cuda but torch.cuda.is_available() is False")
        props = torch.cuda.get_device_properties(0)
        out.update(gpu=props.name, gpu_memory_bytes=int(props.total_memory), gpu_capability=f"{props.major}."
                   f"{props.minor}", gpu_multiprocessors=props.multi_processor_count, cuda=torch.version.cuda)
    n, iters = opts.sizes.matmul_size if opts.cuda else min(opts.sizes.matmul_size, 512), 10
    a = torch.randn(n, n, device=opts.device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=opts.device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    _sync(opts)
    started = time.perf_counter()
    for _ in range(iters):
        a @ b
    _sync(opts)
    out["matmul_bf16_size"] = n
    out["matmul_bf16_tflops"] = 2 * n**3 * iters / (time.perf_counter() - started) / 1e12
    return out


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

    sizes, memory = ctx.opts.sizes, _bench("memory")
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


def phase_fit(ctx: Context) -> dict[str, Any]:
    import lightning as L

    from lightning_speechllm.model.module import SpeechLLMModule

    sizes = ctx.opts.sizes
    L.seed_everything(0, verbose=False)
    started = time.perf_counter()
    module = SpeechLLMModule(model=model_config(ctx), optim=optim_config(), decoding=decoding_config(ctx))
    load_s = time.perf_counter() - started
    dm, timer = datamodule(ctx), _make_step_timer(ctx.opts)
    fit_trainer = trainer(ctx, "fit", max_steps=sizes.fit_steps, callbacks=[timer])
    started = time.perf_counter()
    fit_trainer.fit(module, datamodule=dm)
    fit_s = time.perf_counter() - started
    ctx.fit = {"module": module, "trainer": fit_trainer, "datamodule": dm, "batch": timer.last_batch}
    out = {"load_s": load_s, "fit_s": fit_s,
           **throughput(ctx.opts, timer, ctx.counts, ctx.counts.num_layers, trainable_params(module), False,
                        sizes.warmup_steps),
           "final_train_loss": _float(fit_trainer.callback_metrics.get("train/loss"))}
    ctx.fit_step_s = out["step_s_median"]

    def step(batch: Any) -> tuple[Any, int]:
        loss, (_, inputs) = module.model_step(batch)
        return loss, int(inputs.attention_mask.sum())

    add_counted_mfu(ctx.opts, out, counted_flops(ctx.opts, module, timer.last_batch, step))
    return out


def phase_validate(ctx: Context) -> dict[str, Any]:
    module, dm = ctx.fit["module"], ctx.fit["datamodule"]
    started = time.perf_counter()
    [metrics] = trainer(ctx, "validate", validate=True).validate(module, datamodule=dm, verbose=False)
    seconds = time.perf_counter() - started
    hypotheses = module.gathered_hypotheses()
    return {"validate_s": seconds, "utterances": len(hypotheses), "max_new_tokens": ctx.opts.sizes.max_new_tokens,
            "utterances_per_s": len(hypotheses) / seconds if seconds else None,
            "metrics": {k: _float(v) for k, v in sorted(metrics.items())},
            "hypothesis_example": hypotheses[0].hypothesis[:120] if hypotheses else None}


def phase_checkpoint(ctx: Context) -> dict[str, Any]:
    import torch

    from lightning_speechllm.checkpoints import load_module

    fitted, fit_trainer = ctx.fit["module"], ctx.fit["trainer"]
    path = ctx.work_dir / "fit.ckpt"
    started = time.perf_counter()
    fit_trainer.save_checkpoint(path, weights_only=False)  # as ModelCheckpoint writes it (optimizer too)
    save_s = time.perf_counter() - started
    started = time.perf_counter()
    reloaded = load_module(path)
    load_s = time.perf_counter() - started
    before, after = fitted.speechllm.trainable_state_dict(), reloaded.speechllm.trainable_state_dict()
    same_keys = before.keys() == after.keys()
    diff = max((float((before[k].float().cpu() - after[k].float().cpu()).abs().max()) for k in before if k in after),
               default=None)
    for module in (fitted, reloaded):
        module.to(ctx.opts.device).eval()  # fit's teardown left the fitted one on the CPU
    with torch.no_grad(), _autocast(ctx.opts):
        loss_before = float(fitted.model_step(ctx.fit["batch"])[0])
        loss_after = float(reloaded.model_step(ctx.fit["batch"])[0])
    ctx.reloaded = reloaded
    ctx.fit.clear()  # the fitted module and its trainer go; the reloaded model heals next
    return {"save_s": save_s, "load_s": load_s, "checkpoint_bytes": path.stat().st_size, "tensors": len(after),
            "same_keys": same_keys, "max_abs_diff": diff, "loss_before": loss_before, "loss_after": loss_after,
            "loss_abs_diff": abs(loss_before - loss_after)}


def phase_heal(ctx: Context) -> dict[str, Any]:
    import lightning as L

    from lightning_speechllm.healing.module import HealingConfig, HealingModule
    from lightning_speechllm.model.speechllm import LoraConfig
    from lightning_speechllm.pruning.plan import plan_explicit

    sizes = ctx.opts.sizes
    L.seed_everything(0, verbose=False)
    plan_path = plan_explicit(ctx.counts.num_layers, ctx.removed_layers).to_json(ctx.work_dir / "plan.json")
    losses = [{"class_path": "TaskCrossEntropy"}, {"class_path": "KLDivergence", "init_args": {"temperature": 2.0}}]
    healing = HealingConfig(plan_path=str(plan_path), losses=losses,
                            lora=LoraConfig(r=sizes.lora_r, alpha=sizes.lora_r, dropout=0.05))
    speechllm = ctx.reloaded.speechllm if ctx.reloaded is not None else None  # the fitted projector, when reloaded
    ctx.reloaded = None
    started = time.perf_counter()
    module = HealingModule(model=model_config(ctx), healing=healing, optim=optim_config(),
                           decoding=decoding_config(ctx, generate=False), speechllm=speechllm)
    build_s = time.perf_counter() - started
    timer = _make_step_timer(ctx.opts)
    heal_trainer = trainer(ctx, "heal", max_steps=sizes.heal_steps, callbacks=[timer])
    started = time.perf_counter()
    heal_trainer.fit(module, datamodule=datamodule(ctx))
    heal_s = time.perf_counter() - started
    active = len(module.speechllm.layer_mask.active_layers)
    out = {"build_s": build_s, "heal_s": heal_s, "from_checkpoint": speechllm is not None,
           "removed_layers": module.plan["removed_layers"], "receiving_layers": module.plan["receiving_layers"],
           **throughput(ctx.opts, timer, ctx.counts, active, trainable_params(module), True, sizes.warmup_steps),
           "final_losses": {k.removeprefix("train/"): _float(v) for k, v in heal_trainer.callback_metrics.items()
                            if k.startswith("train/loss")}}
    if ctx.fit_step_s and out["step_s_median"]:
        out["step_time_over_fit"] = out["step_s_median"] / ctx.fit_step_s

    def step(batch: Any) -> tuple[Any, int]:
        total, _ = module.healing_step(batch)
        return total, int(module.tokens_in_last_batch)

    add_counted_mfu(ctx.opts, out, counted_flops(ctx.opts, module, timer.last_batch, step))
    return out


def phase_heal_memory(ctx: Context) -> dict[str, Any]:
    """scripts/bench/healing.py's worker for student-only, shared teacher and teacher copy, in this process."""
    healing = _bench("healing")
    sizes = ctx.opts.sizes
    args = healing.BenchArgs(llm_path=str(ctx.paths["llm"]), removed_layers=list(ctx.removed_layers),
                             lora_r=sizes.lora_r, batch_size=sizes.memory_batch_size, steps=sizes.memory_steps,
                             warmup_steps=1, device=ctx.opts.device, dtype=ctx.opts.llm_dtype)
    out: dict[str, Any] = {"batch_size": args.batch_size, "steps": args.warmup_steps + args.steps,
                           "batches": "text-only (the bench's sentences)", "variants": {}}
    meter = PeakMemory(ctx.opts)
    for variant in healing.MEMORY_VARIANTS:  # student, shared, copy
        meter.reset()
        started = time.perf_counter()
        result = healing.worker(args, variant)
        if not ctx.opts.cuda:  # the worker's CPU figure is the process's lifetime peak: use this variant's own
            result["peak_bytes"] = meter.read()["peak_memory_bytes"]
        result["seconds"] = time.perf_counter() - started
        result.pop("step_s", None)
        if result["peak_bytes"] is not None:
            result["step_bytes"] = result["peak_bytes"] - result["loaded_bytes"]
        out["variants"][variant] = result
        _free(ctx.opts)
    peaks = [v["peak_bytes"] for v in out["variants"].values()]
    out["peak_memory_bytes"] = None if None in peaks else max(peaks)  # the phase's peak: its largest variant's
    student = out["variants"]["student"]["peak_bytes"]
    for variant in ("shared", "copy"):
        peak = out["variants"][variant]["peak_bytes"]
        out[f"{variant}_over_student"] = peak / student if peak and student else None
    return out


def phase_fsdp(ctx: Context) -> dict[str, Any]:
    import lightning as L
    import torch

    from lightning_speechllm.model.checkpoint import read_checkpoint
    from lightning_speechllm.model.module import STATE_PREFIX, SpeechLLMModule
    from lightning_speechllm.model.sharding import FSDP2Strategy, is_sharded

    sizes = ctx.opts.sizes
    L.seed_everything(0, verbose=False)
    try:
        started = time.perf_counter()
        module = SpeechLLMModule(model=model_config(ctx), optim=optim_config(),
                                 decoding=decoding_config(ctx, generate=False))
        load_s = time.perf_counter() - started
        timer = _make_step_timer(ctx.opts)
        fsdp_trainer = trainer(ctx, "fsdp", max_steps=sizes.fsdp_steps, callbacks=[timer], strategy=FSDP2Strategy())
        started = time.perf_counter()
        fsdp_trainer.fit(module, datamodule=datamodule(ctx))
        fit_s = time.perf_counter() - started
        warmup = min(sizes.warmup_steps, max(0, sizes.fsdp_steps - 2))
        out = {"load_s": load_s, "fit_s": fit_s, "world_size": fsdp_trainer.world_size,
               "strategy": type(fsdp_trainer.strategy).__name__, "decoder_sharded": is_sharded(module.speechllm.llm),
               **throughput(ctx.opts, timer, ctx.counts, ctx.counts.num_layers, trainable_params(module), False,
                            warmup),
               "final_train_loss": _float(fsdp_trainer.callback_metrics.get("train/loss"))}
        if ctx.fit_step_s and out["step_s_median"]:
            out["step_time_over_fit"] = out["step_s_median"] / ctx.fit_step_s
        path = ctx.work_dir / "fsdp.ckpt"
        fsdp_trainer.save_checkpoint(path, weights_only=False)
        saved = set(read_checkpoint(path)["state_dict"])
        mask = module.speechllm.layer_mask
        with mask.active(range(mask.num_layers)):
            expected = {STATE_PREFIX + n for n, p in module.speechllm.named_parameters() if p.requires_grad}
        out.update(checkpoint_bytes=path.stat().st_size, checkpoint_keys_match=saved == expected)
        return out
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


PHASES: dict[str, tuple[Callable[[Context], dict[str, Any]], tuple[str, ...]]] = {
    "environment": (phase_environment, ()),
    "assets": (phase_assets, ()),
    "fit": (phase_fit, ("assets",)),
    "validate": (phase_validate, ("fit",)),
    "checkpoint": (phase_checkpoint, ("fit",)),
    "heal": (phase_heal, ("assets",)),
    "heal_memory": (phase_heal_memory, ("assets",)),
    "fsdp": (phase_fsdp, ("assets",)),
}
"""name -> (function, phases it needs to have succeeded), in running order."""


# -------------------------------------------------------------------------------------------------- driver
def run_phases(ctx: Context, results: dict[str, Any], phases: dict[str, tuple[Callable, tuple[str, ...]]],
               write: Callable[[], None] = lambda: None, clock: Callable[[], float] = time.perf_counter,
               meter: Any = None) -> None:
    """Run each phase timed and guarded (an exception is recorded, the next phase runs), skip those that would start
    past the time budget or whose prerequisites did not succeed; `write` after every phase."""
    started = clock()
    wanted = ctx.opts.phases or list(phases)
    for name, (function, needs) in phases.items():
        if name not in wanted:
            continue
        elapsed = clock() - started
        record: dict[str, Any]
        failed_needs = [n for n in needs if results["phases"].get(n, {}).get("status") != "ok"]
        if elapsed > ctx.opts.budget_s:
            record = {"status": "skipped", "reason": f"time budget: {elapsed:.0f} s used of {ctx.opts.budget_s:.0f} s"}
        elif failed_needs:
            record = {"status": "skipped", "reason": f"needs {', '.join(failed_needs)}"}
        else:
            print(f"\n=== gpu_check: {name} (at {elapsed:.0f} s)", flush=True)
            phase_start = clock()
            try:
                ctx.release_for(name)
                if meter is not None:
                    meter.reset()
                record = {"status": "ok", **(function(ctx) or {})}
            except Exception as error:  # noqa: BLE001 - every failure is recorded, the other phases still run
                record = {"status": "failed", "error": f"{type(error).__name__}: {error}"[:2000],
                          "traceback": traceback.format_exc()[-3000:]}
                print(record["traceback"], file=sys.stderr, flush=True)
            record["seconds"] = clock() - phase_start
            if meter is not None:
                try:
                    for key, value in meter.read().items():
                        record.setdefault(key, value)  # a phase may report its own figure
                except Exception as error:  # noqa: BLE001
                    record["memory_error"] = f"{type(error).__name__}: {error}"
        results["phases"][name] = record
        results["total_seconds"] = clock() - started
        write()


def summary_lines(results: dict[str, Any]) -> list[str]:
    """A short, human-readable account of the JSON."""
    env, opts = results["phases"].get("environment", {}), results["options"]
    head = (f"gpu_check ({'tiny' if opts['tiny'] else 'full'}): {env.get('gpu', opts['device'])}, "
            f"torch {env.get('torch', '?')}, {opts['precision']}; "
            f"{results.get('total_seconds', 0):.0f} s of the {opts['budget_s']:.0f} s budget")
    lines = [head, f"{'phase':<12}{'status':<9}{'time':>8}{'peak memory':>14}  numbers"]
    for name, record in results["phases"].items():
        numbers = ""
        if record.get("status") == "ok":
            numbers = _numbers(name, record)
        elif record.get("status") == "failed":
            numbers = record["error"].splitlines()[0][:100]
        else:
            numbers = record.get("reason", "")
        seconds = f"{record['seconds']:.1f} s" if "seconds" in record else "-"
        lines.append(f"{name:<12}{record.get('status', '?'):<9}{seconds:>8}{_gib(record.get('peak_memory_bytes')):>14}"
                     f"  {numbers}")
    return lines


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _numbers(name: str, r: dict[str, Any]) -> str:
    if name == "environment":
        return f"bf16 matmul {r['matmul_bf16_tflops']:.0f} TFLOP/s ({r['matmul_bf16_size']}^3)"
    if name == "assets":
        return (f"decoder {r['decoder_params'] / 1e9:.3f} B ({r['decoder_layers']} layers, vocab "
                f"{r['decoder_vocab']}), encoder {r['encoder_params'] / 1e9:.3f} B, remove {r['removed_layers']}")
    if name in ("fit", "heal", "fsdp"):
        text = (f"{r['tokens_per_s'] or 0:,.0f} tok/s, {r['step_s_median'] or 0:.3f} s/step, "
                f"MFU 6N {_pct(r.get('mfu_6n'))}")
        if "mfu_counted" in r:
            text += f", counted {_pct(r['mfu_counted'])}"
        if "step_time_over_fit" in r:
            text += f", step time x{r['step_time_over_fit']:.2f} fit's"
        return text
    if name == "validate":
        wer = next((v for k, v in r["metrics"].items() if k.endswith("/wer")), None)
        return f"{r['utterances']} utterances in {r['validate_s']:.1f} s, WER {wer}"
    if name == "checkpoint":
        return (f"{r['checkpoint_bytes'] / 2**20:.1f} MiB, reload max|diff| {r['max_abs_diff']}, loss diff "
                f"{r['loss_abs_diff']:.2e}")
    if name == "heal_memory":
        peaks = ", ".join(f"{k} {_gib(v['peak_bytes'])}" for k, v in r["variants"].items())
        shared, copy = r.get("shared_over_student"), r.get("copy_over_student")
        ratio = "-" if shared is None else f"{shared:.3f}"
        return f"{peaks}; shared/student {ratio}, copy/student {'-' if copy is None else f'{copy:.3f}'}"
    return ""


def json_path(opts: Options) -> Path:
    if opts.json_out:
        return Path(opts.json_out)
    if os.environ.get("OUT"):
        return Path(os.environ["OUT"]) / "gpu_check.json"
    return Path("gpu_check.json")


def write_json(path: Path, results: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(results, indent=1, default=str) + "\n")
    partial.replace(path)


def missing_modules() -> list[str]:
    return [name for name in REQUIRED_MODULES if importlib.util.find_spec(name) is None]


def download_wheels(target: str) -> int:
    """pip download (here, where PyPI is reachable) the cp312 x86-64 wheels the device image lacks, in the versions
    installed here."""
    from importlib.metadata import PackageNotFoundError, version

    pins = []
    for name in DEVICE_WHEELS:
        try:
            pins.append(f"{name}=={version(name)}")
        except PackageNotFoundError:
            pins.append(name)
    platforms = [arg for p in WHEEL_PLATFORMS for arg in ("--platform", p)]
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
               "--implementation", "cp", *platforms, "-d", target, *pins]
    print(" ".join(command), flush=True)
    done = subprocess.run(command, check=False)
    if done.returncode == 0:
        size = sum(f.stat().st_size for f in Path(target).glob("*.whl"))
        print(f"{len(list(Path(target).glob('*.whl')))} wheels, {size / 2**20:.1f} MiB in {target}")
    return done.returncode


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="scripts/gpu_check.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny encoder/decoder, a few steps (CPU smoke test)")
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument("--precision", default="bf16-mixed", help="Lightning precision (default bf16-mixed)")
    parser.add_argument("--llm_dtype", default="bfloat16", help="frozen decoder weights (default bfloat16)")
    parser.add_argument("--encoder_dtype", default="bfloat16", help="frozen encoder weights (default bfloat16)")
    parser.add_argument("--budget_s", type=float, default=450.0,
                        help="skip the phases that would start after this many seconds (default 450)")
    parser.add_argument("--peak_tflops", type=float, default=H100_BF16_DENSE_TFLOPS,
                        help="the card's dense bf16 peak for MFU (default: H100 SXM, 989)")
    parser.add_argument("--prune_fraction", type=float, default=0.25, help="share of decoder layers healing removes")
    parser.add_argument("--phases", default="", help=f"comma-separated subset of {','.join(PHASES)} (default: all)")
    parser.add_argument("--fit_steps", type=int, help="override the fit steps (20; tiny 4)")
    parser.add_argument("--heal_steps", type=int, help="override the heal steps (20; tiny 4)")
    parser.add_argument("--fsdp_steps", type=int, help="override the FSDP fit steps (10; tiny 2)")
    parser.add_argument("--json_out", help="where the JSON goes (default: $OUT/gpu_check.json, else ./gpu_check.json)")
    parser.add_argument("--work_dir", help="keep the random checkpoints, WAVs and run files here (default: a temp "
                                           "dir, removed at the end)")
    parser.add_argument("--download_wheels", metavar="DIR",
                        help="only download the wheels the device needs into DIR (run here, not on the device)")
    return parser


def main(argv: list[str] | None = None) -> int:
    namespace = build_parser().parse_args(argv)
    if namespace.download_wheels:
        return download_wheels(namespace.download_wheels)
    phases = [p for p in namespace.phases.split(",") if p]
    unknown = sorted(set(phases) - set(PHASES))
    if unknown:
        print(f"error: unknown phases {unknown}; choose from {list(PHASES)}", file=sys.stderr)
        return 2
    opts = Options(**{k: v for k, v in vars(namespace).items() if k in Options.__dataclass_fields__ and k != "phases"},
                   phases=phases)
    out_path = json_path(opts)
    results: dict[str, Any] = {"schema": 1, "options": {**asdict(opts), "sizes": asdict(opts.sizes)},
                               "phases": {}, "json": str(out_path)}
    missing = missing_modules()
    if missing:
        results["error"] = (f"modules not installed: {missing}; carry wheels (python scripts/gpu_check.py "
                            "--download_wheels .whl here, then install them as the docstring says)")
        write_json(out_path, results)
        print(json.dumps(results, indent=1), flush=True)
        return 2
    import torch

    if opts.cuda and not torch.cuda.is_available():
        results["error"] = "--device cuda, but torch.cuda.is_available() is False"
        write_json(out_path, results)
        print(json.dumps(results, indent=1), flush=True)
        return 2
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*smaller than the logging interval.*")
    for name in ("lightning.pytorch", "lightning.fabric", "lightning_speechllm"):
        logging.getLogger(name).setLevel(logging.WARNING)
    import transformers

    transformers.logging.set_verbosity_error()
    work_dir = Path(opts.work_dir) if opts.work_dir else Path(tempfile.mkdtemp(prefix="gpu_check_"))
    work_dir.mkdir(parents=True, exist_ok=True)
    ctx = Context(opts=opts, work_dir=work_dir)
    try:
        run_phases(ctx, results, PHASES, write=lambda: write_json(out_path, results), meter=PeakMemory(opts))
    finally:
        ctx.fit.clear()
        ctx.reloaded = None
        if not opts.work_dir:
            shutil.rmtree(work_dir, ignore_errors=True)
    results["failed"] = [n for n, r in results["phases"].items() if r["status"] == "failed"]
    results["skipped"] = [n for n, r in results["phases"].items() if r["status"] == "skipped"]
    results["summary"] = summary_lines(results)
    write_json(out_path, results)
    print("\n" + json.dumps(results, indent=1, default=str))
    print("\n" + "\n".join(results["summary"]) + f"\nJSON: {out_path}", flush=True)
    return 1 if results["failed"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
