"""WER and BLEU against jiwer and sacreBLEU directly."""
import jiwer
import pytest
import sacrebleu

from lightning_speechllm.evaluation import WordErrorCounts, corpus_bleu_metric, normalize_english

REFS = ["Mr. Smith has twenty-five colours.", "the cat sat on the mat", "hello world"]
HYPS = ["mister smith has 25 colors", "the cat sat on mat mat today", ""]


def test_wer_counts_equal_jiwer_on_normalised_text():
    metric = WordErrorCounts()
    metric.update(HYPS[:2], REFS[:2])
    metric.update(HYPS[2:], REFS[2:])
    result = metric.compute()
    refs = [normalize_english(r) for r in REFS]
    hyps = [normalize_english(h) for h in HYPS]
    expected = jiwer.process_words(refs, hyps)
    assert result["substitutions"].item() == expected.substitutions
    assert result["deletions"].item() == expected.deletions
    assert result["insertions"].item() == expected.insertions
    assert result["wer"].item() == pytest.approx(expected.wer)
    assert normalize_english(REFS[0]) == "mister smith has 25 colors"


def test_wer_rejects_mismatched_lengths():
    with pytest.raises(ValueError, match="2 hypotheses but 1 references"):
        WordErrorCounts().update(["a", "b"], ["a"])


def test_bleu_equals_sacrebleu_corpus_score():
    refs = ["the cat is on the mat", "there is a cat on the mat today", "le chat est sur le tapis"]
    hyps = ["the cat is on the mat", "a cat is on the mat today", "le chat sur le tapis"]
    metric = corpus_bleu_metric()
    metric.update(hyps, [[r] for r in refs])
    expected = sacrebleu.corpus_bleu(hyps, [refs]).score
    assert 100 * metric.compute().item() == pytest.approx(expected, abs=1e-3)
