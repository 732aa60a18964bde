"""Scale-up settings (issue 10, item 6): target-window logits in healing, gradient checkpointing, the attention
kernel, the encoder dtype, low-memory encoder loading and pinned batches. Tiny fp32 models on CPU."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from torch.nn import functional as F
from torch.utils.data._utils.pin_memory import pin_memory as dataloader_pin_memory
from transformers import HubertConfig, Wav2Vec2Config, WavLMConfig, WhisperModel

import lightning_speechllm.model.encoders as encoders
from lightning_speechllm.data.batch import SpeechBatch
from lightning_speechllm.healing.losses import HealingInputs, HealingLoss, LossSpec, prediction_mask
from lightning_speechllm.healing.module import HealingConfig, HealingModule
from lightning_speechllm.model.encoders import (
    WaveformSpeechEncoder,
    WhisperSpeechEncoder,
    build_speech_encoder,
    load_speech_encoder,
)
from lightning_speechllm.model.module import DecodingConfig, OptimConfig
from lightning_speechllm.model.speechllm import IGNORE_INDEX, LoraConfig, SpeechLLM, SpeechLLMConfig, target_window
from tests.test_speechllm import make_batch
from tests.tiny_speechllm import save_tiny_assets, tiny_speechllm, tiny_whisper_config

NO_DROPOUT_LORA = LoraConfig(r=4, alpha=4, dropout=0.0, target_modules=["q_proj", "v_proj"])
CE = LossSpec("TaskCrossEntropy")


def healing_module(losses: list[LossSpec], **model_kwargs) -> HealingModule:
    config = HealingConfig(removed_layers=[1, 2], lora=NO_DROPOUT_LORA, losses=list(losses))
    module = HealingModule(healing=config, speechllm=tiny_speechllm(seed=0, **model_kwargs),
                           optim=OptimConfig(lr=1e-2, warmup_steps=0, schedule="constant"),
                           decoding=DecodingConfig(max_new_tokens=4, generate_in_validation=False))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # non-zero adapters: the student differs from the teacher beyond the mask
        for name, param in module.speechllm.llm.named_parameters():
            if "lora_B.default" in name:
                param.copy_(0.5 * torch.randn(param.shape, generator=gen))
    return module


# ------------------------------------------------------------------------------------- 1. target-window logits
def full_healing_inputs(module: HealingModule, batch: SpeechBatch) -> HealingInputs:
    """Today's (pre-window) inputs: logits at every position, labels and target mask uncut."""
    inputs = module.speechllm.build_inputs(batch, with_targets=True)
    student, student_hidden = module.student_pass(inputs, hidden=True)
    teacher, teacher_hidden = module.teacher_pass(inputs, hidden=True)
    return HealingInputs(student_logits=student, labels=inputs.labels, target_mask=prediction_mask(inputs.labels),
                         attention_mask=inputs.attention_mask, teacher_logits=teacher,
                         student_hidden=student_hidden, teacher_hidden=teacher_hidden,
                         layer_map={0: 0, 1: 1, 2: 4})


def old_reference(spec: LossSpec, full: HealingInputs, loss: HealingLoss) -> torch.Tensor:
    """The loss as computed on full logits before the window (CE and hidden-state formulas as they were)."""
    if spec.class_path == "TaskCrossEntropy":
        logits = full.student_logits[:, :-1]
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), full.labels[:, 1:].reshape(-1),
                               ignore_index=IGNORE_INDEX, label_smoothing=spec.init_args.get("label_smoothing", 0.0))
    if spec.class_path == "KLDivergence":
        return loss(full)[0]  # the KL picked the target rows before the window already: the full-input path
    mask = full.attention_mask.bool() if spec.init_args.get("tokens") == "all" else full.target_mask
    terms = []
    for s, t in ((1, 1), (2, 4)):
        per_token = loss._per_token(full.student_hidden[s], full.teacher_hidden[t])
        terms.append((per_token * mask.float()).sum() / mask.sum())
    return torch.stack(terms).mean()


def test_healing_logits_cover_the_target_window_only():
    module = healing_module([CE, LossSpec("KLDivergence")]).eval()
    batch = make_batch()
    with torch.no_grad():
        ours = module.healing_inputs(batch)
        full = full_healing_inputs(module, batch)
    window = target_window(full.labels)
    length = full.labels.shape[1]
    assert window < length
    assert ours.student_logits.shape[1] == ours.teacher_logits.shape[1] == window == ours.window
    assert ours.labels.shape == ours.target_mask.shape == (len(batch), window)
    assert ours.attention_mask.shape == (len(batch), length)
    # the LM head on the window vs on all positions (another GEMM shape, K = 48): float32 logits (|x| <= 6) ~1e-6
    # apart, bounded by K eps sum|w h| ~ 5e-5 per side on any kernel; a window off by one position is O(1) off
    torch.testing.assert_close(ours.student_logits, full.student_logits[:, -window:], atol=1e-4, rtol=0)
    torch.testing.assert_close(ours.teacher_logits, full.teacher_logits[:, -window:], atol=1e-4, rtol=0)
    assert torch.equal(ours.labels, full.labels[:, -window:])
    assert torch.equal(ours.target_mask, full.target_mask[:, -window:])
    assert int(ours.target_mask.sum()) == int(full.target_mask.sum())  # no target position is lost
    assert torch.equal(ours.in_window(ours.attention_mask), ours.attention_mask[:, -window:])


@pytest.mark.parametrize("spec", [
    CE,
    LossSpec("TaskCrossEntropy", {"label_smoothing": 0.1}),
    LossSpec("KLDivergence", {"direction": "forward", "temperature": 2.0}),
    LossSpec("KLDivergence", {"direction": "reverse"}),
    LossSpec("KLDivergence", {"direction": "symmetric"}),
    LossSpec("KLDivergence", {"direction": "skew", "skew_alpha": 0.2}),
    LossSpec("HiddenStateMSE"),
    LossSpec("HiddenStateMSE", {"tokens": "all"}),
    LossSpec("HiddenStateCosine"),
    LossSpec("HiddenStateCosine", {"tokens": "all"}),
], ids=lambda s: f"{s.class_path}-{'-'.join(f'{k}={v}' for k, v in s.init_args.items())}")
def test_windowed_losses_equal_the_full_logit_losses(spec):
    module = healing_module([spec]).eval()
    batch = make_batch()
    with torch.no_grad():
        total, parts = module.healing_step(batch)
        full = full_healing_inputs(module, batch)
        (loss,) = module.loss_fn.parts.values()
        reference = old_reference(spec, full, loss)
    assert float(reference) > 0
    # float32 means over ~10^2-10^3 terms in another order, from logits ~1e-6 apart: ~1e-7 relative (1.9e-6 of 11.6
    # on AVX2); 1e-5 relative + 1e-5 covers any kernel, a target position lost or added moves them by ~1e-2 relative
    torch.testing.assert_close(total, reference, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(loss(full)[0], reference, atol=1e-5, rtol=1e-5)  # full-length inputs still work


def test_forward_kl_matches_its_formula_on_full_logits():
    module = healing_module([LossSpec("KLDivergence", {"temperature": 2.0})]).eval()
    batch = make_batch()
    with torch.no_grad():
        total, _ = module.healing_step(batch)
        full = full_healing_inputs(module, batch)
    log_p = torch.log_softmax(full.teacher_logits / 2.0, -1)[full.target_mask]
    log_q = torch.log_softmax(full.student_logits / 2.0, -1)[full.target_mask]
    reference = (log_p.exp() * (log_p - log_q)).sum(-1).mean() * 4.0
    torch.testing.assert_close(total, reference, atol=1e-5, rtol=1e-5)  # windowed vs full logits: as above


class AllTokenLogitNorm(HealingLoss):
    """A user loss over every non-pad position's logits: it must ask for full-length logits."""

    needs_full_logits = True

    def forward(self, inputs: HealingInputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        mask = inputs.attention_mask.bool()
        return inputs.student_logits[mask].pow(2).mean(), {}


def test_a_loss_can_ask_for_full_length_logits():
    module = healing_module([LossSpec(f"{__name__}.AllTokenLogitNorm"), CE]).eval()
    batch = make_batch()
    with torch.no_grad():
        inputs = module.healing_inputs(batch)
        total, parts = module.healing_step(batch)
    assert inputs.student_logits.shape[1] == inputs.labels.shape[1] == inputs.attention_mask.shape[1]
    assert inputs.window == inputs.attention_mask.shape[1]
    assert torch.isfinite(total) and float(parts["all_token_logit_norm"]) > 0


# ----------------------------------------------------------------------------------- 2. gradient checkpointing
def count_calls(module: torch.nn.Module) -> list[int]:
    """Forward calls of `module` (a layer's first submodule: the recomputation stops early, after the last saved
    tensor the backward needs)."""
    calls = [0]
    module.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_gradient_checkpointing_frozen_decoder_same_loss_and_projector_grads():
    batch = make_batch()
    results = {}
    for checkpointing in (False, True):
        model = tiny_speechllm(seed=0, gradient_checkpointing=checkpointing).train()
        assert not model.llm.training  # the frozen decoder stays in eval mode (no dropout)...
        calls = count_calls(model.llm.model.layers[1].input_layernorm)
        # every row whole in both runs: checkpointing turns the shared prompt prefix off (one extra layer call)
        loss, _, _ = model(batch, shared_prefix=False)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.projector.named_parameters()}
        results[checkpointing] = (loss.detach(), grads, calls[0])
        assert all(not m.training for m in model.llm.modules())  # ...and is left in eval mode
    (loss_off, grads_off, calls_off), (loss_on, grads_on, calls_on) = results[False], results[True]
    assert (calls_off, calls_on) == (1, 2)  # ...but its layers are recomputed in the backward
    torch.testing.assert_close(loss_on, loss_off, atol=1e-6, rtol=0)
    for name, grad in grads_off.items():
        assert grad.abs().max() > 0
        torch.testing.assert_close(grads_on[name], grad, atol=1e-6, rtol=1e-5)


def test_gradient_checkpointing_is_off_without_gradients():
    model = tiny_speechllm(seed=0, gradient_checkpointing=True).train()
    calls = count_calls(model.llm.model.layers[1].input_layernorm)
    with torch.no_grad():
        model(make_batch())
    assert calls[0] == 1


HIDDEN_KD = [CE, LossSpec("KLDivergence", {"temperature": 2.0}), LossSpec("HiddenStateMSE"),
             LossSpec("HiddenStateCosine", {"tokens": "all"})]


def test_gradient_checkpointing_with_lora_and_hidden_state_losses():
    batch = make_batch()
    results = {}
    for checkpointing in (False, True):
        module = healing_module(HIDDEN_KD, gradient_checkpointing=checkpointing).train()
        calls = count_calls(module.speechllm.llm.base_model.model.model.layers[-1].input_layernorm)  # original layer 3
        total, parts = module.healing_step(batch)
        total.backward()
        grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.requires_grad and p.grad is not None}
        results[checkpointing] = (total.detach(), {k: v.detach() for k, v in parts.items()}, grads, calls[0])
    (total_off, parts_off, grads_off, calls_off), (total_on, parts_on, grads_on, calls_on) = results.values()
    assert (calls_off, calls_on) == (2, 3)  # student + teacher; the student's layer again in the backward
    torch.testing.assert_close(total_on, total_off, atol=1e-6, rtol=0)
    assert parts_on.keys() == parts_off.keys() and float(parts_off["hidden_state_mse"]) > 0
    for name, value in parts_off.items():
        torch.testing.assert_close(parts_on[name], value, atol=1e-6, rtol=0)
    assert grads_on.keys() == grads_off.keys()
    assert any("lora_B" in n for n in grads_off) and any("projector" in n for n in grads_off)
    for name, grad in grads_off.items():
        torch.testing.assert_close(grads_on[name], grad, atol=1e-5, rtol=1e-4)


def test_gradient_checkpointing_backward_stops_at_the_first_adapted_layer():
    batch = make_batch(text_only=True)  # no projector: only the LoRA on (original) layer 3 trains
    grads, calls = {}, {}
    for checkpointing in (False, True):
        module = healing_module([CE], gradient_checkpointing=checkpointing).train()
        first = count_calls(module.speechllm.llm.get_base_model().model.layers[0].input_layernorm)
        total, _ = module.healing_step(batch)
        total.backward()
        grads[checkpointing] = {n: p.grad for n, p in module.named_parameters() if p.grad is not None}
        calls[checkpointing] = first[0]
    assert calls == {False: 1, True: 1}  # layer 0 is not recomputed: no gradient is wanted below layer 3
    assert grads[True].keys() == grads[False].keys() and all("lora_" in n for n in grads[True])
    for name, grad in grads[False].items():
        torch.testing.assert_close(grads[True][name], grad, atol=1e-6, rtol=1e-5)


# ------------------------------------------------------------------------------------------- 3. attention kernel
def test_attn_implementation_is_applied_and_an_unknown_one_refused(tmp_path):
    logits = {}
    for name in ("eager", "sdpa"):
        model = tiny_speechllm(seed=0, attn_implementation=name).eval()
        assert model.llm.config._attn_implementation == name
        with torch.no_grad():
            logits[name] = model(make_batch())[1].logits
    # two attention kernels: float32 logits (|x| <= 6) ~6e-6 apart; 1e-4 (~200 ulps) covers any kernel
    torch.testing.assert_close(logits["sdpa"], logits["eager"], atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match=r"model\.attn_implementation .* got 'flash'"):
        tiny_speechllm(attn_implementation="flash")
    with pytest.raises(ValueError, match=r"model\.attn_implementation .* got 'flash'"):  # before reading weights
        SpeechLLM.from_config(SpeechLLMConfig(llm_path=str(tmp_path / "missing"), attn_implementation="flash"))
    assets = save_tiny_assets(tmp_path / "assets", ["the cat"], [16000])
    loaded = SpeechLLM.from_config(SpeechLLMConfig(llm_path=str(assets["llm"]), encoder_path=str(assets["whisper"]),
                                                   attn_implementation="eager"))
    assert loaded.llm.config._attn_implementation == "eager"


# ---------------------------------------------------------------------------------------------- 4. encoder dtype
def save_whisper(path, dtype=torch.float32, **save_kwargs):
    config = tiny_whisper_config()
    config.update({"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "decoder_start_token_id": 1})
    config.suppress_tokens = config.begin_suppress_tokens = None
    torch.manual_seed(0)
    WhisperModel(config).to(dtype).save_pretrained(path, **save_kwargs)
    return path


def test_whisper_encoder_in_bf16_computes_fp32_log_mel(tmp_path):
    path = save_whisper(tmp_path / "whisper")
    fp32 = load_speech_encoder(path).eval()
    bf16 = load_speech_encoder(path, dtype=torch.bfloat16).eval()
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}
    assert {b.dtype for b in bf16.features.buffers()} == {torch.float32}
    seen = []
    bf16.features.register_forward_hook(lambda _m, _a, out: seen.append(out.dtype))
    audio, lens = 0.1 * torch.randn(2, 16000), torch.tensor([16000, 9000])
    with torch.no_grad():
        ours, ours_lens = bf16(audio.bfloat16(), lens)  # a bf16 batch, as a `bf16-true` precision makes it
        reference, reference_lens = fp32(audio, lens)
    assert seen == [torch.float32] and ours.dtype == torch.bfloat16 and torch.equal(ours_lens, reference_lens)
    torch.testing.assert_close(ours.float(), reference, atol=0.1, rtol=0.05)


def tiny_waveform_config(family: str):
    common = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, conv_dim=(16, 16),
                  conv_kernel=(10, 3), conv_stride=(5, 2), num_conv_pos_embeddings=16,
                  num_conv_pos_embedding_groups=2, feat_extract_norm="layer")
    return {"wavlm": WavLMConfig, "hubert": HubertConfig, "wav2vec2": Wav2Vec2Config}[family](**common)


@pytest.mark.parametrize("family", ["wavlm", "hubert", "wav2vec2"])
def test_waveform_encoder_in_bf16_normalises_in_fp32(family, tmp_path):
    torch.manual_seed(0)
    build_speech_encoder(tiny_waveform_config(family)).model.save_pretrained(tmp_path)
    fp32 = load_speech_encoder(tmp_path).eval()
    bf16 = load_speech_encoder(tmp_path, dtype=torch.bfloat16).eval()
    assert isinstance(bf16, WaveformSpeechEncoder) and {p.dtype for p in bf16.parameters()} == {torch.bfloat16}
    seen = []
    bf16.model.register_forward_pre_hook(lambda _m, _a, kwargs: seen.append(kwargs["input_values"]),
                                         with_kwargs=True)
    audio = (0.1 * torch.randn(2, 4000) + 0.3).bfloat16()  # an offset: the mean matters
    lens = torch.tensor([4000, 2500])
    with torch.no_grad():
        ours, _ = bf16(audio, lens)
        reference, _ = fp32(audio.float(), lens)
    valid = torch.arange(4000)[None, :] < lens[:, None]
    expected = encoders.zero_mean_unit_var(audio.float(), valid).bfloat16()
    assert torch.equal(seen[0], expected)  # normalised in float32, then cast
    assert ours.dtype == torch.bfloat16
    torch.testing.assert_close(ours.float(), reference, atol=0.15, rtol=0.05)


def test_speechllm_casts_an_injected_encoder_and_trains_in_bf16():
    model = tiny_speechllm(seed=0, encoder_dtype="bfloat16")
    assert {p.dtype for p in model.encoder.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in model.projector.parameters()} == {torch.float32}
    loss, _, _ = model.train()(make_batch())
    loss.backward()
    reference, _, _ = tiny_speechllm(seed=0).train()(make_batch())
    torch.testing.assert_close(loss.detach(), reference.detach(), atol=0.05, rtol=0)
    assert all(p.grad is not None for p in model.projector.parameters())
    with pytest.raises(ValueError, match=r"model\.encoder_dtype .* got 'fp8'"):
        tiny_speechllm(encoder_dtype="fp8")


def test_from_config_loads_the_encoder_in_encoder_dtype(tmp_path):
    assets = save_tiny_assets(tmp_path, ["the cat"], [16000])
    model = SpeechLLM.from_config(SpeechLLMConfig(llm_path=str(assets["llm"]), encoder_path=str(assets["whisper"]),
                                                  encoder_dtype="bfloat16"))
    assert {p.dtype for p in model.encoder.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in model.llm.parameters()} == {torch.float32}


# ------------------------------------------------------------------------------------------ 5. low-memory loading
def old_whisper_loader(path) -> WhisperSpeechEncoder:
    """The loader before issue 10: a randomly initialised fp32 encoder, every tensor of every file read."""
    from transformers import AutoConfig

    module = WhisperSpeechEncoder(AutoConfig.from_pretrained(path))
    full = {}
    for file in sorted(path.glob("*.safetensors")):
        full.update(load_file(str(file)))
    for prefix in ("model.encoder.", "encoder."):
        state = {k[len(prefix):]: v for k, v in full.items() if k.startswith(prefix)}
        if state:
            break
    module.encoder.load_state_dict(state, strict=False)
    return module


class RecordingSafeOpen:
    """`safe_open` that records every tensor read."""

    def __init__(self, real) -> None:
        self.real, self.read, self.opened = real, [], 0

    def __call__(self, *args, **kwargs):
        recorder = self
        self.opened += 1

        class Handle:
            def __init__(self) -> None:
                self.handle = recorder.real(*args, **kwargs)

            def __enter__(self):
                self.inner = self.handle.__enter__()
                return self

            def __exit__(self, *exc):
                return self.handle.__exit__(*exc)

            def keys(self):
                return self.inner.keys()

            def get_tensor(self, key):
                recorder.read.append(key)
                return self.inner.get_tensor(key)

        return Handle()


@pytest.mark.parametrize("stored", ["float32", "float16", "float16-remapped", "sharded"])
def test_whisper_loader_reads_only_the_encoder_and_equals_the_old_loader(stored, tmp_path, monkeypatch):
    dtype = torch.float16 if stored.startswith("float16") else torch.float32
    path = save_whisper(tmp_path / "whisper", dtype, **({"max_shard_size": "40KB"} if stored == "sharded" else {}))
    files = sorted(path.glob("*.safetensors"))
    assert (len(files) > 1) == (stored == "sharded")
    recorder = RecordingSafeOpen(encoders.safe_open)
    monkeypatch.setattr(encoders, "safe_open", recorder)
    if stored == "float16-remapped":  # the file re-opened after every cast tensor (as after every 256 MiB)
        monkeypatch.setattr(encoders, "_REMAP_BYTES", 1)
    new = load_speech_encoder(path)
    if stored == "float16-remapped":
        assert recorder.opened == 1 + len(new.encoder.state_dict())  # the key scan, then once per tensor
    old = old_whisper_loader(path)
    ours, theirs = new.state_dict(), old.state_dict()
    assert ours.keys() == theirs.keys()
    for key, value in theirs.items():
        assert ours[key].dtype == value.dtype == torch.float32 and torch.equal(ours[key], value), key
    assert recorder.read and all(key.startswith("encoder.") for key in recorder.read)  # no decoder tensor read
    assert len(recorder.read) == len(new.encoder.state_dict())
    assert not any(t.is_meta for t in (*new.parameters(), *new.buffers()))
    if stored == "sharded":
        weight_map = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
        assert any(k.startswith("decoder.") for k in weight_map)


def test_whisper_loader_names_missing_encoder_weights(tmp_path):
    path = save_whisper(tmp_path / "whisper")
    state = load_file(str(path / "model.safetensors"))
    from safetensors.torch import save_file

    save_file({k: v for k, v in state.items() if "layers.1." not in k}, str(path / "model.safetensors"))
    with pytest.raises(encoders.EncoderError, match="missing from the checkpoint: .*layers.1"):
        load_speech_encoder(path)


# -------------------------------------------------------------------------------------------------- 6. pinning
def cached_batch() -> SpeechBatch:
    batch = make_batch()
    batch.encoder_frames, batch.encoder_frame_lens = torch.randn(3, 7, 4), torch.tensor([7, 5, 6])
    batch.encoder_key = "k"
    return batch


def assert_same_batch(ours: SpeechBatch, batch: SpeechBatch) -> None:
    assert isinstance(ours, SpeechBatch) and ours.ids == batch.ids and ours.texts == batch.texts
    for name in ("audio", "audio_lens", "encoder_frames", "encoder_frame_lens"):
        assert torch.equal(getattr(ours, name), getattr(batch, name)), name


def test_pin_memory_keeps_the_batch_without_an_accelerator(monkeypatch):
    monkeypatch.setattr(torch.accelerator, "is_available", lambda: False)
    batch = cached_batch()
    assert_same_batch(dataloader_pin_memory(batch), batch)


def test_pin_memory_pins_every_tensor_through_the_dataloader_hook(monkeypatch):
    pinned = []

    def fake_pin(tensor, *args, **kwargs):  # CPU-only machines cannot page-lock memory
        pinned.append(tensor.data_ptr())
        return tensor.clone()

    monkeypatch.setattr(torch.accelerator, "is_available", lambda: True)
    monkeypatch.setattr(torch.Tensor, "pin_memory", fake_pin)
    batch = cached_batch()
    ours = dataloader_pin_memory(batch)  # what DataLoader(pin_memory=True) calls on each batch
    assert_same_batch(ours, batch)
    assert sorted(pinned) == sorted(getattr(batch, n).data_ptr()
                                    for n in ("audio", "audio_lens", "encoder_frames", "encoder_frame_lens"))
    assert ours.audio is not batch.audio and ours.encoder_key == "k"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinning needs CUDA")
def test_pin_memory_really_pins_with_cuda():
    ours = cached_batch().pin_memory()
    assert ours.audio.is_pinned() and ours.audio_lens.is_pinned() and ours.encoder_frames.is_pinned()
