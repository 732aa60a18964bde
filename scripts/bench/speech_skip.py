"""Speech-token layer skipping (ShortV-style) on a trained checkpoint, side by side in one run on THIS CPU: for k = 0
(the baseline), 3, 6, ... skipped layers, chosen by the per-segment map as the layers that change the speech
positions least, the dev WER, the prefill time (time to first token, median over repeats, on one dev batch), and the
prefill FLOPs saved (FlopCounterMode's count of the baseline prefill, and the skip's analytic saving:
lightning_speechllm.model.speech_skip.skipped_layer_flops per speech position and skipped layer).

    python scripts/bench/speech_skip.py --ckpt_path checkpoints/default/lightning_logs/version_0/checkpoints/epoch=2-step=560.ckpt \\
        --dev data_cache/synth/dev.jsonl --ks 0 3 6 9 12 --threads 2
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from itertools import islice
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from default_step import cpu_name  # noqa: E402

from lightning_speechllm.checkpoints import load_module  # noqa: E402
from lightning_speechllm.data.datamodule import SpeechDataModule  # noqa: E402
from lightning_speechllm.evaluation.sweep.run import evaluate  # noqa: E402
from lightning_speechllm.model.segments import Segment  # noqa: E402
from lightning_speechllm.model.speech_skip import skipped_layer_flops  # noqa: E402
from lightning_speechllm.redundancy.segments import measure_segments, plot_segment_map  # noqa: E402


def prefill_seconds(speechllm, inputs, repeats: int) -> float:
    times = []
    for _ in range(repeats + 1):  # the first warms up
        start = time.perf_counter()
        with torch.no_grad(), speechllm.speech_skip.positions(inputs.segment_ids):
            speechllm.llm(inputs_embeds=inputs.inputs_embeds, attention_mask=inputs.attention_mask,
                          position_ids=inputs.position_ids, use_cache=True, logits_to_keep=1)
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def prefill_flops(speechllm, inputs) -> int:
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        speechllm.llm(inputs_embeds=inputs.inputs_embeds, attention_mask=inputs.attention_mask,
                      position_ids=inputs.position_ids, use_cache=True, logits_to_keep=1)
    return counter.get_total_flops()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt_path", required=True)
    parser.add_argument("--dev", type=Path, default=Path("data_cache/synth/dev.jsonl"))
    parser.add_argument("--ks", type=int, nargs="+", default=[0, 3, 6, 9, 12])
    parser.add_argument("--map_batches", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("checkpoints/speech_skip"))
    parser.add_argument("--no_wer", action="store_true", help="time the prefill only (no dev decoding)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    speechllm = load_module(args.ckpt_path).speechllm.eval()
    datamodule = SpeechDataModule(val_sets={"dev": str(args.dev)}, max_duration=12.0, max_audio_seconds=30.0,
                                  num_workers=0)
    datamodule.setup("validate")
    batches = list(islice(iter(datamodule.val_dataloader()[0]), args.map_batches))
    began = time.perf_counter()
    segment_map = measure_segments(speechllm, batches)
    map_seconds = time.perf_counter() - began
    args.out.mkdir(parents=True, exist_ok=True)
    segment_map.to_json(args.out / "segments_dev.json")
    inputs = speechllm.build_inputs(batches[0], with_targets=False)
    speech_positions = int((inputs.segment_ids == Segment.SPEECH).sum())
    config = speechllm.llm.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    per_layer = speech_positions * skipped_layer_flops(config.hidden_size, config.intermediate_size,
                                                       config.num_attention_heads, head_dim,
                                                       context=inputs.segment_ids.shape[1])
    baseline_flops = prefill_flops(speechllm, inputs)
    rows = []
    for k in args.ks:
        layers = segment_map.lowest_speech(k)
        speechllm.speech_skip.set_layers(layers)
        seconds = prefill_seconds(speechllm, inputs, args.repeats)
        wer = (float("nan") if args.no_wer
               else evaluate(speechllm, datamodule, trainer_kwargs={"accelerator": "cpu"})["dev"]["wer"])
        rows.append((k, layers, wer, seconds, k * per_layer / baseline_flops))
        print(f"  k={k}: layers {layers}, dev WER {wer:.2f}, prefill {1000 * seconds:.1f} ms", flush=True)
    speechllm.speech_skip.set_layers([])
    plot_segment_map(segment_map, args.out / "segments_dev.png", skipped=rows[-1][1])
    print(f"\nCPU: {cpu_name()}, {args.threads} threads; segment map on {segment_map.num_samples} dev utterances in "
          f"{map_seconds:.1f} s; prefill of one dev batch of {len(batches[0])} utterances "
          f"({inputs.segment_ids.shape[1]} positions per row, {speech_positions} speech positions in all)")
    print("| speech skipped in | layers | dev WER | prefill ms (TTFT) | prefill speed-up | prefill FLOPs saved |")
    print("|---:|---|---:|---:|---:|---:|")
    for k, layers, wer, seconds, saved in rows:
        print(f"| {k} | {_compact(layers)} | {wer:.2f} | {1000 * seconds:.1f} | {rows[0][3] / seconds:.2f}x | "
              f"{100 * saved:.1f}% |")


def _compact(layers: list[int]) -> str:
    return ",".join(str(i) for i in layers) or "-"


if __name__ == "__main__":
    main()
