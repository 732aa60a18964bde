"""Bootstrap CIs of agreement that contain what they estimate, paired by utterance end to end, and the stale
``<stem>_per_sample.npy`` check of ``compare`` (issue 20, parts 2 and 4)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lightning_speechllm.__main__ import main as package_main
from lightning_speechllm.redundancy.analysis import (
    RedundancyResult,
    bootstrap_agreement,
    path_agreement,
    per_sample_path,
    pruning_path,
    spearman_rho,
)
from lightning_speechllm.redundancy.compare import compare_maps, load_maps
from lightning_speechllm.redundancy.measure import RedundancyAccumulator, utterance_keys
from tests.redundancy_sim import layer_strengths, map_pair, paired_per_sample_maps


def _write(tmp_path, name: str, per_sample: np.ndarray, keys: np.ndarray | None, modality: str = "speech") -> str:
    result = RedundancyResult.from_tables(per_sample.mean(0), np.linspace(0.1, 0.3, per_sample.shape[1]),
                                          model_id="m", token_selection="last_prompt", set_name=name,
                                          modality=modality, num_samples=len(per_sample), per_sample_tables=per_sample,
                                          per_sample_keys=keys, n_boot=20)
    path = tmp_path / name / modality / "epoch=0.json"
    result.to_json(path)
    result.save_per_sample(path)
    return str(path)


def test_a_map_against_itself_gives_one_one(tmp_path):
    """Fails on the old code: each map's utterances were resampled on their own, so ρ's CI missed ρ = 1."""
    per_sample = map_pair(0, related=True)[0]
    keys = np.arange(len(per_sample))
    files = [_write(tmp_path, "a", per_sample, keys), _write(tmp_path, "a", per_sample[::-1], keys[::-1], "text")]
    pair = compare_maps(load_maps(files), n_perm=50, n_boot=200)["pairs"][0]
    assert pair["ci"]["resampling"] == "paired"
    for statistic in ("spearman_rho", "path_overlap", "same_best_block"):
        assert pair["ci"][statistic] == pytest.approx([1.0, 1.0], abs=1e-12), statistic
    ci = bootstrap_agreement(per_sample, per_sample, n_boot=100, paired=True)
    assert ci.spearman_rho == pytest.approx((1.0, 1.0), abs=1e-12) and ci.same_best_block == (1.0, 1.0)


def test_paired_percentile_intervals_cover_the_population_agreement():
    """Speech- and text-like maps of the same utterances (shared noise, perturbed layer strengths): the 95% interval
    of each statistic covers its value on the population maps (4,000 utterances) in most of 40 draws of 32."""
    coverage = []
    for perturbation in (0.3, 0.6):
        rng = np.random.default_rng(42)
        strengths_a = layer_strengths(rng)
        strengths_b = strengths_a * np.exp(perturbation * rng.standard_normal(len(strengths_a)))
        population = [tables.mean(0) for tables in
                      paired_per_sample_maps(strengths_a, strengths_b, np.random.default_rng(1), num_samples=4000)]
        paths = path_agreement(pruning_path(population[0]), pruning_path(population[1]))
        truth = np.array([spearman_rho(*population), paths.overlap, paths.exact])
        for draw in range(40):
            per_a, per_b = paired_per_sample_maps(strengths_a, strengths_b, np.random.default_rng(100 + draw))
            ci = bootstrap_agreement(per_a, per_b, n_boot=200, seed=draw, paired=True)
            low, high = np.array([ci.spearman_rho, ci.path_overlap, ci.same_best_block]).T
            coverage.append((low - 1e-12 <= truth) & (truth <= high + 1e-12))
    rates = np.mean(coverage, axis=0)
    print(f"\ncoverage of nominal 95% intervals (rho, overlap, same best block): {rates}")
    assert (rates >= 0.8).all(), rates


def test_accumulators_pair_rows_by_utterance_whatever_the_batching():
    """Speech and text of the same utterances, fed in different orders and batches: equal keys in equal order.
    Fails on the old code, which sorted each map's rows by their own values."""
    generator = torch.Generator().manual_seed(0)
    ids = [f"utt{i}" for i in range(6)]
    states = [torch.randn(6, 3, 8, generator=generator) for _ in range(4)]
    segments = torch.full((6, 3), 2)
    speech, text = RedundancyAccumulator(3, keep_per_sample=True), RedundancyAccumulator(3, keep_per_sample=True)
    speech.update_states(states, segments, sample_keys=utterance_keys(ids))
    for rows in ([5, 1], [0, 3, 4, 2]):  # another order, two batches, other values (scaled noise)
        text.update_states([s[rows] + 0.1 * torch.randn(len(rows), 3, 8, generator=generator) for s in states],
                           segments[rows], sample_keys=utterance_keys([ids[r] for r in rows]))
    maps = [accumulator.result(model_id="m", set_name="dev", modality=m, n_boot=10)
            for accumulator, m in ((speech, "speech"), (text, "text"))]
    np.testing.assert_array_equal(maps[0].per_sample_keys, maps[1].per_sample_keys)
    assert sorted(maps[0].per_sample_keys.tolist()) == sorted(utterance_keys(ids).tolist())


def test_compare_refuses_a_stale_per_sample_file(tmp_path, capsys):
    per_a, per_b = map_pair(1, related=True)
    first = _write(tmp_path, "a", per_a, np.arange(len(per_a)))
    second = _write(tmp_path, "b", per_b, np.arange(len(per_b)))
    np.save(per_sample_path(second), per_a)  # same shape, another run's tables
    assert package_main(["compare", first, second, "--out", str(tmp_path / "out"), "--n_perm", "20"]) == 2
    error = capsys.readouterr().err
    assert str(per_sample_path(second)) in error and "stale" in error
    np.save(per_sample_path(second), per_b[:-1])  # one utterance short
    with pytest.raises(ValueError, match="shape"):
        load_maps([first, second])
    # a map written before digests and keys: its mean still gives a stale file away
    data = json.loads((tmp_path / "b" / "speech" / "epoch=0.json").read_text())
    data.pop("per_sample_sha256")
    data.pop("per_sample_keys")
    (tmp_path / "b" / "speech" / "epoch=0.json").write_text(json.dumps(data))
    np.save(per_sample_path(second), per_a)
    with pytest.raises(ValueError, match="mean differs"):
        load_maps([first, second])


def test_compare_names_an_old_per_sample_file_without_keys(tmp_path):
    per_a, per_b = map_pair(2, related=True)
    files = [_write(tmp_path, "a", per_a, None), _write(tmp_path, "b", per_b, np.arange(len(per_b)))]
    comparison = compare_maps(load_maps(files), n_perm=20, n_boot=20)
    pair = comparison["pairs"][0]
    assert pair["ci"] is None and str(per_sample_path(files[0])) in pair["ci_note"]
