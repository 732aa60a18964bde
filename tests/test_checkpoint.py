"""One checkpoint loader for measure, sweep and export: the checkpoint's model settings and plan win."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from lightning_speechllm.checkpoints import load_module
from lightning_speechllm.evaluation.sweep import cli as sweep_cli
from lightning_speechllm.healing.module import HealingConfig, HealingModule
from lightning_speechllm.model.checkpoint import CheckpointError, removed_layers_of
from lightning_speechllm.model.module import SpeechLLMModule
from lightning_speechllm.model.projector import ProjectorConfig
from lightning_speechllm.model.speechllm import LoraConfig, SpeechLLMConfig
from lightning_speechllm.redundancy import cli as measure_cli
from lightning_speechllm.redundancy.analysis import RedundancyResult
from tests.tiny_speechllm import save_tiny_assets

LAYERS = 4
TEXTS = ["the cat sat on the mat", "one two three", "hello world"]


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, Path]:
    return save_tiny_assets(tmp_path_factory.mktemp("ckpt"), TEXTS, [8000] * len(TEXTS), layers=LAYERS,
                            manifest="dev.jsonl")


def _model_config(assets: dict[str, Path], **overrides) -> SpeechLLMConfig:
    return SpeechLLMConfig(llm_path=str(assets["llm"]), encoder_path=str(assets["whisper"]),
                           projector=ProjectorConfig(downsample=2, hidden_dim=32), **overrides)


def _save(module: SpeechLLMModule, path: Path) -> Path:
    """What Lightning writes for the module: its hyper-parameters, then its own on_save_checkpoint hook."""
    checkpoint = {"hyper_parameters": dict(module.hparams), "state_dict": {}}
    module.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, path)
    return path


def _randomize(module: SpeechLLMModule, seed: int) -> dict[str, torch.Tensor]:
    """Give every trainable weight (projector, LoRA A and B) seeded random values; returns them."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.speechllm.parameters():
            if param.requires_grad:
                param.copy_(torch.randn(param.shape, generator=generator))
    return module.speechllm.trainable_state_dict()


@pytest.fixture(scope="module")
def trained(assets, tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    """A SpeechLLMModule checkpoint (unpruned, projector only) and its trained weights."""
    module = SpeechLLMModule(model=_model_config(assets))
    weights = _randomize(module, seed=1)
    return _save(module, tmp_path_factory.mktemp("trained") / "fit.ckpt"), weights


@pytest.fixture(scope="module")
def healed(assets, tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    """A healing checkpoint (layers 1, 2 removed, LoRA on the receiving layer 3) and its trained weights."""
    lora = LoraConfig(r=2, alpha=2, target_modules=["q_proj", "v_proj"])
    module = HealingModule(model=_model_config(assets), healing=HealingConfig(removed_layers=[1, 2], lora=lora))
    weights = _randomize(module, seed=2)
    assert any("lora_B" in key for key in weights)
    return _save(module, tmp_path_factory.mktemp("healed") / "heal.ckpt"), weights


def _assert_equal_weights(speechllm, weights: dict[str, torch.Tensor]) -> None:
    loaded = speechllm.trainable_state_dict()
    assert sorted(loaded) == sorted(weights)
    assert all(torch.equal(loaded[key], value) for key, value in weights.items())


def test_measure_and_sweep_load_the_weights_of_a_speechllm_checkpoint(trained, caplog):
    path, weights = trained
    module = measure_cli.build_module(measure_cli.MeasureArgs(ckpt_path=str(path)), SpeechLLMConfig())
    _assert_equal_weights(module.speechllm, weights)
    assert module.speechllm.layer_mask.removed_layers == () and not module.decoding.generate_in_validation
    with caplog.at_level(logging.WARNING, logger="lightning_speechllm.checkpoints"):
        speechllm = sweep_cli.build_model(SpeechLLMConfig(llm_path="elsewhere", llm_dtype="float32"), str(path))
    _assert_equal_weights(speechllm, weights)
    assert speechllm.config.llm_path == module.speechllm.config.llm_path != "elsewhere"  # the checkpoint wins
    assert "ignoring the given llm_path='elsewhere'" in caplog.text and "llm_dtype" not in caplog.text


def test_measure_on_a_healing_checkpoint_measures_the_pruned_model(assets, healed, tmp_path, capsys):
    path, weights = healed
    module = measure_cli.build_module(measure_cli.MeasureArgs(ckpt_path=str(path)), SpeechLLMConfig())
    assert module.speechllm.layer_mask.active_layers == (0, 3) and module.speechllm.has_lora
    _assert_equal_weights(module.speechllm, weights)
    argv = ["--ckpt_path", str(path), "--data.val_sets", f"{{dev: {assets['manifest']}}}", "--modalities", "[text]",
            "--n_boot", "0", "--accelerator", "cpu", "--root_dir", str(tmp_path / "runs"),
            "--output_dir", str(tmp_path / "maps")]
    assert measure_cli.main(argv) == 0, capsys.readouterr().err
    result = RedundancyResult.from_json(tmp_path / "maps" / "dev" / "text" / "epoch=0.json")
    assert result.num_layers == 2 and result.extra["layer_indices"] == [0, 3]
    assert result.num_samples == len(TEXTS)


def test_sweep_refuses_a_checkpoint_of_a_pruned_model(assets, healed, tmp_path, capsys):
    path, _ = healed
    argv = ["--ckpt_path", str(path), "--sweep.method", "last", "--sweep.ns", "[1]",
            "--data.val_sets", f"{{dev: {assets['manifest']}}}", "--sweep.output_dir", str(tmp_path / "sweep")]
    assert sweep_cli.main(argv) == 2
    error = capsys.readouterr().err
    assert f"checkpoint {path} holds a pruned model (removed decoder layers [1, 2])" in error
    assert "unpruned" in error and not (tmp_path / "sweep").exists()


def test_removed_layers_come_from_the_plan_or_the_model_settings(assets, tmp_path):
    module = SpeechLLMModule(model=_model_config(assets, removed_layers=[3]))
    path = _save(module, tmp_path / "masked.ckpt")
    checkpoint = torch.load(path, weights_only=True)
    assert removed_layers_of(checkpoint) == [3]
    with pytest.raises(CheckpointError, match=r"removed decoder layers \[3\]"):
        load_module(path, allow_pruned=False)
    assert load_module(path).speechllm.layer_mask.active_layers == (0, 1, 2)
    checkpoint["healing"] = {"plan": {"removed_layers": [2, 1]}}
    assert removed_layers_of(checkpoint) == [1, 2]
