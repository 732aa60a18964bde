"""The sweep's layer-count grid (issue 12, item 4): the default walks n = 1, 2, ... and stops once the rule has failed
twice in a row; n maps to exact layer counts (the paper's 14/32 and 1/16); fractions and ns exclude each other."""
from __future__ import annotations

import pytest

from lightning_speechllm.evaluation.sweep import cli as sweep_cli
from lightning_speechllm.evaluation.sweep import SweepConfig, SweepError, build_plan, run_sweep
from lightning_speechllm.evaluation.sweep.grid import GridError, explicit_grid, walk_layer_counts
from tests.test_module import NamedSets
from tests.tiny_speechllm import tiny_speechllm


class TableEvaluator:
    """WER per number of masked layers from a table (baseline 10.0: the rule passes up to 12.5); records the masks."""

    def __init__(self, wer_by_n: dict[int, float]):
        self.wer_by_n = wer_by_n
        self.calls: list[tuple[int, ...]] = []

    def __call__(self, model, datamodule, **kwargs):
        removed = tuple(model.layer_mask.removed_layers)
        self.calls.append(removed)
        return {"clean": {"wer": self.wer_by_n[len(removed)]}}


def test_walk_stops_after_two_consecutive_failures():
    verdicts = {1: True, 2: False, 3: True, 4: False, 5: False, 6: True, 7: True}
    visited = walk_layer_counts(8, lambda n: n, lambda n: verdicts[n])
    assert visited == [1, 2, 3, 4, 5]  # one failure (n=2) does not stop it; two in a row (4, 5) do
    assert walk_layer_counts(4, lambda n: n, lambda n: n != 2) == [1, 2, 3]  # never two: up to num_layers - 1
    assert walk_layer_counts(8, lambda n: n, lambda n: n < 2, stop_after=1) == [1, 2]
    with pytest.raises(GridError, match="walk_stop_after"):
        walk_layer_counts(8, lambda n: n, bool, stop_after=0)


def test_default_sweep_walks_layer_counts_and_takes_the_largest_pass(tmp_path):
    """Fails on the old code: the default was fractions 0.1 .. 0.5, not a walk over n."""
    model = tiny_speechllm(layers=8)
    wer = {0: 10.0, 1: 11.0, 2: 13.0, 3: 12.0, 4: 14.0, 5: 15.0, 6: 11.0, 7: 11.0}  # n=6, 7 would pass: never reached
    spy = TableEvaluator(wer)
    config = SweepConfig(method="last", output_dir=str(tmp_path))
    table, chosen = run_sweep(model, NamedSets(), config, evaluate_fn=spy)
    assert [p.n for p in table.points] == [1, 2, 3, 4, 5] and [len(c) for c in spy.calls] == [0, 1, 2, 3, 4, 5]
    assert all((p.kind, p.value, len(p.removed_layers)) == ("n", p.n, p.n) for p in table.points)
    assert chosen.n == 3 and chosen.removed_fraction == 3 / 8  # largest pass: n=3, after n=2 failed once
    again = TableEvaluator(wer)
    table2, _ = run_sweep(model, NamedSets(), config, evaluate_fn=again)  # a rerun walks the stored points
    assert again.calls == [] and table2.to_dict() == table.to_dict()


@pytest.mark.parametrize(("num_layers", "n"), [(32, 14), (32, 2), (30, 1)])
def test_n_is_an_exact_layer_count(num_layers, n):
    """The paper's points 14/32 and 1/16 (= 2/32): no 0.1-step fraction grid hits them, an n does exactly."""
    plan = build_plan(SweepConfig(method="last", ns=[n]), "n", n, num_layers, None)
    assert len(plan.removed_layers) == n and plan.num_layers == num_layers
    assert explicit_grid(None, [n]) == [("n", n)]


def test_fractions_and_ns_are_mutually_exclusive(tmp_path, capsys):
    with pytest.raises(SweepError, match=r"sweep\.fractions and sweep\.ns are mutually exclusive"):
        SweepConfig(method="last", fractions=[0.1], ns=[1]).check()
    assert SweepConfig(method="last", fractions=[0.25]).values() == [("fraction", 0.25)]  # still an explicit grid
    code = sweep_cli.main(["--sweep.method", "last", "--sweep.fractions", "[0.1]", "--sweep.ns", "[1]",
                           "--data.val_sets", "{a: a.jsonl}", "--sweep.output_dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and "sweep.fractions" in err and "sweep.ns" in err
