"""Released SpeechLLMs (`model.pretrained`) through the CLI: measure -> prune -> heal -> export -> stock reload.

A tiny random model of each supported family is saved with `save_pretrained`; every step runs the commands users
type, and the exported directory is reloaded by stock transformers and compared with the framework's logits.
"""
from __future__ import annotations

import json
from operator import attrgetter
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import transformers
import yaml

from lightning_speechllm.__main__ import main as cli
from lightning_speechllm.checkpoints import load_module
from lightning_speechllm.model.released import ReleasedModelError, detect_family
from lightning_speechllm.model.segments import Segment
from lightning_speechllm.model.speechllm import SpeechLLM, SpeechLLMConfig
from lightning_speechllm.pruning.plan import PruningPlan
from lightning_speechllm.redundancy.analysis import RedundancyResult
from tests.test_speechllm import make_batch
from tests.tiny_released import FAMILIES, save_tiny_released

TEXTS = ["the cat sat on the mat", "one two three", "hello world", "a quick brown fox", "transcribe the audio",
         "one two three four five"]
LORA = {"r": 4, "alpha": 4, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}


def _make_assets(root: Path, family: str) -> dict[str, Path]:
    save_tiny_released(family, root / family)
    rng = np.random.default_rng(0)
    rows = []
    for i, text in enumerate(TEXTS):
        sf.write(root / f"u{i}.wav", (0.1 * rng.standard_normal(8000 + 2000 * (i % 3))).astype(np.float32), 16000)
        rows.append({"id": f"u{i}", "audio": f"u{i}.wav", "text": text, "task": "asr"})
    (root / "dev.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"root": root, "model": root / family, "manifest": root / "dev.jsonl", "family": family}


@pytest.fixture(scope="module", params=FAMILIES)
def assets(request, tmp_path_factory) -> dict[str, Path]:
    """A tiny model of each supported family, and a 6-utterance manifest."""
    return _make_assets(tmp_path_factory.mktemp(request.param), request.param)


@pytest.fixture(scope="module")
def qwen2_assets(tmp_path_factory) -> dict[str, Path]:
    """The tiny Qwen2-Audio alone, for the checks that do not depend on the family."""
    return _make_assets(tmp_path_factory.mktemp("qwen2_audio_only"), "qwen2_audio")


def _stock_inputs(speechllm: SpeechLLM, stock, batch, with_targets: bool = True) -> tuple[dict, object]:
    """What the stock class reads for `batch` (its audio token at the speech positions, its own features) and the
    framework's inputs for the same batch; without targets, the generation prompts."""
    inputs = speechllm.build_inputs(batch, with_targets=with_targets)
    samples = [speechllm.prompts.encode(task, None, text if with_targets else None)
               for task, text in zip(batch.tasks, batch.texts)]
    width = inputs.segment_ids.shape[1]
    audio_id = speechllm.tokenizer.convert_tokens_to_ids(speechllm.released.audio_token)
    ids = torch.full((len(samples), width), speechllm.tokenizer.pad_token_id)
    for row, sample in enumerate(samples):
        speech = int((inputs.segment_ids[row] == Segment.SPEECH).sum())
        tokens = sample.prefix + [audio_id] * speech + sample.suffix + sample.target
        ids[row, width - len(tokens):] = torch.tensor(tokens)
    waves = [batch.audio[i, :n].numpy() for i, n in enumerate(batch.audio_lens.tolist())]
    family = speechllm.released.family
    common = {"input_ids": ids, "attention_mask": inputs.attention_mask, "position_ids": inputs.position_ids}
    if family.decoder_embedding:  # Phi-4-multimodal: its own feature names and speech-position counts
        features = speechllm.encoder.feature_extractor(waves, sampling_rate=16000, return_tensors="pt")
        return {**common, **features}, inputs
    if family.features == "utterance":  # Granite Speech: its extractor pads the batch and masks the positions
        features = speechllm.encoder.feature_extractor([torch.from_numpy(w) for w in waves])
        mask = features.input_features_mask
    else:
        features = speechllm.encoder.feature_extractor(waves, sampling_rate=16000, padding="max_length",
                                                       return_attention_mask=True, return_tensors="pt")
        mask = features.attention_mask
    stock_inputs = {**common, "input_features": features.input_features}
    if family.feature_mask_argument:
        stock_inputs[family.feature_mask_argument] = mask
    return stock_inputs, inputs


def _stock(directory: Path, speechllm: SpeechLLM):
    stock = getattr(transformers, speechllm.released.family.class_name).from_pretrained(
        directory, attn_implementation="eager").eval()
    family = speechllm.released.family
    if family.adapter_subfolder and (Path(directory) / family.adapter_subfolder).is_dir():
        from peft import PeftModel  # Phi-4's model card switches its speech LoRA on for audio

        stock = PeftModel.from_pretrained(stock, Path(directory) / family.adapter_subfolder).merge_and_unload()
    return stock


def _on_the_16_bit_grid(audio: torch.Tensor, tmp_path: Path) -> torch.Tensor:
    """Waveforms as a 16-bit WAV holds them (written and read back by soundfile)."""
    sf.write(tmp_path / "grid.wav", audio.T.numpy(), 16000, subtype="PCM_16")
    return torch.from_numpy(sf.read(tmp_path / "grid.wav", dtype="float32", always_2d=True)[0].T.copy())


def _processor_logits(directory: Path, speechllm: SpeechLLM, batch, tmp_path: Path) -> list[torch.Tensor]:
    """The stock model's logits over each utterance's prompt, its inputs made by the stock processor alone (its
    chat template, its audio-token count, its features): nothing of the framework's prompt code is used."""
    processor, stock = transformers.AutoProcessor.from_pretrained(directory), _stock(directory, speechllm)
    instruction, rows = speechllm.prompts.instruction("asr", None), []
    for i, n in enumerate(batch.audio_lens.tolist()):
        wave = batch.audio[i, :n].numpy()
        if speechllm.released.family.prompt_ids:  # mistral-common reads the audio itself
            sf.write(tmp_path / f"row{i}.wav", wave, 16000, subtype="PCM_16")
            audio = {"type": "audio", "path": str(tmp_path / f"row{i}.wav")}
            inputs = processor.apply_chat_template([{"role": "user", "content": [
                audio, {"type": "text", "text": instruction}]}], tokenize=True, return_dict=True, return_tensors="pt")
        elif speechllm.released.family.audio_in_text or not processor.chat_template:
            # the model cards' way (Granite Speech, Phi-4): the audio token in the text, a template over strings
            owner = processor if processor.chat_template else processor.tokenizer
            text = owner.apply_chat_template([{"role": "user", "content": f"{processor.audio_token}{instruction}"}],
                                             tokenize=False, add_generation_prompt=True)
            audio = torch.from_numpy(wave) if speechllm.released.family.audio_in_text else wave
            inputs = processor(text=[text], audio=[audio], return_tensors="pt")
        else:
            text = processor.apply_chat_template([{"role": "user", "content": [
                {"type": "audio"}, {"type": "text", "text": instruction}]}], tokenize=False, add_generation_prompt=True)
            inputs = processor(text=[text], audio=[wave], sampling_rate=16000, return_tensors="pt")
        with torch.no_grad():
            rows.append(stock(**inputs).logits[0])
    return rows


def _assert_stock_equals_framework(directory: Path, speechllm: SpeechLLM, tmp_path: Path, atol: float = 5e-5) -> None:
    """The stock class reloaded from `directory`, fed by its own processor, gives the framework's logits on the
    same utterances. The framework runs them batched and left-padded, the stock model one by one: float32 rounding
    apart (~1e-5 on logits of |x| ~ 5), where a wrong position, feature or layer moves them by O(1)."""
    batch = make_batch(seconds=(1.0, 0.6, 1.4))
    batch.audio = _on_the_16_bit_grid(batch.audio, tmp_path)  # mistral-common hands Voxtral 16-bit audio
    theirs = _processor_logits(directory, speechllm, batch, tmp_path)
    with torch.no_grad():
        inputs = speechllm.build_inputs(batch, with_targets=False)
        ours = speechllm.run_decoder(inputs).logits
    for row, stock_row in enumerate(theirs):
        ours_row = ours[row][inputs.attention_mask[row].bool()]
        assert ours_row.shape == stock_row.shape  # the same prompt length: the processor's audio-token count
        assert ours_row.abs().max() > 1.0  # logits that carry the weights, not a near-zero random init
        torch.testing.assert_close(stock_row, ours_row, atol=atol, rtol=0)


def test_the_parts_give_the_stock_models_logits(assets, tmp_path):
    speechllm = SpeechLLM.from_config(SpeechLLMConfig(pretrained=str(assets["model"]), attn_implementation="eager"))
    assert speechllm.released.family.model_type == assets["family"] and speechllm.layer_mask.num_layers == 4
    pieces = speechllm.prompts.pieces("asr", None)
    if assets["family"] == "voxtral":  # mistral-common's ids: <s>[INST][BEGIN_AUDIO] audio, instruction [/INST]
        ids = speechllm.tokenizer.convert_tokens_to_ids(["<s>", "[INST]", "[BEGIN_AUDIO]", "[/INST]"])
        assert list(pieces.prefix) == ids[:3] and pieces.suffix[-1] == ids[3]
        assert speechllm.prompts.end_token_id == speechllm.tokenizer.eos_token_id
    else:
        around = {"qwen2_audio": "Audio 1: <|audio_bos|><|speech|><|audio_eos|>\n", "audioflamingo3": "<|speech|>\n",
                  "glmasr": "<|begin_of_audio|><|speech|><|end_of_audio|>\n",
                  "qwen2_5_omni": "<|audio_bos|><|speech|><|audio_eos|>",
                  "granite_speech": "<|speech|>Transcribe", "phi4_multimodal": "<|speech|>Transcribe",
                  "qwen3_asr": "<|audio_start|><|speech|><|audio_end|>"}[assets["family"]]
        assert speechllm.prompts.render("asr", None).count(around) == 1
        assert speechllm.prompts.end_token_id == speechllm.tokenizer.convert_tokens_to_ids("<|im_end|>")
    _assert_stock_equals_framework(assets["model"], speechllm.eval(), tmp_path)


def test_measure_prune_heal_export_through_the_cli(assets, tmp_path, capsys):
    model_dir, manifest = str(assets["model"]), str(assets["manifest"])
    model = {"pretrained": model_dir, "attn_implementation": "eager"}
    data = {"val_sets": {"dev": manifest}, "max_audio_seconds": 4.0, "max_cuts": 3}
    measure_yaml = tmp_path / "measure.yaml"
    measure_yaml.write_text(yaml.safe_dump({"model": model, "data": data, "root_dir": str(tmp_path / "runs"),
                                            "output_dir": str(tmp_path / "maps"), "n_boot": 10, "n_perm": 20,
                                            "precision": "32-true"}))
    assert cli(["measure", "--config", str(measure_yaml)]) == 0
    speech_map = RedundancyResult.from_json(tmp_path / "maps" / "dev" / "speech" / "epoch=0.json")
    assert speech_map.model_id == model_dir and speech_map.num_layers == 4 and speech_map.num_samples == len(TEXTS)
    assert (tmp_path / "maps" / "dev" / "text" / "epoch=0.json").is_file()

    # prune: the plan from the map, exported whole in its own class
    plan_path, pruned = tmp_path / "plan.json", tmp_path / "pruned"
    assert cli(["prune", "--method", "angular", "--map", str(tmp_path / "maps" / "dev" / "speech" / "epoch=0.json"),
                "--n", "2", "--llm_path", model_dir, "--out", str(plan_path), "--export", str(pruned)]) == 0
    plan = PruningPlan.from_json(plan_path)
    assert len(plan.removed_layers) == 2 and "pruned decoder written to" in capsys.readouterr().out
    masked = SpeechLLM.from_config(SpeechLLMConfig(pretrained=model_dir, attn_implementation="eager")).eval()
    masked.layer_mask.remove_layers(plan.removed_layers)
    _assert_stock_equals_framework(pruned, masked, tmp_path)
    assert _decoder_layers(pruned) == 2

    # heal 3 steps (LoRA on the receiving layer + projector, CE + KL from the shared-weight teacher), then export
    heal_yaml = _heal_yaml(assets, tmp_path, {"plan_path": str(plan_path), "lora": LORA, "losses": [
        {"class_path": "TaskCrossEntropy"}, {"class_path": "KLDivergence", "weight": 0.5}]})
    assert cli(["heal", "--config", str(heal_yaml)]) == 0
    out = tmp_path / "export"
    assert cli(["export", "--ckpt", str(tmp_path / "ck" / "last.ckpt"), "--out", str(out)]) == 0
    healed = load_module(tmp_path / "ck" / "last.ckpt")
    lora_b = [v for k, v in healed.speechllm.trainable_state_dict().items() if "lora_B" in k]
    assert lora_b and max(float(v.abs().max()) for v in lora_b) > 1e-3  # the merge matters
    assert not (out / "decoder").exists() and (out / "model" / "processor_config.json").is_file()
    # merged vs unmerged LoRA: float32 rounding only
    _assert_stock_equals_framework(out / "model", healed.speechllm.eval(), tmp_path, atol=1e-4)
    info = json.loads((out / "model" / "pruning.json").read_text())
    assert info["removed_layers"] == plan.removed_layers and info["family"] == assets["family"]


def _decoder_layers(directory: Path) -> int:
    """The exported config's decoder layer count (Phi-4-multimodal's decoder config is the top one)."""
    config = json.loads((directory / "config.json").read_text())
    return config.get("text_config", config)["num_hidden_layers"]


def _heal_yaml(assets: dict[str, Path], tmp_path: Path, healing: dict, steps: int = 3) -> Path:
    path = tmp_path / "heal.yaml"
    path.write_text(yaml.safe_dump({
        "trainer": {"accelerator": "cpu", "devices": 1, "precision": "32-true", "logger": False,
                    "enable_progress_bar": False, "enable_model_summary": False, "limit_val_batches": 0,
                    "max_steps": steps, "default_root_dir": str(tmp_path / "heal"),
                    "callbacks": [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                                   "init_args": {"dirpath": str(tmp_path / "ck"), "save_last": True}}]},
        "model": {"model": {"pretrained": str(assets["model"]), "attn_implementation": "eager"}, "healing": healing,
                  "optim": {"lr": 5e-2, "warmup_steps": 0, "schedule": "constant"},
                  "decoding": {"generate_in_validation": False}},
        "data": {"train": str(assets["manifest"]), "max_duration": 3.0, "num_buckets": 2, "seed": 1,
                 "max_audio_seconds": 4.0}}))
    return path


def test_replacement_healing_exports_as_a_stock_model(assets, tmp_path):
    """A trained FFN replacement of the removed block becomes a stock decoder layer of the exported Qwen2-Audio."""
    config = _heal_yaml(assets, tmp_path, {"removed_layers": [1, 2], "lora": None,
                                           "replacement": {"kind": "ffn", "width": 32},
                                           "losses": [{"class_path": "ReplacementMSE"}]}, steps=2)
    assert cli(["heal", "--config", str(config)]) == 0
    assert cli(["export", "--ckpt", str(tmp_path / "ck" / "last.ckpt"), "--out", str(tmp_path / "export")]) == 0
    healed = load_module(tmp_path / "ck" / "last.ckpt").speechllm.eval()
    assert _decoder_layers(tmp_path / "export" / "model") == 3  # layers 0, 3 and the replacement
    _assert_stock_equals_framework(tmp_path / "export" / "model", healed, tmp_path)


def test_cached_generation_equals_uncached_after_pruning(assets, tmp_path):
    speechllm = SpeechLLM.from_config(SpeechLLMConfig(pretrained=str(assets["model"]), attn_implementation="eager"))
    speechllm.layer_mask.remove_layers([1, 2])
    from lightning_speechllm.model.released.export import save_released

    save_released(speechllm, tmp_path / "pruned")
    stock = _stock(tmp_path / "pruned", speechllm)
    batch = make_batch(seconds=(1.0, 0.6))
    with torch.no_grad():
        inputs, _ = _stock_inputs(speechllm, stock.eval(), batch)
        inputs = {k: v for k, v in inputs.items() if k != "position_ids"}
        cached = stock.generate(**inputs, max_new_tokens=8, do_sample=False, use_cache=True, min_new_tokens=8)
        uncached = stock.generate(**inputs, max_new_tokens=8, do_sample=False, use_cache=False, min_new_tokens=8)
    assert cached.shape[1] == inputs["input_ids"].shape[1] + 8
    assert torch.equal(cached, uncached)
    assert len(attrgetter(speechllm.released.family.decoder)(stock).layers) == 2


def test_the_speech_map_is_reproduced_from_output_hidden_states(assets, tmp_path):
    """d(l, n) at each utterance's last token, recomputed in float64 from the stock model's hidden states. HF's last
    hidden state is after the final norm, so x^L is read from the last decoder layer's output (a hook)."""
    model_dir = assets["model"]
    measure_yaml = tmp_path / "measure.yaml"
    measure_yaml.write_text(yaml.safe_dump({
        "model": {"pretrained": str(model_dir), "attn_implementation": "eager"},
        "data": {"val_sets": {"dev": str(assets["manifest"])}, "max_audio_seconds": 4.0, "max_cuts": 3},
        "root_dir": str(tmp_path / "runs"), "output_dir": str(tmp_path / "maps"), "n_boot": 10, "n_perm": 20,
        "modalities": ["speech"], "precision": "32-true"}))
    assert cli(["measure", "--config", str(measure_yaml)]) == 0
    ours = RedundancyResult.from_json(tmp_path / "maps" / "dev" / "speech" / "epoch=0.json")

    speechllm = SpeechLLM.from_config(SpeechLLMConfig(pretrained=str(model_dir))).eval()
    stock = _stock(model_dir, speechllm)
    rows = [json.loads(line) for line in assets["manifest"].read_text().splitlines()]
    last_layer_out = []
    decoder = attrgetter(speechllm.released.family.decoder)(stock)
    decoder.layers[-1].register_forward_hook(
        lambda module, args, output: last_layer_out.append(output[0] if isinstance(output, tuple) else output))
    layers = len(decoder.layers)
    sums = np.zeros((layers, layers))
    for row in rows:
        audio, _ = sf.read(assets["root"] / row["audio"], dtype="float32")
        batch = make_batch(seconds=(len(audio) / 16000,), texts=[row["text"]])
        batch.audio = torch.from_numpy(audio)[None]
        with torch.no_grad():
            inputs, _ = _stock_inputs(speechllm, stock, batch)
            hidden = stock(**inputs, output_hidden_states=True).hidden_states
        states = [h[0, -1].double() for h in hidden[:layers]] + [last_layer_out[-1][0, -1].double()]
        for n in range(1, layers + 1):
            for first in range(layers - n + 1):
                cos = torch.nn.functional.cosine_similarity(states[first], states[first + n], dim=0).clamp(-1, 1)
                sums[n - 1, first] += float(torch.arccos(cos) / np.pi)
    reference = sums / len(rows)
    defined = np.tri(layers, layers, dtype=bool)[::-1]  # row n-1, column l: defined where l + n <= L
    assert np.ptp(reference[defined]) > 0.05  # a map with structure, not a constant
    np.testing.assert_allclose(ours.table[defined], reference[defined], atol=1e-6, rtol=0)


def _config_dir(root: Path, model_type: str, **extra) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps({"model_type": model_type, **extra}))
    return root


@pytest.mark.parametrize("model_type, extra, words", [
    ("gemma3n", {}, "num_kv_shared_layers"), ("qwen3_omni_moe", {}, "mixture-of-experts"),
    ("kyutai_speech_to_text", {}, "not supported yet"),
    ("bert", {}, "not a released SpeechLLM family")])
def test_unsupported_families_are_refused_with_the_reason(tmp_path, model_type, extra, words):
    directory = _config_dir(tmp_path / model_type, model_type, **extra)
    with pytest.raises(ReleasedModelError, match=words) as error:
        detect_family(directory)
    assert str(directory / "config.json") in str(error.value)
    with pytest.raises(ReleasedModelError, match=words):
        SpeechLLM.from_config(SpeechLLMConfig(pretrained=str(directory)))


def test_prune_export_refuses_a_kv_shared_family_through_the_cli(tmp_path, capsys):
    directory = _config_dir(tmp_path / "gemma3n", "gemma3n")
    config = json.loads((directory / "config.json").read_text())
    config["text_config"] = {"num_hidden_layers": 6}
    (directory / "config.json").write_text(json.dumps(config))
    assert cli(["prune", "--method", "last", "--n", "1", "--llm_path", str(directory),
                "--export", str(tmp_path / "out")]) == 2
    assert "num_kv_shared_layers" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_validate_efficiency_and_sweep_run_on_it(qwen2_assets, tmp_path, capsys):
    model_dir, manifest = str(qwen2_assets["model"]), str(qwen2_assets["manifest"])
    config = tmp_path / "validate.yaml"
    config.write_text(yaml.safe_dump({
        "trainer": {"accelerator": "cpu", "devices": 1, "precision": "32-true", "logger": False,
                    "enable_progress_bar": False, "default_root_dir": str(tmp_path / "val")},
        "model": {"model": {"pretrained": model_dir}, "decoding": {"max_new_tokens": 3}},
        "data": {"val_sets": {"dev": manifest}, "max_audio_seconds": 4.0}}))
    assert cli(["validate", "--config", str(config)]) == 0
    assert '"val/dev/utterances": 6.0' in capsys.readouterr().out

    assert cli(["efficiency", "--model.pretrained", model_dir, "--remove", "[1, 2]", "--repeats", "1", "--warmup",
                "0", "--max_new_tokens", "2", "--sentences", "1", "--threads", "1",
                "--json_out", str(tmp_path / "efficiency.json")]) == 0
    rows = json.loads((tmp_path / "efficiency.json").read_text())
    assert "decoder layers" in capsys.readouterr().out and rows

    assert cli(["sweep", "--model.pretrained", model_dir, "--sweep.method", "last", "--sweep.ns", "[1]",
                "--sweep.heal", "true", "--sweep.heal_steps", "2", "--sweep.heal_lora_r", "4",
                "--sweep.heal_lora_alpha", "4", "--data.val_sets", f"{{dev: {manifest}}}", "--data.train", manifest,
                "--data.max_duration", "3.0", "--data.num_buckets", "2", "--data.max_audio_seconds", "4.0",
                "--decoding.max_new_tokens", "2", "--trainer.precision", "32-true",
                "--sweep.output_dir", str(tmp_path / "sweep")]) == 0
    table = (tmp_path / "sweep" / "sweep.md").read_text()
    assert "| baseline |" in table and "| last |" in table and "dev/wer_after" in table


def test_greedy_and_attention_plans_export_in_its_own_class(qwen2_assets, tmp_path):
    model_dir, manifest = str(qwen2_assets["model"]), str(qwen2_assets["manifest"])
    data = ["--data.val_sets", f"{{dev: {manifest}}}", "--data.max_audio_seconds", "4.0"]
    assert cli(["prune", "--method", "greedy", "--n", "2", "--model.pretrained", model_dir, *data,
                "--calibration_batches", "2", "--out", str(tmp_path / "greedy.json"),
                "--export", str(tmp_path / "greedy")]) == 0
    plan = PruningPlan.from_json(tmp_path / "greedy.json")
    assert plan.model_id == model_dir and len(plan.removed_layers) == 2
    assert json.loads((tmp_path / "greedy" / "config.json").read_text())["text_config"]["num_hidden_layers"] == 2

    assert cli(["measure", "--model.pretrained", model_dir, *data, "--sublayers", "true", "--modalities", "[speech]",
                "--n_boot", "10", "--precision", "32-true", "--output_dir", str(tmp_path / "maps"),
                "--root_dir", str(tmp_path / "runs")]) == 0
    assert cli(["prune", "--method", "attention", "--n", "1", "--map",
                str(tmp_path / "maps" / "sublayers" / "dev" / "speech.json"), "--llm_path", model_dir,
                "--out", str(tmp_path / "attention.json"), "--export", str(tmp_path / "attention")]) == 0
    dropped = PruningPlan.from_json(tmp_path / "attention.json").removed_attention
    speechllm = SpeechLLM.from_config(SpeechLLMConfig(pretrained=model_dir, attn_implementation="eager")).eval()
    speechllm.sublayer_mask.drop(dropped, [])
    # the dropped attention is exported as a zeroed output projection: the stock model's logits are the framework's
    _assert_stock_equals_framework(tmp_path / "attention", speechllm, tmp_path)


def test_framework_generation_equals_the_stock_models_after_pruning(assets, tmp_path):
    """SpeechLLM.generate (inputs_embeds, its KV cache) and the exported stock model's generate give the same tokens."""
    speechllm = SpeechLLM.from_config(SpeechLLMConfig(pretrained=str(assets["model"]), attn_implementation="eager"))
    speechllm.layer_mask.remove_layers([1, 2])
    from lightning_speechllm.model.released.export import save_released

    stock = _stock(save_released(speechllm.eval(), tmp_path / "pruned"), speechllm)
    # Granite's and Phi-4's Conformers mask no padding in their convolutions: the stock batch sees the padding, so
    # both rows have one length there
    batch = make_batch(seconds=(1.0, 1.0) if assets["family"] in ("granite_speech", "phi4_multimodal") else (1.0, 0.6))
    with torch.no_grad():
        ours = speechllm.generate_with_details(batch, max_new_tokens=6, min_new_tokens=6)
        inputs, _ = _stock_inputs(speechllm, stock, batch, with_targets=False)
        prompt = {k: v for k, v in inputs.items() if k != "position_ids"}
        theirs = stock.generate(**prompt, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    assert ours.num_tokens == [6, 6]
    expected = speechllm.tokenizer.batch_decode(theirs[:, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
    assert ours.texts == [text.strip() for text in expected]


@pytest.mark.parametrize("family", ["audioflamingo3", "glmasr", "qwen2_5_omni", "granite_speech", "phi4_multimodal",
                                    "qwen3_asr"])
def test_a_bfloat16_model_and_cached_frames_run(family, tmp_path):
    """A half-precision tower reads float32 features (AF3's and GLM-ASR's do not cast them), and cached frames,
    trimmed to each utterance, need not fill the last group of stacked frames (or Granite's last window)."""
    assets = _make_assets(tmp_path, family)
    speechllm = SpeechLLM.from_config(SpeechLLMConfig(pretrained=str(assets["model"]), llm_dtype="bfloat16")).eval()
    assert next(speechllm.encoder.tower.parameters()).dtype == torch.bfloat16
    assert len(speechllm.encoder_cache_key()) == 16  # every buffer hashes (Granite's tower holds a 0-d one)
    batch = make_batch(seconds=(1.0, 0.62))
    with torch.no_grad():
        frames, lens = speechllm.encode_frames(batch.audio, batch.audio_lens)
        whole, whole_lens = speechllm.projector(frames, lens)
        trimmed, trimmed_lens = speechllm.projector(frames[:, : int(lens.max())], lens)
    assert torch.equal(whole_lens, trimmed_lens)
    for row, n in enumerate(whole_lens.tolist()):
        torch.testing.assert_close(trimmed[row, :n], whole[row, :n], atol=0, rtol=0)


def test_granite_speech_audio_adapter_is_merged_and_not_shipped_again(tmp_path):
    """Granite Speech's shipped LoRA (its class switches it on for audio) is merged at load: the framework equals the
    stock model with its adapter on, not the base weights, and the export carries merged weights and no adapter."""
    assets = _make_assets(tmp_path, "granite_speech")
    speechllm = SpeechLLM.from_config(SpeechLLMConfig(pretrained=str(assets["model"]), attn_implementation="eager"))
    base = transformers.GraniteSpeechForConditionalGeneration.from_pretrained(
        assets["model"], adapter_kwargs={"subfolder": "no-adapter-here"}).eval()
    name = "model.language_model.layers.0.self_attn.q_proj.weight"
    merged = attrgetter("model.layers.0.self_attn.q_proj.weight")(speechllm.llm)
    assert float((merged - base.state_dict()[name]).abs().max()) > 1e-2
    speechllm.layer_mask.remove_layers([2])
    from lightning_speechllm.model.released.export import save_released

    out = save_released(speechllm.eval(), tmp_path / "pruned")
    assert not (out / "adapter_config.json").exists()
    assert json.loads((out / "config.json").read_text())["has_lora_adapter"] is False
    _assert_stock_equals_framework(out, speechllm, tmp_path)


def test_qwen2_5_omni_exports_its_thinker_with_the_vision_tower(tmp_path):
    """A whole Qwen2.5-Omni directory loads as its thinker; the export is a stock thinker directory that keeps the
    vision tower's weights as they were."""
    assets = _make_assets(tmp_path, "qwen2_5_omni")
    speechllm = SpeechLLM.from_config(SpeechLLMConfig(pretrained=str(assets["model"]), attn_implementation="eager"))
    visual = dict(speechllm.released.other_weights)
    assert visual and all(key.startswith("model.visual.") for key in visual)
    speechllm.layer_mask.remove_layers([0, 3])
    from lightning_speechllm.model.released.export import save_released

    out = save_released(speechllm.eval(), tmp_path / "pruned")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "qwen2_5_omni_thinker" and config["text_config"]["num_hidden_layers"] == 2
    stock = transformers.Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(out).eval()
    state = stock.state_dict()
    for key, value in visual.items():
        torch.testing.assert_close(state[key], value, atol=0, rtol=0)


def test_fit_on_a_tower_that_projects_itself_says_what_to_train(tmp_path):
    """Qwen2.5-Omni's tower ends in its own projection: projector training alone has nothing to train, and the error
    says what to train instead."""
    assets = _make_assets(tmp_path, "qwen2_5_omni")
    from lightning_speechllm.model.module import SpeechLLMModule

    module = SpeechLLMModule(model=SpeechLLMConfig(pretrained=str(assets["model"])))
    with pytest.raises(ValueError, match="tower projects to the decoder itself"):
        module.configure_optimizers()
