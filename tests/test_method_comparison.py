"""`sweep --sweep.compare_methods`: every method x healing variant on one table, the model restored between runs."""
from __future__ import annotations

import copy
import dataclasses
import json

import pytest

from lightning_speechllm.evaluation import method_comparison
from lightning_speechllm.evaluation.method_comparison import (
    ComparisonRow,
    compact_indices,
    compare_methods,
    frontier,
    frontier_markdown,
    mark_chosen,
)
from lightning_speechllm.evaluation.sweep import SweepConfig, SweepError
from lightning_speechllm.evaluation.sweep import cli as sweep_cli
from lightning_speechllm.evaluation.sweep.table import Thresholds
from lightning_speechllm.model.module import DecodingConfig
from tests.test_module import NamedSets
from tests.test_sweep import TRAINER, assert_restored, model_state, tiny_angular_map
from tests.tiny_speechllm import tiny_speechllm

METHODS = ["angular", "block_influence", "last", "greedy", "attention", "budget"]
VARIANTS = ["lora", "replacement", "kd", "linear_patch", "text_kd"]


def _config(tmp_path, methods=METHODS) -> SweepConfig:
    return SweepConfig(fractions=[0.25, 0.5], map_path=tiny_angular_map(tmp_path), heal_steps=1, heal_lora_r=2,
                       heal_lora_alpha=2, replacement_width=8, output_dir=str(tmp_path / "compare"),
                       compare_methods=list(methods), compare_healing=list(VARIANTS), calibration_batches=1,
                       speed_new_tokens=3)


def test_every_method_and_variant_runs_on_one_table_and_the_model_is_restored(tmp_path):
    model = tiny_speechllm()
    model.train(False)
    state, model_config = model_state(model), copy.deepcopy(model.config)
    rows = compare_methods(model, NamedSets(n_train=1), _config(tmp_path), decoding=DecodingConfig(max_new_tokens=3),
                           trainer_kwargs=TRAINER)
    assert_restored(model, state, model_config)
    assert not model.sublayer_mask.dropped_attention and not len(model.replacements)
    keys = [(row.method, row.fraction, row.healing) for row in rows]
    assert keys[0] == ("none", 0.0, "none")
    # 2 fractions x 6 methods x 6 rows, less the replacement and linear patch where sublayers are dropped (attention
    # always, budget when it chose some), less the linear patches of plans that remove layer 0 (no layer before it)
    unhealed = [r for r in rows if r.healing == "none" and r.method != "none"]
    with_sublayers = sum(1 for r in unhealed if r.removed_attention)
    at_layer_0 = sum(1 for r in unhealed if 0 in r.removed_layers and not r.removed_attention)
    assert len(rows) == 1 + 2 * 6 * 6 - 2 * with_sublayers - at_layer_0
    by_key = {(row.method, row.fraction, row.healing): row for row in rows}
    assert by_key[("angular", 0.25, "none")].removed_layers == [2]
    assert by_key[("angular", 0.5, "none")].removed_layers == [1, 2]
    assert by_key[("last", 0.5, "none")].removed_layers == [1, 2]
    assert by_key[("attention", 0.5, "none")].removed_layers == []
    assert len(by_key[("attention", 0.5, "none")].removed_attention) == 2
    base = rows[0]
    for fraction in (0.25, 0.5):
        whole = by_key[("angular", fraction, "none")]
        attention = by_key[("attention", fraction, "none")]
        assert whole.decoder_params < base.decoder_params and attention.decoder_params < base.decoder_params
        # measured, not analytic: a dropped attention or layer keeps no keys/values
        assert whole.kv_cache_bytes == base.kv_cache_bytes * (4 - int(fraction * 4)) // 4
        assert attention.kv_cache_bytes == whole.kv_cache_bytes
        replaced = by_key[("angular", fraction, "replacement")]
        assert replaced.decoder_params > whole.decoder_params  # the replacement FFN counts
        assert replaced.kv_cache_bytes == whole.kv_cache_bytes  # and keeps no cache
        patched = by_key[("angular", fraction, "linear_patch")]  # folded into a kept layer: a stock pruned decoder
        assert (patched.decoder_params, patched.kv_cache_bytes) == (whole.decoder_params, whole.kv_cache_bytes)
    for row in rows:
        assert "wer" in row.scores["clean"] and "loop_rate" in row.scores["clean"]
        timed = row.healing in ("none", "replacement", "linear_patch")  # LoRA merges at export: decodes as unhealed
        assert (row.decode_speedup > 0) == timed and (row.kv_cache_bytes >= 0) == timed
    out = tmp_path / "compare"
    markdown = (out / "comparison.md").read_text()
    summary, full = markdown.split("## Every row")
    assert summary.count("\n| greedy |") == 2 and full.count("\n| greedy |") == 12 and "KV cache" in markdown
    assert "| attention | 50% | - | " in summary and summary.count("n/a") == 2 * with_sublayers  # no replacement/patch
    for fraction in (0.25, 0.5):  # the budget plan removes at least the parameters of the layer plans' fraction
        budget, whole = by_key[("budget", fraction, "none")], by_key[("angular", fraction, "none")]
        assert budget.decoder_params <= whole.decoder_params
    assert (out / "plans" / "budget_0.5.json").is_file()
    assert (out / "comparison.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "plans" / "sublayers.png").is_file() and (out / "plans" / "greedy_0.5.json").is_file()
    assert len(json.loads((out / "comparison.json").read_text())) == len(rows)

    rerun = compare_methods(model, NamedSets(n_train=1), _config(tmp_path), decoding=DecodingConfig(max_new_tokens=3),
                            trainer_kwargs=TRAINER, evaluate_fn=_never)
    assert [r.scores for r in rerun] == [r.scores for r in rows]  # every row read back, nothing recomputed


def _never(*args, **kwargs):
    raise AssertionError("a finished row was recomputed")


def test_rule_marks_the_largest_passing_fraction_per_method_and_healing():
    def row(method, fraction, healing, wer):
        return ComparisonRow(method, fraction, healing, [], [], {"dev": {"wer": wer}}, 1, 1.0, 1)

    rows = [row("none", 0.0, "none", 10.0), row("a", 0.2, "none", 12.0), row("a", 0.4, "none", 13.0),
            row("a", 0.2, "lora", 11.0), row("a", 0.4, "lora", 12.4), row("b", 0.2, "none", 12.6)]
    mark_chosen(rows, Thresholds(0.25, 0.10))
    assert [r.chosen for r in rows] == [False, True, False, False, True, False]


def test_compact_ranges_and_bad_options(tmp_path):
    assert compact_indices([4, 5, 6, 9, 11, 12]) == "4-6,9,11-12" and compact_indices([]) == "-"
    with pytest.raises(SweepError, match=r"unknown methods / healing variants \['sleb'\]"):
        compare_methods(tiny_speechllm(), NamedSets(), _config(tmp_path, methods=["sleb"]))
    with pytest.raises(SweepError, match="needs sweep.fractions"):
        compare_methods(tiny_speechllm(), NamedSets(), SweepConfig(ns=[1], compare_methods=["last"]))


def test_cli_runs_a_comparison_and_prints_its_table(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sweep_cli, "build_datamodule", lambda data, sweep: NamedSets(n_train=1))
    monkeypatch.setattr(sweep_cli, "build_model", lambda model, ckpt: tiny_speechllm())
    code = sweep_cli.main(["--sweep.compare_methods", "[last, attention]", "--sweep.compare_healing", "[lora]",
                           "--sweep.fractions", "[0.25]", "--sweep.heal_steps", "1", "--sweep.heal_lora_r", "2",
                           "--sweep.calibration_batches", "1", "--sweep.speed_new_tokens", "3",
                           "--decoding.max_new_tokens", "3", "--trainer.accelerator", "cpu",
                           "--sweep.output_dir", str(tmp_path / "cli"), "--data.val_sets", "{clean: x.jsonl}"])
    captured = capsys.readouterr()
    printed = captured.out
    assert code == 0, captured.err
    assert "| last | 25% | 2 | - |" in printed and "| attention | 25% | - | " in printed and "healed: lora" in printed
    assert (tmp_path / "cli" / "comparison.csv").is_file()


def test_the_frontier_keeps_the_rows_no_other_beats_on_speed_and_wer():
    def row(method, fraction, healing, wer, speed):
        return ComparisonRow(method, fraction, healing, [], [], {"dev": {"wer": wer}}, 1, 1.0, 1, decode_speedup=speed)

    base, fast_bad, fast_healed = row("none", 0.0, "none", 10.0, 1.0), row("a", 0.2, "none", 50.0, 1.2), \
        row("a", 0.2, "lora", 12.0, -1.0)  # LoRA decodes as its unhealed row: 1.2x
    slower, fastest = row("b", 0.2, "none", 30.0, 1.1), row("a", 0.4, "none", 100.0, 1.5)
    patched = row("b", 0.2, "linear_patch", 11.0, 1.9)  # folded into the weights: b's 1.1x, not its own noisy 1.9x
    replaced = row("b", 0.2, "replacement", 40.0, 1.15)  # runs a module: its own 1.15x, beaten by a + lora
    rows = [base, fast_bad, fast_healed, slower, fastest, patched, replaced]
    assert [(speed, wer, r) for speed, wer, r in frontier(rows)] == [
        (1.0, 10.0, base), (1.1, 11.0, patched), (1.2, 12.0, fast_healed), (1.5, 100.0, fastest)]
    table = frontier_markdown(rows)
    assert "| 1.20x | 12.0 | a | 20% | lora |" in table and "| 1.00x | 10.0 | unpruned |" in table
    assert "| b | 20% | none |" not in table and "| replacement |" not in table


def test_budget_evo_refines_the_budget_plan_of_the_same_share(tmp_path, monkeypatch):
    model = tiny_speechllm()
    model.train(False)
    config = SweepConfig(fractions=[0.5], map_path=tiny_angular_map(tmp_path), output_dir=str(tmp_path / "compare"),
                         compare_methods=["budget", "budget_evo"], compare_healing=[], calibration_batches=1,
                         speed_new_tokens=3, budget_generations=2, budget_offspring=3)
    rows = compare_methods(model, NamedSets(n_train=1), config, decoding=DecodingConfig(max_new_tokens=3),
                           trainer_kwargs=TRAINER)
    assert [(r.method, r.healing) for r in rows] == [("none", "none"), ("budget", "none"), ("budget_evo", "none")]
    plans = tmp_path / "compare" / "plans"
    greedy, evolved = (json.loads((plans / f"{name}_0.5.json").read_text()) for name in ("budget", "budget_evo"))
    record = evolved["params"]["evolution"]
    greedy_units = [["attention", k] for k in greedy["removed_attention"]] + [["layer", k]
                                                                              for k in greedy["removed_layers"]]
    assert sorted(record["start"]) == sorted(greedy_units) and record["kl"] <= record["start_kl"]
    assert evolved["params"]["remove_params"] == greedy["params"]["remove_params"]
    assert evolved["params"]["removed_params"] >= evolved["params"]["remove_params"]
    markdown = (tmp_path / "compare" / "comparison.md").read_text()
    assert "## Speed-up / quality frontier" in markdown
    assert (tmp_path / "compare" / "frontier.png").read_bytes()[:4] == b"\x89PNG"

    monkeypatch.setattr(method_comparison, "plan_budget", _never)  # stored rows: no plan is measured again
    rerun = compare_methods(model, NamedSets(n_train=1), config, decoding=DecodingConfig(max_new_tokens=3),
                            trainer_kwargs=TRAINER, evaluate_fn=_never)
    assert [r.scores for r in rerun] == [r.scores for r in rows]
    monkeypatch.undo()
    scored = []  # a longer search recomputes the budget_evo row only
    longer = dataclasses.replace(config, budget_generations=3)
    compare_methods(model, NamedSets(n_train=1), longer, decoding=DecodingConfig(max_new_tokens=3),
                    trainer_kwargs=TRAINER, evaluate_fn=lambda *args, **kwargs: scored.append(1) or rows[2].scores)
    assert len(scored) == 1
