"""Training-step cost of the Voxtral-exportable recipe (``configs/edge/voxtral.yaml``: every frame of Whisper's 30 s
window, stack 4, no biases) against the default (6 s windows trimmed to the utterance, stack 5), side by side in one
run on THIS CPU, at the precision ``fit`` picks here, on the same batches with cached encoder outputs (as ``fit``
trains). Prints seconds per step, speech positions per batch, and the hours 560 steps (the default's schedule) take.

    python scripts/bench/voxtral_step.py --threads 2 --batches 3 --batch_size 12
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from default_step import cpu_name, load_batches, step_seconds, with_cached_frames  # noqa: E402

from lightning_speechllm.config_utils import from_dict  # noqa: E402
from lightning_speechllm.model.speechllm import SpeechLLM, SpeechLLMConfig  # noqa: E402
from lightning_speechllm.precision import choose_precision  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
STEPS = 560


def recipe(overlay: Path | None) -> SpeechLLMConfig:
    model = yaml.safe_load((ROOT / "configs" / "default.yaml").read_text())["model"]["model"]
    if overlay is not None:
        extra = yaml.safe_load(overlay.read_text())["model"]["model"]
        model = {**model, **extra, "projector": {**model["projector"], **extra.get("projector", {})}}
    return from_dict(SpeechLLMConfig, model)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--manifest", type=Path, default=Path("data_cache/synth/train.jsonl"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batches", type=int, default=3)
    parser.add_argument("--batch_size", type=int, default=12, help="12 synthetic utterances are about 24 s of audio "
                        "(the default's max_duration)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    bf16 = choose_precision("cpu").precision == "bf16-mixed"
    batches = load_batches(args.manifest, args.batches, args.batch_size)
    rows = []
    for name, overlay in (("default (6 s window, trimmed, stack 5)", None),
                          ("voxtral overlay (30 s window whole, stack 4, no bias)",
                           ROOT / "configs" / "edge" / "voxtral.yaml")):
        model = SpeechLLM.from_config(recipe(overlay)).train()
        cached = [with_cached_frames(model, batch) for batch in batches]
        with torch.no_grad():
            positions = sum(int(model.projector.output_lengths(b.encoder_frame_lens).sum()) for b in cached) / len(cached)
        seconds = step_seconds(model, cached, bf16)
        rows.append((name, seconds, positions))
        print(f"  {name}: {seconds:.2f} s/step, {positions:.0f} speech positions per batch", flush=True)
    print(f"\n{args.batches} batches of {args.batch_size} utterances, {args.threads} threads, "
          f"{'bf16 autocast' if bf16 else 'fp32'}; CPU: {cpu_name()}")
    print("| recipe | s/step | speech positions / batch | hours for 560 steps |\n|---|---:|---:|---:|")
    for name, seconds, positions in rows:
        print(f"| {name} | {seconds:.2f} | {positions:.0f} | {seconds * STEPS / 3600:.2f} |")
    print(f"voxtral / default step time: {rows[1][1] / rows[0][1]:.1f}x")


if __name__ == "__main__":
    main()
