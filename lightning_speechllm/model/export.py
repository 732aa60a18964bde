"""Export the active decoder layers of a (masked, possibly LoRA-wrapped) causal LM as a stock HF checkpoint.

The live model is never mutated: the masked model's registered ``ModuleList`` already holds only the active layers
at positions ``0..k-1`` and its config already has the cut ``num_hidden_layers``/per-layer lists, so its state dict
*is* the pruned checkpoint. LoRA deltas are added to copies of the base weights (``W + get_delta_weight``, PEFT's own
formula) and the PEFT keys (``base_layer.``, ``lora_*``, ``modules_to_save``/``original_module``) are rewritten to
the plain module keys. The config is written from a deep copy, since ``save_pretrained`` stamps ``dtype`` and
``architectures`` on the config it saves. The directory is assembled in a temporary sibling and renamed into place.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_speechllm.io_utils import atomic_directory

from .layer_mask import (
    LayerMaskError,
    find_decoder_layers,
    get_layer_mask_state,
    unwrap_peft,
)

__all__ = ["ExportError", "PRUNING_FILE", "merged_state_dict", "pruning_info", "save_pruned_decoder",
           "stock_state_dict"]

PRUNING_FILE = "pruning.json"
_PEFT_KEY_MARKERS = ("lora_", "base_layer", "modules_to_save", "original_module", "lora_magnitude_vector")


class ExportError(LayerMaskError):
    """The model cannot be exported as a plain HF checkpoint (unsupported adapter, write failure...)."""


def pruning_info(model: nn.Module) -> dict[str, Any]:
    """``{"removed_layers", "kept_layers", "original_num_layers"}`` in the indices of the never-pruned model, plus
    ``dropped_attention``/``dropped_mlp``/``replaced_blocks`` when the model has any."""
    state = get_layer_mask_state(model)
    if state is None:
        parent, name = find_decoder_layers(model)
        num_layers = len(getattr(parent, name))
        return {"removed_layers": [], "kept_layers": list(range(num_layers)), "original_num_layers": num_layers}

    kept = [state.original_indices[i] for i in state.active]
    info: dict[str, Any] = {
        "removed_layers": [i for i in range(state.original_num_layers) if i not in set(kept)],
        "kept_layers": kept,
        "original_num_layers": state.original_num_layers,
    }
    return {**info, **_sublayer_info(model, state)}


def _sublayer_info(model: nn.Module, state: Any) -> dict[str, Any]:
    """Dropped sublayers and replaced blocks (original indices), only the kinds present."""
    from .sublayer_mask import SublayerMask

    sublayers, original = SublayerMask(model), state.original_indices
    info = {
        "dropped_attention": [original[i] for i in sublayers.dropped_attention if i in state.active],
        "dropped_mlp": [original[i] for i in sublayers.dropped_mlp if i in state.active],
        "replaced_blocks": [{"first_layer": original[i], "kind": module.kind, "width": module.width}
                            for i, module in sorted(state.replacements.items()) if i not in state.active],
    }
    return {key: value for key, value in info.items() if value}


def _lora_merged_weights(prefix: str, module: nn.Module) -> dict[str, torch.Tensor]:
    """``{prefix.weight, prefix.bias}`` of a PEFT LoRA layer with its active, unmerged adapters folded in."""
    base = module.get_base_layer()
    weight = base.weight.detach()
    bias = base.bias.detach() if getattr(base, "bias", None) is not None else None
    if not (getattr(module, "disable_adapters", False) or getattr(module, "merged", False)):
        weight = weight.clone()
        for adapter in module.active_adapters:
            if adapter not in module.lora_A and adapter not in getattr(module, "lora_embedding_A", {}):
                continue
            if adapter in getattr(module, "lora_variant", {}):
                raise ExportError(f"{prefix}: adapter {adapter!r} is a LoRA variant (e.g. DoRA); merge it first")
            weight += module.get_delta_weight(adapter).detach().to(weight.dtype)
            if getattr(module, "lora_bias", {}).get(adapter, False):
                if bias is None:
                    raise ExportError(f"{prefix}: adapter {adapter!r} has lora_bias but the base layer has no bias")
                bias = bias + module.lora_B[adapter].bias.detach() * module.scaling[adapter]
    merged = {f"{prefix}.weight": weight}
    if bias is not None:
        merged[f"{prefix}.bias"] = bias
    return merged


def _modules_to_save_weights(prefix: str, wrapper: nn.Module) -> dict[str, torch.Tensor]:
    """Plain keys of the module a PEFT ``ModulesToSaveWrapper`` currently runs."""
    adapters = list(getattr(wrapper, "active_adapters", []) or [])
    use_original = getattr(wrapper, "disable_adapters", False) or not adapters
    module = wrapper.original_module if use_original else wrapper.modules_to_save[adapters[0]]
    return {f"{prefix}.{key}": value for key, value in module.state_dict(keep_vars=False).items()}


def _check_no_lora_on_tied_weights(
    state: dict[str, torch.Tensor], replaced: dict[str, torch.Tensor], prefixes: list[str]
) -> None:
    """A merged weight that was tied (e.g. lm_head ↔ embed_tokens) would be re-tied to the unmerged one on reload."""
    owners: dict[int, list[str]] = {}
    for key, tensor in state.items():
        if tensor.device.type != "meta":
            owners.setdefault(tensor.untyped_storage().data_ptr(), []).append(key)
    for prefix in prefixes:
        base_key = f"{prefix}.base_layer.weight"
        if base_key not in state or f"{prefix}.weight" not in replaced:
            continue
        tied = [k for k in owners.get(state[base_key].untyped_storage().data_ptr(), []) if k != base_key]
        if tied:
            raise ExportError(f"{prefix}: an adapter changes a weight tied to {tied[0]}; untie the weights first")


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """State dict of the transformers model inside ``model`` with PEFT LoRA merged and PEFT keys removed.

    Only registered modules are read, so a masked model yields only its active layers, numbered ``0..k-1``.
    """
    hf_model = unwrap_peft(model)
    state = hf_model.state_dict()
    replaced: dict[str, torch.Tensor] = {}
    prefixes: list[str] = []
    for name, module in hf_model.named_modules():
        if any(name == p or name.startswith(p + ".") for p in prefixes):
            continue  # inside a module already handled (e.g. the base layer of a LoRA layer)
        if hasattr(module, "get_base_layer") and hasattr(module, "lora_A"):
            replaced.update(_lora_merged_weights(name, module))
        elif hasattr(module, "modules_to_save") and hasattr(module, "original_module"):
            replaced.update(_modules_to_save_weights(name, module))
        else:
            continue
        prefixes.append(name)
    _check_no_lora_on_tied_weights(state, replaced, prefixes)
    merged = {k: v for k, v in state.items() if not any(k.startswith(p + ".") for p in prefixes)}
    merged.update(replaced)
    leftovers = sorted(k for k in merged if any(marker in k for marker in _PEFT_KEY_MARKERS))
    if leftovers:
        raise ExportError(f"unsupported PEFT modules, cannot merge keys such as {leftovers[:3]}")
    return merged


def _layer_list_prefix(hf_model: nn.Module) -> tuple[str, nn.ModuleList]:
    parent, name = find_decoder_layers(hf_model)
    layers = getattr(parent, name)
    for module_name, module in hf_model.named_modules():
        if module is layers:
            return module_name, layers
    raise ExportError(f"the decoder-layer list of {type(hf_model).__name__} is not a registered module")


def stock_state_dict(hf_model: nn.Module) -> dict[str, torch.Tensor]:
    """:func:`merged_state_dict` in stock decoder-layer form: a dropped attention (MLP) has its output projection
    zeroed, and a replacement module becomes a stock decoder layer (:func:`~.replacement.stock_layer_state`). The
    logits are those of the live model; what the zeroed sublayers still cost at inference is in the module docs."""
    from .replacement import ReplacementLayer, stock_layer_state
    from .sublayer_mask import ATTENTION_NAMES, MLP_NAMES, has_attention, mlp_dropped

    state = merged_state_dict(hf_model)
    prefix, layers = _layer_list_prefix(hf_model)
    kept = [k for k, layer in enumerate(layers) if not isinstance(layer, ReplacementLayer)]
    for k, layer in enumerate(layers):
        head = f"{prefix}.{k}."
        if isinstance(layer, ReplacementLayer):
            template = {key[len(f"{prefix}.{kept[0]}."):]: value for key, value in state.items()
                        if key.startswith(f"{prefix}.{kept[0]}.")}
            state = {key: value for key, value in state.items() if not key.startswith(head)}
            scale = float(getattr(hf_model.config, "residual_multiplier", 1.0) or 1.0)
            state.update({head + key: value
                          for key, value in stock_layer_state(layer, template, residual_multiplier=scale).items()})
            continue
        kinds = ([("attention", [f"{n}.o_proj." for n in ATTENTION_NAMES])] if not has_attention(layer) else []) + (
            [("MLP", [f"{n}.down_proj." for n in MLP_NAMES])] if mlp_dropped(layer) else [])
        for kind, parts in kinds:
            keys = [key for key in state if key.startswith(head) and key[len(head):].startswith(tuple(parts))]
            if not keys:
                raise ExportError(f"layer {k} ({type(layer).__name__}) drops its {kind} but has no {' / '.join(parts)} "
                                  "weight to zero: this architecture's dropped sublayers cannot be exported")
            state.update({key: torch.zeros_like(state[key]) for key in keys})
    return state


def _write_pruned(hf_model: nn.Module, directory: Path, tokenizer: Any, info: dict) -> None:
    state_dict = stock_state_dict(hf_model)
    live_config = hf_model.config
    hf_model.config = copy.deepcopy(live_config)
    try:
        hf_model.save_pretrained(directory, state_dict=state_dict)
    finally:
        hf_model.config = live_config
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    (directory / PRUNING_FILE).write_text(json.dumps(info, indent=2) + "\n")


def save_pruned_decoder(
    model: nn.Module, out_dir: str | Path, tokenizer: Any = None, safe_serialization: bool = True
) -> Path:
    """Write the active decoder layers of ``model`` (LoRA merged) as an HF directory loadable by
    ``AutoModelForCausalLM.from_pretrained``, plus ``pruning.json``; returns the directory.

    The live model (mask, weights, adapters, config) is left untouched. The export is written to a temporary
    sibling directory and renamed into place, replacing an existing ``out_dir`` only once it is complete.
    ``safe_serialization`` must stay True (transformers 5.x saves safetensors only).
    """
    if not safe_serialization:
        raise ExportError("safe_serialization=False is unsupported: transformers 5.x writes safetensors only")
    out = Path(out_dir).expanduser().resolve()
    hf_model = unwrap_peft(model)
    if not hasattr(hf_model, "save_pretrained") or not hasattr(hf_model, "config"):
        raise ExportError(f"{type(model).__name__} is not a transformers PreTrainedModel (no save_pretrained)")
    info = pruning_info(model)
    with atomic_directory(out, ExportError) as tmp:
        _write_pruned(hf_model, tmp, tokenizer, info)
    return out


