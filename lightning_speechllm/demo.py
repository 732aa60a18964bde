"""`python -m lightning_speechllm demo`: the embedded default end to end on the CPU, in about a minute.

Pulls the offline weights (Whisper tiny.en + SmolLM2-135M), speaks a few project-written sentences with espeak-ng,
builds the default SpeechLLM, checks the encoder with Whisper's own decoder, measures the text-input redundancy map
of the decoder (angular distance of every block, the pruning path) and runs one speech-input generation through the
(not yet trained) projector to show the whole pipeline.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from lightning_speechllm import assets
from lightning_speechllm.data.batch import SAMPLE_RATE, SpeechBatch
from lightning_speechllm.data.sentences import unique_sentences
from lightning_speechllm.data.synth import EspeakSynthesizer, resample
from lightning_speechllm.model.speechllm import SpeechLLM, SpeechLLMConfig
from lightning_speechllm.redundancy.measure import RedundancyAccumulator


def synthesize(sentences: list[str]) -> SpeechBatch:
    """16 kHz espeak-ng renderings of `sentences` as one batch."""
    speaker = EspeakSynthesizer(voice="en-us", rate=160)
    waves = []
    for text in sentences:
        audio, rate = speaker.speak(text)
        waves.append(torch.from_numpy(resample(audio, rate, SAMPLE_RATE)))
    lens = torch.tensor([w.numel() for w in waves])
    audio = torch.zeros(len(waves), int(lens.max()))
    for row, wave in enumerate(waves):
        audio[row, : wave.numel()] = wave
    return SpeechBatch(ids=[f"demo-{i}" for i in range(len(sentences))], audio=audio, audio_lens=lens,
                       texts=list(sentences), tasks=["asr"] * len(sentences), transcripts=list(sentences),
                       tgt_langs=[None] * len(sentences))


def whisper_check(batch: SpeechBatch) -> str:
    """Transcribe the first utterance with the converted Whisper tiny.en and its own decoder."""
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    path = assets.resolve("whisper-tiny.en")
    processor = WhisperProcessor.from_pretrained(path)
    whisper = WhisperForConditionalGeneration.from_pretrained(path).eval()
    audio = batch.audio[0, : int(batch.audio_lens[0])].numpy()
    features = processor(audio, sampling_rate=SAMPLE_RATE, return_tensors="pt").input_features
    with torch.no_grad():
        ids = whisper.generate(features, max_new_tokens=64)
    return processor.batch_decode(ids, skip_special_tokens=True)[0].strip()


def text_redundancy(model: SpeechLLM, batch: SpeechBatch, out_dir: Path) -> None:
    """d(l, n) of the decoder on text inputs (the transcripts), written as JSON + CSV + heatmap."""
    from lightning_speechllm.redundancy.plots import plot_result_heatmap

    accumulator = RedundancyAccumulator(len(model.layer_mask.active_layers), token_selection="last")
    accumulator.update(model, batch.as_text_only())
    result = accumulator.result(model_id=model.config.model_id, set_name="demo", modality="text")
    result.to_json(out_dir / "text_redundancy.json")
    result.to_csv(out_dir / "text_redundancy.csv")
    plot_result_heatmap(result, save_to=out_dir / "text_redundancy.png")
    table = result.table
    print(f"text-input angular distance: d(0,1) = {table[0, 0]:.3f}, d(25,1) = {table[0, 25]:.3f}")
    print("pruning path l*(n), n = 1..8:", result.path[:8])
    print("least influential layers (Block Influence):", result.bi_ranking[:6])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lightning_speechllm demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("checkpoints/demo"), help="where the outputs go")
    parser.add_argument("--sentences", type=int, default=8, help="how many sentences to speak")
    parser.add_argument("--seed", type=int, default=0, help="sentence generator seed")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    for name in assets.DEFAULT_ASSETS:
        print(f"asset {name}: {assets.pull(name)}")
    batch = synthesize(unique_sentences(args.sentences, seed=args.seed))
    print(f"reference : {batch.texts[0]}")
    print(f"whisper   : {whisper_check(batch)}")
    model = SpeechLLM.from_config(SpeechLLMConfig()).eval()
    text_redundancy(model, batch, args.out)
    hypothesis = model.generate(batch.subset([0]), max_new_tokens=24)[0]
    print(f"SpeechLLM (untrained projector): {hypothesis!r}")
    print(f"outputs in {args.out}/ (text_redundancy.png/.json/.csv); {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
