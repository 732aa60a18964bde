"""GGUF of a pruned Voxtral-layout export, by llama.cpp's own converter (`python -m lightning_speechllm gguf`).

The real SmolLM2-135M + Whisper tiny.en, shaped for Voxtral (a random bias-free 4-frame projector), with 8 of its 30
decoder layers removed: the text GGUF must hold 22 renumbered blocks whose weights are the kept layers', no
per-layer metadata at the old length, and the mmproj must be Voxtral's audio projector with the model's weights.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from lightning_speechllm.__main__ import main as cli
from lightning_speechllm.assets import resolve
from lightning_speechllm.edge import GGUFExportError, convert_voxtral, gguf_summary
from lightning_speechllm.model.projector import ProjectorConfig
from lightning_speechllm.model.speechllm import SpeechLLM, SpeechLLMConfig
from lightning_speechllm.model.voxtral_layout import save_voxtral
from tests.test_voxtral_export import _voxtral_shaped

REMOVED = list(range(20, 28))


def _tensor(path, name: str) -> np.ndarray:
    from gguf import GGUFReader

    tensor = next(t for t in GGUFReader(str(path)).tensors if t.name == name)
    return np.asarray(tensor.data, dtype=np.float32)


@pytest.mark.slow
def test_the_pruned_default_converts_to_gguf_with_renumbered_blocks(tmp_path, capsys):
    try:
        resolve("smollm2-135m"), resolve("whisper-tiny.en")
    except Exception as error:  # pragma: no cover - only without the offline asset cache
        pytest.skip(f"real weights unavailable: {error}")
    speechllm = SpeechLLM.from_config(SpeechLLMConfig(
        encoder_whole_window=True, projector=ProjectorConfig(downsample=4, hidden_dim=576, bias=False))).eval()
    every_layer = list(speechllm.llm.model.layers)  # the original numbering
    speechllm.layer_mask.remove_layers(REMOVED)
    voxtral = save_voxtral(speechllm, tmp_path / "voxtral")
    assert cli(["gguf", "--voxtral", str(voxtral), "--out", str(tmp_path / "gguf"), "--types", "[f16, q8_0]"]) == 0
    printed = capsys.readouterr().out
    assert "llama.block_count=22" in printed and "clip.projector_type=voxtral" in printed

    for kind in ("f16", "q8_0"):
        summary = gguf_summary(tmp_path / "gguf" / f"model-{kind}.gguf")
        blocks = {int(name.split(".")[1]) for name in summary["tensors"] if name.startswith("blk.")}
        assert summary["metadata"]["llama.block_count"] == 22 and blocks == set(range(22))
        assert not [k for k, v in summary["metadata"].items() if v == "array[30]"]  # no per-layer list left at 30
    kept = [i for i in range(30) if i not in REMOVED]
    for block in (19, 20, 21):  # after the cut: original layers 19, 28, 29
        expected = every_layer[kept[block]].mlp.down_proj.weight.detach().half().float().numpy()
        got = _tensor(tmp_path / "gguf" / "model-f16.gguf", f"blk.{block}.ffn_down.weight")
        np.testing.assert_array_equal(got.reshape(expected.shape), expected)

    mmproj = gguf_summary(tmp_path / "gguf" / "mmproj-f16.gguf")["metadata"]
    assert mmproj["clip.projector_type"] == "voxtral" and mmproj["clip.audio.projector.stack_factor"] == 4
    assert mmproj["clip.audio.block_count"] == 4
    linear_1 = speechllm.projector.net[0].weight.detach()
    got = _tensor(tmp_path / "gguf" / "mmproj-f16.gguf", "mm.a.mlp.1.weight").reshape(linear_1.shape)
    np.testing.assert_allclose(got, linear_1.half().float().numpy(), atol=0, rtol=0)
    info = json.loads((voxtral / "pruning.json").read_text())
    assert info["removed_layers"] == REMOVED and info["audio_token"] in speechllm.tokenizer.get_added_vocab()


def test_the_converters_refusal_is_reported_and_leaves_no_file(tmp_path, capsys):
    """A tokenizer llama.cpp does not know (the tiny one) is the converter's refusal, relayed with its own words."""
    speechllm = _voxtral_shaped()
    voxtral = save_voxtral(speechllm.eval(), tmp_path / "voxtral")
    with pytest.raises(GGUFExportError, match="pre-tokenizer was not recognized"):
        convert_voxtral(voxtral, tmp_path / "gguf", ("f16",))
    assert not list((tmp_path / "gguf").glob("*.gguf*"))
    assert cli(["gguf", "--voxtral", str(tmp_path), "--out", str(tmp_path / "gguf")]) == 2
    assert "has no config.json" in capsys.readouterr().err
    with pytest.raises(GGUFExportError, match="GGUF types must be among"):
        convert_voxtral(voxtral, tmp_path / "gguf", ("q4_0",))
