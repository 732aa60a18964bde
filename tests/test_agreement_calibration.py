"""The agreement null on simulated maps: calibrated on unrelated pairs, powerful on related ones (issue 20).

Unrelated maps of pre-norm-like streams share a generic shape, so the old within-row shuffle called 80% of them
related (Spearman ρ). These tests fail on that null."""
from __future__ import annotations

import numpy as np
import pytest

from lightning_speechllm.redundancy.analysis import (
    RedundancyResult,
    additive_scale,
    block_design,
    decompose_layers,
    surrogate_tables,
    valid_cells,
)
from lightning_speechllm.redundancy.compare import LoadedMap, compare_pair
from tests.redundancy_sim import LAYERS, map_pair

PAIRS = 100
N_PERM = 200
ALPHA = 0.05
STATISTICS = ("spearman_rho", "path_overlap", "same_best_block", "path_mean_jaccard")


def _loaded(label: str, table: np.ndarray) -> LoadedMap:
    result = RedundancyResult.from_tables(table, np.linspace(0.1, 0.3, len(table)), model_id="sim",
                                          token_selection="last", set_name=label, modality="speech", num_samples=32)
    return LoadedMap(label, f"{label}.json", result, None)


def _significant_rate(related: bool) -> dict[str, float]:
    """Share of ``PAIRS`` simulated pairs whose ``compare`` p-value is <= ALPHA, per statistic."""
    hits = dict.fromkeys(STATISTICS, 0)
    for seed in range(PAIRS):
        per_a, per_b = map_pair(seed, related)
        row = compare_pair(_loaded("a", per_a.mean(0)), _loaded("b", per_b.mean(0)), n_perm=N_PERM, seed=seed)
        for name in STATISTICS:
            hits[name] += row["null"][name]["p_value"] <= ALPHA
    return {name: count / PAIRS for name, count in hits.items()}


def test_null_is_calibrated_on_unrelated_maps_and_finds_related_ones():
    false_positive, power = _significant_rate(related=False), _significant_rate(related=True)
    print(f"\nfalse-positive rate at alpha={ALPHA}: {false_positive}\npower: {power}")
    assert all(rate <= 0.10 for rate in false_positive.values()), false_positive
    assert all(rate >= 0.80 for rate in power.values()), power


def test_surrogates_keep_the_maps_own_structure():
    table = map_pair(3, related=False)[0].mean(0)
    valid = valid_cells(LAYERS)
    parts = decompose_layers(table)
    # the decomposition is exact: contributions re-summed over each block plus the remainder give the map back
    np.testing.assert_allclose(block_design(LAYERS) @ parts.contribution + parts.remainder,
                               additive_scale(table[valid]), atol=1e-12)
    surrogates = surrogate_tables(table, 50, seed=1)
    assert surrogates.shape == (50, LAYERS, LAYERS) and np.isnan(surrogates[:, ~valid]).all()
    original = additive_scale(np.where(valid, table, 0.0))
    row_means = np.nanmean(np.where(valid, surrogates, np.nan), axis=2)
    # d grows with n in the map and in every surrogate; the embeddings' and last layer's blocks stay where they are
    assert (np.diff(np.nanmean(np.where(valid, original, np.nan), axis=1)) > 0).all()
    assert (np.diff(row_means, axis=1) > 0).all()
    np.testing.assert_allclose(surrogates[:, 0, 0], original[0, 0], atol=1e-12)
    np.testing.assert_allclose(surrogates[:, 0, LAYERS - 1], original[0, LAYERS - 1], atol=1e-12)
    # ... and the interior layers move: the surrogates' best single layers are spread over the stack
    assert len({int(np.nanargmin(s[0])) for s in surrogates}) > 4


def test_surrogates_are_seeded_and_checked():
    table = map_pair(4, related=False)[0].mean(0)
    np.testing.assert_array_equal(surrogate_tables(table, 5, seed=2), surrogate_tables(table, 5, seed=2))
    with pytest.raises(ValueError, match="n_perm"):
        surrogate_tables(table, 0)
    tiny = np.array([[0.1, 0.2], [0.3, np.nan]])  # no interior layer: every surrogate is the map itself
    np.testing.assert_allclose(surrogate_tables(tiny, 3)[:, valid_cells(2)], additive_scale(tiny[valid_cells(2)])[None]
                               .repeat(3, 0), atol=1e-12)
