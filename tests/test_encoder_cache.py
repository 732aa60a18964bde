"""Frozen-encoder outputs cached in the data layer: same model inputs as the live encoder, computed once, never stale."""
from __future__ import annotations

import pytest
import torch

from lightning_speechllm.data.datamodule import SpeechDataModule
from tests.tiny_speechllm import save_tiny_assets, tiny_speechllm

TEXTS = ["the cat sat on the mat", "one two three", "hello world", "a quick brown fox"]


def datamodule(assets: dict, cache) -> SpeechDataModule:
    dm = SpeechDataModule(train=assets["manifest"], max_duration=100, shuffle=False, encoder_cache=cache,
                          max_audio_seconds=4)
    dm.setup("fit")
    return dm


def test_cached_batches_give_the_live_encoders_inputs_and_the_cache_is_computed_once(tmp_path):
    assets = save_tiny_assets(tmp_path / "assets", TEXTS, [8000, 6000, 4000, 7000])
    model = tiny_speechllm(encoder_window_step_seconds=1.0).eval()
    live = next(iter(datamodule(assets, None).train_dataloader()))
    calls = []

    def encode(audio, lens):
        calls.append(len(lens))
        return model.encode_frames(audio, lens)

    dm = datamodule(assets, tmp_path / "cache")
    assert dm.use_encoder_cache(encode, model.encoder_cache_key(), model.encoder_description())
    cached = next(iter(dm.train_dataloader()))
    assert sum(calls) == len(TEXTS) and cached.encoder_key == model.encoder_cache_key()
    assert cached.audio.shape[1] == 0 and cached.ids == live.ids
    key = model.encoder_cache_key()
    assert len(list((tmp_path / "cache" / key / "frames").glob("*.npy"))) == len(TEXTS)
    with torch.no_grad():
        expected, from_cache = model.build_inputs(live), model.build_inputs(cached)
    assert torch.equal(expected.attention_mask, from_cache.attention_mask)
    torch.testing.assert_close(from_cache.inputs_embeds, expected.inputs_embeds, atol=2e-3, rtol=2e-3)

    again = datamodule(assets, tmp_path / "cache")
    assert again.use_encoder_cache(encode, key) and sum(calls) == len(TEXTS)  # read, not recomputed

    more = save_tiny_assets(tmp_path / "more", [*TEXTS, "a new sentence"], [8000, 6000, 4000, 7000, 5000])
    grown = datamodule(more, tmp_path / "cache")  # other files under the same ids, plus one more utterance
    assert grown.use_encoder_cache(encode, key) and sum(calls) == 2 * len(TEXTS) + 1


def test_frames_of_another_encoder_or_window_are_refused(tmp_path):
    assets = save_tiny_assets(tmp_path / "assets", TEXTS, [8000, 6000, 4000, 7000])
    model = tiny_speechllm(encoder_window_step_seconds=1.0)
    dm = datamodule(assets, tmp_path / "cache")
    dm.use_encoder_cache(model.encode_frames, model.encoder_cache_key())
    batch = next(iter(dm.train_dataloader()))
    other_weights = tiny_speechllm(seed=1, encoder_window_step_seconds=1.0)
    other_window = tiny_speechllm(encoder_window_step_seconds=2.0)
    assert len({model.encoder_cache_key(), other_weights.encoder_cache_key(), other_window.encoder_cache_key()}) == 3
    for other in (other_weights, other_window):
        with pytest.raises(ValueError, match="made by encoder .* not by this model's .* rebuild the cache"):
            other.build_inputs(batch)
    text_only = batch.as_text_only()
    assert text_only.encoder_frames is None and other_window.build_inputs(text_only).inputs_embeds.shape[0] == len(batch)


def test_a_batch_with_cached_frames_for_some_utterances_only_is_refused():
    import numpy as np

    from lightning_speechllm.data.dataset import Utterance, collate_utterances

    cached = Utterance("a", np.zeros(0, np.float32), "x", "asr", "x", encoder_frames=np.ones((3, 4), np.float16),
                       encoder_key="k")
    live = Utterance("b", np.ones(800, np.float32), "y", "asr", "y")
    with pytest.raises(ValueError, match="1 of the 2 utterances of a batch carry cached encoder outputs"):
        collate_utterances([cached, live])
    batch = collate_utterances([cached, cached])
    assert batch.encoder_frames.shape == (2, 3, 4) and batch.encoder_key == "k" and batch.audio.shape == (2, 0)


def _break_two_files(assets: dict) -> None:
    """After the manifest was read (headers checked): u1 no longer decodes, u2 decodes to NaN samples."""
    import numpy as np
    import soundfile as sf

    (assets["root"] / "u1.wav").write_bytes(b"RIFF not a wave file" * 20)
    samples = np.full(4000, np.nan, dtype=np.float32)
    sf.write(assets["root"] / "u2.wav", samples, 16000, subtype="FLOAT")


def test_building_the_cache_applies_the_bad_sample_policy(tmp_path):
    from lightning_speechllm.data.bad_samples import BadSampleError, count_rejected

    assets = save_tiny_assets(tmp_path / "assets", TEXTS, [8000, 6000, 4000, 7000])
    model = tiny_speechllm().eval()
    key = model.encoder_cache_key()
    dm = datamodule(assets, tmp_path / "cache")
    _break_two_files(assets)
    with pytest.raises(BadSampleError, match=r"train\.jsonl:2: \[unreadable_audio\] cannot decode audio .*u1\.wav"):
        dm.use_encoder_cache(model.encode_frames, key)

    skip = SpeechDataModule(train=assets["manifest"], max_duration=100, shuffle=False, encoder_cache=tmp_path / "c2",
                            max_audio_seconds=4, on_bad_sample="skip", rejected_dir=tmp_path / "rejected")
    skip.setup("fit")
    assert skip.use_encoder_cache(model.encode_frames, key)
    assert count_rejected(skip.rejected_path) == {"unreadable_audio": 1, "non_finite": 1}
    batch = next(iter(skip.train_dataloader()))
    assert sorted(batch.ids) == ["u0", "u3"] and torch.isfinite(batch.encoder_frames).all()
    assert len(list((tmp_path / "c2" / key / "frames").glob("*.npy"))) == 2  # no NaN frames were stored


def test_a_file_re_rendered_at_the_same_length_is_encoded_again(tmp_path):
    import os

    import numpy as np
    import soundfile as sf

    assets = save_tiny_assets(tmp_path / "assets", TEXTS, [8000, 6000, 4000, 7000])
    model = tiny_speechllm().eval()
    key = model.encoder_cache_key()
    dm = datamodule(assets, tmp_path / "cache")
    dm.use_encoder_cache(model.encode_frames, key)
    before = {cut.id: cut.load_custom("encoder_frames") for cut in dm.cuts("train")}
    path = assets["root"] / "u0.wav"
    stat = path.stat()
    sf.write(path, (0.3 * np.random.default_rng(7).standard_normal(8000)).astype(np.float32), 16000)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 2_000_000_000))  # a later render, same length
    assert path.stat().st_size == stat.st_size
    again = datamodule(assets, tmp_path / "cache")
    again.use_encoder_cache(model.encode_frames, key)
    after = {cut.id: cut.load_custom("encoder_frames") for cut in again.cuts("train")}
    assert not np.array_equal(after["u0"], before["u0"])  # fresh frames, not the stale ones
    assert all(np.array_equal(after[i], before[i]) for i in ("u1", "u2", "u3"))


def test_waveform_normalisation_is_part_of_the_encoder_cache_key():
    from transformers import AutoModel

    from lightning_speechllm.model.encoders import WaveformSpeechEncoder
    from lightning_speechllm.model.speechllm import SpeechLLM, SpeechLLMConfig
    from tests.test_scale_up import tiny_waveform_config
    from tests.tiny_speechllm import tiny_llama, tiny_tokenizer

    torch.manual_seed(0)
    wavlm = AutoModel.from_config(tiny_waveform_config("wavlm"))
    keys, descriptions = [], []
    for normalize in (True, False):
        encoder = WaveformSpeechEncoder(wavlm, normalize=normalize)  # the same weights
        model = SpeechLLM(tiny_llama(layers=2), tiny_tokenizer(), encoder, SpeechLLMConfig(llm_path="<memory>"))
        keys.append(model.encoder_cache_key())
        descriptions.append(model.encoder_description())
    assert keys[0] != keys[1]  # the same weights, other frames: another cache
    assert descriptions[0]["waveform_normalize"] is True and descriptions[1]["waveform_normalize"] is False
