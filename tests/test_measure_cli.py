"""`measure` command end to end: a tiny SpeechLLM saved to disk, a tiny manifest, --config, --print_config."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import yaml

from lightning_speechllm.assets import resolve
from lightning_speechllm.redundancy.analysis import RedundancyResult
from lightning_speechllm.redundancy.cli import main
from tests.tiny_speechllm import save_tiny_assets

LAYERS = 3
TEXTS = ["the cat sat on the mat", "one two three", "hello world", "a quick brown fox"]


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory) -> dict[str, Path]:
    """A tiny llama + tokenizer dir, a tiny Whisper dir, and a 4-utterance manifest."""
    samples = [16000 * (1 + i % 2) // 2 for i in range(len(TEXTS))]
    return save_tiny_assets(tmp_path_factory.mktemp("measure"), TEXTS, samples, layers=LAYERS, manifest="dev.jsonl")


def _config(dirs: dict[str, Path], out: Path, **overrides) -> Path:
    config = {
        "model": {"llm_path": str(dirs["llm"]), "encoder_path": str(dirs["whisper"]),
                  "projector": {"downsample": 2, "hidden_dim": 32}},
        "data": {"val_sets": {"dev": str(dirs["manifest"]), "dev2": str(dirs["manifest"])},
                 "max_audio_seconds": 4.0, "max_cuts": 2},
        "root_dir": str(out / "runs"), "output_dir": str(out / "maps"), "n_boot": 20,
        **overrides,
    }
    path = out / "measure.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_measure_speech_and_text_from_a_yaml_config(tiny_dirs, tmp_path, capsys):
    config = _config(tiny_dirs, tmp_path)
    assert main(["--config", str(config), "--sets", "[dev]"]) == 0
    printed = capsys.readouterr().out
    assert "text vs speech Spearman rho" in printed and "n=3" in printed and "n=4" not in printed
    maps = tmp_path / "maps"
    for modality in ("speech", "text"):
        result = RedundancyResult.from_json(maps / "dev" / modality / "epoch=0.json")
        assert result.num_samples == len(TEXTS) and result.num_layers == LAYERS
        assert result.model_id == str(tiny_dirs["llm"])
    assert not (maps / "dev2").exists()  # --sets filters
    agreement = json.loads((maps / "dev" / "agreement_epoch=0.json").read_text())
    assert -1.0 <= agreement["spearman_rho"] <= 1.0
    summary = (maps / "summary.csv").read_text().splitlines()
    assert len(summary) == 3 and summary[0].startswith("model_id,set_name,modality")
    assert list((tmp_path / "runs" / "measure").glob("version_0/metrics.csv"))


def test_model_options_from_their_own_file_as_the_help_says(tiny_dirs, tmp_path):
    """`--model model.yaml` (a group read from a file) once failed: jsonargparse's `__path__` reached the config."""
    config = yaml.safe_load(_config(tiny_dirs, tmp_path).read_text())
    model_file = tmp_path / "model.yaml"
    model_file.write_text(yaml.safe_dump(config.pop("model")))
    (tmp_path / "rest.yaml").write_text(yaml.safe_dump(config))
    assert main(["--config", str(tmp_path / "rest.yaml"), "--model", str(model_file), "--sets", "[dev]"]) == 0
    result = RedundancyResult.from_json(tmp_path / "maps" / "dev" / "speech" / "epoch=0.json")
    assert result.model_id == str(tiny_dirs["llm"]) and result.num_layers == LAYERS


def test_measure_writes_sublayer_maps_that_attention_plans_read(tiny_dirs, tmp_path):
    from lightning_speechllm.pruning.plan import plan_sublayers
    from lightning_speechllm.redundancy.sublayers import SublayerMap

    config = _config(tiny_dirs, tmp_path)
    assert main(["--config", str(config), "--sets", "[dev]", "--sublayers", "true", "--n_boot", "0"]) == 0
    for modality in ("speech", "text"):
        result = SublayerMap.from_json(tmp_path / "maps" / "sublayers" / "dev" / f"{modality}.json")
        assert result.layers == list(range(LAYERS)) and result.num_samples == len(TEXTS)
        assert all(0.0 < d < 1.0 for d in result.attention + result.mlp)
        assert (tmp_path / "maps" / "sublayers" / "dev" / f"{modality}.png").is_file()
    plan = plan_sublayers(result, LAYERS, n=1)
    assert plan.removed_attention == [min(range(LAYERS), key=lambda i: result.attention[i])]
    assert not (tmp_path / "maps" / "sublayers" / "dev2").exists()


def test_measure_writes_segment_maps_whose_speech_row_is_the_speech_token_map(tiny_dirs, tmp_path):
    from lightning_speechllm.redundancy.segments import SegmentMap

    config = _config(tiny_dirs, tmp_path)
    argv = ["--config", str(config), "--sets", "[dev]", "--segments", "true", "--n_boot", "0",
            "--token_selection", "speech", "--modalities", "[speech]"]
    assert main(argv) == 0
    segments = SegmentMap.from_json(tmp_path / "maps" / "segments" / "dev.json")
    layer_map = RedundancyResult.from_json(tmp_path / "maps" / "dev" / "speech" / "epoch=0.json")
    assert segments.layers == list(range(LAYERS)) and segments.num_samples == len(TEXTS)
    # d(l, 1) over the speech tokens, as the layer map measured with token_selection speech
    assert segments.speech == pytest.approx([float(layer_map.table[0, i]) for i in range(LAYERS)], rel=1e-5)
    assert segments.prompt != segments.speech and all(0.0 < d < 1.0 for d in segments.target)
    assert segments.lowest_speech(1) == [min(range(LAYERS), key=lambda i: segments.speech[i])]
    assert (tmp_path / "maps" / "segments" / "dev.png").is_file()


def test_measure_text_only_with_max_batches_and_tensorboard(tiny_dirs, tmp_path, capsys):
    config = _config(tiny_dirs, tmp_path)
    argv = ["--config", str(config), "--modalities", "[text]", "--max_batches", "1", "--logger", "tensorboard",
            "--output_dir", "null", "--token_selection", "target"]
    assert main(argv) == 0
    maps = next((tmp_path / "runs" / "measure").glob("version_*/redundancy"))
    for set_name in ("dev", "dev2"):
        result = RedundancyResult.from_json(maps / set_name / "text" / "epoch=0.json")
        assert result.num_samples == 2 and result.token_selection == "target"  # one batch of max_cuts=2
        assert not (maps / set_name / "speech").exists()
    assert "Spearman" not in capsys.readouterr().out


def test_print_config_round_trips(tiny_dirs, tmp_path, capsys):
    config = _config(tiny_dirs, tmp_path, modalities=["text"])
    assert main(["--config", str(config), "--print_config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["modalities"] == ["text"] and printed["decode"] is False
    assert printed["model"]["projector"]["downsample"] == 2 and printed["data"]["val_sets"]["dev2"]


def test_bad_input_gives_exit_code_2(tiny_dirs, tmp_path, capsys):
    config = _config(tiny_dirs, tmp_path)
    assert main(["--config", str(config), "--ckpt_path", str(tmp_path / "missing.ckpt")]) == 2
    assert "missing.ckpt does not exist" in capsys.readouterr().err
    assert main(["--token_selection", "middle"]) == 2
    assert main(["--root_dir", str(tmp_path)]) == 2  # no --data.val_sets
    assert "val_sets is empty" in capsys.readouterr().err


@pytest.mark.slow
def test_measure_real_smollm2_text_finds_its_known_redundant_layers(tmp_path, capsys):
    try:
        llm_dir = resolve("smollm2-135m")
    except Exception as error:  # pragma: no cover - only without the offline asset cache
        pytest.skip(f"real SmolLM2 weights unavailable: {error}")
    sf.write(tmp_path / "silence.wav", np.zeros(8000, np.float32), 16000)  # text-only: the audio is never read
    rows = [{"id": f"t{i}", "text": text, "task": "asr", "audio": "silence.wav"}
            for i, text in enumerate(["It is windy in Dublin on Friday.", "My order number is three zero eight.",
                                      "These phones are red.", "The meeting starts at nine in the morning."])]
    manifest = tmp_path / "text.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    argv = ["--model.llm_path", str(llm_dir), "--model.encoder_path", "null", "--modalities", "[text]",
            "--data.val_sets", f"{{dev: {manifest}}}", "--root_dir", str(tmp_path / "runs"),
            "--output_dir", str(tmp_path / "maps"), "--n_boot", "0", "--accelerator", "cpu"]
    assert main(argv) == 0
    result = RedundancyResult.from_json(tmp_path / "maps" / "dev" / "text" / "epoch=0.json")
    assert result.num_layers == 30 and result.num_samples == len(rows)
    assert result.table[0, 25] < 0.5 * result.table[0, 0], (result.table[0, 25], result.table[0, 0])
