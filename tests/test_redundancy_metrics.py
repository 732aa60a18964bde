"""Redundancy metrics against plain-loop float64 references of the formulas in PAPER.md."""
from __future__ import annotations

import math

import pytest
import torch

from lightning_speechllm.model.segments import Segment
from lightning_speechllm.redundancy import (
    AngularDistanceMetric,
    BlockInfluenceMetric,
    pruning_path,
    select_tokens,
)

P, S, G, X = Segment.PROMPT, Segment.SPEECH, Segment.TARGET, Segment.PAD
NUM_LAYERS = 5
MODES = ["last", "last_prompt", "all", "speech", "prompt", "target"]


def _segments() -> torch.Tensor:
    """Three left-padded sequences of length 8."""
    return torch.tensor([
        [P, P, S, S, S, S, G, G],
        [X, X, P, S, S, S, G, G],
        [X, X, X, X, P, S, S, G],
    ])


def _states(seed: int = 0, batch: int = 3, length: int = 8, dim: int = 6, layers: int = NUM_LAYERS):
    generator = torch.Generator().manual_seed(seed)
    # a shared component makes neighbouring layers correlated, like a residual stream
    base = torch.randn(batch, length, dim, generator=generator)
    states = []
    for _ in range(layers + 1):
        base = base + 0.7 * torch.randn(batch, length, dim, generator=generator)
        states.append(base.clone())
    return states


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float(torch.dot(a, b) / (a.norm() * b.norm()))


def _reference_tables(states, mask):
    """Per-utterance token-mean tables and the token-mean table, with plain loops in float64."""
    num_layers = len(states) - 1
    token_sum = torch.zeros(num_layers, num_layers, dtype=torch.float64)
    per_utterance, count = [], 0
    for b in range(mask.shape[0]):
        utterance = torch.zeros(num_layers, num_layers, dtype=torch.float64)
        tokens = [t for t in range(mask.shape[1]) if mask[b, t]]
        for t in tokens:
            for n in range(1, num_layers + 1):
                for l in range(0, num_layers - n + 1):
                    cos = max(-1.0, min(1.0, _cosine(states[l][b, t], states[l + n][b, t])))
                    utterance[n - 1, l] += math.acos(cos) / math.pi
        token_sum += utterance
        count += len(tokens)
        if tokens:
            per_utterance.append(utterance / len(tokens))
    invalid = torch.tensor([[l + n > num_layers for l in range(num_layers)] for n in range(1, num_layers + 1)])
    token_mean = (token_sum / count).masked_fill(invalid, float("nan"))
    per_utterance = torch.stack(per_utterance).masked_fill(invalid, float("nan"))
    return token_mean, per_utterance


def _reference_bi(states, mask):
    num_layers = len(states) - 1
    sums = [0.0] * num_layers
    count = 0
    for b, t in mask.nonzero().tolist():
        count += 1
        for i in range(num_layers):
            sums[i] += _cosine(states[i][b, t], states[i + 1][b, t])
    return torch.tensor([1.0 - s / count for s in sums], dtype=torch.float64)


def test_select_tokens_modes_with_left_padding():
    segments = _segments()
    last = select_tokens(segments, "last")
    assert last.sum(dim=1).tolist() == [1, 1, 1]
    assert last[:, -1].all()
    assert select_tokens(segments, "all").tolist() == (segments != X).tolist()
    assert select_tokens(segments, "speech").sum().item() == 4 + 3 + 2
    assert select_tokens(segments, "prompt").sum().item() == 2 + 1 + 1
    assert select_tokens(segments, "target").sum().item() == 2 + 2 + 1
    for mode in MODES:
        assert not (select_tokens(segments, mode) & (segments == X)).any(), mode


def test_select_tokens_last_with_right_padding_and_empty_rows():
    segments = torch.tensor([[P, S, G, X], [X, X, X, X]])
    assert select_tokens(segments, "last").tolist() == [[False, False, True, False], [False] * 4]


def test_select_tokens_last_prompt_is_the_position_that_predicts_the_first_target_token():
    segments = torch.tensor([
        [P, S, S, P, P, G, G],  # prefix, speech, suffix, target: the suffix's last token
        [X, X, P, S, P, G, G],
        [X, X, X, P, S, S, P],  # a generation prompt (no target): its last token
        [X, X, X, X, S, S, G],  # no prompt at all: nothing
    ])
    picked = select_tokens(segments, "last_prompt")
    assert picked.nonzero().tolist() == [[0, 4], [1, 4], [2, 6]]
    assert select_tokens(segments, "last").nonzero().tolist() == [[0, 6], [1, 6], [2, 6], [3, 6]]


def test_select_tokens_rejects_bad_input():
    with pytest.raises(ValueError, match="unknown token selection mode 'middle'"):
        select_tokens(_segments(), "middle")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        select_tokens(_segments()[0], "all")


@pytest.mark.parametrize("mode", MODES)
def test_angular_distance_matches_loop_reference(mode):
    states, mask = _states(), select_tokens(_segments(), mode)
    expected, expected_per_sample = _reference_tables(states, mask)
    metric = AngularDistanceMetric(NUM_LAYERS, keep_per_sample=True, token_chunk_size=3)
    metric.update(states, mask)
    table = metric.compute()
    assert table.shape == (NUM_LAYERS, NUM_LAYERS)
    assert torch.equal(table.isnan(), expected.isnan())
    torch.testing.assert_close(table, expected, atol=1e-5, rtol=0, equal_nan=True)
    per_sample = metric.compute_per_sample()
    torch.testing.assert_close(per_sample.double(), expected_per_sample, atol=1e-5, rtol=0, equal_nan=True)
    utterance_metric = AngularDistanceMetric(NUM_LAYERS, reduction="utterance")
    utterance_metric.update(torch.stack(states), mask)  # stacked [L+1, B, T, D] input works too
    torch.testing.assert_close(utterance_metric.compute(), expected_per_sample.mean(0), atol=1e-5, rtol=0,
                               equal_nan=True)


def test_angular_distance_float32_close_to_reference():
    states, mask = _states(seed=3), select_tokens(_segments(), "all")
    expected, _ = _reference_tables(states, mask)
    metric = AngularDistanceMetric(NUM_LAYERS, compute_dtype=torch.float32)
    metric.update(states, mask)
    torch.testing.assert_close(metric.compute(), expected, atol=1e-5, rtol=0, equal_nan=True)


@pytest.mark.parametrize("mode", ["last", "all", "speech"])
def test_block_influence_matches_loop_reference(mode):
    states, mask = _states(seed=1), select_tokens(_segments(), mode)
    metric = BlockInfluenceMetric(NUM_LAYERS)
    metric.update(states, mask)
    torch.testing.assert_close(metric.compute(), _reference_bi(states, mask), atol=1e-5, rtol=0)


def test_two_updates_equal_one_update_on_concatenation():
    segments, states_a, states_b = _segments(), _states(seed=4), _states(seed=5)
    mask = select_tokens(segments, "all")
    both = [torch.cat([a, b]) for a, b in zip(states_a, states_b)]
    both_mask = torch.cat([mask, mask])
    for reduction in ("token", "utterance"):
        split = AngularDistanceMetric(NUM_LAYERS, reduction=reduction, keep_per_sample=True)
        split.update(states_a, mask)
        split.update(states_b, mask)
        joint = AngularDistanceMetric(NUM_LAYERS, reduction=reduction, keep_per_sample=True)
        joint.update(both, both_mask)
        torch.testing.assert_close(split.compute(), joint.compute(), equal_nan=True)
        torch.testing.assert_close(split.compute_per_sample(), joint.compute_per_sample(), equal_nan=True)
    bi_split, bi_joint = BlockInfluenceMetric(NUM_LAYERS), BlockInfluenceMetric(NUM_LAYERS)
    bi_split.update(states_a, mask)
    bi_split.update(states_b, mask)
    bi_joint.update(both, both_mask)
    torch.testing.assert_close(bi_split.compute(), bi_joint.compute())


def test_merged_states_equal_single_metric():
    """What a DDP sync does: sum the "sum" states and concatenate the per-sample lists of two ranks."""
    segments, states_a, states_b = _segments(), _states(seed=6), _states(seed=7)
    mask = select_tokens(segments, "speech")
    rank0 = AngularDistanceMetric(NUM_LAYERS, keep_per_sample=True)
    rank1 = AngularDistanceMetric(NUM_LAYERS, keep_per_sample=True)
    single = AngularDistanceMetric(NUM_LAYERS, keep_per_sample=True)
    rank0.update(states_a, mask)
    rank1.update(states_b, mask)
    single.update(states_a, mask)
    single.update(states_b, mask)
    summed = rank0.token_sum + rank1.token_sum
    counted = rank0.token_count + rank1.token_count
    torch.testing.assert_close(torch.where(single.compute().isnan(), float("nan"), summed / counted),
                               single.compute(), equal_nan=True)
    rank1.merge_state(rank0)
    torch.testing.assert_close(rank1.compute(), single.compute(), equal_nan=True)
    assert rank1.compute_per_sample().shape == single.compute_per_sample().shape == (6, NUM_LAYERS, NUM_LAYERS)
    bi0, bi1, bi_single = (BlockInfluenceMetric(NUM_LAYERS) for _ in range(3))
    bi0.update(states_a, mask)
    bi1.update(states_b, mask)
    bi_single.update(states_a, mask)
    bi_single.update(states_b, mask)
    bi0.merge_state(bi1)
    torch.testing.assert_close(bi0.compute(), bi_single.compute())


def test_planted_identity_block_is_found_by_the_path():
    layers = 8
    states = _states(seed=8, layers=layers)
    states[6] = 2.5 * states[3]  # layers 3, 4, 5 do nothing up to scale
    mask = select_tokens(_segments(), "all")
    metric = AngularDistanceMetric(layers)
    metric.update(states, mask)
    table = metric.compute()
    assert table[2, 3].item() == pytest.approx(0.0, abs=1e-6)
    assert (table[2][~table[2].isnan()] > 1e-3).sum() == layers - 3  # every other block of size 3 moves
    assert pruning_path(table)[2] == 3


def test_metric_input_errors_are_explicit():
    metric = AngularDistanceMetric(NUM_LAYERS)
    states, mask = _states(), select_tokens(_segments(), "all")
    with pytest.raises(ValueError, match="expected num_layers \\+ 1 = 6 residual states"):
        metric.update(states[:-1], mask)
    with pytest.raises(ValueError, match="token_mask shape"):
        metric.update(states, mask[:, 1:])
    with pytest.raises(ValueError, match="state x\\^2"):
        metric.update(states[:2] + [states[2][:, :4]] + states[3:], mask)
    with pytest.raises(RuntimeError, match="keep_per_sample=True"):
        metric.compute_per_sample()
    empty = AngularDistanceMetric(NUM_LAYERS)
    empty.update(states, torch.zeros_like(mask))
    with pytest.raises(RuntimeError, match="before any token"):
        empty.compute()


_DDP_SCRIPT = '''
import os, sys, torch, torch.distributed as dist
from lightning_speechllm.redundancy import AngularDistanceMetric, BlockInfluenceMetric

def states(seed):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 5, 8, generator=generator) for _ in range(4)]

MASK = torch.tensor([[False, True, True, True, True], [True] * 5])

def run(rank, port, out, idle):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    distance, influence = AngularDistanceMetric(3, keep_per_sample=True), BlockInfluenceMetric(3)
    if rank != idle:  # an idle rank saw no utterance for this accumulator (a per-task set, a padding shard)
        distance.update(states(rank), MASK)
        influence.update(states(rank), MASK)
    result = (distance.compute(), distance.compute_per_sample(), influence.compute())
    if rank == 0:
        torch.save(result, out)
    dist.barrier()
    dist.destroy_process_group()

if __name__ == "__main__":
    run(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], int(sys.argv[4]))
'''


def _run_two_gloo_ranks(tmp_path, idle: int = -1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run _DDP_SCRIPT on 2 CPU ranks (gloo); rank ``idle`` updates nothing. Rank 0's (table, per-sample, BI)."""
    import socket
    import subprocess
    import sys

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    script, out = tmp_path / "ddp.py", tmp_path / "ddp.pt"
    script.write_text(_DDP_SCRIPT)
    ranks = [subprocess.Popen([sys.executable, str(script), str(rank), str(port), str(out), str(idle)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    for rank, process in enumerate(ranks):
        _, stderr = process.communicate(timeout=120)
        assert process.returncode == 0, f"rank {rank}: {stderr[-2000:]}"
    return torch.load(out)


def _single_process(ranks: tuple[int, ...]) -> tuple[AngularDistanceMetric, BlockInfluenceMetric]:
    """The metrics of one process that saw the batches of ``ranks`` in rank order."""
    mask = torch.tensor([[False, True, True, True, True], [True] * 5])
    distance, block = AngularDistanceMetric(3, keep_per_sample=True), BlockInfluenceMetric(3)
    for rank in ranks:
        generator = torch.Generator().manual_seed(rank)
        rank_states = [torch.randn(2, 5, 8, generator=generator) for _ in range(4)]
        distance.update(rank_states, mask)
        block.update(rank_states, mask)
    return distance, block


def test_ddp_sync_over_two_gloo_ranks_equals_single_process(tmp_path):
    """Real torch.distributed sync (2 CPU ranks, gloo): sums, counts and per-sample lists are gathered."""
    table, per_sample, influence = _run_two_gloo_ranks(tmp_path)
    distance, block = _single_process((0, 1))
    torch.testing.assert_close(table, distance.compute(), equal_nan=True)
    torch.testing.assert_close(per_sample, distance.compute_per_sample(), equal_nan=True)
    torch.testing.assert_close(influence, block.compute())


def test_ddp_sync_with_a_rank_that_saw_no_utterance(tmp_path):
    """A rank without utterances used to sync an empty 1-D per-sample tensor against [S, L, L] elsewhere, and gloo
    aborted ("Received data size doesn't match expected size"). It must contribute zero tables instead."""
    table, per_sample, influence = _run_two_gloo_ranks(tmp_path, idle=1)
    distance, block = _single_process((0,))
    assert per_sample.shape == (2, 3, 3)
    torch.testing.assert_close(table, distance.compute(), equal_nan=True)
    torch.testing.assert_close(per_sample, distance.compute_per_sample(), equal_nan=True)
    torch.testing.assert_close(influence, block.compute())
