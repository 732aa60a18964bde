"""Config dataclasses rebuilt from checkpoint hyper-parameters."""
import pytest
from jsonargparse import ArgumentParser

from lightning_speechllm.config_utils import from_dict, parsed_values
from lightning_speechllm.model.module import OptimConfig
from lightning_speechllm.model.speechllm import LoraConfig, SpeechLLMConfig


def test_nested_dicts_become_dataclasses_and_tuples_come_back():
    config = from_dict(SpeechLLMConfig, {"llm_path": "x", "lora": {"layers": [3], "r": 8}, "projector": {"downsample": 4}})
    assert isinstance(config.lora, LoraConfig) and config.lora.layers == [3] and config.projector.downsample == 4
    assert from_dict(OptimConfig, {"betas": [0.9, 0.95]}).betas == (0.9, 0.95)


def test_unknown_key_is_named():
    with pytest.raises(KeyError, match="unknown SpeechLLMConfig keys \\['llm_dir'\\]"):
        from_dict(SpeechLLMConfig, {"llm_dir": "x"})


def test_an_instance_is_copied_so_shared_defaults_are_never_mutated():
    shared = SpeechLLMConfig()
    copy = from_dict(SpeechLLMConfig, shared)
    copy.removed_layers.append(3)
    assert copy == from_dict(SpeechLLMConfig, copy) and shared.removed_layers == []


def test_parsed_values_drop_the_path_of_a_group_read_from_its_own_file(tmp_path):
    """`--model model.yaml` makes jsonargparse add `__path__` to the group; every command parses through this."""
    parser = ArgumentParser()
    parser.add_class_arguments(SpeechLLMConfig, "model")
    (tmp_path / "model.yaml").write_text("llm_path: my-llm\nprojector:\n  downsample: 3\n")
    values = parsed_values(parser.parse_args(["--model", str(tmp_path / "model.yaml")]))
    assert "__path__" not in values["model"]
    config = from_dict(SpeechLLMConfig, values["model"])
    assert config.llm_path == "my-llm" and config.projector.downsample == 3
