"""GGUF of a pruned Voxtral-layout export, by llama.cpp's own converter (`python -m lightning_speechllm gguf`), and
the pruned decoder run by llama.cpp (`lightning_speechllm.edge.runtime`).

The real SmolLM2-135M + Whisper tiny.en, shaped for Voxtral (a random bias-free 4-frame projector), with 8 of its 30
decoder layers removed: the text GGUF must hold 22 renumbered blocks whose weights are the kept layers', no
per-layer metadata at the old length, and the mmproj must be Voxtral's audio projector with the model's weights.
llama.cpp, given the framework's speech embeddings, must decode the same 16 greedy tokens from the F16 file as
PyTorch does.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lightning_speechllm.__main__ import main as cli
from lightning_speechllm.assets import resolve
from lightning_speechllm.edge import GGUFExportError, convert_export, gguf_summary
from lightning_speechllm.model.projector import ProjectorConfig
from lightning_speechllm.model.speechllm import SpeechLLM, SpeechLLMConfig
from lightning_speechllm.model.voxtral_layout import save_voxtral
from tests.test_speechllm import make_batch
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
    torch.manual_seed(0)
    speechllm = SpeechLLM.from_config(SpeechLLMConfig(
        encoder_whole_window=True, projector=ProjectorConfig(downsample=4, hidden_dim=576, bias=False))).eval()
    with torch.no_grad():  # large enough that the speech steers the greedy tokens
        for param in speechllm.projector.parameters():
            param.normal_(0.0, 0.05)
    every_layer = list(speechllm.llm.model.layers)  # the original numbering
    speechllm.layer_mask.remove_layers(REMOVED)
    voxtral = save_voxtral(speechllm, tmp_path / "voxtral")
    assert cli(["gguf", "--source", str(voxtral), "--out", str(tmp_path / "gguf"), "--types", "[f16, q8_0]"]) == 0
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
    _llama_cpp_decodes_like_pytorch(speechllm, voxtral, tmp_path / "gguf")


def _llama_cpp_decodes_like_pytorch(speechllm: SpeechLLM, voxtral, gguf_dir) -> None:
    pytest.importorskip("llama_cpp", reason="llama-cpp-python (the edge extra) is not installed")
    from lightning_speechllm.edge.runtime import LlamaCppSpeechModel, RuntimeUnavailable

    batch = make_batch(seconds=(2.0,))
    with torch.no_grad():
        frames, lens = speechllm.encode_frames(batch.audio, batch.audio_lens)
        embeddings, positions = speechllm.projector(frames, lens)
        ours = speechllm.generate_with_details(batch, max_new_tokens=16, min_new_tokens=16).texts[0]
    runtime = LlamaCppSpeechModel.from_dir(gguf_dir, "f16")
    try:
        theirs = runtime.generate(embeddings[0, : positions[0]].numpy(), max_new_tokens=16, min_new_tokens=16)
        assert theirs.audio_positions == 375 and len(theirs.tokens) == 16
        assert theirs.text == ours  # the same 16 greedy tokens from the F16 GGUF as from PyTorch's float32
        with pytest.raises(RuntimeUnavailable, match="average-pools the encoder frames by 2"):
            runtime.audio_embeddings(batch.audio[0].numpy())
    finally:
        runtime.close()


def test_the_converters_refusal_is_reported_and_leaves_no_file(tmp_path, capsys):
    """A tokenizer llama.cpp does not know (the tiny one) is the converter's refusal, relayed with its own words."""
    speechllm = _voxtral_shaped()
    voxtral = save_voxtral(speechllm.eval(), tmp_path / "voxtral")
    with pytest.raises(GGUFExportError, match="pre-tokenizer was not recognized"):
        convert_export(voxtral, tmp_path / "gguf", ("f16",))
    assert not list((tmp_path / "gguf").glob("*.gguf*"))
    assert cli(["gguf", "--source", str(tmp_path), "--out", str(tmp_path / "gguf")]) == 2
    assert "is neither the llamacpp/ folder" in capsys.readouterr().err
    with pytest.raises(GGUFExportError, match="GGUF types must be among"):
        convert_export(voxtral, tmp_path / "gguf", ("q4_0",))
