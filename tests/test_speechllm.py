"""SpeechLLM: encoders, projector, prompt splice, labels, generation (batched == one by one), LoRA, checkpoints."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import WavLMConfig, WhisperFeatureExtractor

from lightning_speechllm.data.batch import SpeechBatch
from lightning_speechllm.model.encoders import (
    EncoderError,
    WhisperLogMel,
    build_speech_encoder,
    load_speech_encoder,
)
from lightning_speechllm.model.projector import Projector, ProjectorConfig
from lightning_speechllm.model.prompts import PromptBuilder, PromptConfig, PromptError
from lightning_speechllm.model.segments import Segment
from lightning_speechllm.model.speechllm import IGNORE_INDEX, LoraConfig
from tests.tiny_speechllm import tiny_speechllm, tiny_tokenizer, tiny_whisper_config


def make_batch(seconds=(1.0, 0.6, 1.4), texts=None, tasks=None, tgt_langs=None, text_only=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    lens = torch.tensor([int(s * 16000) for s in seconds])
    audio = torch.zeros(len(seconds), int(lens.max()))
    for i, n in enumerate(lens):
        audio[i, :n] = 0.1 * torch.randn(int(n), generator=gen)
    count = len(seconds)
    texts = texts or ["the cat sat on the mat", "one two three", "hello world"][:count]
    return SpeechBatch(ids=[f"u{i}" for i in range(count)], audio=audio, audio_lens=lens, texts=texts,
                       tasks=tasks or ["asr"] * count, transcripts=list(texts),
                       tgt_langs=tgt_langs or [None] * count, text_only=text_only)


def test_whisper_log_mel_matches_hf_feature_extractor():
    audio = np.random.default_rng(0).normal(scale=0.1, size=16000 * 2).astype(np.float32)
    reference = WhisperFeatureExtractor(feature_size=80)(audio, sampling_rate=16000, return_tensors="np")
    padded = torch.nn.functional.pad(torch.from_numpy(audio)[None], (0, 480000 - audio.size))
    ours = WhisperLogMel(80)(padded)
    assert ours.shape == reference.input_features.shape == (1, 80, 3000)
    np.testing.assert_allclose(ours.numpy(), reference.input_features, atol=2e-4)


def test_whisper_encoder_keeps_frames_covering_audio():
    encoder = build_speech_encoder(tiny_whisper_config()).eval()
    lens = torch.tensor([16000, 8000, 321])
    feats, frame_lens = encoder(torch.randn(3, 16000), lens)
    assert frame_lens.tolist() == [50, 25, 2]  # 100 mel frames per second, conv stride 2
    assert feats.shape == (3, 50, 32)


def test_whisper_encoder_refuses_audio_longer_than_window():
    encoder = build_speech_encoder(tiny_whisper_config(window_seconds=1))
    with pytest.raises(EncoderError, match="exceeds Whisper's 1.0 s window"):
        encoder(torch.randn(1, 20000), torch.tensor([20000]))


def test_whisper_encoder_padding_does_not_change_valid_frames():
    encoder = build_speech_encoder(tiny_whisper_config()).eval()
    audio = torch.randn(1, 12000)
    alone, _ = encoder(audio, torch.tensor([12000]))
    padded, _ = encoder(torch.nn.functional.pad(audio, (0, 4000)), torch.tensor([12000]))
    torch.testing.assert_close(alone, padded[:, : alone.shape[1]], atol=1e-5, rtol=0)


def test_wavlm_encoder_lengths_and_normalisation_ignore_padding(tmp_path):
    config = WavLMConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                         conv_dim=(16, 16), conv_kernel=(10, 3), conv_stride=(5, 2), num_conv_pos_embeddings=16,
                         num_conv_pos_embedding_groups=2, feat_extract_norm="layer")
    torch.manual_seed(0)
    encoder = build_speech_encoder(config).eval()
    encoder.model.save_pretrained(tmp_path)
    loaded = load_speech_encoder(tmp_path).eval()
    audio = torch.randn(2, 4000)
    lens = torch.tensor([4000, 2500])
    feats, frame_lens = loaded(audio, lens)
    assert frame_lens.tolist() == encoder.model._get_feat_extract_output_lengths(lens).tolist()
    alone, _ = loaded(audio[1:, :2500], lens[1:])
    torch.testing.assert_close(feats[1, : frame_lens[1]], alone[0], atol=1e-4, rtol=1e-4)


def test_unknown_encoder_type_is_named(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(EncoderError, match="'bert'"):
        load_speech_encoder(tmp_path)


@pytest.mark.parametrize("kind", ["mlp", "conv1d"])
def test_projector_downsamples_with_ceiling_lengths(kind):
    projector = Projector(8, 16, ProjectorConfig(kind=kind, downsample=5, hidden_dim=12))
    out, lens = projector(torch.randn(2, 23, 8), torch.tensor([23, 11]))
    assert out.shape == (2, 5, 16)
    assert lens.tolist() == [5, 3]


def test_projector_mlp_stacks_consecutive_frames():
    projector = Projector(2, 3, ProjectorConfig(downsample=2, hidden_dim=4))
    frames = torch.arange(8.0).reshape(1, 4, 2)
    first_layer = projector.net[0]
    out, _ = projector(frames, torch.tensor([4]))
    expected_hidden = first_layer(torch.tensor([[0.0, 1, 2, 3], [4, 5, 6, 7]]))
    expected = projector.net[2](projector.net[1](expected_hidden))
    torch.testing.assert_close(out[0], expected)


def test_projector_frame_masks_zero_frames_in_training_only():
    config = ProjectorConfig(downsample=1, hidden_dim=4, time_masks=2, time_mask_frames=6, feature_masks=1,
                             feature_mask_width=3)
    projector = Projector(8, 3, config)
    frames, lens = torch.randn(4, 30, 8) + 5.0, torch.tensor([30, 30, 20, 30])
    seen: list[torch.Tensor] = []
    projector.net[0].register_forward_hook(lambda module, args, out: seen.append(args[0].detach()))
    projector.eval()
    projector(frames, lens)
    torch.testing.assert_close(seen[-1][:, :20], frames[:, :20])  # eval: untouched
    projector.train()
    torch.manual_seed(0)
    projector(frames, lens)
    masked = seen[-1] == 0
    assert masked.any() and (masked | (seen[-1] == frames)).all()  # only zeros are put in
    whole_frames = masked.all(dim=-1)[:, :20]  # a time mask: every channel of a frame
    whole_channels = masked[:, :20].all(dim=1)  # a feature mask: a channel over every frame
    assert whole_frames.sum(dim=1).max() <= 12 and whole_channels.sum(dim=1).max() <= 3
    assert len({tuple(row.tolist()) for row in whole_channels}) > 1  # drawn per utterance
    with pytest.raises(ValueError, match="time_masks must be >= 0, got -1"):
        Projector(8, 3, ProjectorConfig(time_masks=-1))


def test_prompt_uses_chat_template_and_targets_end_with_eos():
    tokenizer = tiny_tokenizer(chat=True)
    builder = PromptBuilder(tokenizer)
    assert builder.uses_chat_template
    text = builder.render("asr", None)
    assert text.startswith("<|im_start|>user\n<|speech|>\nTranscribe the audio.<|im_end|>")
    assert text.endswith("<|im_start|>assistant\n")
    sample = builder.encode("asr", None, "the cat")
    assert sample.target[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(sample.target[:-1]) == "the cat"


def test_instruction_first_moves_the_instruction_into_the_prefix():
    tokenizer = tiny_tokenizer(chat=True)
    after = PromptBuilder(tokenizer)
    first = PromptBuilder(tokenizer, PromptConfig(instruction_first=True))
    assert first.render("asr", None).startswith("<|im_start|>user\nTranscribe the audio.\n<|speech|><|im_end|>")
    late, early = after.pieces("asr", None), first.pieces("asr", None)
    # The same tokens in all; the instruction (and its newline) moves from after the speech to before it.
    assert len(early.suffix) < len(late.suffix)
    assert len(early.prefix) + len(early.suffix) == len(late.prefix) + len(late.suffix)
    assert tokenizer.decode(list(early.suffix)) == "<|im_end|>\n<|im_start|>assistant\n"


def test_chat_target_ends_with_the_templates_end_of_turn_token_when_eos_differs():
    # Qwen2.5-base style: the chat template closes turns with <|im_end|>, the tokenizer's EOS is <|endoftext|>.
    tokenizer = tiny_tokenizer(chat=True)
    tokenizer.eos_token = "<|endoftext|>"
    builder = PromptBuilder(tokenizer)
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert builder.end_token_id == end != tokenizer.eos_token_id
    assert builder.encode("asr", None, "the cat").target[-1] == end
    assert PromptBuilder(tokenizer, PromptConfig(use_chat_template=False)).end_token_id == tokenizer.eos_token_id
    model = tiny_speechllm()
    model.prompts = builder
    assert end in model._stop_token_ids() and tokenizer.eos_token_id in model._stop_token_ids()


def test_prompt_plain_template_and_translation_language():
    builder = PromptBuilder(tiny_tokenizer(chat=False), PromptConfig())
    assert not builder.uses_chat_template
    assert builder.render("ast", "fr") == "<|speech|>\nTranslate the audio into French.\nAnswer:"
    with pytest.raises(PromptError, match="needs a target language"):
        builder.render("ast", None)
    with pytest.raises(PromptError, match="unknown task 'qa'"):
        builder.render("qa", None)


def test_splice_puts_speech_where_placeholder_was_and_masks_labels():
    model = tiny_speechllm().eval()
    batch = make_batch()
    inputs = model.build_inputs(batch)
    speech, speech_lens = model.encode_speech(batch.audio, batch.audio_lens)
    builder = model.prompts
    for row in range(len(batch)):
        sample = builder.encode("asr", None, batch.texts[row])
        seg = inputs.segment_ids[row]
        n_pad = int((seg == Segment.PAD).sum())
        n_speech = int(speech_lens[row])
        expected = ([Segment.PAD] * n_pad + [Segment.PROMPT] * len(sample.prefix) + [Segment.SPEECH] * n_speech
                    + [Segment.PROMPT] * len(sample.suffix) + [Segment.TARGET] * len(sample.target))
        assert seg.tolist() == expected
        torch.testing.assert_close(inputs.inputs_embeds[row, seg == Segment.SPEECH], speech[row, :n_speech])
        prefix_embeds = model.llm.get_input_embeddings()(torch.tensor(sample.prefix))
        torch.testing.assert_close(inputs.inputs_embeds[row, n_pad: n_pad + len(sample.prefix)], prefix_embeds)
        labels = inputs.labels[row]
        assert labels[seg != Segment.TARGET].eq(IGNORE_INDEX).all()
        assert labels[seg == Segment.TARGET].tolist() == sample.target
        assert inputs.attention_mask[row].tolist() == [0] * n_pad + [1] * (len(seg) - n_pad)
        assert inputs.position_ids[row, n_pad:].tolist() == list(range(len(seg) - n_pad))


def test_text_only_mode_feeds_transcript_embeddings():
    model = tiny_speechllm().eval()
    batch = make_batch(text_only=True)
    batch.audio = torch.zeros(len(batch), 0)
    inputs = model.build_inputs(batch)
    embed = model.llm.get_input_embeddings()
    for row, transcript in enumerate(batch.transcripts):
        ids = model.tokenizer(transcript, add_special_tokens=False).input_ids
        torch.testing.assert_close(inputs.inputs_embeds[row, inputs.segment_ids[row] == Segment.SPEECH],
                                   embed(torch.tensor(ids)))


def test_loss_is_mean_cross_entropy_over_target_tokens():
    model = tiny_speechllm().eval()
    batch = make_batch()
    loss, output, inputs = model(batch)
    labels = inputs.labels
    with torch.no_grad():
        logits = model.llm(inputs_embeds=inputs.inputs_embeds, attention_mask=inputs.attention_mask,
                           position_ids=inputs.position_ids).logits
    # The LM head runs on the target window only: the longest target plus the position predicting its first token.
    window = int((labels != IGNORE_INDEX).sum(1).max()) + 1
    assert output.logits.shape[1] == window < labels.shape[1]
    torch.testing.assert_close(output.logits, logits[:, -window:])
    total, count = 0.0, 0
    for row in range(len(batch)):
        for t in range(1, labels.shape[1]):
            if labels[row, t] != IGNORE_INDEX:
                total += -torch.log_softmax(logits[row, t - 1].double(), -1)[labels[row, t]].item()
                count += 1
    assert loss.item() == pytest.approx(total / count, rel=1e-5)


@pytest.mark.parametrize("num_beams", [1, 3])
def test_batched_generation_equals_one_by_one(num_beams):
    model = tiny_speechllm(seed=3).eval()
    batch = make_batch(seconds=(1.2, 0.4, 0.8), tasks=["asr", "ast", "asr"], tgt_langs=[None, "fr", None])
    batched = model.generate(batch, max_new_tokens=8, num_beams=num_beams)
    single = [model.generate(batch.subset([i]), max_new_tokens=8, num_beams=num_beams)[0] for i in range(len(batch))]
    assert batched == single
    assert any(batched), "a random tiny model should still emit some tokens"


def test_generation_with_cache_equals_without_cache():
    model = tiny_speechllm(seed=1).eval()
    batch = make_batch()
    inputs = model.build_inputs(batch, with_targets=False)
    kwargs = dict(inputs_embeds=inputs.inputs_embeds, attention_mask=inputs.attention_mask, max_new_tokens=8,
                  do_sample=False, pad_token_id=model.tokenizer.pad_token_id)
    cached = model.llm.generate(use_cache=True, **kwargs)
    uncached = model.llm.generate(use_cache=False, **kwargs)
    assert cached.tolist() == uncached.tolist()


def test_freezing_policy_and_lora_on_chosen_layers():
    model = tiny_speechllm(lora=LoraConfig(layers=[2], r=4, alpha=4, target_modules=["q_proj", "v_proj"]))
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert any(name.startswith("projector.") for name in trainable)
    lora_names = [name for name in trainable if "lora_" in name]
    assert lora_names and all(".layers.2." in name for name in lora_names)
    assert not any(name.startswith("encoder.") for name in trainable)
    assert not any("lora_" not in name and name.startswith("llm.") for name in trainable)
    with pytest.raises(ValueError, match=r"LoRA layers \[9\] out of range"):
        tiny_speechllm(lora=LoraConfig(layers=[9]))


def test_trainable_state_roundtrip_under_mask_uses_full_layout():
    model = tiny_speechllm(lora=LoraConfig(layers=[3], r=4, alpha=4, target_modules=["q_proj"]))
    model.set_active_layers([0, 1, 3])
    state = model.trainable_state_dict()
    assert any(".layers.3." in k for k in state), "keys must use the original numbering even under a mask"
    other = tiny_speechllm(seed=5, lora=LoraConfig(layers=[3], r=4, alpha=4, target_modules=["q_proj"]))
    other.load_trainable_state_dict(state)
    for key, value in other.trainable_state_dict().items():
        torch.testing.assert_close(value, state[key])
    with pytest.raises(KeyError, match="missing"):
        other.load_trainable_state_dict({k: v for k, v in state.items() if "lora_" not in k})


def test_batch_subset_trims_audio_and_text_only_view():
    batch = make_batch(seconds=(1.0, 0.5, 0.25), tgt_langs=[None, "fr", None])
    part = batch.subset([1, 2])
    assert part.ids == ["u1", "u2"] and part.tgt_langs == ["fr", None]
    assert part.audio.shape == (2, 8000)
    torch.testing.assert_close(part.audio[1, :4000], batch.audio[2, :4000])
    text = batch.as_text_only()
    assert text.text_only and text.audio.shape == (3, 0) and text.transcripts == batch.transcripts


def test_projector_ignores_frames_past_each_utterance():
    """Encoder frames beyond an utterance's length (padding) must not change its projected speech."""
    projector = Projector(4, 6, ProjectorConfig(downsample=3, hidden_dim=8))
    frames = torch.randn(1, 7, 4)
    garbage = frames.clone()
    garbage[:, 5:] = 100.0
    out, lens = projector(frames, torch.tensor([5]))
    out_garbage, _ = projector(garbage, torch.tensor([5]))
    assert lens.tolist() == [2]
    torch.testing.assert_close(out[:, :2], out_garbage[:, :2])


def test_whisper_short_window_reproduces_hf_on_a_full_window_and_keeps_frame_lengths():
    encoder = build_speech_encoder(tiny_whisper_config(window_seconds=4)).eval()
    audio, lens = torch.randn(2, 16000), torch.tensor([16000, 9000])
    full, full_lens = encoder(audio, lens)
    with torch.no_grad():
        mel = encoder.features(torch.nn.functional.pad(audio, (0, encoder.full_window_samples - 16000)))
        torch.testing.assert_close(encoder._encode_short_window(mel), encoder.encoder(input_features=mel).last_hidden_state)
    encoder.set_window(1.5)
    short, short_lens = encoder(audio, lens)
    assert short_lens.tolist() == full_lens.tolist() == [50, 29] and short.shape == full.shape
    with pytest.raises(EncoderError, match="exceeds Whisper's 1.5 s window"):
        encoder(torch.randn(1, 40000), torch.tensor([40000]))
    with pytest.raises(EncoderError, match="window_seconds must be in"):
        encoder.set_window(9)


def test_whisper_window_per_utterance_matches_a_pinned_window_of_its_size_and_refuses_past_30s_equivalent():
    """With a window step, each utterance is encoded in the smallest multiple of the step that holds it, as a window
    pinned to that size would: its frames do not depend on the other utterances of the batch."""
    encoder = build_speech_encoder(tiny_whisper_config(window_seconds=4)).eval()
    audio, lens = torch.randn(3, 26000), torch.tensor([8000, 26000, 16000])
    audio[0, 8000:] = audio[2, 16000:] = 0.0
    encoder.set_window_step(1.0)
    assert encoder.windows(lens).tolist() == [16000, 32000, 16000]
    with torch.no_grad():
        batched, batched_lens = encoder(audio, lens)
        expected = {}
        for seconds, rows in ((1.0, [0, 2]), (2.0, [1])):
            encoder.set_window(seconds)
            expected[seconds] = encoder(audio[rows, : int(lens[rows].max())], lens[rows])[0]
    assert batched_lens.tolist() == [25, 82, 50]
    torch.testing.assert_close(batched[0, :25], expected[1.0][0, :25])
    torch.testing.assert_close(batched[2, :50], expected[1.0][1, :50])
    torch.testing.assert_close(batched[1, :82], expected[2.0][0, :82])
    encoder.set_window_step(1.0)
    with pytest.raises(EncoderError, match=r"audio of 5.00 s exceeds Whisper's 4.0 s window"):
        encoder(torch.randn(1, 80000), torch.tensor([80000]))


def test_speechllm_refuses_a_pinned_window_together_with_a_window_step():
    with pytest.raises(ValueError, match="encoder_window_seconds .* encoder_window_step_seconds .* not both"):
        tiny_speechllm(encoder_window_seconds=2.0, encoder_window_step_seconds=1.0)


def test_whisper_features_stay_float32_when_the_encoder_is_cast_to_bfloat16():
    """bf16-true casts every buffer; the log-mel filterbank must stay float32 and the features match fp32 ones."""
    encoder = build_speech_encoder(tiny_whisper_config(window_seconds=4)).eval()
    audio, lens = torch.randn(2, 16000), torch.tensor([16000, 9000])
    with torch.no_grad():
        reference = encoder.features(torch.nn.functional.pad(audio, (0, encoder.full_window_samples - 16000)))
        encoder.to(torch.bfloat16)
        assert encoder.encoder.conv1.weight.dtype == torch.bfloat16
        assert all(b.dtype == torch.float32 for b in encoder.features.buffers())
        features = encoder.features(torch.nn.functional.pad(audio, (0, encoder.full_window_samples - 16000)))
        frames, frame_lens = encoder(audio, lens)
    torch.testing.assert_close(features, reference)
    assert frames.dtype == torch.bfloat16 and frame_lens.tolist() == [50, 29]
