"""Failure modes of pruned SpeechLLMs: loops, empty outputs, insertions, hypotheses cut off at max_new_tokens."""
from __future__ import annotations

import json
import math

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader
from transformers import LogitsProcessor, LogitsProcessorList

from lightning_speechllm.evaluation import FAILURE_METRICS, FailureModeCounts, WordErrorCounts
from lightning_speechllm.evaluation.failure_modes import has_loop, is_empty, words
from lightning_speechllm.evaluation.report import write_report
from lightning_speechllm.evaluation.sweep import evaluate
from lightning_speechllm.evaluation.sweep.table import SweepPoint, SweepTable, Thresholds, choose_point, passes
from lightning_speechllm.model.generation import GenerationOutput, generated_lengths
from lightning_speechllm.model.module import DecodingConfig, SpeechLLMModule
from tests.test_speechllm import make_batch
from tests.tiny_speechllm import tiny_speechllm


# ------------------------------------------------------------------------------------------- definitions
@pytest.mark.parametrize("text, expected", [
    ("the cat the cat the cat the cat", True),  # a 2-gram 4 times in a row
    ("the cat the cat the cat", False),  # only 3 copies
    ("No, no. NO! no...", True),  # case and punctuation do not hide a loop
    ("no no no", False),  # a natural triple
    ("one two three four one two three four one two three four one two three four", True),  # 4-gram x4
    ("a b c d e a b c d e a b c d e a b c d e", False),  # a 5-gram: longer than max_ngram
    ("a b x a b y a b z a b", False),  # repeated, but not back to back
    ("it went on and on and on", False),  # natural: "on and" twice
    ("and so on and on and on and on and on", True),  # "on and" x4 inside a sentence
    ("the cat sat on the mat", False),
    ("", False),
])
def test_loop_definition_on_hand_made_strings(text, expected):
    assert has_loop(text) is expected


def test_loop_parameters_change_the_definition():
    assert has_loop("a b c d e a b c d e a b c d e a b c d e", max_ngram=5)
    assert has_loop("no no no", min_repeats=3) and not has_loop("no no", min_repeats=3)
    assert words("Don't STOP, don't-stop!") == ["don't", "stop", "don't", "stop"]
    with pytest.raises(ValueError, match="min_repeats >= 2"):
        has_loop("a a", min_repeats=1)
    with pytest.raises(ValueError, match="max_ngram >= 1"):
        FailureModeCounts(max_ngram=0)


def test_empty_definition_normalises_only_for_asr():
    assert is_empty("") and is_empty(" \n\t")
    assert not is_empty("uh") and is_empty("uh", normalize=True)  # the Whisper normaliser drops fillers
    assert not is_empty("hello", normalize=True)


def test_failure_counts_exact_rates_accumulate_and_reset():
    metric = FailureModeCounts()
    metric.update(["go go go go", "", "fine words", "uh", "no no no"], [True, False, False, False, False],
                  normalize=True)
    metric.update(["bonjour", "  "], [True, False])  # not normalised: "uh" would not be empty here
    out = metric.compute()
    assert int(out["hypotheses"]) == 7
    assert out["loop_rate"].item() == pytest.approx(1 / 7)  # "no no no" is no loop
    assert out["empty_rate"].item() == pytest.approx(3 / 7)  # "", "uh" (ASR), "  "
    assert out["max_tokens_rate"].item() == pytest.approx(2 / 7)
    with pytest.raises(ValueError, match="2 hypotheses but 1"):
        metric.update(["a", "b"], [False])
    metric.reset()
    assert {k: float(v) for k, v in metric.compute().items()} == {
        "loop_rate": 0.0, "empty_rate": 0.0, "max_tokens_rate": 0.0, "hypotheses": 0.0}


def test_insertion_rate_is_insertions_per_reference_word():
    metric = WordErrorCounts()
    metric.update(["the cat sat on the mat", "hello world", ""], ["the cat sat", "hello world", "good night"])
    out = metric.compute()
    assert int(out["insertions"]) == 3 and int(out["reference_words"]) == 7
    assert out["insertion_rate"].item() == pytest.approx(3 / 7)


# --------------------------------------------------------------------------------- max_new_tokens detection
def test_generated_lengths_stop_at_the_first_stop_token_and_ignore_padding():
    ids = torch.tensor([[5, 6, 2, 0, 0], [5, 6, 7, 8, 9], [2, 0, 0, 0, 0], [7, 3, 9, 9, 3]])
    lengths, stopped = generated_lengths(ids, {2, 3})
    assert lengths == [3, 5, 1, 2] and stopped == [True, False, True, True]
    assert GenerationOutput(["a"] * 4, lengths, stopped, 5).hit_max_tokens == [False, True, False, False]
    assert GenerationOutput(["a"] * 4, lengths, stopped, 6).hit_max_tokens == [False] * 4  # ended otherwise


class _StopAfter(LogitsProcessor):
    """Row r emits a stop token as its ``steps[r]``-th token (never when None) and no stop token before."""

    def __init__(self, steps: list[int | None], stop_ids: list[int]):
        self.steps, self.stop_ids = steps, stop_ids

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        scores = scores.clone()
        scores[:, self.stop_ids] = -math.inf
        for row, step in enumerate(self.steps):
            if step is not None and input_ids.shape[1] == step - 1:
                scores[row] = -math.inf
                scores[row, self.stop_ids[0]] = 0.0
        return scores


def test_tiny_model_reports_token_counts_and_max_tokens_hits():
    model = tiny_speechllm(seed=3).eval()
    batch = make_batch()
    stop_ids = model._stop_token_ids()
    assert model.tokenizer.pad_token_id not in stop_ids  # padding after a stop must not count as tokens
    forced = LogitsProcessorList([_StopAfter([2, None, 1], stop_ids)])
    out = model.generate_with_details(batch, max_new_tokens=5, logits_processor=forced)
    assert out.num_tokens == [2, 5, 1] and out.stopped == [True, False, True]
    assert out.hit_max_tokens == [False, True, False] and out.texts[2] == ""
    # generate still returns the texts only, the same ones
    assert model.generate(batch, max_new_tokens=5, logits_processor=forced) == out.texts
    free = model.generate_with_details(batch, max_new_tokens=3)  # unforced: every row within the budget
    assert all(0 < n <= 3 for n in free.num_tokens)
    assert free.hit_max_tokens == [n == 3 and not s for n, s in zip(free.num_tokens, free.stopped)]


# ------------------------------------------------------------------------------ module, sweep, report
HYPOTHESES = {  # id -> (hypothesis, ran out of max_new_tokens)
    "u0": ("the cat sat on the mat mat mat mat", True),  # loop ("mat" x4), 3 insertions (6 + 3 + 2 ref. words)
    "u1": ("", False),  # empty
    "u2": ("uh", False),  # empty after normalisation (ASR)
    "u0_dup0": ("x y z x y z x y z x y z", True),  # Lhotse padding duplicate: never scored
    "a0": ("le chat le chat le chat le chat", True),  # loop
    "a1": ("oui oui oui", False),  # 3 copies: no loop
}
EXPECTED = {  # percent, by hand from HYPOTHESES
    "clean": {"insertion_rate": 100 * 3 / 11, "loop_rate": 100 / 3, "empty_rate": 200 / 3, "max_tokens_rate": 100 / 3},
    "ast-fr": {"loop_rate": 50.0, "empty_rate": 0.0, "max_tokens_rate": 50.0},
}


class FailureSets(L.LightningDataModule):
    """An ASR set (with a padding duplicate) and an AST set, as validation and as test sets."""

    val_set_names = test_set_names = ["clean", "ast-fr"]

    def __init__(self):
        super().__init__()
        clean = make_batch(seconds=(1.0, 0.6, 1.4, 1.0),
                           texts=["the cat sat on the mat", "good morning all", "hello world", "the cat sat on the mat"])
        clean.ids = ["u0", "u1", "u2", "u0_dup0"]
        ast = make_batch(seconds=(0.5, 0.7), texts=["the cat", "hello"], tasks=["ast", "ast"], tgt_langs=["fr", "fr"])
        ast.ids = ["a0", "a1"]
        self.sets = [[clean], [ast]]

    def val_dataloader(self):
        return [DataLoader(s, batch_size=None) for s in self.sets]

    test_dataloader = val_dataloader


def _scripted(speechllm, monkeypatch) -> None:
    """Make ``speechllm`` answer HYPOTHESES (the module drops padding duplicates before generating)."""
    def generate_with_details(batch, max_new_tokens, num_beams=1, **kwargs):
        hyps = [HYPOTHESES[i] for i in batch.ids]
        return GenerationOutput([h for h, _ in hyps], [max_new_tokens if hit else 1 for _, hit in hyps],
                                [not hit for _, hit in hyps], max_new_tokens)

    monkeypatch.setattr(speechllm, "generate_with_details", generate_with_details)


def _trainer(tmp_path) -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                     enable_model_summary=False, default_root_dir=tmp_path)


@pytest.mark.parametrize("stage", ["validate", "test"])
def test_module_logs_failure_rates_per_set_without_padding_duplicates(tmp_path, monkeypatch, stage):
    model = SpeechLLMModule(decoding=DecodingConfig(max_new_tokens=4), speechllm=tiny_speechllm())
    _scripted(model.speechllm, monkeypatch)
    trainer = _trainer(tmp_path)
    getattr(trainer, stage)(model, datamodule=FailureSets(), verbose=False)
    prefix = "val" if stage == "validate" else "test"
    logged = {k: float(v) for k, v in trainer.callback_metrics.items() if k.rsplit("/", 1)[-1] in FAILURE_METRICS}
    expected = {f"{prefix}/{name}/{rate}": value for name, rates in EXPECTED.items() for rate, value in rates.items()}
    assert logged == pytest.approx(expected, abs=1e-4)
    assert f"{prefix}/ast-fr/insertion_rate" not in trainer.callback_metrics  # ASR sets only


def test_sweep_evaluate_collects_the_rates_and_the_rule_ignores_them(tmp_path, monkeypatch):
    speechllm = tiny_speechllm()
    _scripted(speechllm, monkeypatch)
    scores = evaluate(speechllm, FailureSets(), decoding=DecodingConfig(max_new_tokens=4),
                      trainer_kwargs={"accelerator": "cpu", "default_root_dir": tmp_path})
    assert set(scores) == {"clean", "ast-fr"}
    for name, rates in EXPECTED.items():
        assert {k: v for k, v in scores[name].items() if k in FAILURE_METRICS} == pytest.approx(rates, abs=1e-4)
    assert "wer" in scores["clean"] and "bleu" in scores["ast-fr"]
    # The rule reads WER/BLEU only: failure rates that explode, or are missing, change nothing.
    worse = {name: {**metrics, **{k: 100.0 for k in FAILURE_METRICS if k in metrics}} for name, metrics in scores.items()}
    bare = {name: {k: v for k, v in metrics.items() if k not in FAILURE_METRICS} for name, metrics in scores.items()}
    table = SweepTable(scores, 8, [SweepPoint("angular", 0.25, "fraction", 2, 8, [5, 6], before=worse),
                                   SweepPoint("angular", 0.5, "fraction", 4, 8, [3, 4, 5, 6], before=bare)])
    assert table.set_metrics() == [("ast-fr", "bleu"), ("clean", "wer")]
    assert passes(table.points[0], scores) == (True, []) and passes(table.points[1], scores) == (True, [])
    assert choose_point(table, Thresholds()) is table.points[1]
    # ... and the extra keys survive the JSON round trip (NaN as null)
    worse["clean"]["loop_rate"] = math.nan
    restored = SweepTable.from_dict(json.loads(json.dumps(table.to_dict())))
    assert restored.points[0].before["clean"]["empty_rate"] == 100.0 and restored.baseline == scores
    assert math.isnan(SweepPoint.from_dict(json.loads(json.dumps(table.points[0].to_dict()))).before["clean"]["loop_rate"])


def test_report_shows_a_failure_modes_table_per_set(tmp_path):
    scores = {"global_step": 3, "seconds": {}, "test": {}, "test_checkpoint": None, "validation": {
        "val/clean/wer": 12.5, "val/clean/insertion_rate": 27.2727, "val/clean/loop_rate": 33.3333,
        "val/clean/empty_rate": 66.6667, "val/clean/max_tokens_rate": 33.3333, "val/ast-fr/bleu": 20.0,
        "val/ast-fr/loop_rate": 50.0, "val/ast-fr/empty_rate": 0.0, "val/ast-fr/max_tokens_rate": 50.0}}
    (tmp_path / "scores.json").write_text(json.dumps(scores))
    markdown, page = write_report(tmp_path)
    text = markdown.read_text()
    assert "| validation | clean | 27.3% | 33.3% | 66.7% | 33.3% |" in text
    assert "| validation | ast-fr | - | 50.0% | 0.0% | 50.0% |" in text
    assert "`val/clean/wer`" in text and "`val/clean/loop_rate`" not in text  # the rates live in their own table
    assert "<td>66.7%</td>" in page.read_text()
