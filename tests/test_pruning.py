"""Pruning plans: builders (angular on a planted identity block, BI, last, explicit), JSON, validation, the CLI."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_models import tiny_causal_lm, tiny_input_ids
from tiny_speechllm import tiny_llama, tiny_speechllm, tiny_tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer

from lightning_speechllm.model.layer_mask import DecoderLayerMask
from lightning_speechllm.pruning import (
    PlanError,
    PruningPlan,
    apply_plan,
    block_size,
    plan_angular,
    plan_block_influence,
    plan_explicit,
    plan_last,
)
from lightning_speechllm.pruning.cli import PLAN_IN_EXPORT, main
from lightning_speechllm.redundancy import AngularDistanceMetric, BlockInfluenceMetric, RedundancyResult, select_tokens

IDENTITY_BLOCK = (2, 3)


def planted_llama() -> torch.nn.Module:
    """Tiny 6-layer llama whose layers 2 and 3 add nothing to the residual stream (zero o_proj and down_proj)."""
    model = tiny_causal_lm("llama", num_layers=6, seed=3)
    with torch.no_grad():
        for index in IDENTITY_BLOCK:
            model.model.layers[index].self_attn.o_proj.weight.zero_()
            model.model.layers[index].mlp.down_proj.weight.zero_()
    return model


def measure(model: torch.nn.Module, model_id: str) -> RedundancyResult:
    """Angular-distance table and BI of ``model`` over all tokens of a small random batch."""
    mask = DecoderLayerMask(model)
    ids = tiny_input_ids(batch=3, length=12, seed=1)
    with torch.no_grad(), mask.record_residual_stream() as stream:
        model(ids)
    token_mask = select_tokens(torch.ones_like(ids), "all")
    distance, influence = AngularDistanceMetric(mask.num_layers), BlockInfluenceMetric(mask.num_layers)
    distance.update(stream.states, token_mask)
    influence.update(stream.states, token_mask)
    return RedundancyResult.from_tables(distance.compute(), influence.compute(), model_id=model_id,
                                        token_selection="all", set_name="random", modality="text",
                                        num_samples=ids.shape[0])


@pytest.fixture(scope="module")
def planted() -> tuple[torch.nn.Module, RedundancyResult]:
    model = planted_llama()
    return model, measure(model, "tiny-llama")


def synthetic_result(bi: list[float], path: list[int] | None = None) -> RedundancyResult:
    num_layers = len(bi)
    table = np.full((num_layers, num_layers), np.nan)
    for n in range(1, num_layers + 1):
        table[n - 1, : num_layers - n + 1] = np.linspace(0.5, 0.1, num_layers - n + 1) * n
    result = RedundancyResult.from_tables(table, bi, model_id="m", token_selection="last", set_name="s",
                                          modality="speech", num_samples=4)
    if path is not None:
        result.path = path
    return result


# ------------------------------------------------------------------------------------------------- builders
def test_angular_finds_the_planted_identity_block(planted) -> None:
    _, result = planted
    assert result.table[1, 2] == pytest.approx(0.0, abs=1e-6)  # d(2, 2): x^2 == x^4
    plan = plan_angular(result, n=2, source_map="map.json")
    assert plan.removed_layers == [2, 3]
    assert plan.kept_layers == [0, 1, 4, 5]
    assert plan.receiving_layer == 4 and plan.receiving_layer_pruned == 2
    assert plan.method == "angular" and plan.params["n"] == 2 and plan.params["distance"] < 1e-6
    assert plan.model_id == "tiny-llama" and plan.source_map == "map.json"


def test_block_influence_picks_the_planted_layers_and_noncontiguous_lowest(planted) -> None:
    _, result = planted
    assert plan_block_influence(result, n=2).removed_layers == [2, 3]
    plan = plan_block_influence(synthetic_result([0.5, 0.1, 0.9, 0.2, 0.8, 0.7]), n=2)
    assert plan.removed_layers == [1, 3] and not plan.is_contiguous
    assert plan.receiving_layer == 4


def test_fraction_rounds_half_up_with_at_least_one_layer() -> None:
    assert block_size(28, fraction=0.286) == 8
    assert block_size(10, fraction=0.25) == 3  # 2.5 -> 3 (half up, not banker's rounding)
    assert block_size(10, fraction=0.01) == 1
    result = synthetic_result([0.3, 0.2, 0.1, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0])
    plan = plan_angular(result, fraction=0.3)
    n = plan.params["n"]
    assert n == 3 and plan.params["fraction"] == 0.3
    assert plan.removed_layers == list(range(result.path[n - 1], result.path[n - 1] + n))


def test_last_keeps_the_final_layer() -> None:
    plan = plan_last(10, n=3)
    assert plan.removed_layers == [6, 7, 8] and plan.receiving_layer == 9
    assert plan_last(6, n=5).kept_layers == [5]
    assert plan_last(8, fraction=0.5).removed_layers == [3, 4, 5, 6]


def test_explicit_sorts_and_cut_at_end_has_no_receiving_layer() -> None:
    plan = plan_explicit(6, [5, 4])
    assert plan.removed_layers == [4, 5] and plan.receiving_layer is None and plan.receiving_layer_pruned is None
    assert plan_explicit(6, []).receiving_layer is None


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "exactly one of n / fraction"),
        ({"n": 2, "fraction": 0.5}, "exactly one of n / fraction"),
        ({"n": 0}, "n must be a positive int, got 0"),
        ({"n": 6}, "cannot remove 6 of 6 decoder layers: nothing left"),
        ({"fraction": 1.0}, "fraction must be in (0, 1), got 1.0"),
    ],
)
def test_builder_size_errors(kwargs: dict, message: str) -> None:
    with pytest.raises(PlanError, match=message.replace("(", r"\(").replace(")", r"\)")):
        plan_last(6, **kwargs)


# ------------------------------------------------------------------------------------------------- validation
def test_validation_errors_name_the_bad_input() -> None:
    plan = PruningPlan(removed_layers=[3, 1], num_layers=6, method="explicit", model_id="smollm2-135m")
    assert plan.removed_layers == [1, 3]
    with pytest.raises(PlanError, match="plan is for a decoder of 6 layers but the model has 30"):
        plan.validate_for(30)
    with pytest.raises(PlanError, match=r"made for model 'smollm2-135m' but is applied to 'qwen2.5-7b'"):
        plan.validate_for(6, "qwen2.5-7b")
    plan.validate_for(6, "/somewhere/checkpoints/pretrained/smollm2-135m")  # same model, by directory name
    plan.validate_for(6)  # no model id given: not checked
    with pytest.raises(PlanError, match=r"removed layer index 7 \(removed_layers\[1\]\) is out of range for a "
                                        r"decoder of 6 layers \(valid: 0..5\)"):
        PruningPlan(removed_layers=[0, 7], num_layers=6, method="explicit")
    with pytest.raises(PlanError, match="removes all 3 decoder layers: nothing left"):
        plan_explicit(3, [0, 1, 2])
    with pytest.raises(PlanError, match=r"duplicate layer indices in removed_layers: \[2\]"):
        plan_explicit(6, [2, 2])
    with pytest.raises(PlanError, match=r"removed_layers\[0\]='1' is not an int"):
        plan_explicit(6, ["1"])
    with pytest.raises(PlanError, match="unknown plan method 'magic'"):
        PruningPlan(removed_layers=[1], num_layers=6, method="magic")  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------- JSON
def test_json_round_trip_and_file_errors(tmp_path: Path, planted) -> None:
    _, result = planted
    plan = plan_angular(result, fraction=0.3, source_map=str(tmp_path / "map.json"))
    path = plan.to_json(tmp_path / "sub" / "plan.json")
    assert PruningPlan.from_json(path) == plan
    data = json.loads(path.read_text())
    assert data["format_version"] == 1 and data["kept_layers"] == plan.kept_layers
    assert data["receiving_layer"] == plan.receiving_layer
    assert not list(path.parent.glob(".*tmp"))  # the atomic write left no temporary file

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(dict(data, format_version=9)))
    with pytest.raises(PlanError, match=f"{bad}: unsupported format_version 9"):
        PruningPlan.from_json(bad)
    bad.write_text(json.dumps({k: v for k, v in data.items() if k != "num_layers"}))
    with pytest.raises(PlanError, match=r"missing key\(s\) \['num_layers'\]"):
        PruningPlan.from_json(bad)
    bad.write_text(json.dumps(dict(data, removed_layers=[2, 9])))
    with pytest.raises(PlanError, match=f"{bad}: removed layer index 9"):
        PruningPlan.from_json(bad)
    bad.write_text(json.dumps(dict(data, kept_layers=[0])))
    with pytest.raises(PlanError, match="kept_layers is \\[0\\] but removed_layers imply"):
        PruningPlan.from_json(bad)
    bad.write_text('{"format_version": 1,\n "num_layers": }')
    with pytest.raises(PlanError, match=f"{bad}:2:"):
        PruningPlan.from_json(bad)
    with pytest.raises(PlanError, match="does not exist"):
        PruningPlan.from_json(tmp_path / "missing.json")


# ------------------------------------------------------------------------------------------------- applying
def test_apply_plan_on_speechllm_mask_and_hf_model() -> None:
    speechllm = tiny_speechllm(layers=4)  # llm_path "<memory>"
    mask = apply_plan(speechllm, plan_explicit(4, [1, 2], model_id="<memory>"))
    assert mask is speechllm.layer_mask and mask.active_layers == (0, 3)
    with pytest.raises(PlanError, match="made for model 'other-llm' but is applied to '<memory>'"):
        apply_plan(speechllm, plan_explicit(4, [0], model_id="other-llm"))
    with pytest.raises(PlanError, match="plan is for a decoder of 6 layers but the model has 4"):
        apply_plan(speechllm.layer_mask, plan_last(6, n=1))
    assert mask.active_layers == (0, 3)  # a rejected plan leaves the selection alone

    model = tiny_causal_lm("qwen3", num_layers=6)
    mask = apply_plan(model, plan_last(6, n=2))
    assert mask.removed_layers == (3, 4) and model.config.num_hidden_layers == 4
    with pytest.raises(PlanError, match="cannot apply a pruning plan to a str"):
        apply_plan("model", plan_last(6, n=2))


# ------------------------------------------------------------------------------------------------- CLI
def test_cli_writes_plan_and_stock_reloadable_export(tmp_path: Path, planted, capsys) -> None:
    model, result = planted
    llm_dir = tmp_path / "tiny-llama"  # same name as the map's model_id
    model.save_pretrained(llm_dir)
    tiny_tokenizer().save_pretrained(llm_dir)
    map_path = result.to_json(tmp_path / "map.json")
    out_plan, export = tmp_path / "plan.json", tmp_path / "pruned"

    code = main(["--method", "angular", "--map", str(map_path), "--n", "2", "--llm_path", str(llm_dir),
                 "--out", str(out_plan), "--export", str(export)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "remove 2/6 layers" in printed and "[2, 3]" in printed and "parameters:" in printed
    plan = PruningPlan.from_json(out_plan)
    assert plan.removed_layers == [2, 3] and plan.source_map == str(map_path)
    assert PruningPlan.from_json(export / PLAN_IN_EXPORT) == plan

    reloaded = AutoModelForCausalLM.from_pretrained(export, attn_implementation="eager").eval()
    assert reloaded.config.num_hidden_layers == 4 and len(reloaded.model.layers) == 4
    assert AutoTokenizer.from_pretrained(export).get_vocab() == tiny_tokenizer().get_vocab()
    ids = tiny_input_ids(batch=2, length=9, seed=5)
    with torch.no_grad():
        full = model(ids).logits  # removing an identity block changes nothing
        torch.testing.assert_close(reloaded(ids).logits, full, rtol=0, atol=1e-5)
    before = sum(p.numel() for p in model.parameters())
    after = sum(p.numel() for p in reloaded.parameters())
    assert f"{before:,} -> {after:,}" in printed


def test_cli_yaml_config_and_input_errors(tmp_path: Path, capsys) -> None:
    config = tmp_path / "prune.yaml"
    config.write_text(f"method: last\nfraction: 0.5\nnum_layers: 6\nout: {tmp_path / 'plan.json'}\n")
    assert main(["--config", str(config)]) == 0
    assert PruningPlan.from_json(tmp_path / "plan.json").removed_layers == [2, 3, 4]

    assert main(["--config", str(config), "--print_config"]) == 0
    assert "fraction: 0.5" in capsys.readouterr().out

    map_path = synthetic_result([0.1 * i for i in range(1, 11)]).to_json(tmp_path / "map.json")
    cases = [
        (["--method", "angular", "--n", "2", "--out", "p.json"], "--method angular needs --map"),
        (["--method", "block_influence", "--map", str(map_path), "--n", "2", "--num_layers", "6", "--out", "p.json"],
         "the layer counts disagree (--map: 10, --num_layers: 6)"),
        (["--method", "explicit", "--num_layers", "6", "--out", "p.json"], "--method explicit needs --layers"),
        (["--method", "last", "--n", "2", "--out", "p.json"], "needs the layer count"),
        (["--method", "last", "--n", "2", "--num_layers", "6"], "nothing to write"),
        (["--method", "last", "--n", "2", "--num_layers", "6", "--export", "d"], "--export needs --llm_path"),
        (["--method", "explicit", "--layers", "[1, 9]", "--num_layers", "6", "--out", "p.json"],
         "removed layer index 9"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        assert message in capsys.readouterr().err
    assert main(["--method", "prune-everything"]) == 2


@pytest.mark.slow
def test_cli_angular_plan_on_real_smollm2_exports_a_stock_pruned_model(tmp_path: Path, capsys) -> None:
    from lightning_speechllm import assets

    llm_dir = assets.pull("smollm2-135m")
    tokenizer = AutoTokenizer.from_pretrained(llm_dir)
    model = AutoModelForCausalLM.from_pretrained(llm_dir, dtype=torch.float32).eval()
    batch = tokenizer(["The capital of France is Paris.", "Speech recognition turns audio into text.",
                       "One two three four five six seven."], return_tensors="pt", padding=True)
    mask = DecoderLayerMask(model)
    with torch.no_grad(), mask.record_residual_stream() as stream:
        model(**batch)
    token_mask = select_tokens(batch["attention_mask"], "all")
    distance, influence = AngularDistanceMetric(30), BlockInfluenceMetric(30)
    distance.update(stream.states, token_mask)
    influence.update(stream.states, token_mask)
    result = RedundancyResult.from_tables(distance.compute(), influence.compute(), model_id="smollm2-135m",
                                          token_selection="all", set_name="text", modality="text", num_samples=3)
    map_path = result.to_json(tmp_path / "map.json")

    export = tmp_path / "pruned"
    assert main(["--method", "angular", "--map", str(map_path), "--fraction", "0.2", "--llm_path", "smollm2-135m",
                 "--export", str(export)]) == 0
    plan = PruningPlan.from_json(export / PLAN_IN_EXPORT)
    assert len(plan.removed_layers) == 6 and plan.is_contiguous and plan.model_id == "smollm2-135m"
    assert plan.removed_layers[0] > 0  # the embedding-facing first layer is never the most redundant block
    print(capsys.readouterr().out)

    reloaded = AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32).eval()
    assert reloaded.config.num_hidden_layers == 24
    mask.remove_layers(plan.removed_layers)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, model(**batch).logits, rtol=0, atol=1e-4)
    assert AutoTokenizer.from_pretrained(export).eos_token == tokenizer.eos_token


def test_receiving_layers_cover_every_block_and_a_cut_at_the_end():
    split = plan_explicit(7, [0, 2, 3, 5])
    assert split.receiving_layers == [1, 4, 6] and split.receiving_layer == 6
    at_end = plan_explicit(4, [2, 3])
    assert at_end.receiving_layers == [1] and at_end.receiving_layer is None


def test_cli_attention_plan_from_a_sublayer_map_exports_zeroed_attention_with_identical_logits(tmp_path, capsys):
    from lightning_speechllm.model.sublayer_mask import SublayerMask
    from lightning_speechllm.redundancy.sublayers import SublayerMap

    model = tiny_llama(layers=6, seed=3).eval()
    llm_dir = tmp_path / "tiny-llama"
    model.save_pretrained(llm_dir)
    tiny_tokenizer().save_pretrained(llm_dir)
    sublayers = SublayerMap(layers=list(range(6)), attention=[0.4, 0.02, 0.3, 0.01, 0.5, 0.2], mlp=[0.6] * 6,
                            token_selection="last", num_samples=3, model_id=str(llm_dir))
    map_path = sublayers.to_json(tmp_path / "sublayers.json")
    export = tmp_path / "pruned"
    assert main(["--method", "attention", "--map", str(map_path), "--n", "2", "--llm_path", str(llm_dir),
                 "--out", str(tmp_path / "plan.json"), "--export", str(export)]) == 0
    assert "attention dropped at [1, 3]" in capsys.readouterr().out
    plan = PruningPlan.from_json(tmp_path / "plan.json")
    assert plan.removed_attention == [1, 3] and plan.removed_layers == []
    reloaded = AutoModelForCausalLM.from_pretrained(export, attn_implementation="eager").eval()
    assert reloaded.config.num_hidden_layers == 6  # stock transformers keeps the layers: attention output zeroed
    assert not reloaded.model.layers[1].self_attn.o_proj.weight.any()
    ids = tiny_input_ids(batch=2, length=9, seed=5)
    SublayerMask(model).drop(attention=[1, 3])
    with torch.no_grad():
        # eager vs sdpa attention through 6 layers: float32 logits (|x| <= 6) ~6e-6 apart; 1e-4 (~200 ulps) covers any
        # kernel, while attention left in a dropped layer (or dropped from a kept one) moves them by O(1)
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, rtol=0, atol=1e-4)
    assert main(["--method", "attention", "--n", "2", "--num_layers", "6", "--out", "p.json"]) == 2
    assert "--method attention needs --map (a sublayer map JSON" in capsys.readouterr().err
