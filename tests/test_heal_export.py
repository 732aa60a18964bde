"""`export`: checkpoint -> stock HF pruned decoder (LoRA merged) equal to the live masked student, projector, JSON."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from lightning_speechllm.checkpoints import load_module
from lightning_speechllm.healing.cli import main as heal
from lightning_speechllm.healing.export import export_checkpoint, main
from lightning_speechllm.healing.module import HealingModule
from lightning_speechllm.model.checkpoint import CheckpointError
from lightning_speechllm.pruning.plan import PruningPlan
from tests.test_heal_cli import heal_yaml, tiny_assets
from tests.test_speechllm import make_batch


@pytest.fixture(scope="module")
def healed(tmp_path_factory) -> Path:
    """A healing checkpoint (layers 1, 2 removed; LoRA on layer 3 after 3 steps at a high LR)."""
    root = tmp_path_factory.mktemp("heal_export")
    assets = tiny_assets(root / "assets")
    config = heal_yaml(assets, root / "run", max_steps=3, callbacks=[
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
         "init_args": {"dirpath": str(root / "ck"), "save_last": True}}])
    assert heal(["--config", str(config)]) == 0
    return root / "ck" / "last.ckpt"


def _exported_and_student_logits(exported, module: HealingModule):
    """(exported decoder's logits, the live student's, the non-pad positions) on one tiny batch."""
    with torch.no_grad():
        inputs = module.speechllm.build_inputs(make_batch())
        student, _ = module.student_pass(inputs)
        theirs = exported(inputs_embeds=inputs.inputs_embeds, attention_mask=inputs.attention_mask,
                          position_ids=inputs.position_ids, use_cache=False).logits
    return theirs, student, inputs.attention_mask.bool()


def test_exported_decoder_equals_the_masked_student(healed, tmp_path, capsys):
    out = tmp_path / "export"
    assert main(["--ckpt", str(healed), "--out", str(out)]) == 0
    assert "exported" in capsys.readouterr().out
    module = load_module(healed)
    assert isinstance(module, HealingModule) and module.speechllm.layer_mask.active_layers == (0, 3)
    lora_b = [v for k, v in module.speechllm.trainable_state_dict().items() if "lora_B" in k]
    assert lora_b and max(float(v.abs().max()) for v in lora_b) > 1e-3  # the merge matters

    exported = AutoModelForCausalLM.from_pretrained(out / "decoder").eval()
    assert exported.config.num_hidden_layers == 2 and len(exported.model.layers) == 2
    theirs, student, _ = _exported_and_student_logits(exported, module)
    # merged vs unmerged LoRA: float32 logits (|x| <= 6) ~6e-6 apart; 1e-4 (~200 ulps) covers any kernel, while the
    # healing LoRA left out of the export moves them by ~0.17
    torch.testing.assert_close(theirs, student, atol=1e-4, rtol=0)

    projector = load_file(out / "projector.safetensors")
    for key, value in module.speechllm.projector.state_dict().items():
        torch.testing.assert_close(projector[key], value, atol=0, rtol=0)
    description = json.loads((out / "speechllm.json").read_text())
    assert description["removed_layers"] == [1, 2] and description["num_layers"] == 4
    assert Path(description["encoder_dir"]).is_dir() and description["config"]["projector"]["downsample"] == 2
    plan = PruningPlan.from_json(out / "plan.json")
    assert plan.removed_layers == [1, 2] and plan.num_layers == 4
    assert (out / "decoder" / "tokenizer.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".export")]  # no temp dir left


def test_export_replaces_an_old_export_and_refuses_bad_checkpoints(healed, tmp_path, capsys):
    out = tmp_path / "export"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    assert export_checkpoint(healed, out) == out.resolve()
    assert not (out / "stale.txt").exists() and (out / "decoder" / "config.json").is_file()
    assert main(["--ckpt", str(tmp_path / "missing.ckpt"), "--out", str(out)]) == 2
    assert "missing.ckpt does not exist" in capsys.readouterr().err
    bogus = tmp_path / "bogus.ckpt"
    torch.save({"state_dict": {}}, bogus)
    with pytest.raises(CheckpointError, match="no 'hyper_parameters' entry"):
        export_checkpoint(bogus, tmp_path / "x")
    assert main(["--out", str(out)]) == 2  # --ckpt is required


def test_iterative_healing_checkpoint_exports_its_final_plan(tmp_path):
    assets = tiny_assets(tmp_path / "assets")
    callbacks = [{"class_path": "lightning_speechllm.healing.iterative.IterativePruning",
                  "init_args": {"layers_per_round": 1, "rounds": 2, "heal_steps": 1, "measure_batches": 1}},
                 {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                  "init_args": {"dirpath": str(tmp_path / "ck"), "save_last": True}}]
    config = heal_yaml(assets, tmp_path / "run", max_steps=2, callbacks=callbacks)
    argv = ["--config", str(config), "--model.healing.removed_layers", "[]",
            "--data.val_sets", json.dumps({"dev": str(assets["manifest"])})]
    assert heal(argv) == 0
    checkpoint = torch.load(tmp_path / "ck" / "last.ckpt", weights_only=True)
    [state] = [v for k, v in checkpoint["callbacks"].items() if k.startswith("IterativePruning")]
    removed = sorted(i for r in state["history"] for i in r["removed"])
    assert len(removed) == 2 and checkpoint["healing"]["plan"]["removed_layers"] == removed

    out = export_checkpoint(tmp_path / "ck" / "last.ckpt", tmp_path / "export")
    exported = AutoModelForCausalLM.from_pretrained(out / "decoder").eval()
    assert exported.config.num_hidden_layers == 2
    assert PruningPlan.from_json(out / "plan.json").removed_layers == removed
    module = load_module(tmp_path / "ck" / "last.ckpt")
    with torch.no_grad():
        inputs = module.speechllm.build_inputs(make_batch())
        student, _ = module.student_pass(inputs)
        theirs = exported(inputs_embeds=inputs.inputs_embeds, attention_mask=inputs.attention_mask,
                          position_ids=inputs.position_ids, use_cache=False).logits
    torch.testing.assert_close(theirs, student, atol=1e-4, rtol=0)  # merged vs unmerged LoRA: as above


def test_heal_with_replacement_and_dropped_attention_then_export_to_stock_transformers(tmp_path, capsys):
    """The commands a user types: `heal` with a replacement module and an attention-only cut, then `export`."""
    import yaml

    assets = tiny_assets(tmp_path / "assets")
    config_path = heal_yaml(assets, tmp_path / "run", max_steps=3, callbacks=[
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
         "init_args": {"dirpath": str(tmp_path / "ck"), "save_last": True}}])
    config = yaml.safe_load(config_path.read_text())
    config["model"]["healing"].update(removed_layers=[1], removed_attention=[3], lora=None,
                                      replacement={"kind": "ffn", "width": 16},
                                      losses=[{"class_path": "ReplacementMSE"}, {"class_path": "TaskCrossEntropy"}])
    config_path.write_text(yaml.safe_dump(config))
    assert heal(["--config", str(config_path)]) == 0
    out = tmp_path / "export"
    assert main(["--ckpt", str(tmp_path / "ck" / "last.ckpt"), "--out", str(out)]) == 0
    module = load_module(tmp_path / "ck" / "last.ckpt")
    assert module.speechllm.sublayer_mask.dropped_attention == (3,)
    trained = module.speechllm.replacements["1"].mlp.down_proj.weight
    assert trained.abs().max() > 0  # healing moved the zero-initialised output projection

    exported = AutoModelForCausalLM.from_pretrained(
        out / "decoder", attn_implementation=module.speechllm.llm.config._attn_implementation).eval()
    assert exported.config.num_hidden_layers == 4  # layer 0, the replacement, layer 2, layer 3 (zero attention)
    theirs, student, real = _exported_and_student_logits(exported, module)
    torch.testing.assert_close(theirs[real], student[real], atol=1e-5, rtol=0)
    plan = PruningPlan.from_json(out / "plan.json")
    assert plan.removed_layers == [1] and plan.removed_attention == [3]
    pruning = json.loads((out / "decoder" / "pruning.json").read_text())
    assert pruning["replaced_blocks"] == [{"first_layer": 1, "kind": "ffn", "width": 16}]
    assert pruning["dropped_attention"] == [3]


def test_prune_attention_then_heal_from_the_plan_then_export_and_reload(tmp_path, capsys):
    """`prune --method attention` -> `heal --model.healing.plan_path` -> `export`, and the loader `measure` and
    `sweep` use: the healed checkpoint's dropped attentions come back from its plan (they are not in the healing
    settings when a plan_path was given)."""
    import yaml

    from lightning_speechllm.pruning.cli import main as prune
    from lightning_speechllm.redundancy.sublayers import SublayerMap

    assets = tiny_assets(tmp_path / "assets")
    sublayers = SublayerMap(layers=list(range(4)), attention=[0.4, 0.02, 0.01, 0.5], mlp=[0.6] * 4,
                            token_selection="last", num_samples=3, model_id=str(assets["llm"]))
    map_path = sublayers.to_json(tmp_path / "sublayers.json")
    plan_path = tmp_path / "plan.json"
    assert prune(["--method", "attention", "--map", str(map_path), "--n", "2", "--num_layers", "4",
                  "--out", str(plan_path)]) == 0
    assert PruningPlan.from_json(plan_path).removed_attention == [1, 2]
    config_path = heal_yaml(assets, tmp_path / "run", max_steps=2, callbacks=[
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
         "init_args": {"dirpath": str(tmp_path / "ck"), "save_last": True}}])
    config = yaml.safe_load(config_path.read_text())
    config["model"]["healing"].update(removed_layers=[], plan_path=str(plan_path))
    config_path.write_text(yaml.safe_dump(config))
    assert heal(["--config", str(config_path)]) == 0
    checkpoint = tmp_path / "ck" / "last.ckpt"

    module = load_module(checkpoint)  # raised PlanMismatchError: "healed with removed_attention [1, 2], ... []"
    assert module.speechllm.sublayer_mask.dropped_attention == (1, 2)
    assert module.plan["removed_attention"] == [1, 2]
    assert main(["--ckpt", str(checkpoint), "--out", str(tmp_path / "export")]) == 0
    assert PruningPlan.from_json(tmp_path / "export" / "plan.json").removed_attention == [1, 2]
