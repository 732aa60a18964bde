"""Layer skipping for speech tokens only: the skipped layer equals the full layer with the speech rows put back, on
every supported architecture and attention kernel; cached generation equals uncached; the FLOPs it saves."""
from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from lightning_speechllm.model.segments import Segment
from lightning_speechllm.model.speech_skip import SpeechSkip, SpeechSkipError, skipped_layer_flops
from tests.test_speechllm import make_batch
from tests.tiny_models import tiny_causal_lm
from tests.tiny_speechllm import tiny_speechllm

FULL = ["full_attention"] * 4


def _layout() -> torch.Tensor:
    """Two rows, the second left-padded: prompt, 5 speech positions, prompt, target."""
    row = [Segment.PROMPT] * 3 + [Segment.SPEECH] * 5 + [Segment.PROMPT] * 2 + [Segment.TARGET] * 3
    padded = [Segment.PAD] * 2 + row[:3] + [Segment.SPEECH] * 3 + row[8:]
    return torch.tensor([row, padded])


def _frozen_rows_reference(llm, layers, speech: torch.Tensor):
    """Hooks that run each of ``layers`` whole, then put the speech rows' input back (the definition of the skip)."""
    def hook(_module, args, kwargs, output):
        hidden = args[0] if args else kwargs["hidden_states"]
        if hidden.shape[:2] != speech.shape:
            return output
        return torch.where(speech[..., None], hidden, output[0] if isinstance(output, tuple) else output)

    decoder = llm.model.layers
    return [decoder[i].register_forward_hook(hook, with_kwargs=True) for i in layers]


def _llm(arch: str, attention: str):
    layer_types = FULL if arch in ("qwen2", "qwen3") else None
    llm = tiny_causal_lm(arch, num_layers=4, seed=1, layer_types=layer_types)
    if arch == "mistral":
        llm.config.sliding_window = None  # as Mistral 7B v0.2+; a sliding window is refused
    llm.config._attn_implementation = attention
    for module in llm.modules():
        if hasattr(module, "config") and hasattr(module.config, "_attn_implementation"):
            module.config._attn_implementation = attention
    return llm


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "mistral"])
def test_skipped_layers_equal_the_full_layers_with_the_speech_rows_put_back(arch, attention):
    llm = _llm(arch, attention).eval()
    segments = _layout()
    speech = segments == Segment.SPEECH
    embeds = torch.randn(*segments.shape, llm.config.hidden_size, generator=torch.Generator().manual_seed(0))
    mask = (segments != Segment.PAD).long()
    positions = (mask.cumsum(1) - 1).clamp_min(0)
    call = dict(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=False)
    hooks = _frozen_rows_reference(llm, (1, 2), speech)
    with torch.no_grad():
        reference = llm(**call, output_hidden_states=True)
    for hook in hooks:
        hook.remove()
    skip = SpeechSkip(llm)
    skip.set_layers([1, 2])
    with torch.no_grad(), skip.positions(segments):
        ours = llm(**call, output_hidden_states=True)
    real = mask.bool()
    torch.testing.assert_close(ours.logits[real], reference.logits[real], rtol=0, atol=2e-5)
    # the speech rows leave a skipped layer exactly as they entered it
    assert torch.equal(ours.hidden_states[2][speech], ours.hidden_states[1][speech])
    assert not torch.equal(ours.hidden_states[1][speech], ours.hidden_states[0][speech])  # layer 0 runs them
    with torch.no_grad():  # outside `positions` the layers run whole
        plain = llm(**call).logits
    assert not torch.allclose(plain[real], ours.logits[real], atol=1e-4)


def test_speechllm_generation_with_the_skip_is_the_reference_and_cached_equals_uncached():
    model = tiny_speechllm(seed=0, speech_skip_layers=[1, 2]).eval()
    batch = make_batch()
    inputs = model.build_inputs(batch, with_targets=False)
    kwargs = dict(inputs_embeds=inputs.inputs_embeds, attention_mask=inputs.attention_mask, max_new_tokens=8,
                  min_new_tokens=8, do_sample=False, pad_token_id=model.tokenizer.pad_token_id)
    with torch.no_grad(), model.speech_skip.positions(inputs.segment_ids):
        cached = model.llm.generate(use_cache=True, **kwargs)
        uncached = model.llm.generate(use_cache=False, **kwargs)
    assert cached.tolist() == uncached.tolist()
    texts = model.generate(batch, max_new_tokens=8)
    reference_model = tiny_speechllm(seed=0).eval()
    hooks = _frozen_rows_reference(reference_model.llm, (1, 2), inputs.segment_ids == Segment.SPEECH)
    try:
        assert reference_model.generate(batch, max_new_tokens=8) == texts
    finally:
        for hook in hooks:
            hook.remove()
    assert model.shared_prefix_length(batch) == 0  # training rows run whole: the skip places speech by row layout


def test_refusals_and_switching_off():
    with pytest.raises(SpeechSkipError, match="extra norms"):
        SpeechSkip(tiny_causal_lm("gemma2", num_layers=4)).set_layers([1])
    with pytest.raises(SpeechSkipError, match="sliding window"):
        SpeechSkip(tiny_causal_lm("qwen3", num_layers=4)).set_layers([1])  # its odd layers slide
    with pytest.raises(SpeechSkipError, match="sliding window of 4"):
        SpeechSkip(tiny_causal_lm("mistral", num_layers=4)).set_layers([2])
    llm = tiny_causal_lm("llama", num_layers=4)
    skip = SpeechSkip(llm)
    with pytest.raises(SpeechSkipError, match=r"\[4\] are out of range for a decoder of 4 layers"):
        skip.set_layers([4])
    skip.set_layers([0, 3])
    assert "forward" in vars(llm.model.layers[3])
    skip.set_layers([])
    assert not any("forward" in vars(layer) for layer in llm.model.layers) and skip.layers == ()


def test_the_projection_and_mlp_flops_saved_are_the_formula_times_the_speech_positions():
    llm = _llm("llama", "eager").eval()
    segments = _layout()[:1]
    speech_positions = int((segments == Segment.SPEECH).sum())
    call = dict(inputs_embeds=torch.randn(1, segments.shape[1], llm.config.hidden_size),
                attention_mask=torch.ones_like(segments), use_cache=False)

    def matmul_flops(skip_layers):  # aten.mm: the projections and the MLP (the attention's bmm is not compared:
        skip = SpeechSkip(llm)      # FlopCounterMode does not see the skipped layer's broadcast matmuls)
        skip.set_layers(skip_layers)
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), skip.positions(segments), counter:
            llm(**call)
        skip.set_layers([])
        return counter.get_flop_counts()["Global"][torch.ops.aten.mm]

    config = llm.config
    expected = speech_positions * skipped_layer_flops(config.hidden_size, config.intermediate_size,
                                                      config.num_attention_heads,
                                                      config.hidden_size // config.num_attention_heads, context=0)
    assert matmul_flops([]) - matmul_flops([1]) == expected == 5 * 2 * (2 * 32 * 32 + 3 * 32 * 64)


def test_export_refuses_a_model_that_skips_speech_positions(tmp_path):
    from lightning_speechllm.healing.export import write_export
    from lightning_speechllm.model.checkpoint import CheckpointError
    from lightning_speechllm.model.module import SpeechLLMModule

    module = SpeechLLMModule(speechllm=tiny_speechllm(seed=0, speech_skip_layers=[1, 2]))
    with pytest.raises(CheckpointError, match=r"skips the speech positions in layers \[1, 2\]"):
        write_export(module, tmp_path)


def test_gradients_through_the_skipped_layers_equal_the_reference():
    """A shorter row repeats one of its kept positions in the gathered batch; the repeats must not add gradient."""
    segments = _layout()
    speech = segments == Segment.SPEECH
    embeds = torch.randn(*segments.shape, 32, generator=torch.Generator().manual_seed(0))
    mask = (segments != Segment.PAD).long()
    call = dict(inputs_embeds=embeds, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp_min(0),
                use_cache=False)

    def gradient(llm) -> torch.Tensor:
        llm.zero_grad()
        llm(**call).logits[mask.bool()].pow(2).mean().backward()
        return llm.model.layers[1].mlp.down_proj.weight.grad.clone()

    reference = _llm("llama", "eager")
    hooks = _frozen_rows_reference(reference, (1,), speech)
    expected = gradient(reference)
    for hook in hooks:
        hook.remove()
    ours = _llm("llama", "eager")
    skip = SpeechSkip(ours)
    skip.set_layers([1])
    with skip.positions(segments):
        torch.testing.assert_close(gradient(ours), expected, rtol=1e-4, atol=1e-6)


def test_beam_search_follows_each_rows_layout_and_a_dropped_sublayer_is_refused():
    model = tiny_speechllm(seed=3, speech_skip_layers=[1, 2]).eval()
    batch = make_batch(seconds=(1.2, 0.4, 0.8))
    single = [model.generate(batch.subset([i]), max_new_tokens=6, num_beams=3)[0] for i in range(3)]
    assert model.generate(batch, max_new_tokens=6, num_beams=3) == single
    first = batch.subset([0])  # the reference: the prefill's 3 beam rows each with the utterance's speech rows put back
    speech = model.build_inputs(first, with_targets=False).segment_ids == Segment.SPEECH
    reference = tiny_speechllm(seed=3).eval()
    hooks = _frozen_rows_reference(reference.llm, (1, 2), speech.repeat_interleave(3, dim=0))
    try:
        assert reference.generate(first, max_new_tokens=6, num_beams=3)[0] == single[0]
    finally:
        for hook in hooks:
            hook.remove()
    model.sublayer_mask.drop([1])
    with pytest.raises(SpeechSkipError, match="has a dropped sublayer"):
        model.generate(batch, max_new_tokens=2)


def test_a_deep_copy_or_pickle_skips_by_its_own_layout_and_switches_off_alone():
    model = tiny_speechllm(seed=0, speech_skip_layers=[1, 2]).eval()
    copy_ = copy.deepcopy(model)
    inputs = model.build_inputs(make_batch())
    with torch.no_grad():
        skipped = model.run_decoder(inputs).logits
        assert torch.equal(copy_.run_decoder(inputs).logits, skipped)  # the copy reads its own skip's layout
        copy_.speech_skip.set_layers([])
        whole = copy_.run_decoder(inputs).logits
        assert not torch.allclose(whole, skipped)  # the copy now runs every position
        assert torch.equal(model.run_decoder(inputs).logits, skipped) and model.speech_skip.layers == (1, 2)
        restored = pickle.loads(pickle.dumps(model.llm))  # the LLM alone: its private skip is never laid out
        assert torch.equal(restored(inputs_embeds=inputs.inputs_embeds, attention_mask=inputs.attention_mask,
                                    position_ids=inputs.position_ids, use_cache=False).logits, whole)
