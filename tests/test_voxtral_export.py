"""`export --format voxtral`: an assembled SpeechLLM written as a stock VoxtralForConditionalGeneration directory.

A tiny Voxtral-shaped model (Whisper encoder with encoder_ffn_dim = 4 x d_model, a 4-frame bias-free projector as wide
as the decoder, the whole window as speech positions) is trained 2 steps and pruned through the CLI, exported, and
reloaded by stock transformers, fed by its own feature extractor and tokenizer: its logits must be the framework's.
"""
from __future__ import annotations

import json

import pytest
import torch
import transformers
from transformers import WhisperModel

from lightning_speechllm import cli
from lightning_speechllm.__main__ import main as cli_main
from lightning_speechllm.checkpoints import load_module
from lightning_speechllm.model.encoders import WhisperSpeechEncoder
from lightning_speechllm.model.projector import ProjectorConfig
from lightning_speechllm.model.prompts import SPEECH_PLACEHOLDER
from lightning_speechllm.model.segments import Segment
from lightning_speechllm.model.speechllm import LoraConfig, SpeechLLM, SpeechLLMConfig
from lightning_speechllm.model.voxtral_layout import VoxtralExportError, save_voxtral, voxtral_blockers
from tests.test_speechllm import make_batch
from tests.tiny_speechllm import save_tiny_assets, tiny_llama, tiny_tokenizer, tiny_whisper_config

TEXTS = ["the cat sat on the mat", "one two three", "hello world", "a quick brown fox"]
SPARE_ROWS_VOCAB = 368
"""The tiny tokenizer has 360 tokens and no spare special one: embedding rows past them take the audio placeholder
(as Qwen2.5's 151,936 rows past its 151,665 tokens would)."""


def _voxtral_whisper():
    config = tiny_whisper_config()
    config.encoder_ffn_dim = 4 * config.d_model  # Voxtral stacks intermediate_size // hidden_size frames
    return config


def _voxtral_shaped(seed: int = 0, **overrides) -> SpeechLLM:
    torch.manual_seed(seed)
    config = SpeechLLMConfig(llm_path="<memory>", encoder_path="<memory>", encoder_whole_window=True,
                             projector=ProjectorConfig(downsample=4, hidden_dim=48, bias=False))
    for key, value in overrides.items():
        setattr(config, key, value)
    return SpeechLLM(tiny_llama(vocab_size=SPARE_ROWS_VOCAB, seed=seed), tiny_tokenizer(),
                     WhisperSpeechEncoder(_voxtral_whisper()), config)


def _stock_logits(directory, speechllm: SpeechLLM, batch) -> tuple[list[torch.Tensor], torch.Tensor, object]:
    """The stock class's logits, one utterance at a time, its input ids built from the exported tokenizer and the
    placeholder that pruning.json names, its features from the exported WhisperFeatureExtractor."""
    info = json.loads((directory / "pruning.json").read_text())
    stock = transformers.VoxtralForConditionalGeneration.from_pretrained(directory, attn_implementation="eager").eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    features = transformers.WhisperFeatureExtractor.from_pretrained(directory)
    prefix, suffix = info["prompt"].split(SPEECH_PLACEHOLDER)
    inputs = speechllm.build_inputs(batch, with_targets=False)
    rows = []
    for row, n in enumerate(batch.audio_lens.tolist()):
        speech = int((inputs.segment_ids[row] == Segment.SPEECH).sum())
        ids = (tokenizer(prefix, add_special_tokens=False).input_ids + [info["audio_token_id"]] * speech
               + tokenizer(suffix, add_special_tokens=False).input_ids)
        mel = features(batch.audio[row, :n].numpy(), sampling_rate=16000, return_tensors="pt").input_features
        with torch.no_grad():
            rows.append(stock(input_ids=torch.tensor([ids]), input_features=mel).logits[0])
    return rows, inputs, stock


def test_a_voxtral_shaped_model_trains_prunes_and_exports_through_the_cli(tmp_path, capsys):
    assets = save_tiny_assets(tmp_path / "assets", TEXTS, [16000, 9600, 12800, 8000])
    whisper = _voxtral_whisper()
    whisper.update({"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "decoder_start_token_id": 1})
    whisper.suppress_tokens = whisper.begin_suppress_tokens = None
    WhisperModel(whisper).save_pretrained(assets["whisper"])
    tiny_llama(vocab_size=SPARE_ROWS_VOCAB).save_pretrained(assets["llm"])
    root = tmp_path / "run"
    root.mkdir()
    (root / "fit.yaml").write_text("seed_everything: 0\n")
    assert cli.fit(["--config", str(root / "fit.yaml"), "--model.model.llm_path", str(assets["llm"]),
                    "--model.model.encoder_path", str(assets["whisper"]), "--model.model.encoder_whole_window", "true",
                    "--model.model.projector.downsample", "4", "--model.model.projector.hidden_dim", "48",
                    "--model.model.projector.bias", "false", "--model.model.removed_layers", "[1, 2]",
                    "--model.decoding.max_new_tokens", "3", "--data.train", str(assets["manifest"]),
                    "--data.max_duration", "4", "--trainer.accelerator", "cpu", "--trainer.max_steps", "2",
                    "--trainer.limit_val_batches", "0", "--trainer.default_root_dir", str(root),
                    "--trainer.enable_progress_bar", "false", "--trainer.precision", "32-true"]) == 0
    checkpoint = next(root.rglob("*.ckpt"))
    assert cli_main(["export", "--ckpt", str(checkpoint), "--out", str(tmp_path / "out"), "--format", "voxtral"]) == 0
    out = tmp_path / "out" / "voxtral"
    assert not (tmp_path / "out" / "decoder").exists() and (out / "preprocessor_config.json").is_file()
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "voxtral" and config["text_config"]["num_hidden_layers"] == 2

    speechllm = load_module(checkpoint).speechllm.eval()
    batch = make_batch(seconds=(1.0, 0.6, 1.4))
    theirs, inputs, _ = _stock_logits(out, speechllm, batch)
    with torch.no_grad():
        ours = speechllm.run_decoder(inputs).logits
    for row, stock_row in enumerate(theirs):
        ours_row = ours[row][inputs.attention_mask[row].bool()]
        assert ours_row.shape == stock_row.shape and ours_row.shape[0] > 50  # 50 positions: the whole 4 s window
        torch.testing.assert_close(stock_row, ours_row, atol=1e-4, rtol=0)  # float32, their log-mel vs ours


def test_the_export_merges_lora_and_generates_like_the_framework(tmp_path):
    speechllm = _voxtral_shaped()
    with torch.no_grad():  # weights large enough that a wrong position or feature changes the tokens
        for param in speechllm.projector.parameters():
            param.normal_(0.0, 0.3)
    speechllm.layer_mask.remove_layers([2])
    speechllm.add_lora(LoraConfig(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, param in speechllm.llm.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.2)
    out = save_voxtral(speechllm.eval(), tmp_path / "voxtral")
    batch = make_batch(seconds=(1.0, 0.6))
    theirs, inputs, stock = _stock_logits(out, speechllm, batch)
    with torch.no_grad():
        ours = speechllm.run_decoder(inputs).logits
    for row, stock_row in enumerate(theirs):
        torch.testing.assert_close(stock_row, ours[row][inputs.attention_mask[row].bool()], atol=2e-4, rtol=0)
    assert len(stock.model.language_model.layers) == 3


def test_models_without_a_voxtral_form_are_refused_with_every_reason(tmp_path):
    torch.manual_seed(0)
    plain = SpeechLLM(tiny_llama(), tiny_tokenizer(), WhisperSpeechEncoder(tiny_whisper_config()),
                      SpeechLLMConfig(llm_path="<memory>", encoder_path="<memory>",
                                      projector=ProjectorConfig(kind="conv1d", downsample=3, hidden_dim=64)))
    reasons = " | ".join(voxtral_blockers(plain))
    for words in ("kind 'conv1d'", "downsample 3: Voxtral stacks encoder_ffn_dim // d_model = 2", "biases",
                  "hidden_dim 64", "all 375 positions"):
        assert words in reasons
    with pytest.raises(VoxtralExportError, match="no Voxtral form") as error:
        save_voxtral(plain, tmp_path / "out")
    assert "biases" in str(error.value) and not (tmp_path / "out").exists()
    assert voxtral_blockers(_voxtral_shaped()) == []
    with pytest.raises(ValueError, match="encoder_whole_window needs a Whisper encoder on its 30 s window"):
        _voxtral_shaped(encoder_window_seconds=2.0)
