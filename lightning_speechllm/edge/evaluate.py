"""``python -m lightning_speechllm gguf-eval``: WER and speed of ``gguf`` folders run by llama.cpp, beside the
PyTorch checkpoints they came from, on the same utterances, one at a time, on the same threads.

Each ``--gguf`` folder (``model-<type>.gguf``, ``mmproj-f16.gguf``, ``speech.json``) is run for each ``--types``
entry through llama.cpp's audio path (:meth:`~lightning_speechllm.edge.runtime.LlamaCppSpeechModel.transcribe`).
Each ``--ckpt`` of the same name is run by PyTorch as trained; when ``speech.json`` says the model was trained on a
shorter encoder window than llama.cpp's 30 s, PyTorch runs it a second time on the 30 s window, which separates
what the runtime changes from what the window changes. WER is the project's (Whisper's English normaliser, jiwer),
as ``test`` prints it.

``gguf-transcribe --gguf DIR --audio FILE ...`` prints the transcript of each audio file (any rate: resampled to
16 kHz, mixed to mono; up to 30 s).
"""
from __future__ import annotations

import copy
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from jsonargparse import ActionConfigFile, ArgumentParser

from lightning_speechllm.evaluation.anchor import read_jsonl_manifest, read_wave, word_error_scores
from lightning_speechllm.io_utils import atomic_write_text
from lightning_speechllm.model.llamacpp_layout import SPEECH_FILE

from .cli import parsed_or_none, unmatched_checkpoints
from .runtime import SAMPLE_RATE, WINDOW_SAMPLES, LlamaCppSpeechModel, RuntimeUnavailable, SpeechSpec

__all__ = ["evaluate", "main", "transcribe_main", "wave_batch"]

DEFAULT_SETS = {"test": "data_cache/synth/test.jsonl", "real": "data_cache/asterisk/heldout.jsonl",
                "speakers": "data_cache/real_speakers/test.jsonl"}
"""The default recipe's test sets (configs/default.yaml); those whose manifest is missing are skipped, said."""

Transcriber = Callable[[np.ndarray], tuple[str, dict[str, float]]]
"""16 kHz waveform -> transcript and its seconds (encode, prefill, decode) and generated token count."""


def llamacpp_transcriber(runtime: LlamaCppSpeechModel, max_new_tokens: int) -> Transcriber:
    def transcribe(wave: np.ndarray) -> tuple[str, dict[str, float]]:
        out = runtime.transcribe(wave, max_new_tokens=max_new_tokens)
        return out.text, {"encode": out.encode_seconds, "prefill": out.prefill_seconds,
                          "decode": out.decode_seconds, "tokens": len(out.tokens)}

    return transcribe


def wave_batch(wave: np.ndarray):
    """A one-utterance ASR SpeechBatch of a 16 kHz waveform, for the framework's generation."""
    import torch

    from lightning_speechllm.data.batch import SpeechBatch

    return SpeechBatch(ids=["utt"], audio=torch.from_numpy(wave)[None], audio_lens=torch.tensor([len(wave)]),
                       texts=[""], tasks=["asr"], transcripts=[""], tgt_langs=[None])


def pytorch_transcriber(speechllm, max_new_tokens: int) -> Transcriber:
    """The framework's greedy decoding, one utterance per call (its whole time is counted as ``decode``)."""
    import torch

    def transcribe(wave: np.ndarray) -> tuple[str, dict[str, float]]:
        batch = wave_batch(wave)
        start = time.perf_counter()
        with torch.no_grad():
            out = speechllm.generate_with_details(batch, max_new_tokens=max_new_tokens)
        return out.texts[0], {"encode": 0.0, "prefill": 0.0, "decode": time.perf_counter() - start,
                              "tokens": out.num_tokens[0]}

    return transcribe


def score_set(transcribe: Transcriber, rows: list[dict], waves: list[np.ndarray], label: str) -> dict:
    """WER and time of one runtime on one set."""
    from tqdm import tqdm

    hypotheses, totals = [], {"encode": 0.0, "prefill": 0.0, "decode": 0.0, "tokens": 0}
    for wave in tqdm(waves, desc=label, unit="utt", leave=False):
        text, spent = transcribe(wave)
        hypotheses.append(text)
        for key in totals:
            totals[key] += spent[key]
    audio_seconds = sum(len(w) for w in waves) / SAMPLE_RATE
    compute = totals["encode"] + totals["prefill"] + totals["decode"]
    return {"utterances": len(rows), **word_error_scores(hypotheses, [r["text"] for r in rows]),
            "audio_seconds": round(audio_seconds, 2), "seconds": {k: round(v, 3) for k, v in totals.items()
                                                                  if k != "tokens"},
            "generated_tokens": totals["tokens"], "rtf": round(compute / audio_seconds, 4),
            "hypotheses": {r["id"]: h for r, h in zip(rows, hypotheses)}}


def _read_sets(sets: dict[str, str], limit: int | None) -> dict[str, tuple[list[dict], list[np.ndarray]]]:
    loaded = {}
    for name, manifest in sets.items():
        if not Path(manifest).is_file():
            print(f"note: set {name!r} skipped: {manifest} does not exist", file=sys.stderr)
            continue
        rows = read_jsonl_manifest(manifest)[:limit]
        loaded[name] = (rows, [read_wave(row["audio"]) for row in rows])
    if not loaded:
        raise FileNotFoundError(f"none of the sets exists: {sets}")
    return loaded


def _pytorch_runs(name: str, ckpt: str, speech: SpeechSpec, max_new_tokens: int) -> list[tuple[str, Transcriber]]:
    from lightning_speechllm.checkpoints import load_module

    speechllm = load_module(ckpt).speechllm.eval()
    runs = [(f"{name} pytorch", pytorch_transcriber(speechllm, max_new_tokens))]
    if speech.trained_window_seconds < WINDOW_SAMPLES / SAMPLE_RATE:
        window_30 = copy.deepcopy(speechllm)
        window_30.encoder.set_window(None)  # llama.cpp's 30 s window
        runs.append((f"{name} pytorch (30 s window)", pytorch_transcriber(window_30, max_new_tokens)))
    return runs


def evaluate(gguf_dirs: dict[str, str], types: list[str], sets: dict[str, str], ckpts: dict[str, str] | None = None,
             limit: int | None = None, threads: int = 2, max_new_tokens: int = 40) -> dict[str, dict[str, dict]]:
    """{runtime label: {set: scores}} for every GGUF folder x type, and every checkpoint in PyTorch."""
    import torch

    torch.set_num_threads(threads)
    loaded = _read_sets(sets, limit)
    results: dict[str, dict[str, dict]] = {}

    def run(label: str, transcribe: Transcriber) -> None:
        results[label] = {}
        for set_name, (rows, waves) in loaded.items():
            results[label][set_name] = score_set(transcribe, rows, waves, f"{label} / {set_name}")
            print(_row(label, set_name, results[label][set_name]), flush=True)

    print(_header(), flush=True)
    for name, directory in gguf_dirs.items():
        speech = SpeechSpec.read(Path(directory) / SPEECH_FILE)
        for kind in types:
            runtime = LlamaCppSpeechModel.from_dir(directory, kind, n_threads=threads)
            try:
                run(f"{name} llama.cpp {kind}", llamacpp_transcriber(runtime, max_new_tokens))
            finally:
                runtime.close()
        if ckpts and name in ckpts:
            for label, transcribe in _pytorch_runs(name, ckpts[name], speech, max_new_tokens):
                run(label, transcribe)
    return results


def _header() -> str:
    return f"{'runtime':<36} {'set':<10} {'utts':>5} {'WER %':>7} {'RTF':>7} {'decode tok/s':>13}"


def _row(label: str, set_name: str, scores: dict) -> str:
    decode = scores["seconds"]["decode"]
    steps = scores["generated_tokens"] - scores["utterances"]  # the first token of each comes with the prefill
    rate = f"{steps / decode:.1f}" if decode > 0 and scores["seconds"]["prefill"] > 0 else "-"
    return (f"{label:<36} {set_name:<10} {scores['utterances']:>5} {scores['wer']:>7.2f} {scores['rtf']:>7.3f} "
            f"{rate:>13}")


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="lightning_speechllm gguf-eval", exit_on_error=False,
                            description="WER and speed of gguf folders in llama.cpp, beside their PyTorch checkpoints.")
    parser.add_argument("--config", action=ActionConfigFile)
    parser.add_argument("--gguf", type=dict[str, str], required=True,
                        help="name -> folder written by `gguf` (e.g. {full: G1, pruned: G2})")
    parser.add_argument("--ckpt", type=dict[str, str], default={},
                        help="name -> the checkpoint each folder was exported from (run in PyTorch beside it)")
    parser.add_argument("--types", type=list[str], default=["f16", "q8_0"], help="text-model GGUF types to run")
    parser.add_argument("--sets", type=dict[str, str], default=DEFAULT_SETS, help="set name -> JSONL manifest")
    parser.add_argument("--limit", type=int | None, default=None, help="the first N utterances of each set")
    parser.add_argument("--threads", type=int, default=2, help="threads for llama.cpp and PyTorch alike")
    parser.add_argument("--max_new_tokens", type=int, default=40)
    parser.add_argument("--out", type=str | None, default=None, help="JSON of every score and hypothesis")
    return parser


def main(argv: list[str] | None = None) -> int:
    """CLI entry; 0 on success, 2 on bad arguments, a missing file or a runtime refusal."""
    args = parsed_or_none(build_parser(), argv)
    if args is None:
        return 2
    unmatched = unmatched_checkpoints(args.gguf, args.ckpt)
    if unmatched:
        print(f"error: {unmatched}", file=sys.stderr)
        return 2
    try:
        results = evaluate(args.gguf, args.types, args.sets, args.ckpt, args.limit, args.threads,
                           args.max_new_tokens)
    except (RuntimeUnavailable, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.out:
        atomic_write_text(json.dumps(results, indent=1, ensure_ascii=False) + "\n", Path(args.out))
        print(f"scores and hypotheses: {args.out}")
    return 0


def build_transcribe_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="lightning_speechllm gguf-transcribe", exit_on_error=False,
                            description="Transcribe audio files with a gguf folder in llama.cpp.")
    parser.add_argument("--config", action=ActionConfigFile)
    parser.add_argument("--gguf", type=str, required=True, help="folder written by `gguf`")
    parser.add_argument("--audio", type=list[str], required=True, help="audio files (up to 30 s each)")
    parser.add_argument("--type", type=str, default="f16", help="text-model GGUF type")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max_new_tokens", type=int, default=40)
    return parser


def transcribe_main(argv: list[str] | None = None) -> int:
    """CLI entry of ``gguf-transcribe``; 0 on success, 2 on bad arguments, a missing file or a runtime refusal."""
    args = parsed_or_none(build_transcribe_parser(), argv)
    if args is None:
        return 2
    try:
        runtime = LlamaCppSpeechModel.from_dir(args.gguf, args.type, n_threads=args.threads)
    except RuntimeUnavailable as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    try:
        for path in args.audio:
            try:
                out = runtime.transcribe(read_wave(path), max_new_tokens=args.max_new_tokens)
            except (RuntimeError, OSError) as error:  # a refusal, or soundfile's error on an unreadable file
                print(f"error: {path}: {error}", file=sys.stderr)
                return 2
            print(f"{path}\t{out.text}")
    finally:
        runtime.close()
    return 0
