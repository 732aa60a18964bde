"""Pruning path, BI ranking, bootstrap CIs, agreement statistics, result I/O and figures."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from matplotlib.image import imread

from lightning_speechllm.redundancy import (
    AngularDistanceMetric,
    BlockInfluenceMetric,
    RedundancyResult,
    block_influence_ranking,
    bootstrap_ci,
    path_agreement,
    pruning_path,
    select_tokens,
    spearman_rho,
    valid_cells,
)
from lightning_speechllm.redundancy.plots import (
    plot_block_influence,
    plot_redundancy_heatmap,
    plot_result_heatmap,
    plot_speech_vs_text,
)
from lightning_speechllm.redundancy.report import write_summary_csv


def _random_table(num_layers: int, seed: int = 0) -> np.ndarray:
    table = np.random.default_rng(seed).uniform(0.05, 0.6, size=(num_layers, num_layers))
    return np.where(valid_cells(num_layers), table, np.nan)


def _result(seed: int = 0, num_layers: int = 6, with_ci: bool = True, modality: str = "speech") -> RedundancyResult:
    rng = np.random.default_rng(seed)
    per_sample = np.stack([_random_table(num_layers, seed + i) for i in range(12)])
    table = per_sample.mean(axis=0)  # NaN stays NaN in the undefined cells
    return RedundancyResult.from_tables(
        table, rng.uniform(0.01, 0.3, num_layers), model_id="tiny-llama", token_selection="last",
        set_name="dev", modality=modality, num_samples=12, per_sample_tables=per_sample if with_ci else None,
        epoch=3, n_boot=200,
    )


def test_valid_cells_layout():
    assert valid_cells(3).tolist() == [[True, True, True], [True, True, False], [True, False, False]]


def test_pruning_path_argmin_per_block_size_with_ties_to_smallest_layer():
    nan = np.nan
    table = np.array([
        [0.5, 0.2, 0.2, 0.3],  # n=1: tie between l=1 and l=2 -> 1
        [0.4, 0.6, 0.1, nan],  # n=2 -> 2
        [0.3, 0.3, nan, nan],  # n=3: tie -> 0
        [0.7, nan, nan, nan],  # n=4 -> 0
    ])
    assert pruning_path(table) == [1, 2, 0, 0]
    assert pruning_path(torch.from_numpy(table)) == [1, 2, 0, 0]
    broken = table.copy()
    broken[1, 1] = nan
    with pytest.raises(ValueError, match="n=2, l=1"):
        pruning_path(broken)
    with pytest.raises(ValueError, match="square"):
        pruning_path(np.zeros((2, 3)))


def test_block_influence_ranking_lowest_first_stable():
    assert block_influence_ranking([0.3, 0.1, 0.2, 0.1]) == [1, 3, 2, 0]
    assert block_influence_ranking(torch.tensor([0.5, 0.4])) == [1, 0]
    with pytest.raises(ValueError, match="1-D"):
        block_influence_ranking(np.zeros((2, 2)))


def test_bootstrap_ci_contains_the_mean_and_shrinks_with_more_samples():
    num_layers = 5
    rng = np.random.default_rng(1)
    center = _random_table(num_layers, seed=2)

    def samples(count: int) -> np.ndarray:
        return center + rng.normal(0.0, 0.05, size=(count, num_layers, num_layers))

    small, large = samples(20), samples(400)
    valid = valid_cells(num_layers)
    widths = []
    for tables in (small, large):
        low, high = bootstrap_ci(tables, n_boot=500, alpha=0.05, seed=0)
        mean = tables.mean(axis=0)
        assert np.isnan(low[~valid]).all() and np.isnan(high[~valid]).all()
        assert (low[valid] <= mean[valid]).all() and (mean[valid] <= high[valid]).all()
        widths.append(np.mean(high[valid] - low[valid]))
    assert widths[1] < 0.5 * widths[0]  # ~ 1/sqrt(20) vs 1/sqrt(400): a factor ~4.5
    again = bootstrap_ci(small, n_boot=500, seed=0)
    np.testing.assert_array_equal(again[0], bootstrap_ci(small, n_boot=500, seed=0)[0])  # seeded
    with pytest.raises(ValueError, match=r"\[S, L, L\]"):
        bootstrap_ci(center)
    with pytest.raises(ValueError, match="alpha"):
        bootstrap_ci(small, alpha=1.5)


def test_bootstrap_ci_is_the_95_percent_interval_of_a_hand_checkable_case():
    """Four utterances at d = 0 and four at d = 1: a resample's mean is k/8 with k ~ Binomial(8, 1/2), so
    P(k <= 0) = 1/256 < 2.5% < P(k <= 1) = 9/256 < 5%. The 2.5% / 97.5% quantiles are 1/8 and 7/8; the 5% / 95%
    ones (a 90% interval) would be 2/8 and 6/8. Any correct resampling gives this with many resamples."""
    tables = np.array([0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0]).reshape(8, 1, 1)
    low, high = bootstrap_ci(tables, n_boot=100_000, alpha=0.05, seed=0)
    assert (low[0, 0], high[0, 0]) == (1 / 8, 7 / 8)
    low, high = bootstrap_ci(tables, n_boot=100_000, alpha=0.10, seed=0)
    assert (low[0, 0], high[0, 0]) == (2 / 8, 6 / 8)


def test_bootstrap_ci_equals_a_fixed_seed_reference():
    """The same resampling written out: multinomial counts from default_rng(seed), means, then numpy's
    2.5 / 97.5 percentiles per defined cell (NaN elsewhere)."""
    num_layers, num_samples, n_boot, seed = 3, 9, 400, 7
    tables = np.random.default_rng(3).uniform(0.0, 1.0, size=(num_samples, num_layers, num_layers))
    low, high = bootstrap_ci(tables, n_boot=n_boot, alpha=0.05, seed=seed)
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(num_samples, [1.0 / num_samples] * num_samples, size=n_boot)
    for n in range(1, num_layers + 1):
        for first in range(num_layers):
            if first + n > num_layers:
                assert np.isnan(low[n - 1, first]) and np.isnan(high[n - 1, first])
                continue
            means = counts @ tables[:, n - 1, first] / num_samples
            expected = np.percentile(means, [2.5, 97.5])
            assert (low[n - 1, first], high[n - 1, first]) == pytest.approx(tuple(expected), abs=1e-12)


def test_spearman_rho_over_valid_cells():
    table = _random_table(6, seed=3)
    assert spearman_rho(table, table) == pytest.approx(1.0)
    assert spearman_rho(table, np.sqrt(table)) == pytest.approx(1.0)  # rank-based
    assert spearman_rho(table, -table) == pytest.approx(-1.0)
    assert abs(spearman_rho(table, _random_table(6, seed=4))) < 0.6
    with pytest.raises(ValueError, match="differ in shape"):
        spearman_rho(table, _random_table(5))


def test_path_agreement():
    same = path_agreement([0, 1, 2], [0, 1, 2])
    assert (same.exact, same.overlap, same.mean_jaccard) == (1.0, 1.0, 1.0)
    # n=1: 0 vs 1 disjoint; n=2: [1,3) vs [2,4) share 1 of 3; n=3: [0,3) vs [0,3) equal
    mixed = path_agreement([0, 1, 0], [1, 2, 0])
    assert mixed.exact == pytest.approx(1 / 3)
    assert mixed.overlap == pytest.approx(2 / 3)
    assert mixed.mean_jaccard == pytest.approx((0 + 1 / 3 + 1) / 3)
    with pytest.raises(ValueError, match="equal length"):
        path_agreement([0], [0, 1])


def test_result_json_round_trip_and_format(tmp_path):
    result = _result()
    assert result.path == pruning_path(result.table)
    assert result.ci_low is not None and result.extra["ci_n_boot"] == 200
    path = result.to_json(tmp_path / "out" / "redundancy.json")
    text = path.read_text()
    assert "NaN" not in text  # strict JSON
    data = json.loads(text)
    assert data["format_version"] == 1 and data["num_layers"] == 6 and data["table"][5][1] is None
    loaded = RedundancyResult.from_json(path)
    assert loaded == result
    assert loaded != _result(seed=1)
    no_ci = _result(with_ci=False, modality="text")
    assert RedundancyResult.from_json(no_ci.to_json(tmp_path / "no_ci.json")) == no_ci


def test_result_json_errors_name_the_file(tmp_path):
    data = _result().to_dict()
    data["format_version"] = 99
    bad_version = tmp_path / "v99.json"
    bad_version.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="v99.json: unsupported format_version 99"):
        RedundancyResult.from_json(bad_version)
    broken = tmp_path / "broken.json"
    broken.write_text('{\n "a": 1,\n}')
    with pytest.raises(ValueError, match=r"broken.json:3:1: invalid JSON"):
        RedundancyResult.from_json(broken)
    del data["table"]
    data["format_version"] = 1
    with pytest.raises(KeyError, match="missing key"):
        RedundancyResult.from_dict(data, "x.json")
    with pytest.raises(ValueError, match="modality"):
        RedundancyResult.from_tables(_random_table(3), [0.1, 0.2, 0.3], model_id="m", token_selection="last",
                                     set_name="s", modality="video", num_samples=1)  # type: ignore[arg-type]


def test_result_csv_long_format(tmp_path):
    result = _result()
    with result.to_csv(tmp_path / "table.csv").open() as stream:
        rows = list(csv.DictReader(stream))
    assert len(rows) == 6 * 7 // 2
    assert list(rows[0]) == ["l", "n", "d", "ci_low", "ci_high"]
    for row in rows:
        l, n = int(row["l"]), int(row["n"])
        assert float(row["d"]) == pytest.approx(result.table[n - 1, l])
        assert float(row["ci_low"]) <= float(row["d"]) <= float(row["ci_high"])
    with write_summary_csv([result, _result(seed=2, modality="text")], tmp_path / "summary.csv").open() as stream:
        summary = list(csv.DictReader(stream))
    assert [row["modality"] for row in summary] == ["speech", "text"]
    assert summary[0]["path"].split() == [str(first) for first in result.path]


def test_metrics_to_result_end_to_end(tmp_path):
    num_layers = 4
    generator = torch.Generator().manual_seed(0)
    states = [torch.randn(2, 5, 8, generator=generator) for _ in range(num_layers + 1)]
    segment_ids = torch.tensor([[0, 1, 2, 2, 3], [1, 1, 2, 3, 3]])
    mask = select_tokens(segment_ids, "all")
    distance = AngularDistanceMetric(num_layers, keep_per_sample=True)
    influence = BlockInfluenceMetric(num_layers)
    distance.update(states, mask)
    influence.update(states, mask)
    result = RedundancyResult.from_tables(distance.compute(), influence.compute(), model_id="m",
                                          token_selection="all", set_name="toy", modality="speech",
                                          num_samples=2, per_sample_tables=distance.compute_per_sample(),
                                          n_boot=50)
    assert RedundancyResult.from_json(result.to_json(tmp_path / "r.json")) == result
    assert result.bi_ranking == block_influence_ranking(influence.compute())


def test_figures_are_written_as_valid_pngs(tmp_path):
    speech, text = _result(seed=0, num_layers=10), _result(seed=5, num_layers=10, modality="text")
    heatmap = plot_result_heatmap(speech, save_to=tmp_path / "heatmap.png")
    assert len(heatmap.axes) == 2  # map + colourbar
    plot_redundancy_heatmap(speech.table, title="raw table", save_to=tmp_path / "raw.png")
    plot_block_influence(speech.block_influence, num_marked=3, save_to=tmp_path / "bi.png")
    pair = plot_speech_vs_text(speech, text, title="tiny", save_to=tmp_path / "pair.png")
    assert f"{spearman_rho(speech.table, text.table):.3f}" in pair._suptitle.get_text()
    for name in ("heatmap.png", "raw.png", "bi.png", "pair.png"):
        image = imread(tmp_path / name)
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100, name
        assert image[..., :3].std() > 0.05, name  # not a blank canvas
    with pytest.raises(ValueError, match="num_marked"):
        plot_block_influence(speech.block_influence, num_marked=11)
