"""save_pruned_decoder: stock reload of the active layers, LoRA merged, live model untouched, atomic writes."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from lightning_speechllm.model.export import ExportError, merged_state_dict, pruning_info, save_pruned_decoder
from lightning_speechllm.model.layer_mask import DecoderLayerMask
from tiny_models import TINY_ARCHS, tiny_causal_lm, tiny_input_ids

REMOVED = (0, 3)
KEPT = [1, 2, 4, 5]


def reload(directory: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(directory, attn_implementation="eager").eval()


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, "hello": 4, "world": 5}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_export_reloads_with_identical_logits_and_cut_config(arch: str, tmp_path: Path) -> None:
    model = tiny_causal_lm(arch)
    layer_types = getattr(model.config, "layer_types", None)
    mask = DecoderLayerMask(model)
    mask.remove_layers(REMOVED)
    keys_before = list(model.state_dict())
    ids = tiny_input_ids(batch=2, length=11)
    live = model(ids).logits

    out = save_pruned_decoder(model, tmp_path / "pruned")
    reloaded = reload(out)
    torch.testing.assert_close(reloaded(ids).logits, live, rtol=0, atol=1e-5)
    assert reloaded.config.num_hidden_layers == 4 and len(reloaded.model.layers) == 4
    if layer_types is not None:
        assert reloaded.config.layer_types == [layer_types[i] for i in KEPT]
    assert json.loads((out / "pruning.json").read_text()) == {
        "removed_layers": list(REMOVED),
        "kept_layers": KEPT,
        "original_num_layers": 6,
    }
    # the live model is untouched: same mask, same keys, config not stamped by save_pretrained
    assert mask.removed_layers == REMOVED and list(model.state_dict()) == keys_before
    assert model.config.architectures is None
    mask.reset()
    assert model.config.num_hidden_layers == 6


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma2"])
def test_export_merges_lora_without_touching_the_live_peft_model(arch: str, tmp_path: Path) -> None:
    base = tiny_causal_lm(arch)
    lora = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False, lora_dropout=0.0
    )
    peft_model = get_peft_model(base, lora).eval()
    mask = DecoderLayerMask(peft_model)
    mask.remove_layers(REMOVED)
    ids = tiny_input_ids(batch=2, length=9)
    live = peft_model(input_ids=ids).logits
    with peft_model.disable_adapter():
        without_lora = peft_model(input_ids=ids).logits
    assert (live - without_lora).abs().max() > 1e-3  # the adapter matters
    q_proj = peft_model.base_model.model.model.layers[0].self_attn.q_proj
    base_weight = q_proj.base_layer.weight.detach().clone()

    out = save_pruned_decoder(peft_model, tmp_path / "merged")
    torch.testing.assert_close(reload(out)(ids).logits, live, rtol=0, atol=1e-5)
    assert not q_proj.merged and torch.equal(q_proj.base_layer.weight, base_weight)
    assert "lora_A" in dict(q_proj.named_children())
    saved_keys = merged_state_dict(peft_model)
    assert not any("lora" in key or "base_layer" in key for key in saved_keys)


def test_export_after_prune_and_with_tokenizer(tmp_path: Path) -> None:
    model = tiny_causal_lm("gemma3_text")
    mask = DecoderLayerMask(model)
    mask.remove_layers([1, 2])
    mask.prune()
    mask.remove_layers([3])  # original layer 5
    assert pruning_info(model) == {"removed_layers": [1, 2, 5], "kept_layers": [0, 3, 4], "original_num_layers": 6}
    ids = tiny_input_ids()
    out = save_pruned_decoder(model, tmp_path / "twice", tokenizer=tiny_tokenizer())
    torch.testing.assert_close(reload(out)(ids).logits, model(ids).logits, rtol=0, atol=1e-5)
    assert json.loads((out / "pruning.json").read_text())["removed_layers"] == [1, 2, 5]
    assert AutoTokenizer.from_pretrained(out)("hello world")["input_ids"] == [4, 5]


def test_export_of_an_unmasked_model_keeps_every_layer(tmp_path: Path) -> None:
    model = tiny_causal_lm("mistral", num_layers=4)
    out = save_pruned_decoder(model, tmp_path / "full")
    assert reload(out).config.num_hidden_layers == 4
    assert json.loads((out / "pruning.json").read_text()) == {
        "removed_layers": [],
        "kept_layers": [0, 1, 2, 3],
        "original_num_layers": 4,
    }


class _BrokenTokenizer:
    def save_pretrained(self, directory: str | Path) -> None:
        raise OSError("disk full")


def test_failed_export_leaves_no_partial_directory_and_keeps_the_old_one(tmp_path: Path) -> None:
    model = tiny_causal_lm("llama", num_layers=4)
    DecoderLayerMask(model).remove_layers([2])
    target = tmp_path / "export"
    with pytest.raises(OSError, match="disk full"):
        save_pruned_decoder(model, target, tokenizer=_BrokenTokenizer())
    assert list(tmp_path.iterdir()) == []

    save_pruned_decoder(model, target)
    first = (target / "model.safetensors").read_bytes()
    with pytest.raises(OSError, match="disk full"):
        save_pruned_decoder(model, target, tokenizer=_BrokenTokenizer())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]
    assert (target / "model.safetensors").read_bytes() == first

    DecoderLayerMask(model).reset()  # overwrite with the full model
    save_pruned_decoder(model, target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]
    assert json.loads((target / "pruning.json").read_text())["removed_layers"] == []


def test_export_rejects_bad_targets_and_pickle(tmp_path: Path) -> None:
    model = tiny_causal_lm("llama", num_layers=4)
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(ExportError, match=r"export target .*file exists and is not a directory"):
        save_pruned_decoder(model, a_file)
    with pytest.raises(ExportError, match="safe_serialization=False is unsupported"):
        save_pruned_decoder(model, tmp_path / "bin", safe_serialization=False)
    with pytest.raises(ExportError, match="Linear is not a transformers PreTrainedModel"):
        save_pruned_decoder(torch.nn.Linear(2, 2), tmp_path / "linear")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_lora_on_a_tied_weight_is_refused(tmp_path: Path) -> None:
    model = tiny_causal_lm("gemma", num_layers=2)  # lm_head tied to embed_tokens
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["lm_head"], init_lora_weights=False))
    with pytest.raises(ExportError, match=r"lm_head: an adapter changes a weight tied to .*embed_tokens"):
        save_pruned_decoder(peft_model, tmp_path / "tied")
    assert list(tmp_path.iterdir()) == []
