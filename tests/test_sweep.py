"""Pruning sweep: the stopping rule on hand-made tables, a tiny 2-point sweep with and without healing, resume."""
from __future__ import annotations

import copy
import csv
import math

import numpy as np
import pytest
import torch

from lightning_speechllm.evaluation.sweep import run as sweep_mod
from lightning_speechllm.evaluation.sweep import (
    SweepConfig,
    SweepError,
    SweepPoint,
    SweepTable,
    Thresholds,
    choose_fraction,
    choose_point,
    passes,
    relative_change,
    run_sweep,
)
from lightning_speechllm.model.module import DecodingConfig
from lightning_speechllm.redundancy.analysis import RedundancyResult
from tests.test_module import NamedSets
from tests.tiny_speechllm import tiny_speechllm

TRAINER = dict(accelerator="cpu", devices=1)


def point(n: int, wer: float, bleu: float | None = None, after_wer: float | None = None, num_layers: int = 10,
          after_bleu: float | None = None) -> SweepPoint:
    before = {"clean": {"wer": wer}}
    if bleu is not None:
        before["fr-en"] = {"bleu": bleu}
    after = None
    if after_wer is not None:
        after = {"clean": {"wer": after_wer}}
        if after_bleu is not None:
            after["fr-en"] = {"bleu": after_bleu}
    return SweepPoint(method="angular", value=n, kind="n", n=n, num_layers=num_layers,
                      removed_layers=list(range(n)), before=before, after=after)


# ------------------------------------------------------------------------------------------------ the rule
def test_rule_picks_largest_fraction_within_25_percent_wer():
    table = SweepTable({"clean": {"wer": 4.0}}, 10, [point(1, 4.2), point(2, 4.7), point(3, 5.0), point(4, 5.2)])
    assert choose_fraction(table) == pytest.approx(0.3)  # 5.0 is exactly +25%: passes
    assert choose_fraction(table, Thresholds(max_rel_wer_increase=0.2)) == pytest.approx(0.2)


def test_rule_returns_none_when_no_point_passes_and_on_empty_tables():
    table = SweepTable({"clean": {"wer": 4.0}}, 10, [point(1, 6.0), point(2, 9.0)])
    assert choose_point(table) is None and choose_fraction(table) is None
    assert choose_fraction(SweepTable({"clean": {"wer": 4.0}}, 10, [])) is None
    assert choose_fraction(SweepTable({}, 10, [point(1, 4.0)])) is None


def test_rule_is_largest_passing_even_on_non_monotone_curves():
    table = SweepTable({"clean": {"wer": 4.0}}, 10, [point(1, 4.1), point(2, 7.0), point(3, 4.8), point(4, 9.0)])
    assert choose_point(table).n == 3  # 20% fails but 30% passes: the largest passing point wins


def test_rule_needs_every_set_and_bleu_drop_within_10_percent():
    baseline = {"clean": {"wer": 4.0}, "fr-en": {"bleu": 30.0}}
    table = SweepTable(baseline, 10, [point(1, 4.1, bleu=28.0), point(2, 4.2, bleu=26.0), point(3, 4.3, bleu=29.0)])
    assert choose_point(table).n == 3
    ok, failures = passes(table.points[1], baseline)
    assert not ok and failures == ["fr-en bleu -13.3%"]
    assert passes(point(1, 4.1), baseline)[1] == ["fr-en bleu missing"]  # a set not scored fails


def test_rule_judges_after_healing_when_healing_ran():
    table = SweepTable({"clean": {"wer": 4.0}}, 10, [point(2, 8.0, after_wer=4.5), point(3, 9.0, after_wer=6.0)])
    assert choose_point(table).n == 2
    nan_point = point(1, 4.0, after_wer=math.nan)
    assert not passes(nan_point, table.baseline)[0]


def test_relative_change_edge_cases():
    assert relative_change(5.0, 4.0) == pytest.approx(0.25)
    assert relative_change(0.0, 0.0) == 0.0 and relative_change(1.0, 0.0) == math.inf
    assert math.isnan(relative_change(math.nan, 1.0))


def test_config_checks():
    with pytest.raises(SweepError, match="mutually exclusive"):
        SweepConfig(method="last", fractions=[0.1], ns=[1]).check()
    with pytest.raises(SweepError, match="needs map_path"):
        SweepConfig(method="angular", ns=[1]).check()
    with pytest.raises(SweepError, match=r"in \(0, 1\)"):
        SweepConfig(method="last", fractions=[1.2]).check()
    assert SweepConfig(method="last").values() is None  # neither grid given: the walk over n (test_sweep_grid.py)


# ------------------------------------------------------------------------------------------------ fake scoring
class CountingEvaluator:
    """Scores that grow with the number of masked layers; counts calls and records the masks it saw."""

    def __init__(self):
        self.calls: list[tuple[int, ...]] = []

    def __call__(self, model, datamodule, **kwargs):
        removed = tuple(model.layer_mask.removed_layers)
        self.calls.append(removed)
        return {"clean": {"wer": 10.0 + 2.0 * len(removed)}, "ast-fr": {"bleu": 20.0 - 1.0 * len(removed)}}


def test_resume_recomputes_only_the_deleted_point(tmp_path):
    model = tiny_speechllm()
    config = SweepConfig(method="last", ns=[1, 2], output_dir=str(tmp_path))
    spy = CountingEvaluator()
    table, chosen = run_sweep(model, NamedSets(), config, evaluate_fn=spy)
    assert spy.calls == [(), (2,), (1, 2)]  # baseline, n=1, n=2 (last: the final layer is kept)
    assert [p.n for p in table.points] == [1, 2] and chosen.n == 1  # n=2: WER +40%; n=1: +20%, BLEU -5%
    assert model.layer_mask.removed_layers == ()  # reset after the sweep
    (tmp_path / "points" / "last_n2.json").unlink()
    again = CountingEvaluator()
    table2, _ = run_sweep(model, NamedSets(), config, evaluate_fn=again)
    assert again.calls == [(1, 2)]
    assert table2.to_dict() == table.to_dict()
    with pytest.raises(SweepError, match="another sweep"):
        run_sweep(model, NamedSets(), SweepConfig(method="last", ns=[1, 2], heal=True, heal_steps=1,
                                                  output_dir=str(tmp_path)), evaluate_fn=CountingEvaluator())


def tiny_angular_map(tmp_path) -> str:
    """A 4-layer map whose pruning path is layer 2 (n=1), layers 1..2 (n=2); BI ranks 2, 1, 0, 3."""
    table = np.full((4, 4), np.nan)
    for n in range(1, 5):
        for first in range(0, 5 - n):
            table[n - 1, first] = 0.5 + 0.05 * first
    table[0, 2], table[1, 1] = 0.01, 0.02  # n=1 -> layer 2, n=2 -> layers 1..2
    result = RedundancyResult.from_tables(table, [0.3, 0.2, 0.1, 0.4], model_id="<memory>", token_selection="last",
                                          set_name="clean", modality="speech", num_samples=4, n_boot=0)
    return str(result.to_json(tmp_path / "map.json"))


def test_angular_sweep_follows_the_pruning_path_of_the_map(tmp_path):
    map_path = tiny_angular_map(tmp_path)
    spy = CountingEvaluator()
    config = SweepConfig(method="angular", fractions=[0.25, 0.5], map_path=str(map_path),
                         output_dir=str(tmp_path / "sweep"))
    run_sweep(tiny_speechllm(), NamedSets(), config, evaluate_fn=spy)
    assert spy.calls == [(), (2,), (1, 2)]
    assert sorted(p.name for p in (tmp_path / "sweep" / "points").iterdir()) == [
        "angular_0.25.json", "angular_0.5.json", "baseline.json"]


# ------------------------------------------------------------------------------------------------ real scoring
def _read_csv(path):
    with open(path, newline="") as stream:
        return list(csv.DictReader(stream))


@pytest.mark.parametrize("heal", [False, True])
def test_two_point_sweep_writes_table_markdown_and_curve(tmp_path, heal):
    config = SweepConfig(method="last", fractions=[0.25, 0.5], heal=heal, heal_steps=2, heal_lora_r=4,
                         heal_lora_alpha=4, output_dir=str(tmp_path))
    model = tiny_speechllm()
    state, model_config = model_state(model), copy.deepcopy(model.config)
    table, chosen = run_sweep(model, NamedSets(n_train=2), config, decoding=DecodingConfig(max_new_tokens=3),
                              trainer_kwargs=TRAINER)
    assert set(table.baseline) == {"clean", "ast-fr"}
    assert "wer" in table.baseline["clean"] and "bleu" in table.baseline["ast-fr"]
    rows = _read_csv(tmp_path / "sweep.csv")
    assert [r["method"] for r in rows] == ["baseline", "last", "last"]
    assert [r["n"] for r in rows] == ["0", "1", "2"] and rows[2]["removed_layers"] == "1 2"
    assert ("clean/wer_after" in rows[0]) == heal and "ast-fr/rel_dbleu_before" in rows[0]
    if heal:
        assert all(p.after is not None and p.heal_steps == 2 for p in table.points)
    assert_restored(model, state, model_config)  # healed in place, then restored bit for bit
    markdown = (tmp_path / "sweep.md").read_text()
    assert markdown.count("\n| last |") == 2 and ("Chosen:" in markdown or "No sweep point passes" in markdown)
    assert (tmp_path / "sweep.png").read_bytes()[:4] == b"\x89PNG"
    assert model.layer_mask.removed_layers == ()


def model_state(model) -> dict[str, torch.Tensor]:
    return {key: value.clone() for key, value in model.state_dict().items()}


def assert_restored(model, state: dict[str, torch.Tensor], model_config) -> None:
    assert not model.has_lora and model.layer_mask.removed_layers == ()
    now = model.state_dict()
    assert list(now) == list(state)
    assert all(torch.equal(now[key], value) for key, value in state.items())
    assert model.config == model_config
    assert [name for name, p in model.named_parameters() if p.requires_grad] == [
        name for name, _ in model.projector.named_parameters(prefix="projector")]


class FailingEvaluator(CountingEvaluator):
    """Scores the unhealed model, then fails on the healed one (recording what it saw)."""

    def __init__(self):
        super().__init__()
        self.healed: list[tuple[int, ...]] = []
        self.projector: dict[str, torch.Tensor] = {}

    def __call__(self, model, datamodule, **kwargs):
        if model.has_lora:
            self.healed.append(tuple(model.layer_mask.removed_layers))
            self.projector = {k: v.clone() for k, v in model.projector.state_dict().items()}
            raise RuntimeError("evaluation failed")
        return super().__call__(model, datamodule, **kwargs)


def test_healing_is_undone_when_the_evaluation_of_the_healed_model_raises(tmp_path):
    model = tiny_speechllm()
    model.train(False)
    state, model_config = model_state(model), copy.deepcopy(model.config)
    spy = FailingEvaluator()
    config = SweepConfig(method="last", ns=[2], heal=True, heal_steps=1, heal_lora_r=2, heal_lora_alpha=2,
                         output_dir=str(tmp_path))
    with pytest.raises(RuntimeError, match="evaluation failed"):
        run_sweep(model, NamedSets(n_train=1), config, trainer_kwargs=TRAINER, evaluate_fn=spy)
    assert spy.calls == [(), (1, 2)] and spy.healed == [(1, 2)]  # the healed model: LoRA and the plan's mask
    assert any(not torch.equal(v, state[f"projector.{k}"]) for k, v in spy.projector.items())  # the projector trained
    assert_restored(model, state, model_config)
    assert not any(m.training for m in model.modules())  # eval mode as on entry, though fit trains


# ------------------------------------------------------------------------------------------------ the command
def test_cli_print_config_lists_every_group(capsys):
    from lightning_speechllm.evaluation.sweep import cli as sweep_cli

    assert sweep_cli.main(["--print_config"]) == 0
    printed = capsys.readouterr().out
    for key in ("sweep:", "max_rel_wer_increase: 0.25", "model:", "data:", "decoding:", "trainer:", "ckpt_path:"):
        assert key in printed


def test_cli_runs_from_yaml_prints_table_and_writes_report(tmp_path, monkeypatch, capsys):
    from lightning_speechllm.evaluation.sweep import cli as sweep_cli

    monkeypatch.setattr(sweep_cli, "build_model", lambda model, ckpt_path: tiny_speechllm())
    monkeypatch.setattr(sweep_cli, "build_datamodule", lambda data, sweep: NamedSets())
    spy = CountingEvaluator()
    monkeypatch.setattr(sweep_mod, "evaluate", spy)
    config = tmp_path / "sweep.yaml"
    config.write_text(f"sweep:\n  method: last\n  ns: [1, 2]\n  output_dir: {tmp_path / 'out'}\n"
                      "trainer:\n  accelerator: cpu\n")
    assert sweep_cli.main(["--config", str(config)]) == 0
    printed = capsys.readouterr().out
    assert "chosen fraction: 0.250" in printed and f"report: {tmp_path / 'out' / 'report.md'}" in printed
    assert len(spy.calls) == 3 and (tmp_path / "out" / "report.html").is_file()


def test_cli_reports_bad_options_with_exit_code_2(tmp_path, capsys):
    from lightning_speechllm.evaluation.sweep import cli as sweep_cli

    assert sweep_cli.main(["--sweep.method", "angular", "--sweep.ns", "[1]", "--data.val_sets", "{a: a.jsonl}",
                           "--sweep.output_dir", str(tmp_path)]) == 2
    assert "needs map_path" in capsys.readouterr().err


def test_healed_sweep_of_a_lora_tuned_model_merges_its_adapters_first(tmp_path):
    from lightning_speechllm.model.speechllm import LoraConfig
    from tests.test_speechllm import make_batch

    lora = LoraConfig(r=2, alpha=4, dropout=0.0, target_modules=["q_proj", "v_proj"])
    model = tiny_speechllm(lora=lora).eval()
    with torch.no_grad():  # non-zero B, so the adapters change the output
        for name, param in model.llm.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    batch = make_batch()
    with torch.no_grad():
        tuned = model(batch)[1].logits
    spy = CountingEvaluator()
    config = SweepConfig(method="last", ns=[1], heal=True, heal_steps=1, heal_lora_r=2, heal_lora_alpha=2,
                         output_dir=str(tmp_path))
    run_sweep(model, NamedSets(n_train=1), config, trainer_kwargs=TRAINER, evaluate_fn=spy)
    assert not model.has_lora and model.config.lora is None
    with torch.no_grad():
        # merged vs unmerged LoRA (B ~ N(0, 0.5)): float32 logits (|x| <= 6) ~1e-5 apart; 1e-4 (~200 ulps) covers any
        # kernel, while adapters that are dropped instead of merged change the logits by O(1)
        torch.testing.assert_close(model.eval()(batch)[1].logits, tuned, atol=1e-4, rtol=1e-5)


def test_sweep_trainers_keep_lightnings_banner_out_of_the_log(caplog):
    import logging

    with caplog.at_level(logging.INFO, logger="lightning.pytorch.utilities.rank_zero"):
        sweep_mod.build_trainer({"accelerator": "cpu"}, max_steps=1)
    assert not [r for r in caplog.records if "GPU available" in r.getMessage()]
    assert logging.getLogger("lightning.pytorch.utilities.rank_zero").level == logging.NOTSET  # restored


def test_text_kd_heals_on_the_teachers_answer_or_on_the_targets():
    from lightning_speechllm.evaluation.sweep.run import healing_config
    from lightning_speechllm.pruning import PruningPlan

    plan = PruningPlan(removed_layers=[1, 2], num_layers=4, method="explicit")
    for response in ("teacher", "target"):
        config = SweepConfig(heal_variant="text_kd", text_kd_response=response, kd_temperature=2.0)
        losses = healing_config(plan, config).losses
        assert losses == [{"class_path": "TextTeacherKL", "init_args": {"temperature": 2.0, "response": response}}]
