"""Data-layer throughput: seconds of 16 kHz audio delivered per wall-clock second by the train loader.

Makes (or takes) a JSONL manifest of N synthetic utterances (noise + tones at mixed sample rates, so resampling is
exercised), iterates one epoch of ``SpeechDataModule.train_dataloader()`` for each worker count, computes a
Whisper-style log-mel (torchaudio MelSpectrogram n_fft=400, hop=160, 80 mels) on every batch so the features are
included, and prints the results side by side.

    python scripts/bench/data_throughput.py --num-utts 200 --workers 1 2
    python scripts/bench/data_throughput.py --manifest data/train.jsonl --max-duration 120
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torchaudio

from lightning_speechllm.data.batch import SAMPLE_RATE
from lightning_speechllm.data.datamodule import SpeechDataModule


def make_synthetic_manifest(out_dir: Path, num_utts: int, min_s: float, max_s: float, seed: int = 0) -> Path:
    """Write ``num_utts`` WAVs (8 / 16 / 22.05 kHz, noise plus a tone) and their JSONL manifest."""
    rng = np.random.default_rng(seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(num_utts):
        sr = int(rng.choice([8000, 16000, 22050]))
        n = int(rng.uniform(min_s, max_s) * sr)
        t = np.arange(n) / sr
        x = 0.05 * rng.standard_normal(n) + 0.2 * np.sin(2 * np.pi * rng.uniform(100, 400) * t)
        name = f"syn{i:05d}.wav"
        sf.write(out_dir / name, x.astype(np.float32), sr)
        rows.append({"id": f"syn{i:05d}", "audio": name, "text": f"synthetic utterance {i}", "task": "asr"})
    manifest = out_dir / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return manifest


def whisper_log_mel(audio: torch.Tensor, mel: torchaudio.transforms.MelSpectrogram) -> torch.Tensor:
    """Whisper's log-mel normalisation: log10, clamp to (max - 8), then (x + 4) / 4. Shape [B, 80, frames]."""
    spec = mel(audio).clamp(min=1e-10).log10()
    spec = torch.maximum(spec, spec.amax(dim=(-2, -1), keepdim=True) - 8.0)
    return (spec + 4.0) / 4.0


def measure(manifest: Path, workers: int, max_duration: float, num_buckets: int, mel: bool) -> dict[str, float]:
    """One epoch of the train loader with ``workers`` workers; returns audio seconds, wall seconds and batches."""
    dm = SpeechDataModule(manifest, max_duration=max_duration, num_buckets=num_buckets, num_workers=workers)
    dm.setup("fit")
    mel_fn = torchaudio.transforms.MelSpectrogram(sample_rate=SAMPLE_RATE, n_fft=400, hop_length=160, n_mels=80)
    audio_s, batches, frames = 0.0, 0, 0
    start = time.perf_counter()
    for batch in dm.train_dataloader():
        if mel:
            frames += whisper_log_mel(batch.audio, mel_fn).shape[-1] * len(batch)
        audio_s += batch.audio_lens.sum().item() / SAMPLE_RATE
        batches += 1
    wall = time.perf_counter() - start
    return {"workers": workers, "batches": batches, "audio_s": audio_s, "wall_s": wall, "mel_frames": frames}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--manifest", type=Path, help="existing JSONL/Lhotse manifest (default: make a synthetic one)")
    p.add_argument("--num-utts", type=int, default=200)
    p.add_argument("--min-seconds", type=float, default=2.0)
    p.add_argument("--max-seconds", type=float, default=10.0)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--max-duration", type=float, default=120.0, help="seconds of audio per batch")
    p.add_argument("--num-buckets", type=int, default=10)
    p.add_argument("--no-mel", action="store_true", help="skip the log-mel features")
    p.add_argument("--threads", type=int, default=1, help="torch threads in the main process")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="data_bench_") as tmp:
        manifest = args.manifest or make_synthetic_manifest(Path(tmp), args.num_utts, args.min_seconds, args.max_seconds)
        results = [measure(manifest, w, args.max_duration, args.num_buckets, not args.no_mel) for w in args.workers]
    print(f"manifest: {manifest if args.manifest else f'{args.num_utts} synthetic utterances'}; "
          f"max_duration={args.max_duration}s; log-mel {'on' if not args.no_mel else 'off'}")
    print(f"{'workers':>8} {'batches':>8} {'audio s':>10} {'wall s':>8} {'audio s / wall s':>17}")
    for r in results:
        print(f"{r['workers']:>8} {r['batches']:>8} {r['audio_s']:>10.1f} {r['wall_s']:>8.2f} "
              f"{r['audio_s'] / r['wall_s']:>17.1f}")


if __name__ == "__main__":
    main()
