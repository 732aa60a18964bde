"""The training forward runs the prompt prefix every row shares once, as a KV cache: same loss and gradients as
running every row whole, on every decoder family, under layer and sublayer masks; off wherever it would not be."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from lightning_speechllm.model.encoders import WhisperSpeechEncoder
from lightning_speechllm.model.projector import ProjectorConfig
from lightning_speechllm.model.prompts import PromptConfig
from lightning_speechllm.model.speechllm import LoraConfig, SpeechLLM, SpeechLLMConfig
from tests.test_speechllm import make_batch
from tests.tiny_models import tiny_config
from tests.tiny_speechllm import tiny_tokenizer, tiny_whisper_config


def _speechllm(arch: str, **config_kwargs) -> SpeechLLM:
    torch.manual_seed(0)
    encoder = WhisperSpeechEncoder(tiny_whisper_config())
    config = SpeechLLMConfig(llm_path="<memory>", encoder_path="<memory>",
                             projector=ProjectorConfig(downsample=2, hidden_dim=64),
                             prompt=PromptConfig(system_prompt="transcribe the audio"), **config_kwargs)
    llm_config = tiny_config(arch, num_layers=6)
    llm_config.vocab_size = len(tiny_tokenizer())
    if arch == "qwen2":  # as Qwen2.5 ships (use_sliding_window false); sliding decoders run rows whole (below)
        llm_config.layer_types = ["full_attention"] * llm_config.num_hidden_layers
    llm = AutoModelForCausalLM.from_config(llm_config).eval()
    return SpeechLLM(llm, tiny_tokenizer(), encoder, config).train()


def _loss_and_grads(model: SpeechLLM, batch, shared: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss, _, _ = model(batch, shared_prefix=shared)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.projector.parameters()]


# float32, a few hundred operations per logit: the two orders differ by rounding only (a real error moves the loss
# by far more than 1e-5: a wrong position id or a pad attended to changes it in the first or second digit).
@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma"])
@pytest.mark.parametrize("masks", [{}, {"removed_layers": [1, 2]}, {"removed_attention": [0, 3], "removed_mlp": [4]}])
def test_shared_prefix_gives_the_loss_and_gradients_of_running_every_row_whole(arch, masks):
    model = _speechllm(arch, **masks)
    batch = make_batch(seconds=(1.0, 0.3, 1.4), texts=["the cat sat on the mat", "one", "hello world this is"])
    assert model.shared_prefix_length(batch) == len(model.prompts.pieces("asr", None).prefix) > 5
    loss, grads = _loss_and_grads(model, batch, shared=True)
    reference_loss, reference_grads = _loss_and_grads(model, batch, shared=False)
    torch.testing.assert_close(loss, reference_loss, rtol=1e-5, atol=1e-5)
    for grad, reference in zip(grads, reference_grads):
        torch.testing.assert_close(grad, reference, rtol=1e-4, atol=1e-6)


def test_the_prefix_runs_once_not_once_per_row():
    model = _speechllm("llama")
    batch = make_batch()
    widths = []
    hook = model.llm.model.layers[0].register_forward_pre_hook(
        lambda module, args, kwargs: widths.append(tuple((args or [kwargs.get("hidden_states")])[0].shape[:2])), with_kwargs=True)
    try:
        model(batch)
    finally:
        hook.remove()
    prefix = model.shared_prefix_length(batch)
    inputs = model.build_inputs(batch)
    assert widths == [(1, prefix), (len(batch), inputs.inputs_embeds.shape[1] - prefix)]


def test_no_shared_prefix_where_rows_differ_or_the_decoder_trains_or_no_gradient_flows():
    model = _speechllm("llama")
    mixed = make_batch(tasks=["asr", "ast", "asr"], tgt_langs=[None, "fr", None])
    assert model.shared_prefix_length(mixed) == 0
    batch = make_batch()
    with torch.no_grad():
        assert model.shared_prefix_length(batch) == 0  # validation: the recorder hooks see the whole rows
    assert model.shared_prefix_length(batch) > 0
    adapted = _speechllm("llama", lora=LoraConfig(r=2, alpha=2, dropout=0.0))
    assert adapted.shared_prefix_length(batch) == 0  # the prefix's keys move with the adapters
    sliding = _speechllm("gemma3_text")
    assert sliding.shared_prefix_length(batch) == 0  # its sliding-window layers would keep only part of the prefix
    checkpointed = _speechllm("llama", gradient_checkpointing=True)
    assert checkpointed.shared_prefix_length(batch) == 0  # recomputation would append to the cache twice
