"""Run-time selection of the active decoder layers of a HuggingFace causal LM, and a residual-stream recorder.

A :class:`DecoderLayerMask` swaps the decoder's ``nn.ModuleList`` for a new list holding only the kept layer modules
(the same objects: no weight is copied or deleted), and keeps everything a transformers 5.x decoder reads per layer
consistent with that list:

* ``config.num_hidden_layers`` is the active count,
* every per-layer config list (``layer_types`` and any other list with one entry per layer) is cut the same way,
  which is what the decoder loop, ``create_causal_mask``/``create_sliding_window_causal_mask`` and ``DynamicCache``
  read to pick the mask and the cache-layer kind of layer ``i``,
* every ``layer_idx`` attribute inside the kept layers (attention modules, decoder layers) is renumbered ``0..k-1``,
  so KV caches index their layers correctly.

Per-module attributes such as ``self_attn.sliding_window``/``is_sliding``/``layer_type`` travel with their module and
need no change. The original list, config values and ``layer_idx`` values are kept in a plain (unregistered)
attribute of the decoder module, so that :meth:`DecoderLayerMask.reset` restores them exactly (same objects) and
several masks, or :func:`lightning_speechllm.model.export.save_pruned_decoder`, share one state.

Caveats: ``model.to(...)``/``model.train()`` reach only the registered (active) layers; the mask moves restored
layers to the device/dtype and training mode of the active ones when it restores them. Attach PEFT adapters with
all layers active (a LoRA injected while layers are masked lives only in the active ones).
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

__all__ = [
    "DecoderLayerMask",
    "LayerMaskError",
    "ResidualStream",
    "find_decoder_layers",
    "get_layer_mask_state",
    "unwrap_peft",
]

# Attribute paths (from the unwrapped causal LM or base model) that hold the decoder-layer ModuleList.
_LAYER_LIST_PATHS: tuple[str, ...] = (
    "model.layers",
    "model.decoder.layers",
    "model.language_model.layers",
    "language_model.model.layers",
    "language_model.layers",
    "transformer.h",
    "transformer.layers",
    "gpt_neox.layers",
    "decoder.layers",
    "layers",
    "h",
)
# Config keys that may hold a list as long as the layer count without being per-layer.
_NOT_PER_LAYER_KEYS = frozenset({"architectures", "bad_words_ids", "suppress_tokens", "begin_suppress_tokens"})
_STATE_ATTR = "_lsl_layer_mask_state"


class LayerMaskError(ValueError):
    """Invalid decoder-layer selection, or a model whose decoder layers cannot be found."""


def unwrap_peft(model: nn.Module) -> nn.Module:
    """The transformers model inside a PeftModel (or ``model`` itself)."""
    get_base_model = getattr(model, "get_base_model", None)
    return get_base_model() if callable(get_base_model) else model


def _get_path(module: nn.Module, path: str) -> Any:
    obj: Any = module
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def find_decoder_layers(model: nn.Module) -> tuple[nn.Module, str]:
    """(parent module, attribute name) of the decoder-layer ModuleList of an HF causal LM, its base model, or a
    PeftModel wrapping either. Raises :class:`LayerMaskError` naming the model class when there is none."""
    root = unwrap_peft(model)
    candidates: list[nn.Module] = [root]
    get_decoder = getattr(root, "get_decoder", None)
    if callable(get_decoder):
        try:
            decoder = get_decoder()
        except (AttributeError, NotImplementedError, ValueError):
            decoder = None
        if isinstance(decoder, nn.Module) and decoder is not root:
            candidates.append(decoder)
    for candidate in candidates:
        for path in _LAYER_LIST_PATHS:
            layers = _get_path(candidate, path)
            if isinstance(layers, nn.ModuleList) and len(layers) > 0:
                parent_path, _, name = path.rpartition(".")
                parent = _get_path(candidate, parent_path) if parent_path else candidate
                return parent, name
    raise LayerMaskError(
        f"cannot find the decoder-layer ModuleList of {type(model).__name__} "
        f"(looked for {', '.join(_LAYER_LIST_PATHS)} on it and on get_decoder())"
    )


def _find_config(model: nn.Module, parent: nn.Module) -> Any:
    """The (text) config that describes the decoder layers: the decoder module's own config when it has one."""
    config = getattr(parent, "config", None)
    if config is None:
        config = getattr(unwrap_peft(model), "config", None)
        if config is not None and hasattr(config, "get_text_config"):
            config = config.get_text_config(decoder=True)
    if config is None or not hasattr(config, "num_hidden_layers"):
        raise LayerMaskError(f"{type(model).__name__} has no config with num_hidden_layers")
    if getattr(config, "is_heterogeneous", False):
        raise LayerMaskError(f"{type(config).__name__} is heterogeneous (per_layer_config); masking is unsupported")
    return config


def _per_layer_config_keys(config: Any, num_layers: int) -> tuple[str, ...]:
    """Config attributes holding one entry per decoder layer (``layer_types`` and alike), detected generically."""
    keys = []
    for key, value in vars(config).items():
        if key.startswith("_") or key in _NOT_PER_LAYER_KEYS or key.endswith(("_id", "_ids", "token", "tokens")):
            continue
        if isinstance(value, (list, tuple)) and len(value) == num_layers:
            keys.append(key)
    return tuple(keys)


def _layer_idx_records(layer: nn.Module) -> list[tuple[nn.Module, int]]:
    """Every (module, layer_idx) pair inside a decoder layer, the layer itself included."""
    return [
        (module, module.layer_idx)
        for module in layer.modules()
        if isinstance(getattr(module, "layer_idx", None), int) and not isinstance(module.layer_idx, bool)
    ]


@dataclass
class _MaskState:
    """The unmasked reference of a decoder, kept unregistered on the decoder module."""

    layer_list: nn.ModuleList  # the full list object, restored as-is
    config: Any
    config_values: dict[str, Any]  # num_hidden_layers and per-layer lists, original objects
    layer_idx: list[list[tuple[nn.Module, int]]]  # per full-list position
    original_indices: tuple[int, ...]  # index of each full-list layer in the never-pruned model
    original_num_layers: int
    active: tuple[int, ...] = field(default=())
    replacements: dict[int, nn.Module] = field(default_factory=dict)  # first layer of a removed block -> module

    @property
    def num_layers(self) -> int:
        return len(self.layer_list)


def _new_state(parent: nn.Module, name: str, config: Any) -> _MaskState:
    layers: nn.ModuleList = getattr(parent, name)
    num_layers = len(layers)
    if config.num_hidden_layers != num_layers:
        raise LayerMaskError(
            f"config.num_hidden_layers={config.num_hidden_layers} but {type(parent).__name__}.{name} holds "
            f"{num_layers} layers; build the mask before changing the layer list by hand"
        )
    keys = ("num_hidden_layers", *_per_layer_config_keys(config, num_layers))
    return _MaskState(
        layer_list=layers,
        config=config,
        config_values={key: getattr(config, key) for key in keys},
        layer_idx=[_layer_idx_records(layer) for layer in layers],
        original_indices=tuple(range(num_layers)),
        original_num_layers=num_layers,
        active=tuple(range(num_layers)),
    )


def get_layer_mask_state(model: nn.Module) -> _MaskState | None:
    """The mask state attached to ``model``'s decoder, or None when no mask was ever built on it."""
    parent, _ = find_decoder_layers(model)
    return parent.__dict__.get(_STATE_ATTR)


@dataclass
class ResidualStream:
    """Pre-norm residual stream of the most recent complete forward call over the active layers.

    ``states[0]`` is the input of the first active layer (after any embedding scaling), ``states[k]`` the output
    of the k-th active layer, ``states[-1]`` the output of the last active layer before the final norm; each
    ``[B, T, D]``. ``layer_indices`` are the indices of the active layers, as in
    :attr:`DecoderLayerMask.active_layers` (indices of the unmasked model; after :meth:`DecoderLayerMask.prune`,
    of the pruned one). ``num_calls`` counts the complete forward calls seen inside the context.
    """

    states: list[torch.Tensor] = field(default_factory=list)
    layer_indices: tuple[int, ...] = ()
    num_calls: int = 0


class DecoderLayerMask:
    """Select the active decoder layers at run time, without copying or deleting weights.

    Indices are positions in the model as it was when first masked (or last :meth:`prune`-d): ``num_layers`` is
    that layer count and ``active_layers``/``removed_layers`` are sorted indices into it.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._parent, self._name = find_decoder_layers(model)
        state = self._parent.__dict__.get(_STATE_ATTR)
        if state is None:
            state = _new_state(self._parent, self._name, _find_config(model, self._parent))
            self._parent.__dict__[_STATE_ATTR] = state
        self._state: _MaskState = state

    # ----------------------------------------------------------------------------------------------- queries
    @property
    def num_layers(self) -> int:
        """Layer count of the (possibly already pruned) model."""
        return self._state.num_layers

    @property
    def active_layers(self) -> tuple[int, ...]:
        """Indices of the active layers, sorted."""
        return self._state.active

    @property
    def removed_layers(self) -> tuple[int, ...]:
        """Indices of the masked-out layers, sorted."""
        active = set(self._state.active)
        return tuple(i for i in range(self.num_layers) if i not in active)

    @property
    def original_num_layers(self) -> int:
        """Layer count of the model before any :meth:`prune`."""
        return self._state.original_num_layers

    @property
    def original_active_layers(self) -> tuple[int, ...]:
        """Indices of the active layers in the model before any :meth:`prune`."""
        return tuple(self._state.original_indices[i] for i in self._state.active)

    # ----------------------------------------------------------------------------------------------- selection
    def check_indices(self, indices: Sequence[int], what: str) -> tuple[int, ...]:
        """``indices`` sorted, after checking they are ints in range without duplicates (errors name ``what``)."""
        if isinstance(indices, (str, bytes)) or not isinstance(indices, Sequence):
            raise LayerMaskError(f"{what} must be a sequence of ints, got {type(indices).__name__}")
        n = self.num_layers
        seen: set[int] = set()
        duplicates: list[int] = []
        for position, index in enumerate(indices):
            if isinstance(index, bool) or not isinstance(index, int):
                raise LayerMaskError(f"{what}[{position}]={index!r} is not an int")
            if not 0 <= index < n:
                raise LayerMaskError(
                    f"layer index {index} ({what}[{position}]) is out of range for a decoder of {n} layers "
                    f"(valid: 0..{n - 1})"
                )
            if index in seen:
                duplicates.append(index)
            seen.add(index)
        if duplicates:
            raise LayerMaskError(f"duplicate layer indices in {what}: {sorted(set(duplicates))}")
        return tuple(sorted(seen))

    def set_active_layers(self, indices: Sequence[int]) -> None:
        """Keep exactly the layers ``indices`` (any order, no duplicates, at least one)."""
        active = self.check_indices(indices, "active layers")
        if not active:
            raise LayerMaskError("the active-layer selection is empty: at least one decoder layer must stay active")
        self._apply(active)

    def remove_layers(self, indices: Sequence[int]) -> None:
        """Keep every layer except ``indices``."""
        removed = set(self.check_indices(indices, "removed layers"))
        if len(removed) == self.num_layers:
            raise LayerMaskError(f"cannot remove all {self.num_layers} decoder layers: at least one must stay active")
        self._apply(tuple(i for i in range(self.num_layers) if i not in removed))

    def reset(self) -> None:
        """All layers active, the original layer list, config values and layer_idx restored exactly."""
        self._apply(tuple(range(self.num_layers)))

    # ----------------------------------------------------------------------------------------------- replacements
    @property
    def replacements(self) -> dict[int, nn.Module]:
        """First layer of a removed block -> the module that runs in the block's place while it is removed."""
        return dict(self._state.replacements)

    def set_replacements(self, modules: dict[int, nn.Module]) -> None:
        """Run ``modules[i]`` in place of the removed block starting at layer ``i`` (replacing any earlier set).

        A replacement is called like a decoder layer (hidden states first, the decoder's keyword arguments) and
        returns the new hidden states; it is in the layer list only while layer ``i`` is removed, so the teacher
        pass (all layers active) never runs it. Keys must be layer indices; register the modules on a parent module
        yourself (the mask does not own them)."""
        for i, module in modules.items():
            self.check_indices([i], "replacement positions")
            if not isinstance(module, nn.Module):
                raise LayerMaskError(f"the replacement for layer {i} is a {type(module).__name__}, not an nn.Module")
        self._state.replacements = dict(modules)
        self._apply(self._state.active)

    def stream_targets(self) -> list[int]:
        """For each residual state the registered list produces (``x^1 .. x^K``): the index of the full model's
        state it stands for. A kept layer ``i`` yields ``x^(i+1)``; the replacement of a block ``s..e`` yields
        ``x^(e+1)``, the state the next kept layer expects."""
        state, active = self._state, set(self._state.active)
        targets = []
        for i in range(state.num_layers):
            if i in active:
                targets.append(i + 1)
            elif i in state.replacements:
                end = i
                while end + 1 < state.num_layers and end + 1 not in active:
                    end += 1
                targets.append(end + 1)
        return targets

    @contextmanager
    def active(self, indices: Sequence[int]) -> Iterator[None]:
        """Temporarily keep only ``indices``; the previous selection is restored on exit, even on error."""
        previous = self.active_layers
        self.set_active_layers(indices)
        try:
            yield
        finally:
            self._apply(previous)

    def _apply(self, active: tuple[int, ...]) -> None:
        state = self._state
        full = active == tuple(range(state.num_layers))
        reference = self._current_reference_param()
        # Each entry of the new list: the full-list index it stands for (a kept layer, or the first layer of a
        # removed block whose replacement module takes its place) and the module.
        entries = [(i, state.layer_list[i] if i in active else state.replacements[i])
                   for i in range(state.num_layers) if i in active or i in state.replacements]
        new_list = state.layer_list if full else nn.ModuleList([module for _, module in entries])
        setattr(self._parent, self._name, new_list)
        for key, value in state.config_values.items():
            if key == "num_hidden_layers":
                setattr(state.config, key, value if full else len(entries))
            elif full:
                setattr(state.config, key, value)
            else:
                setattr(state.config, key, type(value)(value[i] for i, _ in entries))
        for new_position, (i, _) in enumerate(entries):
            if i not in active:
                continue
            for module, original_idx in state.layer_idx[i]:
                module.layer_idx = original_idx if full else new_position
        state.active = active
        self._sync_restored_layers(reference)

    def _current_reference_param(self) -> torch.Tensor | None:
        """A parameter of the first registered decoder layer. Replacement modules are skipped: healing keeps them in
        float32, and one at position 0 (a plan removing layer 0) would otherwise cast the whole decoder to it."""
        replacements = {id(module) for module in self._state.replacements.values()}
        for layer in getattr(self._parent, self._name):
            if id(layer) in replacements:
                continue
            param = next(layer.parameters(), None)
            if param is not None:
                return param
        return None

    def _sync_restored_layers(self, reference: torch.Tensor | None) -> None:
        """Give re-activated layers the device/dtype and train/eval mode of the layers that stayed registered."""
        training = self._parent.training
        replacements = {id(module) for module in self._state.replacements.values()}
        for layer in getattr(self._parent, self._name):
            if id(layer) in replacements:
                continue  # healing owns their dtype and mode
            if layer.training != training:
                layer.train(training)
            if reference is None:
                continue
            param = next(layer.parameters(), None)
            if param is not None and (param.device != reference.device or param.dtype != reference.dtype):
                layer.to(device=reference.device, dtype=reference.dtype)

    def prune(self) -> None:
        """Make the current selection permanent: the masked-out layers are dropped and the kept ones become layers
        ``0..k-1`` of the model (ModuleList, config, layer_idx all final). Afterwards ``num_layers == k``."""
        state = self._state
        if state.replacements:
            raise LayerMaskError("cannot prune a decoder with replacement modules in its layer list: export it instead "
                                 "(lightning_speechllm.model.export.save_pruned_decoder)")
        sublayers = self._parent.__dict__.get("_lsl_sublayer_mask_state")  # SublayerMask's, indexed like this mask
        if sublayers is not None and (sublayers.attention or sublayers.mlp):
            raise LayerMaskError("cannot prune while sublayers are dropped (their indices would go stale): reset the "
                                 "SublayerMask first, or export the model")
        layers: nn.ModuleList = getattr(self._parent, self._name)
        config = state.config
        self._parent.__dict__[_STATE_ATTR] = self._state = _MaskState(
            layer_list=layers,
            config=config,
            config_values={key: getattr(config, key) for key in state.config_values},
            layer_idx=[_layer_idx_records(layer) for layer in layers],
            original_indices=tuple(state.original_indices[i] for i in state.active),
            original_num_layers=state.original_num_layers,
            active=tuple(range(len(layers))),
        )

    # ----------------------------------------------------------------------------------------------- recording
    @contextmanager
    def record_residual_stream(self, detach: bool = True) -> Iterator[ResidualStream]:
        """Record x^0 … x^L of the active layers during forward calls inside the context.

        Every forward call is recorded and the stream keeps the states of the most recent *complete* call (all
        active layers ran in order), so after ``generate`` it holds the last decoding step. Hooks are removed on
        exit, even on error. With ``detach=False`` the states keep their autograd graph.
        """
        layers = list(getattr(self._parent, self._name))
        stream = ResidualStream(layer_indices=self.active_layers)
        buffer: list[torch.Tensor] | None = None

        def keep(tensor: torch.Tensor) -> torch.Tensor:
            return tensor.detach() if detach else tensor

        def pre_hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
            nonlocal buffer
            hidden = args[0] if args else kwargs.get("hidden_states")
            if not isinstance(hidden, torch.Tensor):
                raise LayerMaskError("the first active decoder layer was called without a hidden_states tensor")
            buffer = [keep(hidden)]

        def make_hook(position: int):
            def hook(_module: nn.Module, _args: tuple, output: Any) -> None:
                nonlocal buffer
                if buffer is None or len(buffer) != position + 1:
                    return  # not part of an in-order pass (e.g. a checkpoint recomputation)
                hidden = output[0] if isinstance(output, (tuple, list)) else output
                buffer.append(keep(hidden))
                if position == len(layers) - 1:
                    stream.states = buffer
                    stream.num_calls += 1
                    buffer = None

            return hook

        handles = [layers[0].register_forward_pre_hook(pre_hook, with_kwargs=True)]
        try:
            handles.extend(layer.register_forward_hook(make_hook(k)) for k, layer in enumerate(layers))
            yield stream
        finally:
            for handle in handles:
                handle.remove()
