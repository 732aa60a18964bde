"""Training-step speed of the embedded default, side by side in one run (issue 11): the old recipe (fp32, the
encoder run at every step, SmolLM2's long default system prompt) against each lever of the new one (bf16 autocast,
cached encoder outputs, a short prompt). Prints seconds per step (median over the batches), steps per minute and
the speed-up over the old recipe, plus the encoder's share of the old step.

Batches are the first ``--batches`` x ``--batch_size`` utterances of the synthetic train set (``data synth`` first).

    python scripts/bench/default_step.py --threads 2 --batches 6 --batch_size 12
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import soundfile as sf
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from lightning_speechllm.data.batch import SpeechBatch  # noqa: E402
from lightning_speechllm.model.projector import ProjectorConfig  # noqa: E402
from lightning_speechllm.model.prompts import PromptConfig  # noqa: E402
from lightning_speechllm.model.speechllm import SpeechLLM, SpeechLLMConfig  # noqa: E402

OLD_PROMPT = PromptConfig()
NEW_PROMPT = PromptConfig(system_prompt="Transcribe the speech.", asr_instruction="Transcribe.")


def load_batches(manifest: Path, batches: int, batch_size: int) -> list[SpeechBatch]:
    rows = [json.loads(line) for line in manifest.read_text().splitlines()[: batches * batch_size]]
    out = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        waves = [sf.read(str(manifest.parent / r["audio"]), dtype="float32")[0] for r in chunk]
        lens = torch.tensor([len(w) for w in waves])
        audio = torch.zeros(len(waves), int(lens.max()))
        for i, w in enumerate(waves):
            audio[i, : len(w)] = torch.from_numpy(w)
        texts = [r["text"] for r in chunk]
        out.append(SpeechBatch(ids=[r["id"] for r in chunk], audio=audio, audio_lens=lens, texts=texts,
                               tasks=["asr"] * len(chunk), transcripts=texts))
    return out


def with_cached_frames(model: SpeechLLM, batch: SpeechBatch) -> SpeechBatch:
    with torch.no_grad():
        frames, lens = model.encode_frames(batch.audio, batch.audio_lens)
    return SpeechBatch(ids=batch.ids, audio=batch.audio[:, :0], audio_lens=torch.zeros_like(batch.audio_lens),
                       texts=batch.texts, tasks=batch.tasks, transcripts=batch.transcripts,
                       encoder_frames=frames.half().float(), encoder_frame_lens=lens,
                       encoder_key=model.encoder_cache_key())


def step_seconds(model: SpeechLLM, batches: list[SpeechBatch], bf16: bool) -> float:
    times = []
    for batch in [batches[0], *batches]:  # the first batch warms up
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss, _, _ = model(batch)
        loss.backward()
        model.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--manifest", type=Path, default=Path("data_cache/synth/train.jsonl"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batches", type=int, default=6)
    parser.add_argument("--batch_size", type=int, default=12)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = SpeechLLMConfig(encoder_window_step_seconds=6.0, projector=ProjectorConfig(downsample=5, hidden_dim=1024))
    model = SpeechLLM.from_config(config).train()
    batches = load_batches(args.manifest, args.batches, args.batch_size)
    cached = [with_cached_frames(model, b) for b in batches]
    encoder = statistics.median(_timed(lambda b=b: model.encode_frames(b.audio, b.audio_lens)) for b in batches)
    rows = []
    for name, prompt, bf16, data in (("old: fp32, live encoder, default system prompt", OLD_PROMPT, False, batches),
                                     ("+ bf16 autocast", OLD_PROMPT, True, batches),
                                     ("+ cached encoder outputs", OLD_PROMPT, True, cached),
                                     ("+ short prompt (new default)", NEW_PROMPT, True, cached)):
        model.config.prompt = prompt
        model.prompts = type(model.prompts)(model.tokenizer, prompt)
        rows.append((name, step_seconds(model, data, bf16)))
    base = rows[0][1]
    print(f"{args.batches} batches of {args.batch_size} utterances, {args.threads} threads; "
          f"encoder alone: {encoder:.3f} s/batch ({100 * encoder / base:.0f}% of the old step)")
    print(f"| recipe | s/step | steps/min | speed-up |\n|---|---:|---:|---:|")
    for name, seconds in rows:
        print(f"| {name} | {seconds:.3f} | {60 / seconds:.1f} | {base / seconds:.2f}x |")


def _timed(fn) -> float:
    start = time.perf_counter()
    with torch.no_grad():
        fn()
    return time.perf_counter() - start


if __name__ == "__main__":
    main()
