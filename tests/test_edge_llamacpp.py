"""A Whisper SpeechLLM end to end through llama.cpp's audio path: ``export --format llamacpp`` -> ``gguf --source``
(llama.cpp's own converter) -> mtmd's log-mel, Whisper and projector from the mmproj, then the pruned decoder.

The mmproj's GLM-ASR graph must give the framework's speech embeddings (Whisper on the 30 s window, k = 5 frames
stacked, Linear-GELU-Linear) within F16 rounding, the begin/end rows and the window's positions past the utterance
dropped; and from those embeddings llama.cpp's decoder must give PyTorch's next-token logits (to its F16 KV cache's
rounding: a random tiny model has near-ties, so whole greedy transcripts are compared on real weights, in
``gguf-eval``). The model is tiny and random,
with SmolLM2's tokenizer (the one llama.cpp's converter must recognise).
"""
from __future__ import annotations

import json
from unittest.mock import patch

import numpy as np
import pytest
import torch

from lightning_speechllm.__main__ import main as cli
from lightning_speechllm.assets import resolve
from lightning_speechllm.edge import gguf_summary
from lightning_speechllm.model.encoders import WhisperSpeechEncoder
from lightning_speechllm.model.llamacpp_layout import LlamaCppExportError, llamacpp_blockers, save_llamacpp
from lightning_speechllm.model.projector import ProjectorConfig
from lightning_speechllm.model.speechllm import SpeechLLM, SpeechLLMConfig
from tests.test_speechllm import make_batch
from tests.tiny_speechllm import tiny_llama, tiny_whisper_config

pytest.importorskip("llama_cpp", reason="llama-cpp-python (the edge extra) is not installed")


def _speechllm(downsample: int = 5, **config) -> SpeechLLM:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(resolve("smollm2-135m"))
    except Exception as error:  # pragma: no cover - only without the offline asset cache
        pytest.skip(f"SmolLM2's tokenizer is unavailable: {error}")
    whisper = tiny_whisper_config(window_seconds=30)
    whisper.encoder_layers = 3
    torch.manual_seed(0)
    speechllm = SpeechLLM(tiny_llama(vocab_size=len(tokenizer), layers=4), tokenizer, WhisperSpeechEncoder(whisper),
                          SpeechLLMConfig(llm_path="<memory>", encoder_path="<memory>",
                                          projector=ProjectorConfig(downsample=downsample, hidden_dim=64), **config))
    with torch.no_grad():  # large enough that the speech steers the greedy tokens
        for param in speechllm.projector.parameters():
            param.normal_(0.0, 0.2)
    return speechllm.eval()


def test_llamacpps_audio_path_reproduces_the_framework_and_decodes_its_tokens(tmp_path, capsys):
    from lightning_speechllm.edge.runtime import LlamaCppSpeechModel

    speechllm = _speechllm()
    speechllm.layer_mask.remove_layers([1, 2])
    export = save_llamacpp(speechllm, tmp_path / "llamacpp")
    assert cli(["gguf", "--source", str(export), "--out", str(tmp_path / "gguf"), "--types", "[f32]"]) == 0
    printed = capsys.readouterr().out
    assert "llama.block_count=2" in printed and "clip.projector_type=glma" in printed
    mmproj = gguf_summary(tmp_path / "gguf" / "mmproj-f16.gguf")
    assert mmproj["metadata"]["clip.audio.projector.stack_factor"] == 5
    assert not [name for name in mmproj["tensors"] if name.startswith("a.post_ln")]  # moved to the pre-norm
    speech = json.loads((tmp_path / "gguf" / "speech.json").read_text())
    assert speech["speech_positions"] == "utterance" and speech["boundary_rows"] == 1 and "note" not in speech

    batch = make_batch(seconds=(2.0, 1.3))  # 100 frames = 20 whole groups; 65 frames = 13
    with torch.no_grad():
        ours, positions = speechllm.encode_speech(batch.audio, batch.audio_lens)
    runtime = LlamaCppSpeechModel.from_dir(tmp_path / "gguf", "f32")
    try:
        for row, n in enumerate(batch.audio_lens.tolist()):
            wave = batch.audio[row, :n].numpy()
            theirs = runtime.audio_embeddings(wave)
            assert theirs.shape == (int(positions[row]), 48)
            expected = ours[row, : positions[row]].numpy()  # ggml multiplies F16 weights by F16-rounded activations
            np.testing.assert_allclose(theirs, expected, atol=2e-3 * np.abs(expected).max(), rtol=0)
            transcript = runtime.transcribe(wave, max_new_tokens=12)
            assert transcript.audio_positions == int(positions[row]) and len(transcript.tokens) == 12
            logits = runtime.last_logits()  # after the last decoded token: compare the prefill's instead
            runtime.generate(theirs, max_new_tokens=1)
            prefill = runtime.last_logits()
            speech = (torch.from_numpy(theirs)[None], positions[row: row + 1])
            with torch.no_grad(), patch.object(speechllm, "encode_speech", lambda *_, speech=speech: speech):
                inputs = speechllm.build_inputs(batch.subset([row]), with_targets=False)
                pytorch = speechllm.llm(inputs_embeds=inputs.inputs_embeds,
                                        attention_mask=inputs.attention_mask).logits[0, -1].numpy()
            # the same next-token logits from the same speech embeddings (llama.cpp's KV cache is F16)
            np.testing.assert_allclose(prefill, pytorch, atol=1e-2 * np.abs(pytorch).max(), rtol=0)
            assert transcript.tokens[0] == int(pytorch.argmax()) and not np.array_equal(logits, prefill)
    finally:
        runtime.close()


def test_gguf_eval_and_transcribe_score_llamacpps_transcripts(tmp_path, capsys):
    import soundfile as sf

    from lightning_speechllm.edge.runtime import LlamaCppSpeechModel
    from lightning_speechllm.evaluation.anchor import word_error_scores

    speechllm = _speechllm()
    export = save_llamacpp(speechllm, tmp_path / "llamacpp")
    assert cli(["gguf", "--source", str(export), "--out", str(tmp_path / "gguf"), "--types", "[f16]"]) == 0
    batch = make_batch(seconds=(1.0, 1.6))
    rows = []
    for row, n in enumerate(batch.audio_lens.tolist()):
        sf.write(tmp_path / f"u{row}.wav", batch.audio[row, :n].numpy(), 16000)
        rows.append({"id": f"u{row}", "audio": f"u{row}.wav", "text": "one two three"})
    (tmp_path / "set.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    runtime = LlamaCppSpeechModel.from_dir(tmp_path / "gguf", "f16")
    try:
        expected = [runtime.transcribe(batch.audio[r, :n].numpy(), max_new_tokens=6).text
                    for r, n in enumerate(batch.audio_lens.tolist())]
    finally:
        runtime.close()

    capsys.readouterr()
    assert cli(["gguf-transcribe", "--gguf", str(tmp_path / "gguf"), "--audio", f"[{tmp_path / 'u1.wav'}]",
                "--max_new_tokens", "6"]) == 0
    assert capsys.readouterr().out == f"{tmp_path / 'u1.wav'}\t{expected[1]}\n"
    out = tmp_path / "eval.json"
    assert cli(["gguf-eval", "--gguf", f"{{tiny: {tmp_path / 'gguf'}}}", "--types", "[f16]", "--sets",
                f"{{mine: {tmp_path / 'set.jsonl'}, gone: {tmp_path / 'missing.jsonl'}}}", "--max_new_tokens", "6",
                "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "set 'gone' skipped" in captured.err and "tiny llama.cpp f16" in captured.out
    scores = json.loads(out.read_text())["tiny llama.cpp f16"]["mine"]
    assert list(scores["hypotheses"].values()) == expected
    assert scores["wer"] == word_error_scores(expected, ["one two three"] * 2)["wer"]
    assert scores["utterances"] == 2 and scores["rtf"] > 0
    gguf = tmp_path / "gguf"
    assert cli(["efficiency", "--runtime", "llama.cpp", "--gguf", f"{{full: {gguf}, pruned: {gguf}}}", "--types",
                "[f16]", "--sentences", "1", "--repeats", "1", "--max_new_tokens", "4"]) == 0
    table = capsys.readouterr().out
    assert "| llama.cpp f16 | full |" in table and "| llama.cpp f16 | pruned |" in table
    assert "llama.cpp f16: pruned decodes" in table  # the same folder twice: about 1x, not asserted
    assert cli(["efficiency", "--runtime", "llama.cpp"]) == 2
    assert "needs --gguf" in capsys.readouterr().err
    assert cli(["gguf-transcribe", "--gguf", str(tmp_path), "--audio", "[x.wav]"]) == 2
    assert "has no model-f16.gguf, mmproj-f16.gguf, speech.json" in capsys.readouterr().err


def test_models_llamacpp_cannot_reproduce_are_refused_with_every_reason(tmp_path, capsys):
    speechllm = _speechllm(downsample=8)
    speechllm.config.projector.kind = "conv1d"
    reasons = llamacpp_blockers(speechllm)
    assert any("downsample 8 does not divide" in reason for reason in reasons)
    assert any("projector kind 'conv1d'" in reason for reason in reasons)
    with pytest.raises(LlamaCppExportError, match="no llama.cpp form"):
        save_llamacpp(speechllm, tmp_path / "llamacpp")
    assert not (tmp_path / "llamacpp").exists()
    assert cli(["gguf", "--source", str(tmp_path), "--out", str(tmp_path / "gguf")]) == 2
    assert "is neither the llamacpp/ folder" in capsys.readouterr().err


def test_a_model_trained_on_a_shorter_window_is_exported_with_a_note(tmp_path):
    speechllm = _speechllm(encoder_window_step_seconds=6.0)
    export = save_llamacpp(speechllm, tmp_path / "llamacpp")
    speech = json.loads((export / "speech.json").read_text())
    assert speech["trained_window_seconds"] == 6.0 and "30 s window" in speech["note"]
