"""The sweep's rule reads validation sets only; `--sweep.test_sets` scores the baseline and the chosen point once on
test sets afterwards (issue 12, item 1): never before the choice, never more than once, reused by a rerun."""
from __future__ import annotations

import json

import pytest
from torch.utils.data import DataLoader

from lightning_speechllm.evaluation.sweep import run as sweep_mod
from lightning_speechllm.evaluation.sweep import cli as sweep_cli
from lightning_speechllm.evaluation.sweep import SweepConfig, SweepError, score_chosen_on_test
from tests.test_module import NamedSets
from tests.test_speechllm import make_batch
from tests.tiny_speechllm import tiny_speechllm


class NamedSetsWithTest(NamedSets):
    """NamedSets plus one named test set."""

    test_set_names = ["held"]

    def __init__(self, n_train: int = 4):
        super().__init__(n_train)
        self.test = [[make_batch(seed=200)]]

    def test_dataloader(self):
        return [DataLoader(t, batch_size=None) for t in self.test]


class StageSpy:
    """Validation scores that grow with the mask (n=1 passes the rule, n=2 fails); test scores that would make every
    pruned point fail, so a rule that read them would choose nothing. Records every call."""

    def __init__(self):
        self.calls: list[tuple[str, tuple[int, ...], bool, tuple[str, ...] | None]] = []

    def __call__(self, model, datamodule, stage="validate", sets=None, **kwargs):
        removed = tuple(model.layer_mask.removed_layers)
        self.calls.append((stage, removed, model.has_lora, None if sets is None else tuple(sets)))
        if stage == "test":
            return {"held": {"wer": 10.0 + 100.0 * len(removed)}}
        return {"clean": {"wer": 10.0 + 2.0 * len(removed)}}


def _parsed(tmp_path, *extra: str) -> dict:
    return sweep_cli.parse_args(["--sweep.method", "last", "--sweep.ns", "[1, 2]", "--sweep.output_dir",
                                 str(tmp_path / "out"), "--sweep.test_sets", "[held]", "--trainer.accelerator", "cpu",
                                 "--report", "false", *extra])


def test_test_sets_are_scored_once_after_the_choice_and_reused(tmp_path, monkeypatch, capsys):
    spy = StageSpy()
    monkeypatch.setattr(sweep_mod, "evaluate", spy)
    table, chosen, _, test = sweep_cli.run(_parsed(tmp_path), tiny_speechllm(), NamedSetsWithTest())
    assert chosen.n == 1 and chosen.removed_layers == [2]  # chosen on validation: test scores (+1000%) ignored
    stages = [call[0] for call in spy.calls]
    assert stages == ["validate"] * 3 + ["test"] * 2  # baseline, n=1, n=2 on validation; then test, once each
    assert [call[1:] for call in spy.calls[3:]] == [((), False, ("held",)), ((2,), False, ("held",))]
    assert test["baseline"] == {"held": {"wer": 10.0}} and test["chosen"] == {"held": {"wer": 110.0}}
    assert (test["removed_layers"], test["requested"], test["healed"]) == ([2], "n=1", False)
    summary = json.loads((tmp_path / "out" / "sweep.json").read_text())
    assert summary["test"] == test and summary["chosen"]["removed_layers"] == [2]
    assert "held" not in json.dumps(summary["baseline"])  # the table the rule read holds no test set
    # a rerun reuses the points and the test scores: nothing is scored again
    again = StageSpy()
    monkeypatch.setattr(sweep_mod, "evaluate", again)
    assert sweep_cli.run(_parsed(tmp_path), tiny_speechllm(), NamedSetsWithTest())[3] == test
    assert again.calls == []
    assert "held wer: 10.00 -> 110.00 (+1000.0%)" in sweep_mod.describe_test(test)


def test_a_healed_sweep_heals_the_chosen_plan_again_before_its_test(tmp_path, monkeypatch):
    spy = StageSpy()
    monkeypatch.setattr(sweep_mod, "evaluate", spy)
    model = tiny_speechllm()
    parsed = _parsed(tmp_path, "--sweep.heal", "true", "--sweep.heal_steps", "1", "--sweep.heal_lora_r", "2",
                     "--sweep.heal_lora_alpha", "2")
    _, chosen, _, test = sweep_cli.run(parsed, model, NamedSetsWithTest(n_train=1))
    tests = [call for call in spy.calls if call[0] == "test"]
    assert [call[0] for call in spy.calls[:-2]] == ["validate"] * 5  # baseline, then before/after healing x 2
    assert tests == [("test", (), False, ("held",)), ("test", (2,), True, ("held",))]  # healed: LoRA + the mask
    assert test["healed"] and chosen.removed_layers == [2]
    assert not model.has_lora and model.layer_mask.removed_layers == ()  # restored afterwards


def test_no_test_without_a_chosen_point_and_the_cli_says_so(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sweep_mod, "evaluate", lambda model, dm, stage="validate", **kw: {
        "clean": {"wer": 10.0 * (1 + 9 * len(model.layer_mask.removed_layers))}})
    monkeypatch.setattr(sweep_cli, "build_model", lambda model, ckpt_path: tiny_speechllm())
    monkeypatch.setattr(sweep_cli, "build_datamodule", lambda data, sweep: NamedSetsWithTest())
    assert sweep_cli.main(["--sweep.method", "last", "--sweep.ns", "[1]", "--sweep.output_dir", str(tmp_path),
                           "--sweep.test_sets", "[held]", "--trainer.accelerator", "cpu", "--report", "false"]) == 0
    assert "test sets ['held'] not scored: no sweep point passes the rule" in capsys.readouterr().out
    assert not (tmp_path / "test.json").exists()


def test_real_scoring_of_the_chosen_point_on_a_test_set(tmp_path):
    model = tiny_speechllm()
    config = SweepConfig(method="last", ns=[1], test_sets=["held"], output_dir=str(tmp_path))
    chosen = sweep_mod.SweepPoint(method="last", value=1, kind="n", n=1, num_layers=model.layer_mask.num_layers,
                                  removed_layers=[2], before={})
    result = score_chosen_on_test(model, NamedSetsWithTest(), config, chosen,
                                  decoding=sweep_mod.DecodingConfig(max_new_tokens=3),
                                  trainer_kwargs={"accelerator": "cpu", "devices": 1})
    assert set(result["baseline"]) == set(result["chosen"]) == {"held"} and "wer" in result["chosen"]["held"]
    assert model.layer_mask.removed_layers == ()


def test_test_sets_are_checked_before_anything_runs():
    with pytest.raises(SweepError, match="needs stage 'validate'"):
        SweepConfig(method="last", stage="test", test_sets=["held"]).check()
    with pytest.raises(SweepError, match=r"--sweep.test_sets names \['nope'\], not in --data.test_sets \(\['held'\]\)"):
        sweep_cli.build_datamodule({"val_sets": {"dev": "dev.jsonl"}, "test_sets": {"held": "held.jsonl"}},
                                   SweepConfig(method="last", test_sets=["nope"]))
    data = sweep_cli.build_datamodule({"val_sets": {"dev": "dev.jsonl"}, "test_sets": {"held": "h.jsonl",
                                                                                       "other": "o.jsonl"}},
                                      SweepConfig(method="last", test_sets=["held"]))
    assert data.test_set_names == ["held"] and data.val_set_names == ["dev"]


class LongTestSet(NamedSets):
    """NamedSets plus one named test set of three batches (six utterances) whose references differ in length, so that
    a subset of its batches has another WER than the whole set."""

    test_set_names = ["held"]

    def __init__(self):
        super().__init__(n_train=1)
        long = "one two three four five six seven eight nine ten eleven twelve"
        self.test = [[make_batch(seconds=(1.0, 0.6), texts=["yes", "no"], seed=200),
                      make_batch(seconds=(1.2, 0.8), texts=[long, long], seed=201),
                      make_batch(seconds=(0.7, 0.9), texts=["the cat", "hello world"], seed=202)]]

    def test_dataloader(self):
        return [DataLoader(t, batch_size=None) for t in self.test]


def test_the_sweeps_test_baseline_scores_what_fits_test_scores(tmp_path):
    """Issue 20: one checkpoint scored 10.93% in `fit`'s test and 7.28% as the sweep's test baseline. Both run the
    same test step, but the sweep limited its test sets to `max_batches` (6 batches of 12 s: 21 of the 100 synthetic
    test utterances). The sweep now scores its test sets whole, and both outputs say how many utterances they scored."""
    from lightning_speechllm.model.module import DecodingConfig, SpeechLLMModule
    from tests.test_module import trainer

    model, data, decoding = tiny_speechllm(), LongTestSet(), DecodingConfig(max_new_tokens=3)
    fit_test = trainer(tmp_path)  # `fit`'s test: the trained module's test step over the whole test set
    fit_test.test(SpeechLLMModule(speechllm=model, decoding=decoding), datamodule=data, verbose=False)
    fit_scores = {key: float(value) for key, value in fit_test.callback_metrics.items()}
    assert fit_scores["test/held/utterances"] == 6

    config = SweepConfig(method="last", ns=[1], test_sets=["held"], max_batches=1, output_dir=str(tmp_path / "out"))
    chosen = sweep_mod.SweepPoint(method="last", value=1, kind="n", n=1, num_layers=model.layer_mask.num_layers,
                                  removed_layers=[2], before={})
    result = score_chosen_on_test(model, data, config, chosen, decoding=decoding,
                                  trainer_kwargs={"accelerator": "cpu", "devices": 1})
    assert result["baseline"]["held"]["wer"] == pytest.approx(fit_scores["test/held/wer"], abs=1e-6)
    assert result["baseline"]["held"]["utterances"] == 6
    assert "on 6 utterances" in sweep_mod.describe_test(result)


def test_a_sweep_names_decoding_that_differs_from_its_checkpoints(tmp_path):
    import torch

    from lightning_speechllm.model.module import DecodingConfig

    path = tmp_path / "fit.ckpt"
    torch.save({"hyper_parameters": {"model": {}, "decoding": {"max_new_tokens": 40, "num_beams": 1}},
                "state_dict": {}}, path)
    assert sweep_cli.decoding_differences(str(path), DecodingConfig()) == {"max_new_tokens": (96, 40)}
    assert sweep_cli.decoding_differences(str(path), DecodingConfig(max_new_tokens=40)) == {}
