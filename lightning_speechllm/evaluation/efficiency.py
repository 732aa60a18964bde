"""Efficiency of full vs pruned SpeechLLMs: decoder parameters, FLOPs per token, measured latency and memory.

* :func:`decoder_parameter_count` counts the parameters of the *active* decoder (a :class:`DecoderLayerMask`
  registers only the kept layers), tied embedding / LM-head weights once.
* :func:`per_token_flops` / :func:`ideal_speedup`: analytic forward FLOPs of one generated token of a llama-style
  decoder (GQA attention projections, score/value matmuls over the context, gated MLP, LM head), so the ideal
  speed-up of removing layers is ``FLOPs(full) / FLOPs(pruned)``.
* :func:`measure_latency`: wall-clock prefill, per-token decode (KV cache) and real-time factor of greedy
  transcription with a forced number of new tokens, plus peak memory, as an :class:`EfficiencyReport`;
  :func:`compare` turns two reports into speed-ups and ratios.
* :func:`main`: ``python -m lightning_speechllm efficiency`` (also ``scripts/bench/pruned_speed.py``) benchmarks the
  default SpeechLLM on espeak utterances, full vs pruned (the same object, masked), side by side.

Memory caveat: a masked model keeps the removed layers' weights allocated, so its peak memory differs from the
full model's only by the smaller KV cache and activations; :attr:`EfficiencyReport.active_weight_bytes` gives the
weight footprint an exported pruned model would have.
"""
from __future__ import annotations

import resource
import statistics
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from torch import nn

from lightning_speechllm.data.batch import SAMPLE_RATE, SpeechBatch
from lightning_speechllm.model.layer_mask import unwrap_peft
from lightning_speechllm.model.speechllm import SpeechLLM, SpeechLLMConfig

__all__ = [
    "BenchArgs",
    "EfficiencyReport",
    "compare",
    "decoder_parameter_count",
    "format_markdown",
    "format_side_by_side",
    "ideal_speedup",
    "main",
    "measure_latency",
    "median_report",
    "kv_cache_bytes",
    "per_token_flops",
    "prefill_flops",
    "run_benchmark",
    "synthetic_batches",
]

GOAL_FRACTION_OF_IDEAL = 0.9
"""The pruned model should reach at least this fraction of the ideal (FLOP) decode speed-up."""


# ------------------------------------------------------------------------------------------------ parameters
def _unique_parameters(module: nn.Module) -> list[nn.Parameter]:
    """Parameters of ``module`` with tied / shared tensors counted once (by identity and storage)."""
    seen: set[tuple[int, int, tuple[int, ...]]] = set()
    unique = []
    for param in module.parameters():
        key = (param.data_ptr(), param.storage_offset(), tuple(param.shape)) if param.numel() else (id(param), 0, ())
        if key not in seen:
            seen.add(key)
            unique.append(param)
    return unique


def decoder_parameter_count(llm: nn.Module) -> int:
    """Parameters of an HF causal LM (or PeftModel, or a SpeechLLM's ``.llm``) over its ACTIVE decoder layers.

    A :class:`~lightning_speechllm.model.layer_mask.DecoderLayerMask` registers only the kept layers, so masked
    layers are not counted, nor are sublayers a :class:`~lightning_speechllm.model.sublayer_mask.SublayerMask`
    dropped; replacement modules in the layer list are. Embeddings and LM head count once when tied. LoRA adapters,
    if any, are included.
    """
    if isinstance(llm, SpeechLLM):
        llm = llm.llm
    from lightning_speechllm.model.sublayer_mask import is_dropped

    dropped = {id(p) for m in llm.modules() if is_dropped(m) for p in m.parameters()}
    return sum(param.numel() for param in _unique_parameters(llm) if id(param) not in dropped)


def _parameter_bytes(module: nn.Module) -> int:
    return sum(param.numel() * param.element_size() for param in _unique_parameters(module))


# ----------------------------------------------------------------------------------------------------- FLOPs
@dataclass(frozen=True)
class _DecoderShape:
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    vocab: int
    num_layers: int


def _decoder_shape(config: Any) -> _DecoderShape:
    """Read the llama-style shape from an HF config (its text config for multimodal ones)."""
    if hasattr(config, "get_text_config"):
        config = config.get_text_config(decoder=True)
    name = type(config).__name__
    missing = [key for key in ("hidden_size", "num_attention_heads", "intermediate_size", "vocab_size",
                               "num_hidden_layers") if getattr(config, key, None) is None]
    if missing:
        raise ValueError(f"{name} lacks {missing}: not a llama-style decoder config")
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    if heads % kv_heads:
        raise ValueError(f"{name}: num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}")
    return _DecoderShape(int(config.hidden_size), heads, kv_heads, head_dim, int(config.intermediate_size),
                         int(config.vocab_size), int(config.num_hidden_layers))


def _layer_flops(shape: _DecoderShape, context_len: int) -> int:
    """Forward FLOPs (2 per multiply-add) of one decoder layer for one query token attending ``context_len`` keys."""
    d, q_dim, kv_dim = shape.hidden, shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    projections = 2 * d * q_dim + 2 * 2 * d * kv_dim + 2 * q_dim * d  # q, k, v, o
    attention = 2 * 2 * q_dim * context_len  # q.k^T scores and the weighted sum of values
    mlp = 3 * 2 * d * shape.ffn  # gate, up, down
    return projections + attention + mlp


def per_token_flops(config: Any, num_layers: int | None = None, context_len: int = 1) -> int:
    """Forward FLOPs to generate one token with a KV cache: ``num_layers`` llama-style decoder layers (default:
    ``config.num_hidden_layers``) attending ``context_len`` cached keys (the new token included), plus the LM head
    (``2·d·V``). Embedding lookup, norms, RoPE and softmax are neglected."""
    shape = _decoder_shape(config)
    layers = shape.num_layers if num_layers is None else num_layers
    if layers < 0 or context_len < 1:
        raise ValueError(f"need num_layers >= 0 and context_len >= 1, got {layers} and {context_len}")
    return layers * _layer_flops(shape, context_len) + 2 * shape.hidden * shape.vocab


def prefill_flops(config: Any, num_layers: int | None = None, prompt_len: int = 1, lm_head_tokens: int = 1) -> int:
    """Forward FLOPs of the causal prefill over ``prompt_len`` tokens (token t attends t keys), with the LM head
    applied to the last ``lm_head_tokens`` positions (1 in cached generation)."""
    shape = _decoder_shape(config)
    layers = shape.num_layers if num_layers is None else num_layers
    if prompt_len < 1 or not 0 <= lm_head_tokens <= prompt_len:
        raise ValueError(f"need prompt_len >= 1 and 0 <= lm_head_tokens <= prompt_len, got {prompt_len}, "
                         f"{lm_head_tokens}")
    no_context = _layer_flops(shape, 0)
    attention = 2 * 2 * shape.heads * shape.head_dim * prompt_len * (prompt_len + 1) // 2
    return layers * (prompt_len * no_context + attention) + lm_head_tokens * 2 * shape.hidden * shape.vocab


def kv_cache_bytes(config: Any, num_layers: int | None = None, context_len: int = 1, batch_size: int = 1,
                   bytes_per_value: int = 4) -> int:
    """Size of the key/value cache of ``num_layers`` GQA layers holding ``context_len`` positions per sequence."""
    shape = _decoder_shape(config)
    layers = shape.num_layers if num_layers is None else num_layers
    return 2 * layers * shape.kv_heads * shape.head_dim * context_len * batch_size * bytes_per_value


def _kept_count(kept_layers: int | Sequence[int], full_layers: int) -> int:
    kept = kept_layers if isinstance(kept_layers, int) else len(set(kept_layers))
    if not isinstance(kept_layers, int):
        bad = [i for i in kept_layers if not 0 <= i < full_layers]
        if bad:
            raise ValueError(f"kept layer indices {bad} out of range for a decoder with {full_layers} layers")
    if not 0 <= kept <= full_layers:
        raise ValueError(f"kept_layers={kept} out of range 0..{full_layers}")
    return kept


def ideal_speedup(config: Any, kept_layers: int | Sequence[int], context_len: int = 1,
                  num_layers: int | None = None) -> float:
    """``per_token_flops(full) / per_token_flops(pruned)`` of decoding one token; ``kept_layers`` is a count or the
    kept indices; ``num_layers`` is the full depth (default ``config.num_hidden_layers``; pass it when the config
    belongs to a masked model, whose ``num_hidden_layers`` is the active count)."""
    full = _decoder_shape(config).num_layers if num_layers is None else num_layers
    kept = _kept_count(kept_layers, full)
    return per_token_flops(config, full, context_len) / per_token_flops(config, kept, context_len)


# --------------------------------------------------------------------------------------------------- latency
@dataclass
class EfficiencyReport:
    """Timings of greedy generation with a forced number of new tokens (medians over repeats, warm-up excluded)."""

    label: str
    decoder_layers: int
    """Active decoder layers."""
    decoder_params: int
    """Parameters of the active decoder (tied embeddings once)."""
    active_weight_bytes: int
    """Bytes of all active SpeechLLM weights (encoder + projector + active decoder): an exported model's size."""
    batches: int
    batch_size: int
    prompt_tokens: float
    """Mean prompt length (speech + text tokens, padded batch width) of the first LLM forward."""
    new_tokens: int
    audio_seconds: float
    """Audio per pass over all batches."""
    speech_ms: float | None
    """Speech encoder + projector per batch (None for a model without encoder)."""
    prefill_ms: float
    """From the start of generation to the end of the first LLM forward (speech encoding included), per batch."""
    decode_ms_per_token: float
    """(total − prefill) / (new_tokens − 1): one cached decoding step (the first token comes from the prefill)."""
    total_ms: float
    """Whole generation per batch."""
    rtf: float
    """Real-time factor: generation wall time / audio seconds."""
    peak_memory_bytes: int
    memory_kind: str
    """'cuda_max_allocated' (reset before the timed runs) or 'process_peak_rss' (lifetime peak of the process)."""
    kv_cache_bytes: int
    """Analytic KV-cache size at the end of generation of the largest batch (active layers, decoder dtype; the last
    new token is never fed back, so prompt + new tokens - 1 positions)."""
    device: str
    repeats: int
    threads: int = field(default_factory=torch.get_num_threads)
    kv_cache_measured_bytes: int = -1
    """Bytes of keys and values the KV cache really held at the end of generation (largest batch); a layer without
    attention (dropped or replaced) holds none. -1: not measured (older reports)."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _Run:
    speech_s: float | None
    prefill_s: float
    total_s: float
    prompt_tokens: int
    llm_calls: int
    cache_bytes: int


class _GenerationTimer:
    """Forward hooks that time the speech front end and the first LLM forward of one ``generate`` call."""

    def __init__(self, model: SpeechLLM) -> None:
        self.model = model
        self.cuda = model.device.type == "cuda"
        self.start = 0.0
        self.speech_end: float | None = None
        self.first_forward_end: float | None = None
        self.prompt_tokens = 0
        self.llm_calls = 0

    def now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize(self.model.device)
        return time.perf_counter()

    def _on_llm_pre(self, _module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self.llm_calls == 0:
            embeds = kwargs.get("inputs_embeds")
            ids = kwargs.get("input_ids", args[0] if args else None)
            source = embeds if embeds is not None else ids
            self.prompt_tokens = int(source.shape[1]) if source is not None else 0

    def _on_llm(self, *_: Any) -> None:
        self.llm_calls += 1
        if self.llm_calls == 1:
            self.first_forward_end = self.now()

    def _on_projector(self, *_: Any) -> None:
        self.speech_end = self.now()

    @contextmanager
    def attached(self) -> Iterator["_GenerationTimer"]:
        llm = unwrap_peft(self.model.llm)
        handles = [llm.register_forward_pre_hook(self._on_llm_pre, with_kwargs=True),
                   llm.register_forward_hook(self._on_llm)]
        if self.model.projector is not None:
            handles.append(self.model.projector.register_forward_hook(self._on_projector))
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()


def _timed_generate(model: SpeechLLM, batch: SpeechBatch, new_tokens: int) -> _Run:
    from transformers import DynamicCache

    from lightning_speechllm.model.sublayer_mask import kv_cache_bytes as held_bytes
    from lightning_speechllm.model.sublayer_mask import kv_cache_for

    timer = _GenerationTimer(model)
    llm = unwrap_peft(model.llm)
    cache = kv_cache_for(llm) or DynamicCache(config=llm.config)
    with timer.attached():
        timer.start = timer.now()
        model.generate(batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens, past_key_values=cache)
        end = timer.now()
    if timer.first_forward_end is None:
        raise RuntimeError("generate() never called the LLM forward: nothing to time")
    if timer.llm_calls != new_tokens:
        raise RuntimeError(f"expected {new_tokens} LLM forwards (one per new token), saw {timer.llm_calls}; "
                           "generation stopped early or the model is not decoding with a KV cache")
    speech = None if timer.speech_end is None else timer.speech_end - timer.start
    return _Run(speech, timer.first_forward_end - timer.start, end - timer.start, timer.prompt_tokens,
                timer.llm_calls, held_bytes(cache))


def _peak_memory(device: torch.device) -> tuple[int, str]:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "cuda_max_allocated"
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024, "process_peak_rss"  # KiB on Linux


def _audio_seconds(batch: SpeechBatch) -> float:
    return 0.0 if batch.text_only else float(batch.audio_lens.sum()) / SAMPLE_RATE


@torch.no_grad()
def measure_latency(speechllm: SpeechLLM, batch: SpeechBatch | Sequence[SpeechBatch], max_new_tokens: int = 32,
                    repeats: int = 3, warmup: int = 1, label: str = "") -> EfficiencyReport:
    """Time greedy generation of exactly ``max_new_tokens`` tokens (``min_new_tokens`` forces them) on each batch.

    Per repeat, every batch is generated once; prefill / speech / total times are averaged over batches, the decode
    step is ``Σ(total − prefill) / Σ(new_tokens − 1)`` and the RTF ``Σ total / Σ audio``; the report holds the
    median of each over ``repeats`` (``warmup`` untimed passes first). The model is put in eval mode.
    """
    batches = [batch] if isinstance(batch, SpeechBatch) else list(batch)
    if not batches:
        raise ValueError("measure_latency needs at least one batch")
    if max_new_tokens < 2 or repeats < 1 or warmup < 0:
        raise ValueError(f"need max_new_tokens >= 2, repeats >= 1, warmup >= 0; got {max_new_tokens}, {repeats}, "
                         f"{warmup}")
    speechllm.eval()
    device = speechllm.device
    batches = [b.to(device) for b in batches]
    for _ in range(warmup):
        for item in batches:
            _timed_generate(speechllm, item, max_new_tokens)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    per_repeat: dict[str, list[float]] = {"speech": [], "prefill": [], "decode": [], "total": [], "rtf": []}
    prompt_tokens: list[int] = []
    measured_kv = 0
    audio = sum(_audio_seconds(item) for item in batches)
    for _ in range(repeats):
        runs = [_timed_generate(speechllm, item, max_new_tokens) for item in batches]
        prompt_tokens = [run.prompt_tokens for run in runs]
        measured_kv = max(run.cache_bytes for run in runs)
        total = sum(run.total_s for run in runs)
        if all(run.speech_s is not None for run in runs):
            per_repeat["speech"].append(sum(run.speech_s for run in runs) / len(runs))
        per_repeat["prefill"].append(sum(run.prefill_s for run in runs) / len(runs))
        per_repeat["decode"].append(sum(run.total_s - run.prefill_s for run in runs)
                                    / (len(runs) * (max_new_tokens - 1)))
        per_repeat["total"].append(total / len(runs))
        per_repeat["rtf"].append(total / audio if audio > 0 else float("nan"))
    median = {key: statistics.median(values) if values else None for key, values in per_repeat.items()}
    peak, kind = _peak_memory(device)
    llm = unwrap_peft(speechllm.llm)
    kv_bytes = max(kv_cache_bytes(llm.config, len(speechllm.layer_mask.active_layers), tokens + max_new_tokens - 1,
                                  len(item), llm.get_input_embeddings().weight.element_size())
                   for tokens, item in zip(prompt_tokens, batches))
    return EfficiencyReport(
        label=label, decoder_layers=len(speechllm.layer_mask.active_layers),
        decoder_params=decoder_parameter_count(speechllm.llm), active_weight_bytes=_parameter_bytes(speechllm),
        batches=len(batches), batch_size=max(len(item) for item in batches),
        prompt_tokens=sum(prompt_tokens) / len(prompt_tokens), new_tokens=max_new_tokens, audio_seconds=audio,
        speech_ms=None if median["speech"] is None else 1e3 * median["speech"], prefill_ms=1e3 * median["prefill"],
        decode_ms_per_token=1e3 * median["decode"], total_ms=1e3 * median["total"], rtf=median["rtf"],
        peak_memory_bytes=peak, memory_kind=kind, kv_cache_bytes=kv_bytes, kv_cache_measured_bytes=measured_kv,
        device=str(device), repeats=repeats,
    )


_TIMED_FIELDS = ("speech_ms", "prefill_ms", "decode_ms_per_token", "total_ms", "rtf")


def median_report(reports: Sequence[EfficiencyReport]) -> EfficiencyReport:
    """One report from several single-repeat reports of the same setting: the median of each timed field, the
    maximum peak memory, ``repeats`` summed."""
    if not reports:
        raise ValueError("median_report needs at least one report")
    first = reports[0]
    for index, other in enumerate(reports[1:], start=1):
        if (other.decoder_layers, other.new_tokens, other.batches) != (first.decoder_layers, first.new_tokens,
                                                                      first.batches):
            raise ValueError(f"report {index} ({other.label!r}) measured another setting than report 0")
    timed = {key: (statistics.median(values) if None not in values else None)
             for key in _TIMED_FIELDS for values in [[getattr(r, key) for r in reports]]}
    return replace(first, **timed, peak_memory_bytes=max(r.peak_memory_bytes for r in reports),
                   repeats=sum(r.repeats for r in reports))


def compare(full: EfficiencyReport, pruned: EfficiencyReport, ideal: float | None = None) -> dict[str, Any]:
    """Speed-ups (full time / pruned time) and ratios (pruned / full) of two reports; with the FLOP ``ideal``
    decode speed-up also the achieved fraction of it and whether it meets the goal (≥ 0.9 × ideal)."""
    if full.new_tokens != pruned.new_tokens or full.batches != pruned.batches:
        raise ValueError(f"reports measured different work: {full.label!r} {full.batches} batches × "
                         f"{full.new_tokens} tokens vs {pruned.label!r} {pruned.batches} × {pruned.new_tokens}")
    result: dict[str, Any] = {
        "layers_removed": full.decoder_layers - pruned.decoder_layers,
        "removed_fraction": 1 - pruned.decoder_layers / full.decoder_layers,
        "prefill_speedup": full.prefill_ms / pruned.prefill_ms,
        "decode_speedup": full.decode_ms_per_token / pruned.decode_ms_per_token,
        "total_speedup": full.total_ms / pruned.total_ms,
        "rtf_ratio": pruned.rtf / full.rtf,
        "decoder_param_ratio": pruned.decoder_params / full.decoder_params,
        "weight_bytes_ratio": pruned.active_weight_bytes / full.active_weight_bytes,
        "peak_memory_ratio": pruned.peak_memory_bytes / full.peak_memory_bytes,
        "kv_cache_ratio": pruned.kv_cache_bytes / full.kv_cache_bytes,
    }
    if full.kv_cache_measured_bytes > 0 and pruned.kv_cache_measured_bytes >= 0:
        result["kv_cache_measured_ratio"] = pruned.kv_cache_measured_bytes / full.kv_cache_measured_bytes
    if ideal is not None:
        result["ideal_decode_speedup"] = ideal
        result["fraction_of_ideal"] = result["decode_speedup"] / ideal
        result["meets_goal"] = result["fraction_of_ideal"] >= GOAL_FRACTION_OF_IDEAL
    return result


# ------------------------------------------------------------------------------------------------- benchmark
@dataclass
class BenchArgs:
    """Options of the full-vs-pruned speed benchmark (besides ``--model.*``)."""

    remove: list[int] = field(default_factory=lambda: list(range(14, 26)))
    """Decoder layers to remove (original numbering); default the block 14..25 (12 of SmolLM2's 30)."""
    plan: str | None = None
    """A PruningPlan JSON (``prune`` command); overrides --remove."""
    sentences: int = 4
    """Espeak utterances to synthesize (project sentence generator)."""
    seed: int = 0
    """Sentence generator seed."""
    batch_size: int = 1
    """Utterances per generate() call."""
    max_new_tokens: int = 32
    """Tokens generated per utterance (forced with min_new_tokens)."""
    repeats: int = 3
    """Timed passes (the median is reported)."""
    warmup: int = 1
    """Untimed passes before timing."""
    threads: int = 1
    """torch.set_num_threads on the CPU."""
    device: str = "auto"
    """auto (cuda when available), cpu or cuda."""
    json_out: str | None = None
    """Also write both reports and the comparison to this JSON file."""
    runtime: str = "pytorch"
    """pytorch: the model masked in place (``--model.*``); llama.cpp: the ``--gguf`` folders in llama.cpp, each type
    of ``--types``, beside their ``--ckpt`` in PyTorch eager, each in a process of its own
    (:mod:`lightning_speechllm.edge.speed`)."""
    gguf: dict[str, str] = field(default_factory=dict)
    """llama.cpp only: model name -> folder written by ``gguf`` (``{full: G1, pruned: G2}``: the last is compared
    with the first)."""
    ckpt: dict[str, str] = field(default_factory=dict)
    """llama.cpp only: model name -> the checkpoint its folder was exported from, measured in PyTorch beside it."""
    types: list[str] = field(default_factory=lambda: ["f16", "q8_0"])
    """llama.cpp only: the text-model GGUF types to run."""


def _bench_plan(args: BenchArgs, model: SpeechLLM) -> Any:
    """The PruningPlan of ``--plan`` (whole layers and/or sublayers), or of ``--remove``."""
    from lightning_speechllm.pruning.plan import PruningPlan, plan_explicit

    num_layers = model.layer_mask.num_layers
    if args.plan is not None:
        plan = PruningPlan.from_json(args.plan)
        plan.validate_for(num_layers, model.config.model_id)
        return plan
    bad = [i for i in args.remove if not 0 <= i < num_layers]
    if bad:
        raise ValueError(f"--remove {bad} out of range for a decoder with {num_layers} layers")
    return plan_explicit(num_layers, sorted(set(args.remove)))


@contextmanager
def _applied(model: SpeechLLM, plan: Any | None) -> Iterator[None]:
    """``plan`` masked on ``model`` inside the context (None: the full model)."""
    from lightning_speechllm.pruning.plan import apply_plan

    try:
        if plan is not None:
            apply_plan(model, plan)
        yield
    finally:
        model.layer_mask.reset()
        model.sublayer_mask.reset()


def synthetic_batches(args: BenchArgs) -> list[SpeechBatch]:
    """``args.sentences`` unique synthetic utterances (the demo's synthesizer), in batches of ``args.batch_size``."""
    from lightning_speechllm.data.sentences import unique_sentences
    from lightning_speechllm.demo import synthesize

    if args.sentences < 1 or args.batch_size < 1:
        raise ValueError(f"--sentences and --batch_size must be >= 1, got {args.sentences}, {args.batch_size}")
    batch = synthesize(unique_sentences(args.sentences, seed=args.seed))
    return [batch.subset(list(range(start, min(start + args.batch_size, len(batch)))))
            for start in range(0, len(batch), args.batch_size)]


def run_benchmark(args: BenchArgs, model_config: SpeechLLMConfig,
                  model: SpeechLLM | None = None,
                  batches: Sequence[SpeechBatch] | None = None) -> tuple[EfficiencyReport, EfficiencyReport, dict]:
    """Measure the full model and the same object with the layers masked, in interleaved rounds (median of
    ``args.repeats``); return both reports and :func:`compare` with the ideal decode speed-up at the mean decoding
    context (prompt + half the new tokens)."""
    if args.device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"--device must be auto, cpu or cuda, got {args.device!r}")
    device = "cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu"
    if device == "cpu":
        torch.set_num_threads(args.threads)
    model = (model or SpeechLLM.from_config(model_config)).to(device).eval()
    batches = list(batches) if batches is not None else synthetic_batches(args)
    plan = _bench_plan(args, model)
    mask = model.layer_mask
    kept = plan.kept_layers
    label = f"pruned (-{len(plan.removed_layers)})" + (f", -{len(plan.removed_attention)} attn"
                                                       if plan.removed_attention else "")
    variants = {"full": None, label: plan}
    for _ in range(args.warmup):
        for variant in variants.values():
            with _applied(model, variant):
                measure_latency(model, batches, args.max_new_tokens, repeats=1, warmup=0)
    # Interleaved rounds (full, pruned, full, pruned, ...): load drift on a shared machine hits both alike.
    rounds: dict[str, list[EfficiencyReport]] = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, variant in variants.items():
            with _applied(model, variant):
                rounds[name].append(measure_latency(model, batches, args.max_new_tokens, 1, 0, label=name))
    full, pruned = (median_report(reports) for reports in rounds.values())
    context = max(1, round(full.prompt_tokens + args.max_new_tokens / 2))
    ideal = ideal_speedup(unwrap_peft(model.llm).config, len(kept), context, num_layers=mask.num_layers)
    comparison = compare(full, pruned, ideal)
    comparison["removed_layers"] = list(plan.removed_layers)
    if plan.removed_attention:  # the FLOP ideal counts whole layers only
        comparison["removed_attention"] = list(plan.removed_attention)
    comparison["ideal_context_len"] = context
    return full, pruned, comparison


_ROWS: tuple[tuple[str, str, str], ...] = (
    ("decoder layers", "decoder_layers", "{:d}"),
    ("decoder params (M)", "decoder_params", "{:.2f}"),
    ("active weights (MiB)", "active_weight_bytes", "{:.1f}"),
    ("prompt tokens (mean)", "prompt_tokens", "{:.1f}"),
    ("speech enc+proj (ms)", "speech_ms", "{:.1f}"),
    ("prefill (ms)", "prefill_ms", "{:.1f}"),
    ("decode / token (ms)", "decode_ms_per_token", "{:.2f}"),
    ("total / batch (ms)", "total_ms", "{:.1f}"),
    ("RTF", "rtf", "{:.3f}"),
    ("peak memory (MiB)", "peak_memory_bytes", "{:.1f}"),
    ("KV cache (KiB)", "kv_cache_bytes", "{:.1f}"),
    ("KV cache measured (KiB)", "kv_cache_measured_bytes", "{:.1f}"),
)
_SCALE = {"decoder_params": 1e-6, "active_weight_bytes": 1 / 2**20, "peak_memory_bytes": 1 / 2**20,
          "kv_cache_bytes": 1 / 2**10, "kv_cache_measured_bytes": 1 / 2**10}


def _cells(report: EfficiencyReport) -> list[str]:
    cells = []
    for _, key, fmt in _ROWS:
        value = getattr(report, key)
        cells.append("-" if value is None else fmt.format(value * _SCALE[key] if key in _SCALE else value))
    return cells


def format_side_by_side(full: EfficiencyReport, pruned: EfficiencyReport, comparison: dict) -> str:
    """Plain-text table of both reports and the headline comparison."""
    lines = [f"{'':<22} {full.label:>14} {pruned.label:>14}"]
    lines += [f"{name:<22} {a:>14} {b:>14}" for (name, _, _), a, b in zip(_ROWS, _cells(full), _cells(pruned))]
    lines.append(f"memory: {full.memory_kind}; device {full.device}, {full.threads} thread(s), "
                 f"{full.batches} batch(es) of {full.batch_size}, {full.new_tokens} new tokens, "
                 f"median of {full.repeats}")
    lines.append(_headline(comparison))
    return "\n".join(lines)


def _headline(comparison: dict) -> str:
    text = (f"speed-up: decode {comparison['decode_speedup']:.2f}x, prefill {comparison['prefill_speedup']:.2f}x, "
            f"total {comparison['total_speedup']:.2f}x")
    if "ideal_decode_speedup" in comparison:
        verdict = "meets" if comparison["meets_goal"] else "MISSES"
        text += (f"; FLOP ideal {comparison['ideal_decode_speedup']:.3f}x at context "
                 f"{comparison.get('ideal_context_len', '?')} -> {100 * comparison['fraction_of_ideal']:.0f}% of "
                 f"ideal ({verdict} the goal >= {100 * GOAL_FRACTION_OF_IDEAL:.0f}%)")
    return text


def format_markdown(full: EfficiencyReport, pruned: EfficiencyReport, comparison: dict) -> str:
    """The same table in Markdown."""
    lines = [f"| metric | {full.label} | {pruned.label} |", "|---|---:|---:|"]
    lines += [f"| {name} | {a} | {b} |" for (name, _, _), a, b in zip(_ROWS, _cells(full), _cells(pruned))]
    return "\n".join(lines) + "\n\n" + _headline(comparison)


def build_parser():
    """jsonargparse parser: :class:`BenchArgs` flags, ``--model.*`` (a :class:`SpeechLLMConfig`), ``--config``."""
    from jsonargparse import ActionConfigFile, ArgumentParser

    parser = ArgumentParser(prog="python -m lightning_speechllm efficiency",
                            description="Full vs pruned SpeechLLM: parameters, prefill, decode, RTF, memory.",
                            print_config="--print_config", exit_on_error=False)
    parser.add_argument("--config", action=ActionConfigFile, help="YAML file with any of the options below")
    parser.add_class_arguments(BenchArgs, as_group=True)
    parser.add_class_arguments(SpeechLLMConfig, "model", help="The SpeechLLM to benchmark.")
    return parser


def parse_args(argv: list[str] | None = None) -> tuple[BenchArgs, SpeechLLMConfig]:
    """Parse ``argv`` into the benchmark options and the model config."""
    from lightning_speechllm.config_utils import from_dict, parsed_values

    values = parsed_values(build_parser().parse_args(argv))
    args = BenchArgs(**{key: values[key] for key in BenchArgs.__dataclass_fields__})
    return args, from_dict(SpeechLLMConfig, values["model"])


def main(argv: list[str] | None = None) -> int:
    """Entry point: benchmark, print both tables; exit code 2 on bad input."""
    import json
    from pathlib import Path

    from jsonargparse import ArgumentError

    try:
        args, model_config = parse_args(argv)
    except SystemExit as stop:  # --help, --print_config, or a parse error already reported
        return stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 2)
    except ArgumentError as error:
        print(f"efficiency: error: {error}", file=sys.stderr)
        return 2
    if args.runtime == "llama.cpp":
        return _llamacpp_main(args)
    if args.runtime != "pytorch":
        print(f"efficiency: error: --runtime must be pytorch or llama.cpp, got {args.runtime!r}", file=sys.stderr)
        return 2
    try:
        full, pruned, comparison = run_benchmark(args, model_config)
    except (FileNotFoundError, KeyError, ValueError) as error:
        print(f"efficiency: error: {error}", file=sys.stderr)
        return 2
    print(format_side_by_side(full, pruned, comparison))
    print()
    print(format_markdown(full, pruned, comparison))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"full": full.to_dict(), "pruned": pruned.to_dict(),
                                                   "comparison": comparison}, indent=2))
        print(f"wrote {args.json_out}")
    return 0


def _llamacpp_main(args: BenchArgs) -> int:
    """``--runtime llama.cpp``: the gguf folders and their checkpoints on the same synthetic utterances."""
    import json
    from pathlib import Path

    from lightning_speechllm.edge.cli import unmatched_checkpoints
    from lightning_speechllm.edge.speed import compare_runtimes, format_runtimes

    if not args.gguf:
        print("efficiency: error: --runtime llama.cpp needs --gguf '{full: DIR, pruned: DIR}' (folders written by "
              "`gguf`)", file=sys.stderr)
        return 2
    unmatched = unmatched_checkpoints(args.gguf, args.ckpt)
    if unmatched:
        print(f"efficiency: error: {unmatched}", file=sys.stderr)
        return 2
    waves = [batch.audio[row, : batch.audio_lens[row]].numpy() for batch in synthetic_batches(args)
             for row in range(len(batch.audio_lens))]
    try:
        rows = compare_runtimes(args.gguf, args.ckpt, args.types, waves, args.max_new_tokens, args.repeats,
                                args.threads)
    except RuntimeError as error:
        print(f"efficiency: error: {error}", file=sys.stderr)
        return 2
    names = list(args.gguf)
    print()
    print(format_runtimes(rows, names[0], names[-1]))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(rows, indent=2))
        print(f"wrote {args.json_out}")
    return 0
