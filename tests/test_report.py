"""Run report: redundancy maps, sweep and efficiency collected into report.md and a standalone report.html."""
from __future__ import annotations

import base64
import json
import re

import numpy as np
import pytest

from lightning_speechllm.evaluation.efficiency import compare, measure_latency
from lightning_speechllm.evaluation.report import NOT_MEASURED, write_report
from lightning_speechllm.evaluation.sweep import SweepPoint, SweepTable, Thresholds, choose_point, write_outputs
from lightning_speechllm.redundancy import plots
from lightning_speechllm.redundancy.analysis import RedundancyResult
from lightning_speechllm.redundancy.report import write_json
from tests.test_speechllm import make_batch
from tests.tiny_speechllm import tiny_speechllm


def _result(epoch: int) -> RedundancyResult:
    rng = np.random.default_rng(epoch)
    table = np.full((4, 4), np.nan)
    for n in range(1, 5):
        table[n - 1, : 5 - n] = rng.uniform(0.1, 0.6, 5 - n)
    return RedundancyResult.from_tables(table, rng.uniform(0, 1, 4), model_id="tiny", token_selection="last",
                                        set_name="clean", modality="speech", num_samples=3, epoch=epoch, n_boot=0)


def _efficiency_json(path) -> None:
    """Full vs pruned timings of a tiny SpeechLLM, as `efficiency --json_out` writes them."""
    model, batch = tiny_speechllm(), make_batch(seconds=(0.5, 0.4))
    full = measure_latency(model, batch, max_new_tokens=3, repeats=1, warmup=0, label="full")
    with model.layer_mask.active([0, 1, 3]):
        pruned = measure_latency(model, batch, max_new_tokens=3, repeats=1, warmup=0, label="pruned (-1)")
    path.write_text(json.dumps({"full": full.to_dict(), "pruned": pruned.to_dict(),
                                "comparison": compare(full, pruned, ideal=1.3)}))


@pytest.fixture
def run_dir(tmp_path):
    redundancy = tmp_path / "redundancy" / "clean"
    for epoch in (0, 1):
        plots.plot_result_heatmap(_result(epoch), save_to=redundancy / "speech" / f"epoch={epoch}.png")
    plots.plot_block_influence(_result(1).block_influence, num_marked=2,
                               save_to=redundancy / "speech" / "epoch=1_bi.png")
    write_json({"set_name": "clean", "epoch": 1, "spearman_rho": 0.91, "path_exact": 0.75, "path_overlap": 1.0},
               redundancy / "agreement_epoch=1.json")
    table = SweepTable({"clean": {"wer": 4.0}}, 4, [
        SweepPoint("angular", 0.25, "fraction", 1, 4, [2], before={"clean": {"wer": 4.4}}),
        SweepPoint("angular", 0.5, "fraction", 2, 4, [1, 2], before={"clean": {"wer": 9.0}})])
    write_outputs(table, tmp_path / "sweep", Thresholds(), choose_point(table))
    _efficiency_json(tmp_path / "efficiency.json")
    return tmp_path


def test_report_collects_every_part_and_inlines_images(run_dir):
    markdown_path, html_path = write_report(run_dir)
    markdown = markdown_path.read_text()
    assert "redundancy/clean/speech/epoch=1.png" in markdown and "epoch=0.png" not in markdown  # latest epoch only
    assert "epoch=1_bi.png" in markdown and "| clean | 1 | 0.910 | 75% | 100% |" in markdown
    assert "**Chosen fraction: 25.0%** (1/4 layers, layers [2])" in markdown
    assert "sweep/sweep.png" in markdown and "| metric | full | pruned (-1) |" in markdown
    assert re.search(r"\| decoder layers \| 4 \| 3 \|", markdown) and "| decode / token (ms) |" in markdown
    assert NOT_MEASURED not in markdown
    for link in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", markdown):
        assert (markdown_path.parent / link).is_file(), link

    page = html_path.read_text()
    sources = re.findall(r'<img src="([^"]+)"', page)
    assert len(sources) == 3 and all(s.startswith("data:image/png;base64,") for s in sources)
    assert base64.b64decode(sources[-1].split(",", 1)[1]) == (run_dir / "sweep" / "sweep.png").read_bytes()
    assert "<table>" in page and "<strong>Chosen fraction: 25.0%</strong>" in page and "| clean" not in page


def test_report_states_missing_parts(tmp_path):
    markdown_path, html_path = write_report(tmp_path, out_dir=tmp_path / "out", title="empty run")
    markdown = markdown_path.read_text()
    assert markdown.startswith("# empty run")
    assert markdown.count(NOT_MEASURED) == 3  # redundancy (no directory at all), sweep, efficiency
    assert "<img" not in html_path.read_text()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        write_report(tmp_path / "nope")


def test_report_shows_raw_values_of_an_efficiency_file_in_another_format(run_dir):
    (run_dir / "efficiency.json").write_text(json.dumps({"full": {"decode_ms": 9.5}, "pruned": {"decode_ms": 7.0}}))
    markdown = write_report(run_dir)[0].read_text()
    assert "does not match this version's format" in markdown and "| decode_ms | 9.5 | 7.0 |" in markdown


def test_report_lists_each_token_selection_with_its_null(tmp_path):
    """The agreement file of the callback: the modality-clean selection first, `last` beside it, each with its null."""
    def values(rho, exact, overlap, q95, p_rho, p_overlap):
        return {"spearman_rho": rho, "path_exact": exact, "path_overlap": overlap,
                "null": {"spearman_rho": {"null_q95": q95, "p_value": p_rho}, "path_overlap": {"p_value": p_overlap}}}

    by_selection = {"last_prompt": values(0.5, 0.25, 0.5, 0.7, 0.2, 0.3),
                    "last": values(0.99, 1.0, 1.0, 0.8, 0.001, 0.01)}
    write_json({"set_name": "dev", "epoch": 0, "token_selection": "last_prompt", **by_selection["last_prompt"],
                "by_token_selection": by_selection}, tmp_path / "redundancy" / "dev" / "agreement_epoch=0.json")
    markdown = write_report(tmp_path)[0].read_text()
    assert "| dev | 0 | 0.500 | 25% | 50% | last_prompt | 0.700 | 0.200 | 0.300 |" in markdown
    assert "| dev | 0 | 0.990 | 100% | 100% | last | 0.800 | 0.001 | 0.010 |" in markdown
    assert markdown.index("| last_prompt |") < markdown.index("| last |")
