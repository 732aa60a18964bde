"""Layer skipping for speech tokens only (after ShortV, arXiv 2504.00502, which froze image tokens in a VLM's layers).

In a chosen decoder layer the speech positions are *frozen*: their residual state leaves the layer as it came in. The
prompt and target positions run the layer as usual and still attend to the speech positions, whose keys and values
the layer computes from their (frozen) input state, exactly as the full layer would. So per chosen layer and speech
position, the query projection, the attention row, the output projection and the whole MLP are not computed; the
key/value projections still are (text attends to them, and they fill the KV cache).

The skipped forward works on decoder layers shaped like Llama's (``input_layernorm`` → ``self_attn`` with
``q_proj``/``k_proj``/``v_proj``/``o_proj`` and rotary embeddings → ``post_attention_layernorm`` → ``mlp``: Llama,
Qwen2, Qwen3 with its q/k norms, Mistral without a sliding window) with eager or sdpa attention (the model's own
eager function, or transformers' sdpa one), and anything else is refused with the reason: flash kernels, sliding
windows, gradient checkpointing (transformers checkpoints through the class's forward, which the skip replaces), a
dropped attention or MLP in a skipped layer. A call whose positions hold no speech (a cached decoding step, a text-only
prompt) runs the stock layer. Which positions are speech follows the call's place in the sequence (the KV cache's
length before it), so cached and uncached generation compute the same thing; beam search's expanded rows follow
their row's layout.
"""
from __future__ import annotations

import functools
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from lightning_speechllm.model.layer_mask import LayerMaskError, find_decoder_layers, get_layer_mask_state
from lightning_speechllm.model.segments import Segment
from lightning_speechllm.model.sublayer_mask import is_dropped

__all__ = ["SpeechSkip", "SpeechSkipError", "skipped_layer_flops"]

_PARTS = ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp")
_ATTENTION_PARTS = ("q_proj", "k_proj", "v_proj", "o_proj")
_UNSUPPORTED_PARTS = ("pre_feedforward_layernorm", "post_feedforward_layernorm")  # Gemma 2/3: extra norms


_SKIP_ATTR = "_lightning_speechllm_speech_skip"


class SpeechSkipError(LayerMaskError):
    """A layer the speech-token skip cannot run, or positions it cannot place."""


class SpeechSkip:
    """Which decoder layers skip the speech positions; :meth:`positions` sets those positions for the calls inside.

    A deep copy (or pickle) of the SpeechLLM carries its own skip. A copy of the LLM alone carries a private skip that
    no :meth:`positions` call lays out, so it runs every position."""

    def __init__(self, llm: nn.Module) -> None:
        self.llm = llm
        self.layers: tuple[int, ...] = ()
        self._speech: Tensor | None = None  # [B, T] bool over the whole sequence of the calls inside `positions`

    def set_layers(self, layers: Sequence[int]) -> None:
        """Skip the speech positions in ``layers`` (original numbering); ``[]`` turns the skip off."""
        state = get_layer_mask_state(self.llm)
        full = list(state.layer_list) if state is not None else list(_decoder_layers(self.llm))
        chosen = tuple(sorted({int(i) for i in layers}))
        bad = [i for i in chosen if not 0 <= i < len(full)]
        if bad:
            raise SpeechSkipError(f"speech-skip layers {bad} are out of range for a decoder of {len(full)} layers")
        for index in chosen:
            _check_supported(full[index], index)
        for index, layer in enumerate(full):
            if index in chosen:
                # The layer holds its skip as an attribute, not in a closure, so that a deep copy of the model
                # points the copied layers at the copied skip (a closure would keep reading the original's layout).
                # A partial of a module-level function also pickles (a bound method of it would not).
                layer.__dict__[_SKIP_ATTR] = self
                layer.forward = functools.partial(_skipping_forward, layer)
            elif _SKIP_ATTR in layer.__dict__:
                del layer.forward  # back to the class's forward
                del layer.__dict__[_SKIP_ATTR]
        self.layers = chosen

    @contextmanager
    def positions(self, segment_ids: Tensor) -> Iterator[None]:
        """The calls inside run on sequences laid out as ``segment_ids`` (``[B, T]``; generated tokens may follow)."""
        if not self.layers:
            yield
            return
        previous, self._speech = self._speech, segment_ids == Segment.SPEECH
        try:
            yield
        finally:
            self._speech = previous

    @property
    def laid_out(self) -> bool:
        """Whether the calls now run inside :meth:`positions`."""
        return self._speech is not None

    def speech_in_call(self, hidden: Tensor, cache: Any, layer_idx: int) -> Tensor | None:
        """``[B, T]`` bool: which of this call's positions are speech (None: none are, or no layout was given)."""
        if self._speech is None:
            return None
        rows, laid_out = hidden.shape[0], self._speech.shape[0]
        if rows % laid_out:
            raise SpeechSkipError(f"a decoder call on {rows} rows, but the speech layout has {laid_out}: the skip "
                                  "cannot tell which positions are speech")
        speech = self._speech.repeat_interleave(rows // laid_out, dim=0)  # beam search expands each row in place
        start = int(cache.get_seq_length(layer_idx)) if cache is not None else 0
        width = hidden.shape[1]
        speech = speech[:, start:start + width]
        if speech.shape[1] < width:  # generated positions after the laid-out sequence: never speech
            speech = torch.cat([speech, speech.new_zeros(speech.shape[0], width - speech.shape[1])], dim=1)
        return speech if bool(speech.any()) else None


def _decoder_layers(llm: nn.Module) -> nn.ModuleList:
    parent, name = find_decoder_layers(llm)
    return getattr(parent, name)


def _check_supported(layer: nn.Module, index: int) -> None:
    missing = [name for name in _PARTS if not isinstance(getattr(layer, name, None), nn.Module)]
    attention = getattr(layer, "self_attn", None)
    missing += [f"self_attn.{name}" for name in _ATTENTION_PARTS if not hasattr(attention, name)]
    if missing:
        raise SpeechSkipError(f"layer {index} ({type(layer).__name__}) has no {missing}: the speech-token skip runs "
                              "Llama-shaped layers (norm, q/k/v/o attention, norm, MLP)")
    extra = [name for name in _UNSUPPORTED_PARTS if hasattr(layer, name)]
    window = _sliding_window(layer, attention)
    if extra or window:
        why = f"extra norms {extra}" if extra else f"a sliding window of {window}"
        raise SpeechSkipError(f"layer {index} ({type(layer).__name__}) has {why}: the speech-token skip runs "
                              "Llama-shaped full-attention layers only")
    if _rotary(attention) is None:
        raise SpeechSkipError(f"layer {index}: {type(attention).__module__} has no apply_rotary_pos_emb")
    kernel = getattr(getattr(attention, "config", None), "_attn_implementation", None)
    if kernel not in ("eager", "sdpa"):
        raise SpeechSkipError(f"layer {index} runs {kernel!r} attention: the speech-token skip runs eager or sdpa "
                              "(a flash kernel takes no 4-D mask of kept query rows)")
    if getattr(layer, "gradient_checkpointing", False):
        raise SpeechSkipError(f"layer {index} is gradient-checkpointed, which transformers does through the class's "
                              "forward that the skip replaces: turn gradient_checkpointing off to skip speech")


def _sliding_window(layer: nn.Module, attention: nn.Module) -> int | None:
    """The layer's sliding window, None for full attention (Qwen2/3 set it per layer, Mistral in its config)."""
    kinds = {getattr(attention, "layer_type", None), getattr(layer, "attention_type", None)}
    if "sliding_attention" in kinds:
        return getattr(attention, "sliding_window", None) or getattr(attention.config, "sliding_window", None) or -1
    if "sliding_window" in vars(attention):
        return vars(attention)["sliding_window"]
    config = getattr(attention, "config", None)
    if getattr(config, "use_sliding_window", True) and kinds <= {None}:
        return getattr(config, "sliding_window", None)
    return None


def _rotary(attention: nn.Module):
    return getattr(sys.modules.get(type(attention).__module__), "apply_rotary_pos_emb", None)


def _gather(tensor: Tensor, index: Tensor) -> Tensor:
    """``tensor[b, index[b, j]]`` for ``[B, T, ...]`` tensors."""
    expanded = index.view(*index.shape, *([1] * (tensor.dim() - 2))).expand(*index.shape, *tensor.shape[2:])
    return torch.gather(tensor, 1, expanded)


def _kept_index(speech: Tensor) -> tuple[Tensor, Tensor]:
    """``[B, K]`` positions of each row that are not speech, to gather from (``K``: the most of any row, at least 1;
    a shorter row repeats a position of its own), and the same positions to scatter to, where the repeats point at a
    scratch column ``T`` (so that they write, and backpropagate, nothing)."""
    keep = ~speech
    counts = keep.sum(1)
    width = max(int(counts.max()), 1)
    order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)[:, :width]  # kept positions first, in order
    valid = torch.arange(width, device=speech.device)[None] < counts[:, None]
    gather = torch.where(valid, order, order[:, :1])
    return gather, torch.where(valid, order, torch.full_like(order, speech.shape[1]))


def _skipping_forward(layer: nn.Module, hidden_states: Tensor, attention_mask: Tensor | None = None,
                      position_ids: Tensor | None = None, cache: Any = None, use_cache: bool | None = False,
                      position_embeddings: tuple[Tensor, Tensor] | None = None, **kwargs: Any) -> Tensor:
    """The forward of a layer that skips the speech positions (bound to the layer by :meth:`SpeechSkip.set_layers`)."""
    skip: SpeechSkip = layer.__dict__[_SKIP_ATTR]
    cache = kwargs.pop("past_key_values", cache)
    attention = layer.self_attn
    if skip.laid_out and (is_dropped(attention) or is_dropped(layer.mlp)):
        raise SpeechSkipError(f"layer {attention.layer_idx} skips the speech positions but has a dropped "
                              "sublayer: skip speech in layers whose attention and MLP both run")
    speech = skip.speech_in_call(hidden_states, cache, attention.layer_idx)
    if speech is None:
        return type(layer).forward(layer, hidden_states, attention_mask=attention_mask, position_ids=position_ids,
                                   cache=cache, use_cache=use_cache, position_embeddings=position_embeddings,
                                   **kwargs)
    return _frozen_speech_forward(layer, hidden_states, speech, attention_mask, cache, position_embeddings, kwargs)


def _frozen_speech_forward(layer: nn.Module, hidden: Tensor, speech: Tensor, attention_mask: Tensor | None,
                           cache: Any, position_embeddings: tuple[Tensor, Tensor], kwargs: dict) -> Tensor:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    attention = layer.self_attn
    rows, width = hidden.shape[:2]
    kept, destination = _kept_index(speech)
    normed = layer.input_layernorm(hidden)
    head = attention.head_dim
    query = attention.q_proj(_gather(normed, kept)).view(rows, kept.shape[1], -1, head)
    key = attention.k_proj(normed).view(rows, width, -1, head)
    value = attention.v_proj(normed).view(rows, width, -1, head).transpose(1, 2)
    if hasattr(attention, "q_norm"):  # Qwen3: per-head norms before the rotation
        query, key = attention.q_norm(query), attention.k_norm(key)
    query, key = query.transpose(1, 2), key.transpose(1, 2)
    cos, sin = position_embeddings
    rotate = _rotary(attention)
    query = rotate(query, query, _gather(cos, kept), _gather(sin, kept))[0]
    key = rotate(key, key, cos, sin)[0]
    if cache is not None:
        key, value = cache.update(key, value, attention.layer_idx)
    mask = _query_rows(attention_mask, kept, speech, key.shape[2], cache)
    if attention.config._attn_implementation == "eager":
        interface = sys.modules[type(attention).__module__].eager_attention_forward
    else:
        interface = ALL_ATTENTION_FUNCTIONS["sdpa"]
    dropout = attention.attention_dropout if attention.training else 0.0
    output, _ = interface(attention, query, key, value, mask, dropout=dropout, scaling=attention.scaling)
    output = attention.o_proj(output.reshape(rows, kept.shape[1], -1))
    updated = _gather(hidden, kept) + output
    updated = updated + layer.mlp(layer.post_attention_layernorm(updated))
    scratch = torch.cat([hidden, hidden.new_zeros(rows, 1, hidden.shape[2])], dim=1)
    return scratch.scatter(1, destination[..., None].expand_as(updated), updated)[:, :width]


def _query_rows(mask: Tensor | None, kept: Tensor, speech: Tensor, keys: int, cache: Any) -> Tensor:
    """The 4-D attention mask's rows of the kept positions; a causal boolean mask where the model passed none (sdpa
    with no padding infers causality from equal query and key lengths, which the kept rows no longer have)."""
    if mask is not None and mask.dim() == 4:
        rows = mask if mask.shape[0] == kept.shape[0] else mask.expand(kept.shape[0], *mask.shape[1:])
        index = kept[:, None, :, None].expand(kept.shape[0], rows.shape[1], kept.shape[1], rows.shape[3])
        return torch.gather(rows, 2, index)
    if mask is not None:
        raise SpeechSkipError(f"the speech-token skip needs a 4-D attention mask, got shape {tuple(mask.shape)}")
    past = keys - speech.shape[1]
    query_positions = past + kept  # [B, K] absolute positions of the kept queries
    key_positions = torch.arange(keys, device=kept.device)
    return (key_positions[None, None, None, :] <= query_positions[:, None, :, None])


def skipped_layer_flops(hidden: int, intermediate: int, heads: int, head_dim: int, context: int,
                        gated: bool = True) -> int:
    """Multiply-add FLOPs (2 per MAC) one speech position no longer costs in one skipped layer: its query and
    output projections, its attention row over ``context`` keys (scores and weighted sum) and the MLP."""
    q_and_o = 2 * hidden * heads * head_dim
    attention = 2 * heads * head_dim * context
    mlp = (3 if gated else 2) * hidden * intermediate
    return 2 * (q_and_o + attention + mlp)
