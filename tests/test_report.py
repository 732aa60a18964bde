"""Run report: redundancy maps, sweep and efficiency collected into report.md and a standalone report.html."""
from __future__ import annotations

import base64
import json
import re

import numpy as np
import pytest

from lightning_speechllm.evaluation.efficiency import EfficiencyReport, compare
from lightning_speechllm.evaluation.report import NOT_MEASURED, write_report
from lightning_speechllm.evaluation.sweep import SweepPoint, SweepTable, Thresholds, choose_point, write_outputs
from lightning_speechllm.redundancy import plots
from lightning_speechllm.redundancy.analysis import RedundancyResult
from lightning_speechllm.redundancy.report import write_json


def _result(epoch: int) -> RedundancyResult:
    rng = np.random.default_rng(epoch)
    table = np.full((4, 4), np.nan)
    for n in range(1, 5):
        table[n - 1, : 5 - n] = rng.uniform(0.1, 0.6, 5 - n)
    return RedundancyResult.from_tables(table, rng.uniform(0, 1, 4), model_id="tiny", token_selection="last",
                                        set_name="clean", modality="speech", num_samples=3, epoch=epoch, n_boot=0)


def _efficiency(label: str, layers: int, decode_ms: float) -> EfficiencyReport:
    return EfficiencyReport(label=label, decoder_layers=layers, decoder_params=layers * 10**6,
                            active_weight_bytes=layers * 4 * 10**6, batches=1, batch_size=2, prompt_tokens=40.0,
                            new_tokens=8, audio_seconds=3.0, speech_ms=5.0, prefill_ms=20.0,
                            decode_ms_per_token=decode_ms, total_ms=20 + 7 * decode_ms, rtf=0.1,
                            peak_memory_bytes=2**30, memory_kind="process_peak_rss", device="cpu", repeats=3)


@pytest.fixture
def run_dir(tmp_path):
    redundancy = tmp_path / "redundancy" / "clean"
    for epoch in (0, 1):
        plots.plot_result_heatmap(_result(epoch), save_to=redundancy / "speech" / f"epoch={epoch}.png")
    plots.plot_block_influence(_result(1).block_influence, num_marked=2, save_to=redundancy / "speech" / "epoch=1_bi.png")
    write_json({"set_name": "clean", "epoch": 1, "spearman_rho": 0.91, "path_exact": 0.75, "path_overlap": 1.0},
               redundancy / "agreement_epoch=1.json")
    table = SweepTable({"clean": {"wer": 4.0}}, 4, [
        SweepPoint("angular", 0.25, "fraction", 1, 4, [2], before={"clean": {"wer": 4.4}}),
        SweepPoint("angular", 0.5, "fraction", 2, 4, [1, 2], before={"clean": {"wer": 9.0}})])
    write_outputs(table, tmp_path / "sweep", Thresholds(), choose_point(table))
    full, pruned = _efficiency("full", 4, 10.0), _efficiency("pruned (-1)", 3, 8.0)
    (tmp_path / "efficiency.json").write_text(json.dumps(
        {"full": full.to_dict(), "pruned": pruned.to_dict(), "comparison": compare(full, pruned, ideal=1.3)}))
    return tmp_path


def test_report_collects_every_part_and_inlines_images(run_dir):
    markdown_path, html_path = write_report(run_dir)
    markdown = markdown_path.read_text()
    assert "redundancy/clean/speech/epoch=1.png" in markdown and "epoch=0.png" not in markdown  # latest epoch only
    assert "epoch=1_bi.png" in markdown and "| clean | 1 | 0.910 | 75% | 100% |" in markdown
    assert "**Chosen fraction: 25.0%** (1/4 layers, layers [2])" in markdown
    assert "sweep/sweep.png" in markdown and "| decode / token (ms) | 10.00 | 8.00 |" in markdown
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


def test_report_refuses_a_malformed_efficiency_file(run_dir):
    (run_dir / "efficiency.json").write_text(json.dumps({"full": {}}))
    with pytest.raises(ValueError, match="efficiency.json: not an efficiency result"):
        write_report(run_dir)
