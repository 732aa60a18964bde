"""DecoderLayerMask, the residual-stream recorder and prune() on tiny HF causal LMs of every supported arch."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from lightning_speechllm.model.layer_mask import (
    DecoderLayerMask,
    LayerMaskError,
    ResidualStream,
    find_decoder_layers,
)
from tiny_models import PAD_TOKEN_ID, TINY_ARCHS, tiny_causal_lm, tiny_input_ids

REMOVED = (1, 4)
KEPT = (0, 2, 3, 5)


def hand_pruned(model: nn.Module, arch: str, kept: tuple[int, ...]) -> nn.Module:
    """An independently built model with only ``kept`` layers, weights copied from the unmasked ``model``."""
    layer_types = getattr(model.config, "layer_types", None)
    cut_types = [layer_types[i] for i in kept] if arch in ("qwen2", "qwen3", "gemma2", "gemma3_text") else None
    reference = tiny_causal_lm(arch, num_layers=len(kept), seed=123, layer_types=cut_types)
    state = {}
    for key, value in model.state_dict().items():
        if key.startswith("model.layers."):
            index, rest = key[len("model.layers.") :].split(".", 1)
            if int(index) not in kept:
                continue
            key = f"model.layers.{kept.index(int(index))}.{rest}"
        state[key] = value.clone()
    reference.load_state_dict(state, strict=True)
    return reference


def greedy(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kw) -> torch.Tensor:
    return model.generate(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids) if attention_mask is None else attention_mask,
        max_new_tokens=8,
        min_new_tokens=8,
        do_sample=False,
        pad_token_id=PAD_TOKEN_ID,
        **kw,
    )


def left_padded_batch() -> tuple[torch.Tensor, torch.Tensor]:
    ids = tiny_input_ids(batch=3, length=9, seed=5)
    mask = torch.ones_like(ids)
    for row, pad in enumerate((0, 3, 5)):
        ids[row, :pad] = PAD_TOKEN_ID
        mask[row, :pad] = 0
    return ids, mask


def softcap(logits: torch.Tensor, config) -> torch.Tensor:
    cap = getattr(config, "final_logit_softcapping", None)
    return logits if cap is None else torch.tanh(logits / cap) * cap


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_mask_equals_model_with_layers_deleted_by_hand(arch: str) -> None:
    model = tiny_causal_lm(arch)
    reference = hand_pruned(model, arch, KEPT)
    ids = tiny_input_ids(batch=2, length=12)
    full_logits = model(ids).logits
    mask = DecoderLayerMask(model)
    mask.remove_layers(REMOVED)
    assert mask.active_layers == KEPT and mask.removed_layers == REMOVED and mask.num_layers == 6
    assert model.config.num_hidden_layers == 4 and len(model.model.layers) == 4
    masked = model(ids).logits
    torch.testing.assert_close(masked, reference(ids).logits, rtol=0, atol=1e-5)
    assert (masked - full_logits).abs().max() > 1e-3  # the removed layers did matter


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_masked_generate_with_cache_equals_without_and_reset_is_exact(arch: str) -> None:
    model = tiny_causal_lm(arch)
    ids = tiny_input_ids(batch=2, length=10, seed=3)
    padded_ids, padded_mask = left_padded_batch()
    full_logits = model(ids).logits
    full_generated = greedy(model, padded_ids, padded_mask)
    original_list = model.model.layers
    layer_types = getattr(model.config, "layer_types", None)

    mask = DecoderLayerMask(model)
    mask.set_active_layers([5, 0, 3])  # any order
    assert mask.active_layers == (0, 3, 5)
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1, 2]
    if layer_types is not None:
        assert model.config.layer_types == [layer_types[i] for i in (0, 3, 5)]
    torch.testing.assert_close(greedy(model, ids, use_cache=True), greedy(model, ids, use_cache=False), rtol=0, atol=0)
    cached = greedy(model, padded_ids, padded_mask, use_cache=True)
    torch.testing.assert_close(cached, greedy(model, padded_ids, padded_mask, use_cache=False), rtol=0, atol=0)

    mask.reset()
    assert model.model.layers is original_list
    assert getattr(model.config, "layer_types", None) is layer_types
    assert model.config.num_hidden_layers == 6
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == list(range(6))
    assert torch.equal(model(ids).logits, full_logits)
    assert torch.equal(greedy(model, padded_ids, padded_mask), full_generated)


def test_left_padded_rows_match_their_unpadded_generation_under_mask() -> None:
    model = tiny_causal_lm("qwen2")
    DecoderLayerMask(model).remove_layers([2])
    padded_ids, padded_mask = left_padded_batch()
    batched = greedy(model, padded_ids, padded_mask)
    for row, pad in enumerate((0, 3, 5)):
        alone = greedy(model, padded_ids[row : row + 1, pad:])
        assert torch.equal(batched[row, pad:], alone[0])


def test_active_context_restores_previous_selection_even_on_error() -> None:
    model = tiny_causal_lm("llama")
    mask = DecoderLayerMask(model)
    mask.remove_layers([0])
    ids = tiny_input_ids()
    before = model(ids).logits
    with pytest.raises(RuntimeError, match="boom"):
        with mask.active([2, 3]):
            assert mask.active_layers == (2, 3) and model.config.num_hidden_layers == 2
            raise RuntimeError("boom")
    assert mask.active_layers == (1, 2, 3, 4, 5)
    assert torch.equal(model(ids).logits, before)
    with mask.active([1]):
        with mask.active([0, 1]):
            assert len(model.model.layers) == 2
        assert mask.active_layers == (1,)
    assert mask.removed_layers == (0,)


def test_masks_on_the_same_model_share_state_and_restore_train_mode() -> None:
    model = tiny_causal_lm("gemma3_text")
    first = DecoderLayerMask(model)
    first.remove_layers([1, 2])
    second = DecoderLayerMask(model)
    assert second.num_layers == 6 and second.removed_layers == (1, 2)
    model.train()  # reaches only the active layers
    second.reset()
    assert all(layer.training for layer in model.model.layers)
    assert first.active_layers == tuple(range(6))


def test_mask_on_peft_model_with_lora_in_kept_layers() -> None:
    model = tiny_causal_lm("qwen3")
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "o_proj"], init_lora_weights=False))
    ids = tiny_input_ids()
    full = peft_model(input_ids=ids).logits
    full_params = sum(p.numel() for p in peft_model.parameters())
    assert find_decoder_layers(peft_model)[0] is find_decoder_layers(model)[0]
    mask = DecoderLayerMask(peft_model)
    with mask.active(KEPT):
        masked = peft_model(input_ids=ids).logits
        assert sum(p.numel() for p in peft_model.parameters()) < full_params  # removed layers are unregistered
        assert len(peft_model.base_model.model.model.layers) == 4
        with torch.no_grad():
            peft_model.base_model.model.model.layers[0].self_attn.q_proj.lora_B["default"].weight.zero_()
        assert not torch.equal(peft_model(input_ids=ids).logits, masked)  # LoRA inside a kept layer is live
    assert sum(p.numel() for p in peft_model.parameters()) == full_params
    assert not torch.equal(peft_model(input_ids=ids).logits, full)  # the zeroed LoRA B is the same object


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_recorder_states_are_the_pre_norm_residual_stream(arch: str) -> None:
    model = tiny_causal_lm(arch)
    mask = DecoderLayerMask(model)
    mask.remove_layers(REMOVED)
    ids = tiny_input_ids(batch=2, length=7)
    with mask.record_residual_stream() as stream:
        logits = model(ids).logits
    assert isinstance(stream, ResidualStream)
    assert stream.layer_indices == KEPT and len(stream.states) == len(KEPT) + 1
    assert all(state.shape == (2, 7, 32) and not state.requires_grad for state in stream.states)
    with torch.no_grad():
        from_last = softcap(model.lm_head(model.model.norm(stream.states[-1])), model.config)
        embeddings = model.get_input_embeddings()(ids)
    torch.testing.assert_close(from_last, logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(stream.states[0], embeddings, rtol=0, atol=0)
    if arch.startswith("gemma"):  # x^0 carries Gemma's sqrt(d) embedding scale
        raw = nn.functional.embedding(ids, model.get_input_embeddings().weight)
        torch.testing.assert_close(stream.states[0], raw * math.sqrt(32), rtol=1e-6, atol=1e-6)
    assert all(not layer._forward_hooks and not layer._forward_pre_hooks for layer in model.model.layers)


def test_recorder_matches_output_hidden_states_of_the_unmasked_model() -> None:
    model = tiny_causal_lm("llama")
    ids = tiny_input_ids()
    with DecoderLayerMask(model).record_residual_stream() as stream:
        hidden = model(ids, output_hidden_states=True).hidden_states
    assert len(stream.states) == 7
    for k in range(6):  # HF's last entry is post-norm, ours is pre-norm
        torch.testing.assert_close(stream.states[k], hidden[k], rtol=0, atol=0)
    assert not torch.allclose(stream.states[-1], hidden[-1])


def test_recorder_keeps_the_most_recent_complete_call_and_cleans_up_on_error() -> None:
    model = tiny_causal_lm("mistral")
    mask = DecoderLayerMask(model)
    first, second = tiny_input_ids(seed=1), tiny_input_ids(length=5, seed=2)
    with mask.record_residual_stream() as stream:
        model(first)
        model(second)
    assert stream.num_calls == 2 and stream.states[0].shape[1] == 5
    torch.testing.assert_close(stream.states[0], model.get_input_embeddings()(second))
    with mask.record_residual_stream() as stream:
        greedy(model, first)
    assert stream.num_calls == 8 and stream.states[0].shape[1] == 1  # last decoding step, KV-cached
    with pytest.raises(ValueError, match="fail"):
        with mask.record_residual_stream():
            raise ValueError("fail")
    assert all(not layer._forward_hooks and not layer._forward_pre_hooks for layer in model.model.layers)


def test_recorder_without_detach_keeps_the_graph() -> None:
    model = tiny_causal_lm("gemma")
    mask = DecoderLayerMask(model)
    with mask.active([0, 1]), mask.record_residual_stream(detach=False) as stream:
        model(tiny_input_ids())
    assert stream.states[-1].requires_grad
    stream.states[-1].sum().backward()
    assert model.model.layers[0].mlp.down_proj.weight.grad is not None


class _KeywordLayer(nn.Module):
    """A decoder layer called with ``hidden_states=`` that returns a tuple, like older HF layers."""

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.layer_idx = 0
        self.scale = scale

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, None]:
        return hidden_states + self.scale * self.proj(hidden_states), None


class _ToyLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.config = SimpleNamespace(num_hidden_layers=3, layer_kinds=["a", "b", "c"])
        self.h = nn.ModuleList([_KeywordLayer(float(i + 1)) for i in range(3)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.h:
            x = layer(hidden_states=x)[0]
        return x


def test_recorder_and_mask_on_keyword_calls_and_tuple_outputs() -> None:
    toy = _ToyLM()
    assert find_decoder_layers(toy) == (toy, "h")
    mask = DecoderLayerMask(toy)
    mask.remove_layers([1])
    assert toy.config.layer_kinds == ["a", "c"] and toy.config.num_hidden_layers == 2
    assert [layer.layer_idx for layer in toy.h] == [0, 1]
    x = torch.randn(2, 3, 4)
    with mask.record_residual_stream() as stream:
        out = toy(x)
    assert stream.layer_indices == (0, 2) and len(stream.states) == 3
    assert torch.equal(stream.states[0], x) and torch.equal(stream.states[-1], out)


@pytest.mark.parametrize("arch", ["qwen2", "gemma2", "gemma3_text"])
def test_prune_makes_the_selection_permanent(arch: str) -> None:
    masked, pruned = tiny_causal_lm(arch), tiny_causal_lm(arch)
    DecoderLayerMask(masked).remove_layers(REMOVED)
    mask = DecoderLayerMask(pruned)
    mask.remove_layers(REMOVED)
    mask.prune()
    assert mask.num_layers == 4 and mask.active_layers == (0, 1, 2, 3) and mask.removed_layers == ()
    assert mask.original_num_layers == 6 and mask.original_active_layers == KEPT
    assert len(pruned.model.layers) == 4 and not any(k.startswith("model.layers.4") for k in pruned.state_dict())
    padded_ids, padded_mask = left_padded_batch()
    assert torch.equal(greedy(pruned, padded_ids, padded_mask), greedy(masked, padded_ids, padded_mask))
    mask.reset()  # reset now means "all kept layers"
    assert len(pruned.model.layers) == 4 and pruned.config.num_hidden_layers == 4
    mask.remove_layers([0])  # indices now refer to the pruned model
    assert mask.original_active_layers == (2, 3, 5)
    assert [layer.self_attn.layer_idx for layer in pruned.model.layers] == [0, 1, 2]
    mask.reset()
    assert [layer.self_attn.layer_idx for layer in pruned.model.layers] == [0, 1, 2, 3]


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda m: m.set_active_layers([0, 6]), r"layer index 6 .*out of range.*6 layers \(valid: 0\.\.5\)"),
        (lambda m: m.remove_layers([-1]), r"layer index -1 .*out of range.*\(valid: 0\.\.5\)"),
        (lambda m: m.set_active_layers([1, 2, 1, 3, 3]), r"duplicate layer indices in active layers: \[1, 3\]"),
        (lambda m: m.remove_layers([2, 2]), r"duplicate layer indices in removed layers: \[2\]"),
        (lambda m: m.set_active_layers([]), r"selection is empty"),
        (lambda m: m.remove_layers(range(6)), r"cannot remove all 6 decoder layers"),
        (lambda m: m.set_active_layers([0, 1.0]), r"active layers\[1\]=1\.0 is not an int"),
        (lambda m: m.set_active_layers("01"), r"must be a sequence of ints, got str"),
    ],
)
def test_invalid_selections_raise_and_leave_the_model_unchanged(call, message: str) -> None:
    model = tiny_causal_lm("llama")
    mask = DecoderLayerMask(model)
    mask.remove_layers([4])
    with pytest.raises(LayerMaskError, match=message):
        call(mask)
    assert mask.removed_layers == (4,) and model.config.num_hidden_layers == 5


def test_model_without_layer_list_is_rejected_by_class_name() -> None:
    with pytest.raises(LayerMaskError, match=r"cannot find the decoder-layer ModuleList of Sequential"):
        DecoderLayerMask(nn.Sequential(nn.Linear(2, 2)))
    with pytest.raises(LayerMaskError, match="ModuleList of Linear"):
        find_decoder_layers(nn.Linear(2, 2))


def test_reset_brings_restored_layers_to_the_dtype_of_the_active_ones() -> None:
    model = tiny_causal_lm("llama", num_layers=3)
    mask = DecoderLayerMask(model)
    mask.remove_layers([1])
    model.double()  # reaches only the registered (active) layers
    assert model.model.layers[0].mlp.up_proj.weight.dtype == torch.float64
    mask.reset()
    assert {p.dtype for p in model.parameters()} == {torch.float64}
    assert model(tiny_input_ids()).logits.dtype == torch.float64


def test_find_decoder_layers_on_base_models_and_peft_wrappers() -> None:
    causal_lm = tiny_causal_lm("qwen2", num_layers=2)
    base = causal_lm.model
    assert find_decoder_layers(causal_lm) == (base, "layers")
    assert find_decoder_layers(base) == (base, "layers")
    peft_base = get_peft_model(base, LoraConfig(r=2, target_modules=["k_proj"]))
    assert find_decoder_layers(peft_base) == (base, "layers")
    mask = DecoderLayerMask(peft_base)
    mask.remove_layers([0])
    assert causal_lm.config.num_hidden_layers == 1 and DecoderLayerMask(causal_lm).removed_layers == (0,)


def test_a_float32_replacement_at_position_0_does_not_set_the_decoder_dtype() -> None:
    """A plan removing layer 0 puts its (float32) replacement first in the list; the decoder's dtype must come from
    a decoder layer, or the teacher pass (reset) would cast the whole bf16 decoder to float32."""
    model = tiny_causal_lm("llama", num_layers=3).to(torch.bfloat16)
    replacement = nn.Linear(32, 32)  # float32, as healing keeps it
    mask = DecoderLayerMask(model)
    mask.remove_layers([0])
    mask.set_replacements({0: replacement})
    assert model.model.layers[0] is replacement
    mask.reset()  # the teacher pass: every layer active
    assert {p.dtype for p in model.model.layers.parameters()} == {torch.bfloat16}
    mask.remove_layers([0])  # back to the student: the replacement keeps its own dtype
    assert replacement.weight.dtype == torch.float32
    assert {p.dtype for p in model.model.layers[1:].parameters()} == {torch.bfloat16}
