"""Sub-layer masks: drop the attention or the MLP of chosen decoder layers, keeping their residual path.

A dropped sublayer's ``forward`` is replaced (on the instance, so no weight, key or PEFT adapter moves) by one that
returns zeros: the layer then computes ``x + 0`` for that half, exactly the residual path. A layer without attention
writes no KV cache: :func:`kv_cache_for` builds a ``DynamicCache`` whose slot is a :class:`NoKVCacheLayer` at every
position without attention (a dropped attention, or a replacement module inserted by healing). That slot stores no
keys or values but answers the length queries (``get_seq_length``, ``get_mask_sizes``) with the number of tokens the
cache has seen, which transformers reads from slot 0; so cached generation equals uncached generation and the cache
holds only the attention layers that run. Pass the cache to ``generate`` as ``past_key_values=`` (the name every
supported transformers release takes; newer ones also take ``cache=``).

Indices are positions in the model as first masked, like :class:`~lightning_speechllm.model.layer_mask.DecoderLayerMask`
(the two compose: a layer may be masked as a whole and have a dropped sublayer). The dropped sets live unregistered on
the decoder module, so every ``SublayerMask`` of one model shares them.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers.cache_utils import CacheLayerMixin

from lightning_speechllm.model.layer_mask import (
    DecoderLayerMask,
    LayerMaskError,
    find_decoder_layers,
    get_layer_mask_state,
    unwrap_peft,
)

__all__ = [
    "ATTENTION_NAMES",
    "MLP_NAMES",
    "NoKVCacheLayer",
    "SublayerMask",
    "attention_module",
    "attentionless_positions",
    "has_attention",
    "is_dropped",
    "kv_cache_bytes",
    "kv_cache_for",
    "mlp_dropped",
    "mlp_module",
    "pre_mlp_norm",
]

ATTENTION_NAMES = ("self_attn", "attention", "attn")
MLP_NAMES = ("mlp", "feed_forward")
# The norm whose INPUT is the residual stream between attention and MLP (Gemma2/3 norm the attention output first).
PRE_MLP_NORM_NAMES = ("pre_feedforward_layernorm", "post_attention_layernorm")
_STATE_ATTR = "_lsl_sublayer_mask_state"
_DROPPED_FLAG = "_lsl_dropped"


def _child(layer: nn.Module, names: Sequence[str], what: str) -> nn.Module:
    for name in names:
        module = getattr(layer, name, None)
        if isinstance(module, nn.Module):
            return module
    raise LayerMaskError(f"{type(layer).__name__} has no {what} submodule (looked for {', '.join(names)})")


def attention_module(layer: nn.Module) -> nn.Module:
    """The self-attention submodule of a decoder layer."""
    return _child(layer, ATTENTION_NAMES, "attention")


def mlp_module(layer: nn.Module) -> nn.Module:
    """The MLP (feed-forward) submodule of a decoder layer."""
    return _child(layer, MLP_NAMES, "MLP")


def pre_mlp_norm(layer: nn.Module) -> nn.Module:
    """The norm applied to the residual stream before the MLP: its input is the state between the two sublayers."""
    return _child(layer, PRE_MLP_NORM_NAMES, "pre-MLP norm")


NO_ATTENTION_ATTR = "_lsl_no_attention"
"""Class attribute (True) of modules that sit in the decoder-layer list but run no attention (replacements)."""


def is_dropped(module: nn.Module) -> bool:
    """Whether a sublayer module is dropped by a :class:`SublayerMask`."""
    return bool(getattr(module, _DROPPED_FLAG, False))


def _has_dropped(layer: nn.Module, names: Sequence[str]) -> bool:
    """Whether a submodule of ``layer`` named one of ``names`` is dropped."""
    return any(is_dropped(getattr(layer, name)) for name in names if isinstance(getattr(layer, name, None), nn.Module))


def has_attention(layer: nn.Module) -> bool:
    """False only for an entry that runs no attention because of this package: a dropped attention or a module
    marked with ``NO_ATTENTION_ATTR`` (a replacement). Layers of any other shape count as attention layers, so their
    cache slots are left as transformers made them."""
    return not (getattr(layer, NO_ATTENTION_ATTR, False) or _has_dropped(layer, ATTENTION_NAMES))


def mlp_dropped(layer: nn.Module) -> bool:
    """Whether a decoder layer's MLP is dropped by a :class:`SublayerMask`."""
    return _has_dropped(layer, MLP_NAMES)


def _zero_attention(*args: Any, **kwargs: Any) -> tuple[torch.Tensor, None]:
    hidden = kwargs.get("hidden_states", args[0] if args else None)
    return torch.zeros_like(hidden), None


def _zero_mlp(hidden: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    return torch.zeros_like(hidden)


def _set_dropped(module: nn.Module, zero_forward: Any, dropped: bool) -> None:
    if dropped:
        module.forward = zero_forward
        setattr(module, _DROPPED_FLAG, True)
    elif getattr(module, _DROPPED_FLAG, False):
        del module.forward
        delattr(module, _DROPPED_FLAG)


@dataclass
class _SublayerState:
    attention: tuple[int, ...] = ()
    mlp: tuple[int, ...] = ()
    suspended: int = 0


class SublayerMask:
    """Drop the attention and/or the MLP of chosen decoder layers at run time, without touching weights."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.layer_mask = DecoderLayerMask(model)
        parent, _ = find_decoder_layers(model)
        state = parent.__dict__.get(_STATE_ATTR)
        if state is None:
            state = parent.__dict__[_STATE_ATTR] = _SublayerState()
        self._state: _SublayerState = state

    @property
    def dropped_attention(self) -> tuple[int, ...]:
        """Layers whose attention is dropped, sorted."""
        return self._state.attention

    @property
    def dropped_mlp(self) -> tuple[int, ...]:
        """Layers whose MLP is dropped, sorted."""
        return self._state.mlp

    def _all_layers(self) -> nn.ModuleList:
        return get_layer_mask_state(self.model).layer_list

    def drop(self, attention: Iterable[int] = (), mlp: Iterable[int] = ()) -> None:
        """Drop exactly these sublayers (replacing any earlier selection)."""
        attention = self.layer_mask.check_indices(list(attention), "dropped attention")
        mlp = self.layer_mask.check_indices(list(mlp), "dropped MLP")
        both = sorted(set(attention) & set(mlp))
        if both:
            raise LayerMaskError(f"layers {both} would lose both attention and MLP: remove them as whole layers "
                                 "with the decoder-layer mask instead")
        self._state.attention, self._state.mlp = attention, mlp
        self._apply()

    def reset(self) -> None:
        """Every sublayer runs again."""
        self.drop((), ())

    @contextmanager
    def suspended(self) -> Iterator[None]:
        """Every sublayer runs inside the context (the teacher pass of healing); the selection is restored on exit."""
        if not (self._state.attention or self._state.mlp):
            yield  # nothing dropped: nothing to touch (layers of any shape pass through)
            return
        self._state.suspended += 1
        try:
            self._apply()
            yield
        finally:
            self._state.suspended -= 1
            self._apply()

    def _apply(self) -> None:
        """Set or clear the zero ``forward`` of every sublayer in the selection or dropped before; other layers are
        never looked at, so models whose layers are not Llama-shaped work as long as nothing is dropped in them."""
        active = self._state.suspended == 0
        attention, mlp = set(self._state.attention), set(self._state.mlp)
        for i, layer in enumerate(self._all_layers()):
            for names, find, zero, chosen in ((ATTENTION_NAMES, attention_module, _zero_attention, attention),
                                              (MLP_NAMES, mlp_module, _zero_mlp, mlp)):
                if i in chosen or _has_dropped(layer, names):
                    _set_dropped(find(layer), zero, active and i in chosen)


def _text_config(model: nn.Module) -> Any:
    config = unwrap_peft(model).config
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


def attentionless_positions(model: nn.Module) -> list[int]:
    """Positions in the registered (active) decoder-layer list that run no attention."""
    parent, name = find_decoder_layers(model)
    return [k for k, layer in enumerate(getattr(parent, name)) if not has_attention(layer)]


class NoKVCacheLayer(CacheLayerMixin):
    """The cache slot of a decoder position that runs no attention: it holds no keys or values (``keys`` and
    ``values`` stay None, so :func:`kv_cache_bytes` counts nothing) and is never updated, yet answers the length
    queries transformers makes of a slot (``get_seq_length``, ``get_mask_sizes``, and through them the query offset)
    with the number of tokens the cache has seen: that of ``source``, a layer of the same cache that does store keys.

    Every slot of one cache sees the same tokens, so reading the length from the layer that stores them keeps the two
    equal through prefill, decoding, beam reordering, cropping and reset, with no count of its own to drift. It is
    needed because transformers reads the past length from slot 0: a slot that reported 0 there (a fresh
    ``DynamicLayer`` that is never written) would restart positions and masks at every step.

    Written against ``CacheLayerMixin`` as transformers 5.x ships it: ``get_mask_sizes`` takes the query length (new
    releases) or the ``cache_position`` tensor (older 5.x), and both names of the maximum-length query are answered.
    """

    is_sliding = False
    is_croppable = True  # nothing to crop: the length follows ``source``
    supports_early_init = False  # nothing to allocate (transformers skips such slots in ``early_initialization``)

    def __init__(self, source: Any) -> None:
        super().__init__()
        self.source = source
        self.is_initialized = True  # nothing to initialise: the slot is ready as built

    def __repr__(self) -> str:
        return f"{type(self).__name__}(source={type(self.source).__name__})"

    def get_seq_length(self) -> int:
        return int(self.source.get_seq_length())

    def get_mask_sizes(self, query: Any) -> tuple[int, int]:
        """``(kv_length, kv_offset)`` of a full-attention layer that had cached every token seen so far."""
        query_length = query.shape[0] if isinstance(query, torch.Tensor) else int(query)
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1

    get_max_cache_shape = get_max_length  # the name older 5.x releases ask for

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        return None

    def update(self, key_states: Any, value_states: Any, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
        if key_states is None and value_states is None:  # what transformers' own no-KV slot tolerates (DDP rebuild)
            return None, None
        raise LayerMaskError("an attention ran at a decoder position whose cache slot keeps no keys or values: build "
                             "the cache with kv_cache_for() after the sublayer mask or replacement is in place")

    # Nothing stored, so nothing to move, zero, crop, reorder or select: the length follows ``source``.
    def offload(self) -> None: ...
    def prefetch(self) -> None: ...
    def reset(self) -> None: ...
    def crop(self, *args: Any, **kwargs: Any) -> None: ...
    def reorder_cache(self, beam_idx: torch.Tensor) -> None: ...
    def batch_repeat_interleave(self, repeats: int) -> None: ...
    def batch_select_indices(self, indices: torch.Tensor) -> None: ...


def kv_cache_for(model: nn.Module) -> Any | None:
    """A ``DynamicCache`` for ``model`` as masked now, with a :class:`NoKVCacheLayer` (no KV storage) at every
    position that runs no attention; None when every active layer runs attention (transformers' own cache is then
    right) and when none does (nothing is cached; a per-token model needs no past length). Pass it to ``generate``
    as ``past_key_values=``."""
    positions = attentionless_positions(model)
    if not positions:
        return None
    from transformers import DynamicCache

    cache = DynamicCache(config=_text_config(model))
    if len(cache.layers) <= max(positions):
        raise LayerMaskError(f"the cache built from the config has {len(cache.layers)} slots, but decoder position "
                             f"{max(positions)} runs no attention")
    kept = [layer for k, layer in enumerate(cache.layers) if k not in set(positions)]
    if not kept:
        return None
    # Prefer a full-attention layer: its length is the number of keys it holds.
    source = next((layer for layer in kept if not getattr(layer, "is_sliding", False)), kept[0])
    for k in positions:
        cache.layers[k] = NoKVCacheLayer(source)
    return cache


def kv_cache_bytes(cache: Any) -> int:
    """Bytes of the key and value tensors a (filled) cache holds."""
    total = 0
    for layer in getattr(cache, "layers", []):
        for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(tensor, torch.Tensor):
                total += tensor.numel() * tensor.element_size()
    return total
