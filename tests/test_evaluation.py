"""WER and BLEU against jiwer and sacreBLEU directly."""
from pathlib import Path

import jiwer
import pytest
import sacrebleu
from torchmetrics.text import SacreBLEUScore

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


BLEU_REFS = ["the cat is on the mat", "there is a cat on the mat today", "le chat est sur le tapis",
             "Mr. Smith's dog, the one that barks, ran away!"]
BLEU_HYPS = ["the cat is on the mat", "a cat is on the mat today", "le chat sur le tapis",
             "Mr. Smith's dog ran away."]
# No hypothesis has a 4-gram of its reference (and the first one no 3-gram): sacreBLEU's exp smoothing gives a
# positive score; torchmetrics' SacreBLEUScore (no smoothing) gives 0.
SPARSE_REFS = ["the cat sat on the mat", "a dog barks loudly at night", "hello there"]
SPARSE_HYPS = ["the cat on mat", "a dog barks at the moon", "hello world"]


def _bleu(hyps: list[str], refs: list[str]):
    metric = corpus_bleu_metric()
    metric.update(hyps, [[r] for r in refs])
    return metric


@pytest.mark.parametrize("hyps, refs", [(BLEU_HYPS, BLEU_REFS), (SPARSE_HYPS, SPARSE_REFS)], ids=["normal", "sparse"])
def test_bleu_equals_sacrebleu_corpus_bleu_exactly(hyps, refs):
    expected = sacrebleu.corpus_bleu(hyps, [refs]).score
    assert 100 * _bleu(hyps, refs).compute().item() == pytest.approx(expected, abs=1e-9)
    assert expected > 0


def test_bleu_with_a_zero_match_order_is_smoothed_like_sacrebleu():
    stats = sacrebleu.corpus_bleu(SPARSE_HYPS, [SPARSE_REFS])
    assert stats.counts[3] == 0 and stats.counts[0] > 0  # the corpus this test is about: no 4-gram matches
    value = 100 * _bleu(SPARSE_HYPS, SPARSE_REFS).compute().item()
    assert value == pytest.approx(stats.score, abs=1e-9) and value > 1.0
    # torchmetrics' SacreBLEUScore does not smooth: that is the difference our metric exists for
    torchmetrics_bleu = SacreBLEUScore(tokenize="13a")
    torchmetrics_bleu.update(SPARSE_HYPS, [[r] for r in SPARSE_REFS])
    assert torchmetrics_bleu.compute().item() == 0.0


def test_bleu_states_merged_from_two_ranks_equal_the_whole_corpus():
    """Each "rank" scores a shard; summing the states (what the DDP sync does: dist_reduce_fx="sum") gives the
    corpus score, not the mean of the shard scores."""
    hyps, refs = BLEU_HYPS + SPARSE_HYPS, BLEU_REFS + SPARSE_REFS
    rank0, rank1 = _bleu(hyps[::2], refs[::2]), _bleu(hyps[1::2], refs[1::2])
    expected = sacrebleu.corpus_bleu(hyps, [refs]).score
    shard_mean = (sacrebleu.corpus_bleu(hyps[::2], [refs[::2]]).score
                  + sacrebleu.corpus_bleu(hyps[1::2], [refs[1::2]]).score) / 2
    assert abs(shard_mean - expected) > 1.0  # so the check below can tell a merge from an average
    rank0.merge_state(rank1)
    assert 100 * rank0.compute().item() == pytest.approx(expected, abs=1e-9)


def _gloo_rank(rank: int, init_file: str, hyps: list[str], refs: list[str], out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        shard = slice(0, 5) if rank == 0 else slice(5, None)  # unequal shards
        metric = _bleu(hyps[shard], refs[shard])
        Path(f"{out}.{rank}").write_text(repr(100 * metric.compute().item()))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_bleu_syncs_across_two_gloo_ranks(tmp_path):
    import torch.multiprocessing as mp

    hyps, refs = BLEU_HYPS + SPARSE_HYPS, BLEU_REFS + SPARSE_REFS
    mp.spawn(_gloo_rank, args=(str(tmp_path / "init"), hyps, refs, str(tmp_path / "bleu")), nprocs=2)
    expected = sacrebleu.corpus_bleu(hyps, [refs]).score
    for rank in (0, 1):
        assert float((tmp_path / f"bleu.{rank}").read_text()) == pytest.approx(expected, abs=1e-9)


def test_bleu_of_nothing_is_zero_and_references_are_checked():
    with pytest.warns(UserWarning, match="before the ``update``"):
        assert corpus_bleu_metric().compute().item() == 0.0
    with pytest.raises(ValueError, match="2 hypotheses but 1 reference lists"):
        corpus_bleu_metric().update(["a", "b"], [["a"]])
    with pytest.raises(ValueError, match="same number"):
        corpus_bleu_metric().update(["a", "b"], [["a"], ["b", "c"]])
