"""The SpeechLLM: speech encoder -> projector -> pretrained causal LLM decoder, with decoder-layer masks.

A plain `nn.Module`; the LightningModules wrap it. Sequences are LEFT-padded everywhere (training and generation)
with explicit position ids, so batched decoding equals one-by-one decoding.
"""
from __future__ import annotations

import hashlib
import inspect
import json
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache, PreTrainedModel, PreTrainedTokenizerBase
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.models.llama.modeling_llama import LlamaModel

from lightning_speechllm.data.batch import SpeechBatch
from lightning_speechllm.model.encoders import SpeechEncoder, load_speech_encoder
from lightning_speechllm.model.generation import GenerationOutput, generated_lengths
from lightning_speechllm.model.layer_mask import DecoderLayerMask, unwrap_peft
from lightning_speechllm.model.projector import Projector, ProjectorConfig
from lightning_speechllm.model.prompts import EncodedSample, PromptBuilder, PromptConfig
from lightning_speechllm.model.released import ReleasedOrigin, ReleasedParts, load_released
from lightning_speechllm.model.segments import Segment
from lightning_speechllm.model.sharding import full_tensor, load_into, shard_speechllm
from lightning_speechllm.model.speech_skip import SpeechSkip
from lightning_speechllm.model.sublayer_mask import SublayerMask, kv_cache_for

log = logging.getLogger(__name__)
IGNORE_INDEX = -100
# transformers renamed the decoders' `past_key_values` argument to `cache` (5.24; the old name warns until 5.40).
_CACHE_KWARG = "cache" if "cache" in inspect.signature(LlamaModel.forward).parameters else "past_key_values"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ATTN_IMPLEMENTATIONS = ("eager", "sdpa", "flash_attention_2", "flash_attention_3", "flex_attention")
"""The attention kernels `attn_implementation` may name (transformers' names)."""


@dataclass
class LoraConfig:
    """LoRA adapters on chosen decoder layers (PEFT). Defaults are the paper's healing setting."""

    layers: list[int] | None = None
    """Decoder layer indices (original numbering) that get adapters; None = every layer."""
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj",
                                                                "gate_proj", "up_proj", "down_proj"])
    """Names of the linear modules inside each layer to adapt."""
    r: int = 64
    """Rank."""
    alpha: int = 64
    """Scaling numerator (scale = alpha / r)."""
    dropout: float = 0.05
    """Dropout on the adapter input."""


@dataclass
class SpeechLLMConfig:
    """Where the parts come from and which of them train."""

    llm_path: str = "smollm2-135m"
    """Local HF causal-LM directory, or a registered offline asset name."""
    pretrained: str | None = None
    """Local HF directory of a released SpeechLLM (Qwen2-Audio, ...: :mod:`lightning_speechllm.model.released`),
    loaded whole in its own class, in `llm_dtype`, through its own feature extractor and chat template; `llm_path`,
    `encoder_path`, `encoder_dtype`, the encoder window and `projector` are then unused. None (the default)
    assembles encoder + projector + LLM."""
    encoder_path: str | None = "whisper-tiny.en"
    """Local HF speech-encoder directory, or a registered offline asset name; None for a text-only model."""
    encoder_window_seconds: float | None = None
    """Whisper only: pin the window to this many seconds instead of 30 (faster for short utterances; the encoder then
    sees a shorter context than in pre-training; longer utterances are refused). None = Whisper's 30 s window, as the
    paper, unless `encoder_window_step_seconds` is set."""
    encoder_window_step_seconds: float | None = None
    """Whisper only: choose the window per utterance, the smallest multiple of this many seconds that holds it (up to
    30 s). Utterances up to one step long are encoded as with a window pinned to it; longer ones still fit."""
    encoder_whole_window: bool = False
    """Whisper only: every encoder frame of the 30 s window is a speech position, the silence after the utterance
    included (1500 frames; 375 positions after a 4-frame projector), as Voxtral and llama.cpp's Whisper-based audio
    path feed them. False: only the frames that cover the utterance (the paper; far fewer positions)."""
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    """Projector shape."""
    prompt: PromptConfig = field(default_factory=PromptConfig)
    """Prompt wording and template."""
    llm_dtype: str = "float32"
    """Decoder weight dtype: float32, bfloat16 (recommended on GPU) or float16."""
    encoder_dtype: str = "float32"
    """Speech-encoder weight dtype: float32, bfloat16 or float16. The features (Whisper log-mel, waveform
    normalisation) are computed in float32 whatever this is; the frames are cast to the projector's dtype."""
    attn_implementation: str | None = None
    """Decoder attention kernel: None (transformers' default, sdpa where available), 'eager', 'sdpa',
    'flash_attention_2' (needs the flash-attn package, a CUDA GPU and a half-precision llm_dtype), 'flash_attention_3'
    or 'flex_attention'."""
    gradient_checkpointing: bool = False
    """Recompute each decoder layer's activations in the backward pass instead of keeping them (non-reentrant
    checkpointing): much less activation memory for long speech prompts, about one extra decoder forward of time.
    Applies whenever gradients flow through the decoder (LoRA, or a trainable projector under a frozen decoder)."""
    train_projector: bool = True
    """Train the projector."""
    train_encoder: bool = False
    """Fine-tune the speech encoder (frozen in the paper)."""
    lora: LoraConfig | None = None
    """LoRA on the decoder; None keeps the decoder frozen."""
    removed_layers: list[int] = field(default_factory=list)
    """Decoder layers masked out at load time (original numbering)."""
    removed_attention: list[int] = field(default_factory=list)
    """Decoder layers whose attention sublayer is dropped at load time (the residual path and the MLP stay; no KV
    cache is kept for them)."""
    removed_mlp: list[int] = field(default_factory=list)
    """Decoder layers whose MLP sublayer is dropped at load time (the residual path and the attention stay)."""
    speech_skip_layers: list[int] = field(default_factory=list)
    """Decoder layers in which the speech positions skip the layer (their state passes through; prompt and target
    positions run it and still attend to them: `lightning_speechllm.model.speech_skip`, after ShortV)."""

    @property
    def model_id(self) -> str:
        """What names this model in maps and plans: the released model's directory, else the LLM's path."""
        return self.pretrained or self.llm_path


@dataclass
class LLMInputs:
    """Everything the decoder needs for one batch, left-padded."""

    inputs_embeds: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    segment_ids: torch.Tensor
    labels: torch.Tensor | None


class SpeechLLM(nn.Module):
    """Speech encoder + projector + HF causal LLM with pluggable decoder-layer masks."""

    def __init__(self, llm: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, encoder: SpeechEncoder | None,
                 config: SpeechLLMConfig | None = None, projector: nn.Module | None = None,
                 released: ReleasedOrigin | None = None) -> None:
        """`projector`: a ready projector (a released model's own) instead of one built from `config.projector`;
        `released`: the released model the parts come from (its prompt is its processor's; exported in its own
        class)."""
        super().__init__()
        self.config = config or SpeechLLMConfig()
        self.released = released
        # A released tower keeps the dtypes it was loaded in (llm_dtype, with its class's float32-kept modules)
        self.encoder = encoder if released is not None else _cast_encoder(encoder, self.config.encoder_dtype)
        self.llm = llm
        self.tokenizer = tokenizer
        self.prompts = (PromptBuilder(tokenizer, self.config.prompt) if released is None else
                        PromptBuilder(tokenizer, self.config.prompt, chat_renderer=released.render_chat,
                                      audio_token=released.audio_token))
        llm_dim = llm.get_input_embeddings().embedding_dim
        if projector is None and encoder is not None:
            projector = Projector(encoder.output_dim, llm_dim, self.config.projector)
        self.projector = projector
        self._configure_encoder_window(encoder)
        self._encoder_weights_digest: str | None = None
        self.sharded = False  # set by shard(): FSDP2 units, DTensor parameters
        self.layer_mask = DecoderLayerMask(self.llm)
        self.sublayer_mask = SublayerMask(self.llm)
        self.speech_skip = SpeechSkip(self.llm)
        self.replacements = nn.ModuleDict()  # healing's modules in place of removed blocks, keyed by first layer
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        self._apply_trainability()
        _set_attn_implementation(self.llm, self.config.attn_implementation)
        if self.config.gradient_checkpointing:
            enable_gradient_checkpointing(self.llm)
        if self.config.lora is not None:
            self.add_lora(self.config.lora)
        if self.config.removed_layers:
            self.layer_mask.remove_layers(self.config.removed_layers)
        if self.config.removed_attention or self.config.removed_mlp:
            self.sublayer_mask.drop(self.config.removed_attention, self.config.removed_mlp)
        if self.config.speech_skip_layers:
            self.speech_skip.set_layers(self.config.speech_skip_layers)

    def _configure_encoder_window(self, encoder: SpeechEncoder | None) -> None:
        pinned, step = self.config.encoder_window_seconds, self.config.encoder_window_step_seconds
        if self.config.encoder_whole_window:
            if not hasattr(encoder, "set_window") or pinned is not None or step is not None:
                raise ValueError("encoder_whole_window needs a Whisper encoder on its 30 s window (no "
                                 "encoder_window_seconds / encoder_window_step_seconds)")
            encoder.whole_window = True
        if pinned is None and step is None:
            return
        if pinned is not None and step is not None:
            raise ValueError("set either encoder_window_seconds (a pinned window) or encoder_window_step_seconds "
                             f"(a window per utterance), not both: got {pinned} and {step}")
        if not hasattr(encoder, "set_window"):
            raise ValueError("encoder_window_seconds / encoder_window_step_seconds apply to Whisper encoders only")
        if pinned is not None:
            encoder.set_window(pinned)
        else:
            encoder.set_window_step(step)

    # ----------------------------------------------------------------------------------------------- construction
    @classmethod
    def from_config(cls, config: SpeechLLMConfig) -> "SpeechLLM":
        """Load the LLM, tokenizer and encoder from local directories (or offline asset names)."""
        from lightning_speechllm.assets import resolve

        llm_dtype, encoder_dtype = _dtype(config.llm_dtype), _dtype(config.encoder_dtype, "encoder_dtype")
        attn = _attn_implementation(config.attn_implementation)  # refused before any weight is read
        if config.pretrained:
            return cls._from_released(config, llm_dtype, attn)
        llm_dir = resolve(config.llm_path)
        # transformers 5 builds the model on the meta device and fills it from the memory-mapped safetensors
        # (what `low_cpu_mem_usage=True` was): the weights are in memory once, not a random init plus a copy.
        llm = AutoModelForCausalLM.from_pretrained(llm_dir, dtype=llm_dtype, attn_implementation=attn,
                                                   trust_remote_code=False)
        tokenizer = AutoTokenizer.from_pretrained(llm_dir, trust_remote_code=False)
        encoder = (load_speech_encoder(resolve(config.encoder_path), dtype=encoder_dtype)
                   if config.encoder_path else None)
        return cls(llm, tokenizer, encoder, config)

    @classmethod
    def _from_released(cls, config: SpeechLLMConfig, dtype: torch.dtype, attn: str | None) -> SpeechLLM:
        unused = {key: getattr(config, key) for key in ("encoder_window_seconds", "encoder_window_step_seconds")
                  if getattr(config, key) is not None}
        if unused:  # e.g. from a shared YAML: a released model keeps the window its tower was trained with
            log.warning("model.pretrained %s keeps its own audio window; ignoring %s", config.pretrained,
                        ", ".join(f"{key}={value}" for key, value in unused.items()))
            config.encoder_window_seconds = config.encoder_window_step_seconds = None
        parts = load_released(config.pretrained, dtype=dtype, attn_implementation=attn)
        return cls.from_released_parts(parts, config)

    @classmethod
    def from_released_parts(cls, parts: ReleasedParts, config: SpeechLLMConfig | None = None) -> SpeechLLM:
        """A SpeechLLM on the parts of a released model (:func:`~lightning_speechllm.model.released.load_released`,
        or :func:`~lightning_speechllm.model.released.parts_from_model` for one built in memory)."""
        origin = parts.origin
        config = config or SpeechLLMConfig(pretrained=origin.source, llm_path=f"<memory>/{origin.family.class_name}")
        return cls(parts.llm, parts.tokenizer, parts.encoder, config, projector=parts.projector,
                   released=parts.origin)

    def _apply_trainability(self) -> None:
        self.llm.requires_grad_(False)
        if self.encoder is not None:
            self.encoder.requires_grad_(self.config.train_encoder)
        if self.projector is not None:
            self.projector.requires_grad_(self.config.train_projector)

    def add_lora(self, lora: LoraConfig) -> None:
        """Wrap the decoder with PEFT LoRA adapters on the chosen layers (original layer numbering)."""
        from peft import get_peft_model

        num_layers = self.layer_mask.num_layers
        bad = [i for i in lora.layers or [] if not 0 <= i < num_layers]
        if bad:
            raise ValueError(f"LoRA layers {bad} out of range for a decoder with {num_layers} layers")
        lora = replace(lora, target_modules=fused_lora_targets(self.llm, lora.target_modules))
        with self.layer_mask.active(range(num_layers)):
            self.llm = get_peft_model(self.llm, peft_lora_config(lora))
        if self.config.gradient_checkpointing:
            _drop_input_grad_hook(self.llm)  # PEFT adds it back on a checkpointed model

    def shard(self, mesh, reshard_after_forward: bool = True) -> None:
        """Apply FSDP2 in place (see :mod:`lightning_speechllm.model.sharding`); masks keep working."""
        if len(self.replacements):
            raise ValueError("replacement modules are not sharded under FSDP (each rank would train its own copy): "
                             "heal with replacements under DDP (configs/trainer/ddp.yaml) or on one device")
        shard_speechllm(self, mesh, reshard_after_forward)
        self.sharded = True

    @property
    def has_lora(self) -> bool:
        return hasattr(self.llm, "peft_config")

    def merge_lora(self) -> None:
        """Fold the LoRA adapters into the decoder weights (PEFT ``merge_and_unload``), in place: the decoder is then
        adapter-free and frozen again, and ``config.lora`` is None."""
        if not self.has_lora:
            raise ValueError("this SpeechLLM has no LoRA adapters to merge")
        with self.layer_mask.active(range(self.layer_mask.num_layers)):
            self.llm = self.llm.merge_and_unload()
        self.config.lora = None
        self._apply_trainability()

    def train(self, mode: bool = True) -> "SpeechLLM":
        super().train(mode)
        # Frozen parts stay in eval mode (no dropout), as in SLAM-style training.
        if self.encoder is not None and not self.config.train_encoder:
            self.encoder.eval()
        if not self.has_lora:
            self.llm.eval()
        return self

    def frozen_eval_parts(self) -> list[str]:
        """The parts :meth:`train` keeps in eval mode because they are frozen ('speech encoder', 'decoder')."""
        parts = ["speech encoder"] if self.encoder is not None and not self.config.train_encoder else []
        return parts + ([] if self.has_lora else ["decoder"])

    @property
    def device(self) -> torch.device:
        return self.llm.get_input_embeddings().weight.device

    # ------------------------------------------------------------------------------------------------- inputs
    def encode_speech(self, audio: torch.Tensor, audio_lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Waveforms -> projected speech embeddings [B, T', D_llm] and their lengths."""
        if self.encoder is None or self.projector is None:
            raise RuntimeError("this SpeechLLM has no speech encoder; use text-only batches")
        frames, frame_lens = self.encoder(audio, audio_lens)
        return self.projector(frames, frame_lens)

    def encoder_cache_key(self) -> str:
        """A digest of what makes the (frozen) encoder's frames: its class, config, weights and window policy. Cached
        encoder outputs (``data.encoder_cache``) are stored and checked under this key."""
        if self.encoder is None:
            raise RuntimeError("this SpeechLLM has no speech encoder")
        if self._encoder_weights_digest is None:  # the encoder is frozen: its weights are hashed once
            digest = hashlib.sha256()
            for name, tensor in sorted(self.encoder.state_dict().items()):
                digest.update(name.encode())
                digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
            self._encoder_weights_digest = digest.hexdigest()
        description = json.dumps(self.encoder_description(), sort_keys=True)
        return hashlib.sha256(f"{description}\n{self._encoder_weights_digest}".encode()).hexdigest()[:16]

    def encoder_description(self) -> dict:
        """What the encoder cache key stands for (without the weights digest)."""
        encoder = self.encoder
        config = getattr(encoder, "config", None) or getattr(getattr(encoder, "model", None), "config", None)
        if self.released is not None:  # its tower and its own feature extractor (window, mel settings)
            return {"encoder_class": type(encoder).__name__, "pretrained": self.config.pretrained,
                    "encoder_config": config.to_dict(), "feature_extractor": encoder.feature_extractor.to_dict()}
        return {"encoder_class": type(encoder).__name__, "encoder_path": self.config.encoder_path,
                "encoder_config": config.to_dict() if config is not None else None,
                "window_samples": getattr(encoder, "window_samples", None),
                "window_step_samples": getattr(encoder, "window_step_samples", None),
                # only when set, so that existing caches keep their keys
                **({"whole_window": True} if getattr(encoder, "whole_window", False) else {}),
                # WavLM/HuBERT/wav2vec2 normalise the waveform per utterance (or not, per preprocessor_config.json):
                # other frames from the same weights, so another cache
                "waveform_normalize": getattr(encoder, "normalize", None)}

    def encode_frames(self, audio: torch.Tensor, audio_lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Waveforms (on any device) -> frozen-encoder frames and lengths, computed on the encoder's device (the
        encoding function of ``data.encoder_cache``)."""
        device = next(self.encoder.parameters()).device
        return self.encoder(audio.to(device), audio_lens.to(device))

    def _speech_embeddings(self, batch: SpeechBatch) -> tuple[torch.Tensor, torch.Tensor]:
        if batch.encoder_frames is None:
            return self.encode_speech(batch.audio, batch.audio_lens)
        if self.config.train_encoder:
            raise ValueError("the batch holds cached encoder outputs, but train_encoder is set: the encoder must run")
        if batch.encoder_key != self.encoder_cache_key():
            raise ValueError(f"the batch's cached encoder outputs were made by encoder {batch.encoder_key!r}, not by "
                             f"this model's ({self.encoder_cache_key()!r}): rebuild the cache")
        return self.projector(batch.encoder_frames.to(self.device), batch.encoder_frame_lens.to(self.device))

    def build_inputs(self, batch: SpeechBatch, with_targets: bool = True) -> LLMInputs:
        """Token + speech embeddings, left-padded, with labels on the target tokens only."""
        samples = [
            self.prompts.encode(task, tgt, text if with_targets else None, transcript, batch.text_only)
            for task, tgt, text, transcript in zip(batch.tasks, _or_nones(batch.tgt_langs, len(batch)),
                                                   batch.texts, batch.transcripts)
        ]
        if batch.text_only:
            speech, speech_lens = None, [len(s.speech_tokens) for s in samples]
        else:
            speech, lens = self._speech_embeddings(batch)
            speech_lens = lens.tolist()
        return self._assemble(samples, speech, speech_lens)

    def _assemble(self, samples: list[EncodedSample], speech: torch.Tensor | None,
                  speech_lens: list[int]) -> LLMInputs:
        device, pad_id = self.device, self.tokenizer.pad_token_id
        lengths = [len(s.prefix) + n + len(s.suffix) + len(s.target) for s, n in zip(samples, speech_lens)]
        width = max(lengths)
        token_ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
        segment_ids = torch.zeros((len(samples), width), dtype=torch.long)
        labels = torch.full((len(samples), width), IGNORE_INDEX, dtype=torch.long)
        for row, (sample, n, length) in enumerate(zip(samples, speech_lens, lengths)):
            start = width - length
            speech_ids = sample.speech_tokens if sample.speech_tokens is not None else [pad_id] * n
            token_ids[row, start:] = torch.tensor(sample.prefix + speech_ids + sample.suffix + sample.target)
            segment_ids[row, start:] = torch.tensor(sample.segment_ids(n))
            if sample.target:
                labels[row, width - len(sample.target):] = torch.tensor(sample.target)
        token_ids, segment_ids, labels = token_ids.to(device), segment_ids.to(device), labels.to(device)
        embeds = self._embed_tokens(token_ids)
        if speech is not None:
            speech_slots = segment_ids == Segment.SPEECH
            lens = torch.tensor(speech_lens, device=device)
            valid = torch.arange(speech.shape[1], device=device)[None, :] < lens[:, None]
            embeds = embeds.masked_scatter(speech_slots[..., None], speech[valid].to(embeds.dtype))
        attention_mask = (segment_ids != Segment.PAD).long()
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        has_targets = any(s.target for s in samples)
        return LLMInputs(embeds, attention_mask, position_ids, segment_ids, labels if has_targets else None)

    def _embed_tokens(self, token_ids: torch.Tensor) -> torch.Tensor:
        """The decoder's token embeddings, looked up outside its forward: under FSDP the embedding table belongs to
        the decoder's root unit, gathered here for the lookup and freed again."""
        embedding = self.llm.get_input_embeddings()
        if not self.sharded:
            return embedding(token_ids)
        self.llm.unshard()
        try:
            return embedding(token_ids)
        finally:
            self.llm.reshard()

    def alignment_loss(self, batch: SpeechBatch) -> tuple[torch.Tensor, int]:
        """CTC between the projected speech and the tokens of what was said, each speech position scored against the
        decoder's own (frozen) input-embedding table: logits = speech @ E^T, the pad token as CTC's blank.

        It moves the projector towards embeddings the frozen decoder already reads as the spoken words, without a
        decoder pass (one [T, D] x [D, V] product per utterance, a few times cheaper than a decoder step), which is
        how ``OptimConfig.ctc_warmup_steps`` starts training. The tokens are the transcript's (the target's for
        ASR); an utterance without a transcript, or with more tokens than speech positions, is left out. Returns the
        loss (CTC per target token, averaged over utterances; 0 attached to the projector when none is left) and the
        number of speech positions scored."""
        if self.sharded:
            raise ValueError("ctc_warmup_steps needs the decoder's embedding table on one device; it is sharded here")
        speech, lens = self._speech_embeddings(batch)
        transcripts = [transcript or (text if task == "asr" else None)
                       for task, text, transcript in zip(batch.tasks, batch.texts, _or_nones(batch.transcripts,
                                                                                               len(batch)))]
        tokens = [self.prompts.tokenize(t.strip()) if t and t.strip() else [] for t in transcripts]
        rows = [i for i, ids in enumerate(tokens) if 0 < len(ids) <= int(lens[i])]
        if not rows:
            return (speech * 0.0).sum(), 0
        table = self.llm.get_input_embeddings().weight
        log_probs = (speech[rows].float() @ table.float().T).log_softmax(-1)
        blank = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.prompts.eos_token_id
        targets = torch.tensor([i for row in rows for i in tokens[row]], device=speech.device)
        loss = nn.functional.ctc_loss(log_probs.transpose(0, 1), targets, lens[rows].to(speech.device),
                                      torch.tensor([len(tokens[row]) for row in rows], device=speech.device),
                                      blank=blank, reduction="mean", zero_infinity=True)
        return loss, int(lens[rows].sum())

    # ------------------------------------------------------------------------------------------- forward/generate
    def forward(self, batch: SpeechBatch, shared_prefix: bool = True,
                **llm_kwargs) -> tuple[torch.Tensor, object, LLMInputs]:
        """Teacher-forced pass: (cross-entropy on target tokens, the HF model output, the inputs used).

        Targets are right-aligned (left padding), so only the last `target_window(labels)` positions get logits: the
        LM head and its backward skip the prompt and speech positions (`output.logits` covers that window only).
        While training a frozen decoder, the prompt prefix every row shares runs once (:meth:`shared_prefix_length`;
        `shared_prefix=False` runs every row whole), and `output` then covers the positions after it."""
        inputs = self.build_inputs(batch, with_targets=True)
        window = target_window(inputs.labels)
        prefix = self.shared_prefix_length(batch) if shared_prefix and not llm_kwargs else 0
        if prefix:
            output = self.run_decoder_after_prefix(inputs, prefix, logits_to_keep=window)
        else:
            output = self.run_decoder(inputs, logits_to_keep=window, **llm_kwargs)
        labels = inputs.labels[:, -window:] if window else None  # window is 0 only without targets
        return target_cross_entropy(output.logits, labels), output, inputs

    def shared_prefix_length(self, batch: SpeechBatch) -> int:
        """How many leading prompt tokens every row of a training batch shares and :meth:`forward` runs once, as a
        KV cache, instead of once per row (0: run every row whole).

        A frozen decoder gives the shared prompt (chat header, system prompt) the same keys and values in every row,
        and nothing upstream of it trains, so its forward is needed once and its backward never: about a quarter
        of the default recipe's decoder tokens. Only while gradients flow into a frozen, unsharded, unadapted
        decoder without activation checkpointing (whose recomputation would append to the cache twice), and only
        when all rows have one (task, language) prompt."""
        if not torch.is_grad_enabled() or self.sharded or self.config.gradient_checkpointing or self.llm.training:
            return 0
        if self.speech_skip.layers:
            return 0  # the skip places speech positions by the whole rows' layout
        if len(set(zip(batch.tasks, _or_nones(batch.tgt_langs, len(batch))))) != 1:
            return 0
        if any(p.requires_grad for p in self.llm.parameters()) or any(
                p.requires_grad for p in self.replacements.parameters()):
            return 0
        if any(getattr(layer, "is_sliding", False) for layer in self._prefix_cache().layers):
            return 0  # a sliding-window cache keeps only its window of the prefix: the rows would see less
        return len(self.prompts.pieces(batch.tasks[0], _or_nones(batch.tgt_langs, 1)[0]).prefix)

    def run_decoder_after_prefix(self, inputs: LLMInputs, prefix: int, logits_to_keep: int = 0) -> object:
        """:meth:`run_decoder` with the first `prefix` real tokens of each row (identical in every row) run once,
        without gradients, as a KV cache that the rest of each row attends to. Each row's remaining tokens keep
        their position ids; the left padding moves between the prefix and them, masked as before. Same logits as
        :meth:`run_decoder` up to float rounding."""
        rows = inputs.inputs_embeds.shape[0]
        real = inputs.attention_mask.bool()
        in_prefix = real & (inputs.position_ids < prefix)
        start = int(in_prefix[0].nonzero()[0])
        cache = self._prefix_cache()
        with torch.no_grad():
            self.llm(inputs_embeds=inputs.inputs_embeds[:1, start:start + prefix].detach(),
                     position_ids=torch.arange(prefix, device=self.device)[None], use_cache=True,
                     **{_CACHE_KWARG: cache})
        cache.batch_repeat_interleave(rows)
        rest = ~in_prefix
        width = inputs.inputs_embeds.shape[1] - prefix
        embeds = inputs.inputs_embeds[rest].reshape(rows, width, -1)
        attention_mask = torch.cat([inputs.attention_mask.new_ones(rows, prefix),
                                    inputs.attention_mask[rest].reshape(rows, width)], dim=1)
        return self.llm(inputs_embeds=embeds, attention_mask=attention_mask,
                        position_ids=inputs.position_ids[rest].reshape(rows, width), use_cache=False,
                        logits_to_keep=logits_to_keep, **{_CACHE_KWARG: cache})

    def _prefix_cache(self) -> DynamicCache:
        return kv_cache_for(self.llm) or DynamicCache(config=unwrap_peft(self.llm).config)

    def run_decoder(self, inputs: LLMInputs, logits_to_keep: int = 0, **llm_kwargs) -> object:
        """One teacher-forced decoder call on `inputs` (no KV cache); logits for the last `logits_to_keep` positions
        only (0 = every position). With `gradient_checkpointing`, the layers are checkpointed whenever gradients
        are on, even under a frozen (eval-mode) decoder."""
        with self._checkpointed_layers(), self.speech_skip.positions(inputs.segment_ids):
            return self.llm(inputs_embeds=inputs.inputs_embeds, attention_mask=inputs.attention_mask,
                            position_ids=inputs.position_ids, use_cache=False, logits_to_keep=logits_to_keep,
                            **llm_kwargs)

    @contextmanager
    def _checkpointed_layers(self) -> Iterator[None]:
        """transformers checkpoints a decoder layer only in training mode, and a frozen decoder stays in eval mode
        (no dropout). So, for the call, the active decoder-layer blocks alone are flagged as training (their
        submodules, where attention dropout reads the flag, stay in eval mode)."""
        if not (self.config.gradient_checkpointing and torch.is_grad_enabled()):
            yield
            return
        flagged = [m for m in self.llm.modules() if isinstance(m, GradientCheckpointingLayer) and not m.training]
        for module in flagged:
            module.training = True
        try:
            yield
        finally:
            for module in flagged:
                module.training = False

    @torch.no_grad()
    def generate(self, batch: SpeechBatch, max_new_tokens: int = 128, num_beams: int = 1,
                 **generate_kwargs) -> list[str]:
        """Greedy (num_beams=1) or beam-search hypotheses, with KV cache (none for layers without attention)."""
        return self.generate_with_details(batch, max_new_tokens, num_beams, **generate_kwargs).texts

    @torch.no_grad()
    def generate_with_details(self, batch: SpeechBatch, max_new_tokens: int = 128, num_beams: int = 1,
                              **generate_kwargs) -> GenerationOutput:
        """As :meth:`generate`, with each hypothesis's generated token count and whether a stop token ended it."""
        inputs = self.build_inputs(batch, with_targets=False)
        cache = kv_cache_for(self.llm)
        if cache is not None:
            generate_kwargs.setdefault("past_key_values", cache)  # the name every supported transformers takes
        if self.sharded and torch.distributed.is_initialized():  # every rank runs the decoder until all are done
            generate_kwargs.setdefault("synced_gpus", True)
        stop_ids = self._stop_token_ids()
        with self.speech_skip.positions(inputs.segment_ids):
            output_ids = self.llm.generate(
                inputs_embeds=inputs.inputs_embeds, attention_mask=inputs.attention_mask,
                max_new_tokens=max_new_tokens, num_beams=num_beams, do_sample=False, use_cache=True,
                eos_token_id=stop_ids, pad_token_id=self.tokenizer.pad_token_id, **generate_kwargs,
            )
        output_ids = getattr(output_ids, "sequences", output_ids)  # a ModelOutput with return_dict_in_generate
        texts = [text.strip() for text in self.tokenizer.batch_decode(output_ids, skip_special_tokens=True)]
        num_tokens, stopped = generated_lengths(output_ids, stop_ids)
        return GenerationOutput(texts, num_tokens, stopped, max_new_tokens)

    def _stop_token_ids(self) -> list[int]:
        configured = getattr(self.llm.generation_config, "eos_token_id", None)
        configured = [configured] if isinstance(configured, int) else list(configured or [])
        return sorted({self.prompts.end_token_id, self.prompts.eos_token_id, *configured})

    # ------------------------------------------------------------------------------------ layers & checkpoints
    def set_active_layers(self, indices: Sequence[int]) -> None:
        self.layer_mask.set_active_layers(indices)

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """The weights that train (projector, LoRA, encoder if tuned), keyed in the full, unmasked layout."""
        with self.layer_mask.active(range(self.layer_mask.num_layers)):
            names = {name for name, p in self.named_parameters() if p.requires_grad}
            # Sorted: under FSDP gathering a shard is a collective that every rank runs in the same order.
            return {k: full_tensor(v.detach()).clone() for k, v in sorted(self.state_dict().items()) if k in names}

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load weights saved by `trainable_state_dict`; every trainable weight must be present."""
        with self.layer_mask.active(range(self.layer_mask.num_layers)):
            expected = {name for name, p in self.named_parameters() if p.requires_grad}
            missing, unknown = sorted(expected - state.keys()), sorted(state.keys() - expected)
            if missing or unknown:
                raise KeyError(f"checkpoint does not fit this SpeechLLM: missing {missing[:5]}, "
                               f"unexpected {unknown[:5]}")
            if not self.sharded:
                self.load_state_dict(state, strict=False)
                return
            parameters = dict(self.named_parameters())
            for name in sorted(state):
                load_into(parameters[name], state[name].to(parameters[name].device))

    def describe(self) -> dict:
        """A small JSON-able description (written next to exports and checkpoints)."""
        return {"config": asdict(self.config), "active_layers": list(self.layer_mask.active_layers),
                "removed_layers": list(self.layer_mask.removed_layers), "num_layers": self.layer_mask.num_layers,
                "uses_chat_template": self.prompts.uses_chat_template}

    def write_description(self, path: Path) -> None:
        path.write_text(json.dumps(self.describe(), indent=2))


FUSED_PROJECTIONS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
"""Decoders that fuse projections (Phi-3, Phi-4-multimodal) name them so: a LoRA target of any of the separate
names adapts the fused module."""


def fused_lora_targets(llm: nn.Module, targets: list[str]) -> list[str]:
    """`targets` with each separate projection the decoder does not have but fuses (``q_proj`` -> ``qkv_proj``)
    replaced by its fused module's name (duplicates dropped, order kept)."""
    names = {name.rsplit(".", 1)[-1] for name, _ in llm.named_modules()}
    resolved: list[str] = []
    for target in targets:
        if target not in names:
            target = next((fused for fused, parts in FUSED_PROJECTIONS.items() if target in parts and fused in names),
                          target)
        if target not in resolved:
            resolved.append(target)
    return resolved


def peft_lora_config(lora: LoraConfig):
    """The PEFT LoraConfig of a project LoraConfig (layer indices in the original numbering)."""
    from peft import LoraConfig as PeftLoraConfig

    return PeftLoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                          target_modules=lora.target_modules, layers_to_transform=lora.layers,
                          layers_pattern="layers" if lora.layers is not None else None, bias="none")


def target_window(labels: torch.Tensor | None) -> int:
    """How many final positions hold every target token and the position that predicts the first (0 = all)."""
    if labels is None:
        return 0
    return int((labels != IGNORE_INDEX).sum(dim=1).max()) + 1


def target_cross_entropy(logits: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
    """Next-token cross-entropy averaged over the target tokens (labels != -100), in float32."""
    if labels is None:
        raise ValueError("no target tokens in the batch: cannot compute a loss")
    shift_labels = labels[:, 1:]
    targets = shift_labels != IGNORE_INDEX
    # Only the target positions are upcast: [B, T, V] in float32 is large with 150k-token vocabularies.
    return nn.functional.cross_entropy(logits[:, :-1][targets].float(), shift_labels[targets])


@contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """Every submodule in eval mode inside the context; each one's own mode restored on exit."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def enable_gradient_checkpointing(llm: nn.Module) -> None:
    """Non-reentrant activation checkpointing of every decoder layer of an HF causal LM (or a PeftModel on one)."""
    model = unwrap_peft(llm)
    kwargs = {"use_reentrant": False}  # no need for inputs that require grad; works with frozen weights and PEFT
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x renamed it (the old name warns)
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    _drop_input_grad_hook(model)


def _drop_input_grad_hook(llm: nn.Module) -> None:
    """transformers (on enabling checkpointing) and PEFT (on wrapping a checkpointed model) hook the input embeddings
    to require grad, for reentrant checkpointing. Non-reentrant checkpointing does not need it, and it would make
    every backward run down to the embeddings, through the layers below the first adapted one."""
    model = unwrap_peft(llm)
    model.disable_input_require_grads()


def _attn_implementation(name: str | None) -> str | None:
    if name is not None and name not in ATTN_IMPLEMENTATIONS:
        raise ValueError(f"model.attn_implementation must be null or one of {list(ATTN_IMPLEMENTATIONS)}, "
                         f"got {name!r}")
    return name


def _set_attn_implementation(llm: nn.Module, name: str | None) -> None:
    """Switch an already built decoder (injected, or loaded) to `name`; None leaves it as it is."""
    if _attn_implementation(name) is None:
        return
    model = unwrap_peft(llm)
    if getattr(model.config, "_attn_implementation", None) != name:
        model.set_attn_implementation(name)


def _cast_encoder(encoder: SpeechEncoder | None, dtype_name: str) -> SpeechEncoder | None:
    """The encoder's weights in `encoder_dtype` (a loaded encoder already is; an injected one is cast)."""
    dtype = _dtype(dtype_name, "encoder_dtype")
    if encoder is None:
        return None
    param = next(encoder.parameters(), None)
    if param is not None and param.dtype != dtype:
        encoder.to(dtype)  # feature front ends keep their float32 buffers (see WhisperLogMel._apply)
    return encoder


def _dtype(name: str, key: str = "llm_dtype") -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"model.{key} must be one of {sorted(DTYPES)}, got {name!r}")
    return DTYPES[name]


def _or_nones(values: list, count: int) -> list:
    return values if values else [None] * count
