"""The permutation null and bootstrap of the agreement statistics, and the ``compare`` command on tiny maps."""
from __future__ import annotations

import json

import numpy as np
import pytest
from matplotlib.image import imread
from scipy.stats import spearmanr

from lightning_speechllm.__main__ import main as package_main
from lightning_speechllm.redundancy.analysis import (
    RedundancyResult,
    bootstrap_agreement,
    path_agreement,
    path_null,
    per_sample_path,
    pruning_path,
    spearman_null,
    spearman_rho,
    surrogate_tables,
    valid_cells,
)
from lightning_speechllm.redundancy.compare import compare_maps, load_maps
from tests.redundancy_sim import layer_strengths, per_sample_maps

LAYERS = 16


def _map(seed: int, layers: int = LAYERS) -> np.ndarray:
    """A simulated map (random pre-norm-like stream, see ``tests/redundancy_sim.py``): d grows with n, layer 0 stands
    out, as in every real map, which alone makes ρ of unrelated maps high: exactly what the null must see through."""
    rng = np.random.default_rng(seed)
    return per_sample_maps(layer_strengths(rng, layers), rng).mean(0)


def _related(seed: int, layers: int = LAYERS) -> np.ndarray:
    """A map of the same layer strengths as ``_map(seed)``, measured on new utterances."""
    rng = np.random.default_rng(seed)
    strengths = layer_strengths(rng, layers)
    return per_sample_maps(strengths, np.random.default_rng(seed + 10_000)).mean(0)


def _noisy_copy(table: np.ndarray, seed: int, scale: float = 0.01) -> np.ndarray:
    return table + np.random.default_rng(seed).normal(0.0, scale, table.shape)


def _write(tmp_path, name: str, table: np.ndarray, per_sample: np.ndarray | None = None,
           keys: np.ndarray | None = None) -> str:
    result = RedundancyResult.from_tables(table, np.linspace(0.1, 0.3, len(table)), model_id="m",
                                          token_selection="last_prompt", set_name=name, modality="speech",
                                          num_samples=8 if per_sample is None else len(per_sample),
                                          per_sample_tables=per_sample, per_sample_keys=keys, n_boot=20)
    path = tmp_path / name / "epoch=0.json"
    result.to_json(path)
    result.save_per_sample(path)
    return str(path)


def test_spearman_null_of_one_surrogate_equals_scipy():
    """The null's fast rank formula against scipy on the explicit surrogate (one surrogate, same seed)."""
    a, b = _map(1, 6), _map(2, 6)
    null = spearman_null(a, b, n_perm=1, seed=3)
    surrogate = surrogate_tables(b, 1, seed=3)[0]
    cells = valid_cells(6)
    assert null.null_mean == pytest.approx(spearmanr(a[cells], surrogate[cells]).statistic, abs=1e-12)
    assert null.observed == pytest.approx(spearman_rho(a, b))


def test_null_separates_a_related_map_from_an_unrelated_one():
    a, related = _map(1), _related(1)
    unrelated = [_map(seed) for seed in range(2, 7)]
    # unrelated maps share the generic shape: ρ is high, yet typically no higher than chance (the false-positive
    # rate itself is measured in test_agreement_calibration.py)
    assert min(spearman_rho(a, other) for other in unrelated) > 0.8
    for statistic in ("overlap", "exact", "jaccard"):
        assert np.median([path_null(a, other, statistic=statistic).p_value for other in unrelated]) > 0.1
    assert np.median([spearman_null(a, other).p_value for other in unrelated]) > 0.1
    assert spearman_null(a, related).p_value < 0.01
    assert path_null(a, related, statistic="exact").p_value < 0.01
    assert path_null(a, related, statistic="jaccard").p_value < 0.01


def test_null_is_reproducible_and_checks_its_input():
    a, b = _map(1), _map(2)
    assert spearman_null(a, b, seed=7) == spearman_null(a, b, seed=7)
    with pytest.raises(ValueError, match="shape"):
        spearman_null(a, _map(1, LAYERS - 1))
    with pytest.raises(ValueError, match="n_perm"):
        path_null(a, b, n_perm=0)


def test_bootstrap_agreement_separates_same_from_unrelated_maps():
    """Utterance noise around one map vs around two different maps. (Resampling adds noise, which attenuates ρ: the
    percentile interval of two noisy copies sits slightly below their point estimate.)"""
    per_a = np.stack([_noisy_copy(_map(1), seed, 0.005) for seed in range(20)])
    same = np.stack([_noisy_copy(_map(1), seed, 0.005) for seed in range(20, 40)])
    other = np.stack([_noisy_copy(_map(2), seed, 0.005) for seed in range(20, 40)])
    ci_same, ci_other = bootstrap_agreement(per_a, same, n_boot=200), bootstrap_agreement(per_a, other, n_boot=200)
    assert ci_same.spearman_rho[0] > 0.9
    assert ci_other.spearman_rho[1] < ci_same.spearman_rho[0]
    assert ci_other.same_best_block[1] < ci_same.same_best_block[0]
    assert bootstrap_agreement(per_a, same, n_boot=200) == ci_same  # fixed seed


def test_compare_table_equals_direct_calls(tmp_path):
    tables = {"asr": _map(1), "ast": _related(1), "other": _map(2)}
    files = [_write(tmp_path, name, table) for name, table in tables.items()]
    comparison = compare_maps(load_maps(files), n_perm=500)
    assert [(p["a"], p["b"]) for p in comparison["pairs"]] == [
        ("asr/speech/last_prompt", "ast/speech/last_prompt"), ("asr/speech/last_prompt", "other/speech/last_prompt"),
        ("ast/speech/last_prompt", "other/speech/last_prompt")]
    for pair, (name_a, name_b) in zip(comparison["pairs"], [("asr", "ast"), ("asr", "other"), ("ast", "other")]):
        a, b = tables[name_a], tables[name_b]
        paths = path_agreement(pruning_path(a), pruning_path(b))
        assert pair["spearman_rho"] == pytest.approx(spearman_rho(a, b))
        assert (pair["path_overlap"], pair["same_best_block"]) == (paths.overlap, paths.exact)
        assert pair["null"]["spearman_rho"] == spearman_null(a, b, n_perm=500).to_dict()
        assert pair["ci"] is None  # no per-sample tables beside these maps
    assert comparison["pairs"][0]["null"]["spearman_rho"]["p_value"] < 0.01
    assert comparison["pairs"][1]["null"]["spearman_rho"]["p_value"] > 0.05


def test_compare_map_with_itself(tmp_path):
    table = _map(4)
    first, second = _write(tmp_path, "a", table), _write(tmp_path, "b", table)
    pair = compare_maps(load_maps([first, second]), n_perm=200)["pairs"][0]
    assert (pair["spearman_rho"], pair["path_overlap"], pair["same_best_block"]) == (pytest.approx(1.0), 1.0, 1.0)
    # mid-p: no surrogate reaches the observed agreement, which counts as half a tie
    assert pair["null"]["spearman_rho"]["p_value"] == pytest.approx(0.5 / 201)
    assert pair["null"]["same_best_block"]["p_value"] == pytest.approx(0.5 / 201)


def test_cli_writes_outputs_with_cis(tmp_path, capsys):
    per_a = np.stack([_noisy_copy(_map(1), seed, 0.05) for seed in range(6)])
    per_b = np.stack([_noisy_copy(_map(2), seed, 0.05) for seed in range(6, 12)])
    files = [_write(tmp_path, "a", per_a.mean(0), per_a, np.arange(6)),
             _write(tmp_path, "b", per_b.mean(0), per_b, np.arange(6, 12))]
    assert per_sample_path(files[0]).is_file()
    out = tmp_path / "out"
    code = package_main(["compare", *files, "--out", str(out), "--labels", "ASR", "AST", "--n_perm", "100",
                         "--n_boot", "50"])
    assert code == 0
    data = json.loads((out / "compare.json").read_text())
    pair = data["pairs"][0]
    assert (pair["a"], pair["b"]) == ("ASR", "AST") and pair["ci"]["n_boot"] == 50
    assert pair["ci"]["resampling"] == "independent"  # different utterances
    low, high = pair["ci"]["spearman_rho"]
    assert low < high  # 50 resamples of noisy per-utterance maps: an interval, not a point
    markdown = (out / "compare.md").read_text()
    assert f"| ASR | AST | {pair['spearman_rho']:.3f} [{low:.3f}, {high:.3f}] |" in markdown
    assert markdown in capsys.readouterr().out
    assert imread(out / "compare.png").ndim == 3


def test_cli_refuses_maps_of_different_layer_counts(tmp_path, capsys):
    small, large = _write(tmp_path, "small", _map(1, 6)), _write(tmp_path, "large", _map(1, 8))
    assert package_main(["compare", small, large, "--out", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err
    assert "different layer counts" in error and small in error and large in error
    assert not (tmp_path / "out").exists()
    assert package_main(["compare", small, "--out", str(tmp_path / "out")]) == 2
    assert "at least two maps" in capsys.readouterr().err
