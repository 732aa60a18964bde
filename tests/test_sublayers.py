"""Sub-layer masks (attention / MLP dropped, no KV cache for dropped attention), replacement modules for removed
blocks, their export to stock transformers, and the sublayer redundancy map."""
from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_config
from transformers import AutoModelForCausalLM

from lightning_speechllm.model.export import save_pruned_decoder
from lightning_speechllm.model.layer_mask import DecoderLayerMask, LayerMaskError, get_layer_mask_state
from lightning_speechllm.model.replacement import build_replacement
from lightning_speechllm.model.sublayer_mask import SublayerMask, kv_cache_bytes, kv_cache_for
from lightning_speechllm.pruning.plan import PruningPlan, apply_plan, plan_sublayers
from lightning_speechllm.redundancy.metrics import AngularDistanceMetric
from lightning_speechllm.redundancy.sublayers import SublayerMap, record_sublayer_stream

ARCHS = ("llama", "qwen2", "gemma")
GENERATE = dict(max_new_tokens=10, do_sample=False, pad_token_id=0, eos_token_id=None)


def _model(arch: str, num_layers: int = 6) -> torch.nn.Module:
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_config(arch, num_layers)).eval()


def _inputs() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 200, (2, 9), generator=generator)
    attention_mask = torch.ones_like(ids)
    attention_mask[0, :3] = 0  # left padding, as SpeechLLM batches are
    return ids, attention_mask


def _perturb(module: torch.nn.Module, scale: float = 0.1) -> None:
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for param in module.parameters():
            param.add_(scale * torch.randn(param.shape, generator=generator))


# ------------------------------------------------------------------------------------------------ sublayer masks
@pytest.mark.parametrize("arch", ARCHS)
def test_dropped_attention_equals_residual_path_and_cached_equals_uncached(arch):
    model = _model(arch)
    ids, attention_mask = _inputs()
    sublayers = SublayerMask(model)
    layer = model.model.layers[3]
    captured = {}
    layer.register_forward_pre_hook(lambda m, args, kwargs: captured.update(x=args[0]), with_kwargs=True)
    sublayers.drop(attention=[0, 3], mlp=[4])
    hook = layer.register_forward_hook(lambda m, args, out: captured.update(y=out))
    model(ids, attention_mask=attention_mask)
    hook.remove()
    x = captured["x"]
    expected = x + layer.mlp(layer.post_attention_layernorm(x))  # attention dropped: x + 0, then the MLP
    torch.testing.assert_close(captured["y"], expected, rtol=0, atol=0)

    uncached = model.generate(ids, attention_mask=attention_mask, use_cache=False, **GENERATE)
    cache = kv_cache_for(model)
    cached = model.generate(ids, attention_mask=attention_mask, past_key_values=cache, **GENERATE)
    assert torch.equal(cached, uncached)
    # The attention-less slots (0 and 3) hold no keys or values, yet every slot answers the length the cache has
    # seen: the prompt and every generated token but the last, which no forward has consumed yet.
    holds_nothing = [slot.keys is None and slot.values is None for slot in cache.layers]
    assert holds_nothing == [True, False, False, True, False, False]
    seen = ids.shape[1] + GENERATE["max_new_tokens"] - 1
    assert cache.get_seq_length() == seen and [slot.get_seq_length() for slot in cache.layers] == [seen] * 6
    # The mask size of a full-attention layer, asked by query length (newer 5.x) or by cache_position (older 5.x).
    next_position = torch.arange(seen, seen + 1)
    assert cache.layers[0].get_mask_sizes(1) == cache.layers[0].get_mask_sizes(next_position) == (seen + 1, 0)
    full = _model(arch)
    full_cache = kv_cache_for(full)
    assert full_cache is None  # every layer runs attention: transformers' own cache
    from transformers import DynamicCache

    reference = DynamicCache(config=full.config)
    full.generate(ids, attention_mask=attention_mask, past_key_values=reference, **GENERATE)
    assert kv_cache_bytes(cache) * 6 == kv_cache_bytes(reference) * 4  # 4 of 6 layers keep keys and values


def test_default_cache_would_be_wrong_when_layer_0_drops_attention():
    """Why kv_cache_for exists: transformers reads the sequence length from cache layer 0."""
    model = _model("llama")
    ids, attention_mask = _inputs()
    SublayerMask(model).drop(attention=[0])
    uncached = model.generate(ids, attention_mask=attention_mask, use_cache=False, **GENERATE)
    default = model.generate(ids, attention_mask=attention_mask, use_cache=True, **GENERATE)
    assert not torch.equal(default, uncached)


def test_no_kv_cache_slots_follow_beam_search_and_a_decoder_without_attention_needs_none():
    model = _model("llama")
    ids, attention_mask = _inputs()
    sublayers = SublayerMask(model)
    sublayers.drop(attention=[0, 3])
    beams = dict(GENERATE, num_beams=3)
    uncached = model.generate(ids, attention_mask=attention_mask, use_cache=False, **beams)
    cached = model.generate(ids, attention_mask=attention_mask, past_key_values=kv_cache_for(model), **beams)
    assert torch.equal(cached, uncached)
    sublayers.drop(attention=range(6))  # no position runs attention: tokens do not interact, nothing to cache
    assert kv_cache_for(model) is None
    assert torch.equal(model.generate(ids, attention_mask=attention_mask, use_cache=True, **GENERATE),
                       model.generate(ids, attention_mask=attention_mask, use_cache=False, **GENERATE))


def test_sublayer_mask_reset_suspend_and_errors():
    model = _model("llama")
    ids, attention_mask = _inputs()
    reference = model(ids, attention_mask=attention_mask).logits
    sublayers = SublayerMask(model)
    sublayers.drop(attention=[1], mlp=[2])
    dropped = model(ids, attention_mask=attention_mask).logits
    assert not torch.allclose(dropped, reference)
    with sublayers.suspended():
        assert torch.equal(model(ids, attention_mask=attention_mask).logits, reference)
    assert torch.equal(model(ids, attention_mask=attention_mask).logits, dropped)
    assert SublayerMask(model).dropped_attention == (1,)  # shared state
    sublayers.reset()
    assert torch.equal(model(ids, attention_mask=attention_mask).logits, reference)
    with pytest.raises(LayerMaskError, match=r"out of range .* 6 layers"):
        sublayers.drop(attention=[6])
    with pytest.raises(LayerMaskError, match=r"layers \[2\] would lose both"):
        sublayers.drop(attention=[2], mlp=[2])


# ------------------------------------------------------------------------------------------------ replacement
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("kind", ["ffn", "linear"])
def test_replacement_is_identity_at_init_and_runs_in_the_block_place(arch, kind):
    model = _model(arch)
    ids, attention_mask = _inputs()
    mask = DecoderLayerMask(model)
    mask.remove_layers([2, 3])
    pruned = model(ids, attention_mask=attention_mask).logits
    replacement = build_replacement(get_layer_mask_state(model).layer_list[2], kind, width=40 if kind == "ffn" else None)
    mask.set_replacements({2: replacement})
    assert len(model.model.layers) == 5 and model.config.num_hidden_layers == 5
    assert mask.stream_targets() == [1, 2, 4, 5, 6]  # the replacement stands for x^4, the input of layer 4
    assert torch.equal(model(ids, attention_mask=attention_mask).logits, pruned)  # exact identity
    _perturb(replacement)
    assert not torch.allclose(model(ids, attention_mask=attention_mask).logits, pruned)
    uncached = model.generate(ids, attention_mask=attention_mask, use_cache=False, **GENERATE)
    assert torch.equal(model.generate(ids, attention_mask=attention_mask, past_key_values=kv_cache_for(model),
                                      **GENERATE), uncached)
    with mask.active(range(6)):  # the teacher: every layer, no replacement
        assert len(model.model.layers) == 6
    assert model.model.layers[2] is replacement
    with pytest.raises(LayerMaskError, match="cannot prune a decoder with replacement"):
        mask.prune()


@pytest.mark.parametrize("arch", ARCHS)
def test_export_to_stock_transformers_gives_identical_logits(arch, tmp_path):
    model = _model(arch)
    ids, attention_mask = _inputs()
    mask = DecoderLayerMask(model)
    mask.remove_layers([2, 3])
    replacement = build_replacement(get_layer_mask_state(model).layer_list[2], "ffn", width=40)
    _perturb(replacement)
    mask.set_replacements({2: replacement})
    SublayerMask(model).drop(attention=[0], mlp=[5])
    live = model(ids, attention_mask=attention_mask).logits
    out = save_pruned_decoder(model, tmp_path / "decoder")
    stock = AutoModelForCausalLM.from_pretrained(out, attn_implementation=model.config._attn_implementation).eval()
    assert stock.config.num_hidden_layers == 5
    reloaded = stock(ids, attention_mask=attention_mask).logits
    real = attention_mask.bool()  # padded positions carry no prediction
    torch.testing.assert_close(reloaded[real], live[real], rtol=0, atol=1e-6)
    info = (out / "pruning.json").read_text()
    assert '"dropped_attention": [\n    0\n  ]' in info and '"kind": "ffn"' in info and '"width": 40' in info


@pytest.mark.parametrize(("arch", "kind", "message"), [
    ("llama", "linear", "'linear' replacement has no stock decoder-layer form"),
    ("gemma2", "ffn", r"norm their MLP output \(post_feedforward_layernorm"),  # not exactly expressible
])
def test_replacements_without_an_exact_stock_layer_refuse_export(arch, kind, message, tmp_path):
    model = _model(arch)
    mask = DecoderLayerMask(model)
    mask.remove_layers([2])
    mask.set_replacements({2: build_replacement(get_layer_mask_state(model).layer_list[2], kind)})
    with pytest.raises(LayerMaskError, match=message):
        save_pruned_decoder(model, tmp_path / "decoder")
    assert not (tmp_path / "decoder").exists()


# ------------------------------------------------------------------------------------------------ maps and plans
def test_sublayer_stream_and_map_match_a_hand_computed_distance():
    model = _model("llama", num_layers=4)
    ids, attention_mask = _inputs()
    captured = {}
    layer = model.model.layers[2]
    layer.register_forward_pre_hook(lambda m, args, kwargs: captured.update(x=args[0]), with_kwargs=True)
    with record_sublayer_stream(model) as stream:
        model(ids, attention_mask=attention_mask)
    assert len(stream) == 2 * 4 + 1
    assert torch.equal(stream[4], captured["x"])  # x_2: the input of layer 2
    metric = AngularDistanceMetric(8)
    tokens = attention_mask.bool()
    metric.update(list(stream), tokens)
    table = metric.compute()
    cosine = torch.nn.functional.cosine_similarity(stream[4][tokens].double(), stream[5][tokens].double(), dim=-1)
    assert table[0, 4].item() == pytest.approx((torch.arccos(cosine) / torch.pi).mean().item(), abs=1e-12)
    SublayerMask(model).drop(attention=[2])  # the middle state m_2 is x_2 plus the attention output
    with record_sublayer_stream(model) as dropped:
        model(ids, attention_mask=attention_mask)
    assert torch.equal(dropped[5], dropped[4]) and not torch.equal(stream[5], stream[4])


def test_attention_plan_round_trips_and_applies(tmp_path):
    result = SublayerMap(layers=list(range(6)), attention=[0.3, 0.1, 0.05, 0.2, 0.01, 0.4], mlp=[0.5] * 6,
                         token_selection="last_prompt", num_samples=4, model_id="tiny")
    path = result.to_json(tmp_path / "sublayers.json")
    assert SublayerMap.from_json(path) == result
    plan = plan_sublayers(SublayerMap.from_json(path), 6, fraction=0.5)
    assert plan.removed_attention == [1, 2, 4] and plan.removed_layers == [] and plan.params["n"] == 3
    again = PruningPlan.from_json(plan.to_json(tmp_path / "plan.json"))
    assert again.removed_attention == [1, 2, 4] and again.method == "attention"
    model = _model("llama")
    apply_plan(model, again)
    assert SublayerMask(model).dropped_attention == (1, 2, 4)
    with pytest.raises(Exception, match=r"removed_attention \[1, 7\]"):
        PruningPlan(removed_layers=[], num_layers=6, method="attention", removed_attention=[1, 7])


# ------------------------------------------------------------------------------------------------ guards
def test_layers_of_other_shapes_are_untouched_unless_dropped_and_their_export_is_refused(tmp_path):
    from transformers import GPT2Config

    from lightning_speechllm.model.export import ExportError

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(GPT2Config(n_layer=3, n_embd=32, n_head=4, vocab_size=256)).eval()
    ids, attention_mask = _inputs()
    reference = model(ids, attention_mask=attention_mask).logits
    sublayers = SublayerMask(model)
    sublayers.reset()  # GPT-2 has no `mlp.down_proj` / pre-MLP norm names: nothing dropped, nothing looked up
    with sublayers.suspended():
        assert torch.equal(model(ids, attention_mask=attention_mask).logits, reference)
    assert kv_cache_for(model) is None
    sublayers.drop(attention=[1])  # `attn` is found, so it can be dropped and run ...
    assert not torch.equal(model(ids, attention_mask=attention_mask).logits, reference)
    with pytest.raises(ExportError, match=r"layer 1 \(GPT2Block\) drops its attention but has no .*o_proj"):
        save_pruned_decoder(model, tmp_path / "decoder")  # ... but its c_proj is not zeroed by export: refused


def test_prune_refuses_while_sublayers_are_dropped_and_plans_refuse_a_layer_losing_both_halves():
    model = _model("llama")
    mask = DecoderLayerMask(model)
    SublayerMask(model).drop(attention=[4])
    mask.remove_layers([1])
    with pytest.raises(LayerMaskError, match="cannot prune while sublayers are dropped"):
        mask.prune()
    with pytest.raises(Exception, match=r"layers \[2\] are in both removed_attention and removed_mlp"):
        PruningPlan(removed_layers=[], num_layers=6, method="explicit", removed_attention=[2], removed_mlp=[2])
