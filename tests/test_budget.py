"""Plans under a parameter budget: mixed whole layers and attention sublayers, greedy with re-measurement."""
from __future__ import annotations

import json
import random
import time
from pathlib import Path

import pytest
import torch

from lightning_speechllm.pruning import PlanError, PruningPlan, apply_plan
from lightning_speechllm.pruning.budget import (
    UnitCosts,
    decoder_layer_parameters,
    latency_costs,
    measured_speedup,
    parameter_costs,
    plan_budget,
)
from lightning_speechllm.pruning.cli import main
from lightning_speechllm.pruning.evolution import PlanFitness, evolve_units, mutate
from lightning_speechllm.pruning.latency import time_decode_units
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
    plan = PruningPlan.from_json(plan_budget(model, batches, remove=20000, progress=False).to_json(
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
        plan_budget(model, batches, remove=10, fraction=0.1)
    with pytest.raises(PlanError, match=r"fraction must be in \(0, 1\)"):
        plan_budget(model, batches, fraction=1.2)
    with pytest.raises(PlanError, match=r"the budget must be in \(0, \d+\) params"):
        plan_budget(model, batches, remove=10 ** 9)
    with pytest.raises(PlanError, match="search must be one of"):
        plan_budget(model, batches, fraction=0.2, search="annealing")


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


# ------------------------------------------------------------------------------------------------ costs
def test_unit_costs_count_a_layer_and_its_own_attention_once():
    costs = UnitCosts(layer=(10.0, 10.0, 10.0), attention=(3.0, 4.0, 5.0), total=30.0, unit="params")
    assert costs.saving(("attention", 1)) == 4.0
    assert costs.saving(("layer", 1)) == 10.0 and costs.saving(("layer", 1), dropped=[1]) == 6.0
    assert costs.saved({("layer", 0), ("attention", 0), ("attention", 2)}) == 15.0  # layer 0 holds its attention
    with pytest.raises(PlanError, match=r"the budget must be in \(0, 25\) params"):  # 30 less layer 2's MLP (5)
        plan_budget(tiny_speechllm(layers=3), [], remove=25, costs=costs)


def _slow_attention(model, layer: int, seconds: float):
    """Make one attention sublayer sleep whenever it runs (not when dropped), so that it dominates the decoding step."""
    model.llm.model.layers[layer].self_attn.o_proj.register_forward_pre_hook(lambda *_: time.sleep(seconds))


def test_decode_timing_nests_and_charges_each_unit_its_own_time(batches):
    model = tiny_speechllm(layers=LAYERS).eval()
    _slow_attention(model, 2, 0.01)
    timing = time_decode_units(model, batches[:1], new_tokens=4, repeats=1, warmup=0)
    assert timing.steps == 3  # the prefill is not a decoding step
    assert all(whole >= attention > 0 for whole, attention in zip(timing.layer_ms, timing.attention_ms))
    assert sum(timing.layer_ms) <= timing.step_ms  # layers run inside the LLM forward
    assert timing.attention_ms[2] >= 10.0  # its sleep is charged to it (a loaded machine may slow the others too)
    model.layer_mask.remove_layers([4])
    removed = time_decode_units(model, batches[:1], new_tokens=3, repeats=1, warmup=0)
    assert removed.layer_ms[4] == 0.0 and removed.attention_ms[4] == 0.0 and removed.steps == 2


def test_a_latency_budget_removes_the_slow_unit_first_and_measures_the_speedup(batches):
    model = tiny_speechllm(layers=LAYERS).eval()
    _slow_attention(model, 2, 0.05)  # far above a tiny layer's time, and above load spikes (medians of 3 passes)
    costs = latency_costs(model, batches[:1], new_tokens=3, repeats=3)
    assert costs.unit == "ms" and costs.attention[2] >= 50.0 and costs.total >= sum(costs.layer)
    plan = plan_budget(model, batches, fraction=0.5, costs=costs, progress=False)
    assert plan.params["rounds"][0]["layer"] == 2  # its attention, or the whole layer
    assert plan.params["removed"] >= 0.5 * costs.total
    assert plan.params["unit_costs"]["attention"][2] == costs.attention[2]
    measured = measured_speedup(model, batches[:1], plan, new_tokens=3, rounds=3)  # medians of 3: load spikes
    assert measured["predicted_speedup"] >= 2.0 and measured["speedup"] > 2.0  # a 50 ms sleep against a tiny step
    assert not model.layer_mask.removed_layers and not model.sublayer_mask.dropped_attention  # left unpruned


# ------------------------------------------------------------------------------------------------ evolutionary
def test_mutants_keep_the_budget_and_need_every_unit_they_remove():
    costs = UnitCosts(layer=(8.0,) * 6, attention=(2.0,) * 6, total=48.0, unit="params")
    rng = random.Random(0)
    parent = frozenset({("layer", 1), ("layer", 2)})
    seen = set()
    for _ in range(200):
        child = mutate(parent, costs, 16.0, rng, moves=rng.randint(1, 3))
        seen.add(child)
        assert costs.saved(child) >= 16.0
        assert all(costs.saved(child - {unit}) < 16.0 for unit in child)  # nothing the budget does not need
        assert not any(("layer", k) in child and ("attention", k) in child for k in range(6))
    assert any(kind == "attention" for child in seen for kind, _ in child)  # layers traded for attention sublayers
    assert len(seen) > 10


def test_near_the_largest_budget_a_unit_nothing_can_replace_is_not_freed():
    costs = UnitCosts(layer=(10.0,) * 4, attention=(3.0,) * 4, total=40.0, unit="params")
    parent = frozenset({("layer", 0), ("layer", 1), ("layer", 2), ("attention", 3)})  # 33 of the 33 removable
    rng = random.Random(0)
    children = set()
    for _ in range(100):  # freeing the attention alone has no stand-in (no fourth layer may go): it never raises
        child = mutate(parent, costs, 32.5, rng, moves=rng.randint(1, 3))
        children.add(child)
        layers = {k for kind, k in child if kind == "layer"}
        assert costs.saved(child) >= 32.5 and len(layers) == 3 and child - {("layer", k) for k in layers} == {
            ("attention", ({0, 1, 2, 3} - layers).pop())}  # the one layer kept loses its attention
    assert len(children) > 1


def test_plan_fitness_is_the_kl_from_the_unpruned_model_on_target_tokens(batches):
    model = tiny_speechllm(layers=LAYERS).eval()
    fitness = PlanFitness(model, batches)
    assert fitness(frozenset()) == pytest.approx(0.0, abs=1e-6)
    kl, tokens = 0.0, 0
    with torch.no_grad():
        for batch in batches:
            model.layer_mask.reset()
            inputs = model.build_inputs(batch)
            full = model.llm(inputs_embeds=inputs.inputs_embeds, attention_mask=inputs.attention_mask,
                             position_ids=inputs.position_ids).logits
            model.layer_mask.remove_layers([1])
            cut = model.llm(inputs_embeds=inputs.inputs_embeds, attention_mask=inputs.attention_mask,
                            position_ids=inputs.position_ids).logits
            targets = inputs.labels[:, 1:] != -100
            p, q = full[:, :-1][targets].log_softmax(-1), cut[:, :-1][targets].log_softmax(-1)
            kl += float(torch.nn.functional.kl_div(q, p, log_target=True, reduction="sum"))
            tokens += int(targets.sum())
    assert fitness(frozenset({("layer", 1)})) == pytest.approx(kl / tokens, rel=1e-4)


def test_the_search_finds_a_planted_free_layer_from_a_bad_start(batches):
    model = tiny_speechllm(layers=LAYERS).eval()
    with torch.no_grad():  # layer 3 adds nothing to the stream: removing it costs no KL at all
        model.llm.model.layers[3].self_attn.o_proj.weight.zero_()
        model.llm.model.layers[3].mlp.down_proj.weight.zero_()
    costs = parameter_costs(model)
    units, record = evolve_units(model, batches, costs, costs.layer[3], {("layer", 1)}, generations=6, offspring=6,
                                 progress=False)
    assert units == {("layer", 3)} and record["kl"] == pytest.approx(0.0, abs=1e-6)
    assert record["start_kl"] > 1e-3


def test_the_evolutionary_plan_is_never_worse_than_the_greedy_one_and_reproducible(batches):
    model = tiny_speechllm(layers=LAYERS).eval()
    greedy = plan_budget(model, batches, fraction=0.3, progress=False)
    evolved = plan_budget(model, batches, fraction=0.3, search="evolutionary", generations=3, offspring=4,
                          progress=False)
    record = evolved.params["evolution"]
    greedy_units = {("layer", k) for k in greedy.removed_layers} | {("attention", k) for k in greedy.removed_attention}
    assert {tuple(unit) for unit in record["start"]} == greedy_units
    assert record["kl"] <= record["start_kl"]
    assert evolved.params["removed_params"] >= 0.3 * evolved.params["total_params"]
    again = plan_budget(model, batches, fraction=0.3, search="evolutionary", generations=3, offspring=4,
                        progress=False)
    assert (again.removed_layers, again.removed_attention) == (evolved.removed_layers, evolved.removed_attention)


def test_prune_budget_latency_evolutionary_command(tiny_dirs, tmp_path: Path, capsys):  # noqa: F811 (the fixture)
    out = tmp_path / "plan.json"
    argv = ["--method", "budget", "--budget", "0.3", "--budget_unit", "latency", "--search", "evolutionary",
            "--generations", "2", "--offspring", "2", "--latency_tokens", "3", "--calibration_batches", "1",
            "--calibration_modality", "text", "--data.val_sets", json.dumps({"dev": str(tiny_dirs["manifest"])}),
            "--data.max_cuts", "2", "--data.max_audio_seconds", "4", *cli_model(tiny_dirs), "--out", str(out)]
    assert main(argv) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "ms of the decoding step" in printed and "evolutionary search: KL to the unpruned model" in printed
    assert "decoding step measured:" in printed and "the unit costs predicted" in printed
    plan = PruningPlan.from_json(out)
    assert plan.params["budget_unit"] == "ms" and plan.params["search"] == "evolutionary"
    assert plan.params["removed"] >= 0.3 * plan.params["total"]
    assert plan.params["measured"]["speedup"] > 0 and "predicted_speedup" in plan.params["measured"]
    assert main([*argv[:3], "5000", *argv[4:]]) == 2
    assert "with --budget_unit latency: give a share" in capsys.readouterr().err
    assert main(["--method", "greedy", "--n", "1", *argv[4:]]) == 2
    assert ("--budget_unit, --search, --generations, --offspring, --latency_tokens are only for --method budget, "
            "not greedy") in capsys.readouterr().err
