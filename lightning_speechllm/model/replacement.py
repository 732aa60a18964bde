"""Light modules that take the place of a removed block of decoder layers (LLM-Streamline, arXiv 2403.19135).

A :class:`ReplacementLayer` computes ``x + f(x)`` and is the identity at initialisation (``f`` starts at zero):

* ``ffn``: ``f = MLP(norm(x))``, a copy of the MLP and pre-MLP norm of the block's first layer, cut to ``width``
  hidden units, with the down projection zeroed. It is exactly a decoder layer without attention, so
  :func:`stock_layer_state` writes it as a stock decoder layer (attention output projection zero, MLP zero-padded);
* ``linear``: ``f = W x`` with ``W`` zero, as LLM-Streamline's linear variant. No stock decoder layer expresses it.

It is called like a decoder layer (hidden states first, the decoder's keyword arguments ignored), runs no attention
and so keeps no KV cache (see :func:`lightning_speechllm.model.sublayer_mask.kv_cache_for`).
"""
from __future__ import annotations

import copy
from typing import Any, Literal

import torch
from torch import nn

from lightning_speechllm.model.layer_mask import LayerMaskError
from lightning_speechllm.model.sublayer_mask import mlp_module, pre_mlp_norm

__all__ = ["REPLACEMENT_KINDS", "ReplacementKind", "ReplacementLayer", "build_replacement", "stock_layer_state"]

ReplacementKind = Literal["ffn", "linear"]
REPLACEMENT_KINDS = ("ffn", "linear")
_GATED_MLP = ("gate_proj", "up_proj", "down_proj")
_FUSED_GATE_UP = "gate_up_proj"


class ReplacementLayer(nn.Module):
    """``x + f(x)`` in place of a removed block; ``f`` is an MLP behind a norm (``ffn``) or a linear map."""

    _lsl_no_attention = True  # sublayer_mask.NO_ATTENTION_ATTR: no KV-cache slot

    def __init__(self, kind: ReplacementKind, norm: nn.Module | None = None, mlp: nn.Module | None = None,
                 linear: nn.Linear | None = None) -> None:
        super().__init__()
        if kind not in REPLACEMENT_KINDS:
            raise ValueError(f"replacement kind must be one of {REPLACEMENT_KINDS}, got {kind!r}")
        self.kind = kind
        self.norm, self.mlp, self.linear = norm, mlp, linear

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        # Computed in the module's dtype (float32 by default, like PEFT's adapters: small updates to the zero-started
        # projection survive), added back to the stream in the stream's dtype.
        x = hidden_states.to(next(self.parameters()).dtype)
        delta = self.linear(x) if self.kind == "linear" else self.mlp(self.norm(x))
        return hidden_states + delta.to(hidden_states.dtype)

    @property
    def width(self) -> int:
        """Hidden units of the MLP (``ffn``) or the model width (``linear``)."""
        return self.linear.out_features if self.kind == "linear" else self.mlp.down_proj.in_features


def _plain_linear(module: nn.Module) -> nn.Linear:
    """The base ``nn.Linear`` of a (possibly PEFT-wrapped) projection."""
    base = getattr(module, "base_layer", module)
    if not isinstance(base, nn.Linear):
        raise LayerMaskError(f"expected a linear projection, got {type(base).__name__}")
    return base


def _cut(linear: nn.Linear, rows: int | torch.Tensor | None = None, cols: int | None = None,
         zero: bool = False) -> nn.Linear:
    """A new linear holding the first ``rows`` outputs (or those a tensor of indices picks) and the first ``cols``
    inputs of ``linear`` (or zeros)."""
    picked = rows if isinstance(rows, torch.Tensor) else slice(None, rows)
    weight = linear.weight.detach()[picked][:, :cols]
    bias = linear.bias.detach()[picked] if linear.bias is not None else None
    new = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        new.weight.copy_(torch.zeros_like(weight) if zero else weight)
        if bias is not None:
            new.bias.copy_(torch.zeros_like(bias) if zero else bias)
    return new


def build_replacement(template_layer: nn.Module, kind: ReplacementKind = "ffn", width: int | None = None,
                      dtype: torch.dtype = torch.float32) -> ReplacementLayer:
    """An identity-initialised replacement shaped after ``template_layer`` (the block's first layer), in ``dtype``.

    ``ffn`` copies its pre-MLP norm and its gate/up projections (the first ``width`` units; None = all) and zeroes
    the down projection; ``linear`` is a zero ``D x D`` map. Gated MLPs (gate/up/down projections: Llama, Qwen2,
    Gemma, Mistral...) only."""
    if kind not in REPLACEMENT_KINDS:
        raise LayerMaskError(f"replacement kind must be one of {REPLACEMENT_KINDS}, got {kind!r}")
    return _build(template_layer, kind, width).to(dtype)


def _build(template_layer: nn.Module, kind: ReplacementKind, width: int | None) -> ReplacementLayer:
    if kind == "linear":
        reference = next(template_layer.parameters())
        size = _plain_linear(mlp_module(template_layer).down_proj).out_features
        linear = nn.Linear(size, size, bias=False, device=reference.device, dtype=reference.dtype)
        nn.init.zeros_(linear.weight)
        return ReplacementLayer("linear", linear=linear)
    mlp = mlp_module(template_layer)
    fused = hasattr(mlp, _FUSED_GATE_UP)
    missing = [name for name in ((_FUSED_GATE_UP, "down_proj") if fused else _GATED_MLP) if not hasattr(mlp, name)]
    if missing:
        raise LayerMaskError(f"{type(mlp).__name__} has no {missing}: only gated MLPs (gate/up/down projections, or "
                             "a fused gate_up_proj) can seed an ffn replacement; use kind 'linear'")
    full = _plain_linear(mlp.down_proj).in_features
    width = full if width is None else int(width)
    if not 1 <= width <= full:
        raise LayerMaskError(f"replacement width must be in 1..{full} (the MLP's hidden size), got {width}")
    new_mlp = copy.deepcopy(mlp)  # keeps act_fn and config; the projections are replaced below
    if fused:  # Phi-3 / Phi-4: gate rows then up rows in one projection, split in half by the forward
        gate_up = _plain_linear(mlp.gate_up_proj)
        units = torch.arange(width, device=gate_up.weight.device)
        new_mlp.gate_up_proj = _cut(gate_up, rows=torch.cat([units, full + units]))
    else:
        new_mlp.gate_proj = _cut(_plain_linear(mlp.gate_proj), rows=width)
        new_mlp.up_proj = _cut(_plain_linear(mlp.up_proj), rows=width)
    new_mlp.down_proj = _cut(_plain_linear(mlp.down_proj), cols=width, zero=True)
    if hasattr(new_mlp, "intermediate_size"):
        new_mlp.intermediate_size = width
    norm = copy.deepcopy(pre_mlp_norm(template_layer))
    return ReplacementLayer("ffn", norm=norm, mlp=new_mlp)


def stock_layer_state(replacement: ReplacementLayer, template: dict[str, torch.Tensor],
                      norm_key: str = "post_attention_layernorm",
                      residual_multiplier: float = 1.0) -> dict[str, torch.Tensor]:
    """The state dict (keys relative to a decoder layer) of a stock decoder layer that computes exactly what
    ``replacement`` computes: ``template`` (a kept layer's state, for keys and shapes) with the attention output
    projection zeroed, ``norm_key`` set to the replacement's norm and the MLP zero-padded to the template's width.
    A decoder that scales each sublayer's output before the residual add (Granite's ``residual_multiplier``) gets
    its down projection divided by that scale, so that the layer still adds exactly ``MLP(norm(x))``.

    Cost at inference: the exported layer still runs its attention (output discarded) and keeps its KV cache, and
    its MLP runs at full width."""
    if replacement.kind != "ffn":
        raise LayerMaskError(f"a {replacement.kind!r} replacement has no stock decoder-layer form (only 'ffn' does)")
    sandwich = sorted({key.split(".")[0] for key in template
                       if key.startswith(("pre_feedforward", "post_feedforward"))})
    if sandwich:
        raise LayerMaskError(f"the decoder layers norm their MLP output ({', '.join(sandwich)}): no stock layer "
                             "computes x + MLP(norm(x)) exactly, so the replacement cannot be exported")
    state = {key: value.clone() for key, value in template.items()}
    for key in state:
        if ".o_proj." in f".{key}" and "attn" in key:
            state[key] = torch.zeros_like(state[key])
    for name, value in replacement.norm.state_dict().items():
        state[f"{norm_key}.{name}"] = value.detach().to(state[f"{norm_key}.{name}"].dtype).clone()
    for name, value in replacement.mlp.state_dict().items():
        target = state[f"mlp.{name}"]
        padded = torch.zeros_like(target)
        value = value.detach().double() * (1.0 / residual_multiplier if name.startswith("down_proj.") else 1.0)
        if name.startswith(f"{_FUSED_GATE_UP}."):  # gate rows to the first half, up rows to the second
            half, width = target.shape[0] // 2, value.shape[0] // 2
            padded[:width] = value[:width].to(target.dtype)
            padded[half:half + width] = value[width:].to(target.dtype)
        else:
            padded[tuple(slice(0, size) for size in value.shape)] = value.to(target.dtype)
        state[f"mlp.{name}"] = padded
    return state
