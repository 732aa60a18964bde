"""CTranslate2 -> HF Whisper converter: binary reader round-trips and an end-to-end conversion checked against
ctranslate2's own writer (its ``WhisperLoader`` fills a ``WhisperSpec`` from a tiny random HF model)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import WhisperConfig, WhisperForConditionalGeneration

from lightning_speechllm.model.convert_ct2 import (
    CT2FormatError,
    build_whisper_config,
    convert_ct2_whisper,
    read_ct2_model,
    special_token_ids,
    write_ct2_model,
)

ctranslate2 = pytest.importorskip("ctranslate2")

SPECIALS = ["<|endoftext|>", "<|startoftranscript|>", "<|en|>", "<|transcribe|>", "<|notimestamps|>"]
VOCAB = 120  # ids 0..99 plain tokens, 100.. specials, the rest timestamps


def _variables() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "encoder/w": torch.randn(3, 4, generator=g),
        "encoder/h": torch.randn(5, generator=g).half(),
        "encoder/b": torch.randn(2, 2, 2, generator=g).to(torch.bfloat16),
        "encoder/num_heads": torch.tensor(6, dtype=torch.int16),
        "decoder/flag": torch.tensor(1, dtype=torch.int8),
        "decoder/ids": torch.arange(7, dtype=torch.int32),
        "decoder/empty": torch.empty(0, 3),
    }


def test_reader_roundtrip_all_dtypes(tmp_path: Path) -> None:
    path = tmp_path / "model.bin"
    variables = _variables()
    write_ct2_model(path, variables, spec="WhisperSpec", revision=3, aliases={"decoder/proj": "encoder/w"})
    model = read_ct2_model(path)
    assert (model.version, model.spec, model.revision) == (6, "WhisperSpec", 3)
    assert list(model.variables) == list(variables)
    for name, tensor in variables.items():
        got = model.variables[name]
        assert got.dtype == tensor.dtype and got.shape == tensor.shape, name
        assert torch.equal(got, tensor), name
    assert torch.equal(model.get("decoder/proj"), variables["encoder/w"])
    with pytest.raises(KeyError, match="decoder/missing"):
        model.get("decoder/missing")


def test_reader_concatenates_split_parts(tmp_path: Path) -> None:
    whole = tmp_path / "model.bin"
    write_ct2_model(whole, _variables())
    data = whole.read_bytes()
    (tmp_path / "a").write_bytes(data[:37])
    (tmp_path / "b").write_bytes(data[37:])
    parts = read_ct2_model([tmp_path / "a", tmp_path / "b"])
    assert all(torch.equal(parts.variables[k], v) for k, v in _variables().items())


def test_reader_errors_name_file_and_variable(tmp_path: Path) -> None:
    path = tmp_path / "model.bin"
    write_ct2_model(path, _variables())
    data = path.read_bytes()
    cut = tmp_path / "cut.bin"
    cut.write_bytes(data[:-40])
    with pytest.raises(CT2FormatError, match=r"cut\.bin.*truncated.*decoder/empty|cut\.bin.*truncated"):
        read_ct2_model(cut)
    # corrupt the dtype byte of the first variable ("encoder/w", rank 2)
    header = 4 + 2 + len(b"WhisperSpec\0") + 4 + 4
    dtype_at = header + 2 + len(b"encoder/w\0") + 1 + 2 * 4
    bad = bytearray(data)
    assert bad[dtype_at] == 0  # float32
    bad[dtype_at] = 9
    (tmp_path / "bad.bin").write_bytes(bytes(bad))
    with pytest.raises(CT2FormatError, match=r"bad\.bin.*'encoder/w'.*dtype code 9"):
        read_ct2_model(tmp_path / "bad.bin")
    (tmp_path / "notct2.bin").write_bytes(struct.pack("<I", 12345) + b"\0" * 20)
    with pytest.raises(CT2FormatError, match="unsupported format version 12345"):
        read_ct2_model(tmp_path / "notct2.bin")
    with pytest.raises(FileNotFoundError, match="nope.bin"):
        read_ct2_model(tmp_path / "nope.bin")


# --------------------------------------------------------------------------------------------- end to end
def _tiny_hf_whisper() -> WhisperForConditionalGeneration:
    torch.manual_seed(0)
    config = WhisperConfig(
        vocab_size=VOCAB, num_mel_bins=16, d_model=64, encoder_layers=2, decoder_layers=3,
        encoder_attention_heads=2, decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=96,
        max_source_positions=50, max_target_positions=40,
        pad_token_id=100, bos_token_id=100, eos_token_id=100, decoder_start_token_id=101,
    )
    model = WhisperForConditionalGeneration(config).eval()
    with torch.no_grad():  # random biases everywhere, so a dropped / misplaced bias cannot go unnoticed
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.5)
    return model


def _write_ct2_with_ctranslate2(model: WhisperForConditionalGeneration, out: Path, quantization: str | None) -> Path:
    """Use ctranslate2's own converter (an independent writer) to produce the CT2 directory."""
    from ctranslate2.converters.transformers import WhisperLoader

    spec = WhisperLoader().get_model_spec(model)
    tokens = [f"tok{i}" for i in range(100)] + SPECIALS
    tokens += [f"<|{i * 0.02:.2f}|>" for i in range(VOCAB - len(tokens))]
    spec.register_vocabulary(tokens)
    spec.config.suppress_ids = [5, 6]
    spec.config.suppress_ids_begin = [7, 100]
    spec.config.alignment_heads = [[2, 1]]
    spec.config.lang_ids = [102]
    spec.validate()
    spec.optimize(quantization=quantization)
    out.mkdir(parents=True)
    spec.save(str(out))
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[WhisperForConditionalGeneration, Path, Path]:
    root = tmp_path_factory.mktemp("ct2")
    model = _tiny_hf_whisper()
    ct2_dir = _write_ct2_with_ctranslate2(model, root / "ct2", quantization=None)
    hf_dir = convert_ct2_whisper(ct2_dir, root / "hf")
    return model, ct2_dir, hf_dir


def test_convert_recovers_exact_weights_and_config(tiny) -> None:
    source, _, hf_dir = tiny
    converted = WhisperForConditionalGeneration.from_pretrained(hf_dir).eval()
    c, s = converted.config, source.config
    for key in ("vocab_size", "num_mel_bins", "d_model", "encoder_layers", "decoder_layers",
                "encoder_attention_heads", "decoder_attention_heads", "encoder_ffn_dim", "decoder_ffn_dim",
                "max_source_positions", "max_target_positions", "eos_token_id", "decoder_start_token_id"):
        assert getattr(c, key) == getattr(s, key), key
    got, want = converted.state_dict(), source.state_dict()
    assert set(got) == set(want)
    for name, tensor in want.items():
        assert torch.equal(got[name], tensor), name
    gen = converted.generation_config
    assert gen.suppress_tokens == [5, 6] and gen.begin_suppress_tokens == [7, 100]
    assert gen.no_timestamps_token_id == 104 and gen.alignment_heads == [[2, 1]]
    assert json.loads((hf_dir / "preprocessor_config.json").read_text())["feature_size"] == 16


def test_converted_encoder_and_greedy_decode_match_ctranslate2(tiny) -> None:
    _, ct2_dir, hf_dir = tiny
    converted = WhisperForConditionalGeneration.from_pretrained(hf_dir).eval()
    oracle = ctranslate2.models.Whisper(str(ct2_dir), device="cpu", compute_type="float32")
    features = torch.randn(2, 16, 100, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = converted.model.encoder(features).last_hidden_state.numpy()
    theirs = np.array(oracle.encode(ctranslate2.StorageView.from_array(features.numpy())))
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=1e-4)

    prompt = [101, 104]  # <|startoftranscript|> <|notimestamps|>; suppression comes from generation_config
    result = oracle.generate(ctranslate2.StorageView.from_array(features.numpy()), [prompt] * 2,
                             beam_size=1, max_length=8, suppress_blank=False)
    with torch.no_grad():
        hf = converted.generate(features, max_new_tokens=8)
    for row, res in zip(hf.tolist(), result):
        ours_ids, theirs_ids = row[len(prompt):], res.sequences_ids[0]
        n = min(len(ours_ids), len(theirs_ids))
        assert n >= 4 and ours_ids[:n] == theirs_ids[:n]


def test_fp16_model_bin_converts_to_fp32(tmp_path: Path) -> None:
    source = _tiny_hf_whisper()
    ct2_dir = _write_ct2_with_ctranslate2(source, tmp_path / "ct2", quantization="float16")
    assert read_ct2_model(ct2_dir / "model.bin").get("encoder/conv1/weight").dtype == torch.float16
    converted = WhisperForConditionalGeneration.from_pretrained(convert_ct2_whisper(ct2_dir, tmp_path / "hf"))
    assert converted.dtype == torch.float32
    want = source.model.encoder.layers[1].self_attn.v_proj.weight
    got = converted.model.encoder.layers[1].self_attn.v_proj.weight
    torch.testing.assert_close(got, want.half().float())


def test_special_ids_come_from_vocabulary_and_out_of_range_ids_fail(tiny, tmp_path: Path) -> None:
    _, ct2_dir, _ = tiny
    special = special_token_ids(ct2_dir)
    assert special == {tok: 100 + i for i, tok in enumerate(SPECIALS)}
    model = read_ct2_model(ct2_dir / "model.bin")
    with pytest.raises(CT2FormatError, match=r"<\|endoftext\|> id 50256 outside the vocabulary \(size 120\)"):
        build_whisper_config(model, {}, special={})
    model.variables["encoder/layer_5/ffn/linear_0/weight"] = torch.zeros(1)
    with pytest.raises(CT2FormatError, match=r"encoder layer indices are not contiguous: \[0, 1, 5\]"):
        build_whisper_config(model, {}, special)
