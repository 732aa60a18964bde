"""The README's main job on the real offline weights (pulls them into the shared cache when missing)."""
import json

import pytest

from lightning_speechllm.demo import main


@pytest.mark.slow
def test_demo_runs_on_the_embedded_default(tmp_path, capsys):
    assert main(["--out", str(tmp_path), "--sentences", "4"]) == 0
    printed = capsys.readouterr().out
    assert "whisper   :" in printed and "SpeechLLM (untrained projector):" in printed
    result = json.loads((tmp_path / "text_redundancy.json").read_text())
    assert result["num_layers"] == 30 and result["modality"] == "text"
    table = result["table"]
    assert table[0][25] < table[0][0], "SmolLM2's deep single layers change the residual stream far less than layer 0"
    assert (tmp_path / "text_redundancy.png").stat().st_size > 10_000
