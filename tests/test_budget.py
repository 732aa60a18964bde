"""Plans under a parameter budget: mixed whole layers and attention sublayers, greedy with re-measurement."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lightning_speechllm.pruning import PlanError, PruningPlan, apply_plan
from lightning_speechllm.pruning.budget import decoder_layer_parameters, plan_budget
from lightning_speechllm.pruning.cli import main
from lightning_speechllm.redundancy.metrics import AngularDistanceMetric, select_tokens
from lightning_speechllm.redundancy.sublayers import record_sublayer_stream
from tests.test_greedy import cli_model, tiny_dirs  # noqa: F401 (a fixture)
from tests.test_speechllm import make_batch
from tests.tiny_speechllm import tiny_speechllm

LAYERS = 6


@pytest.fixture(scope="module")
def batches():
    return [make_batch(), make_batch(seconds=(0.8, 1.2), texts=["a quick brown fox", "le chat"], seed=1)]


def _prices(model, batches, dropped: set[int], removed: list[int]) -> dict[tuple[str, int], float]:
    """Stream change per parameter saved of every unit, measured here by hand on the masked model."""
    layer_params, attention_params = decoder_layer_parameters(model)
    model.layer_mask.remove_layers(removed)
    model.sublayer_mask.drop(sorted(dropped))
    active = model.layer_mask.active_layers
    metric = AngularDistanceMetric(2 * len(active), keep_per_sample=False)
    with torch.no_grad():
        for batch in batches:
            inputs = model.build_inputs(batch)
            with record_sublayer_stream(model.llm) as stream:
                model.llm(inputs_embeds=inputs.inputs_embeds, attention_mask=inputs.attention_mask,
                          position_ids=inputs.position_ids, use_cache=False)
            metric.update(list(stream), select_tokens(inputs.segment_ids, "last"))
    table = metric.compute()
    model.layer_mask.reset()
    model.sublayer_mask.reset()
    prices = {}
    for k, layer in enumerate(active):
        saved = layer_params[layer] - (attention_params[layer] if layer in dropped else 0)
        prices[("layer", layer)] = float(table[1, 2 * k]) / saved
        if layer not in dropped:
            prices[("attention", layer)] = float(table[0, 2 * k]) / attention_params[layer]
    return prices


def test_every_round_removes_the_cheapest_unit_of_the_model_pruned_so_far(batches):
    model = tiny_speechllm(layers=LAYERS).eval()
    plan = plan_budget(model, batches, fraction=0.4, progress=False)
    layer_params, attention_params = decoder_layer_parameters(model)
    removed: list[int] = []
    dropped: set[int] = set()
    for done in plan.params["rounds"]:
        prices = _prices(model, batches, dropped, removed)
        assert (done["kind"], done["layer"]) == min(prices, key=prices.get)
        if done["kind"] == "layer":
            removed.append(done["layer"])
            dropped.discard(done["layer"])
        else:
            dropped.add(done["layer"])
    assert plan.removed_layers == sorted(removed) and plan.removed_attention == sorted(dropped)
    total = sum(layer_params)
    saved = sum(layer_params[i] for i in removed) + sum(attention_params[i] for i in dropped)
    assert plan.params["removed_params"] == saved >= 0.4 * total
    assert saved - plan.params["rounds"][-1]["params"] < 0.4 * total  # it stops at the first round over budget


def test_an_attention_that_does_nothing_goes_first_and_its_layer_later_saves_only_the_rest(batches):
    model = tiny_speechllm(layers=LAYERS).eval()
    with torch.no_grad():
        model.llm.model.layers[2].self_attn.o_proj.weight.zero_()  # d(x_2, m_2) = 0: the cheapest unit of all
    plan = plan_budget(model, batches, fraction=0.6, progress=False)
    first = plan.params["rounds"][0]
    assert (first["kind"], first["layer"], first["distance"]) == ("attention", 2, pytest.approx(0.0, abs=1e-6))
    layer_params, attention_params = decoder_layer_parameters(model)
    later = [done for done in plan.params["rounds"][1:] if done["kind"] == "layer" and done["layer"] == 2]
    if later:  # removing layer 2 afterwards saves its MLP and norms only
        assert later[0]["params"] == layer_params[2] - attention_params[2]
        assert 2 in plan.removed_layers and 2 not in plan.removed_attention
    else:
        assert 2 in plan.removed_attention


def test_the_plan_applies_and_removes_what_it_counted(batches, tmp_path: Path):
    model = tiny_speechllm(layers=LAYERS).eval()
    before = sum(p.numel() for p in model.llm.parameters())
    plan = PruningPlan.from_json(plan_budget(model, batches, remove_params=20000, progress=False).to_json(
        tmp_path / "plan.json"))
    assert plan.method == "budget" and not model.layer_mask.removed_layers  # the entry masks are back
    apply_plan(model, plan)
    counted = sum(p.numel() for p in model.llm.parameters())
    dropped = sum(p.numel() for i in plan.removed_attention
                  for p in model.llm.model.layers[model.layer_mask.active_layers.index(i)].self_attn.parameters())
    assert before - counted + dropped == plan.params["removed_params"] >= 20000


def test_bad_budgets_are_refused(batches):
    model = tiny_speechllm(layers=LAYERS).eval()
    with pytest.raises(PlanError, match="exactly one"):
        plan_budget(model, batches, remove_params=10, fraction=0.1)
    with pytest.raises(PlanError, match=r"fraction must be in \(0, 1\)"):
        plan_budget(model, batches, fraction=1.2)
    with pytest.raises(PlanError, match="remove_params must be in"):
        plan_budget(model, batches, remove_params=10 ** 9)


def test_prune_budget_command(tiny_dirs, tmp_path: Path, capsys):  # noqa: F811 (the fixture)
    out = tmp_path / "plan.json"
    argv = ["--method", "budget", "--budget", "0.3", "--calibration_batches", "2", "--calibration_modality", "text",
            "--data.val_sets", json.dumps({"dev": str(tiny_dirs["manifest"])}), "--data.max_cuts", "2",
            "--data.max_audio_seconds", "4", *cli_model(tiny_dirs), "--out", str(out)]
    assert main(argv) == 0, capsys.readouterr().err
    plan = PruningPlan.from_json(out)
    assert plan.method == "budget" and plan.params["fraction"] == 0.3
    assert plan.params["removed_params"] >= 0.3 * plan.params["total_params"]
    assert main([*argv[:2], "--fraction", "0.3", *argv[4:]]) == 2
    assert "--method budget takes --budget" in capsys.readouterr().err
