"""Training-step speed of the embedded default on THIS CPU, side by side in one run: the default recipe
(``configs/default.yaml``: cached encoder outputs, its prompt and projector) in fp32 and under bf16 autocast, and the
issue-11 baseline (fp32, the encoder run at every step, SmolLM2's long default system prompt), and the default in
fp32 with every row run whole (before the shared prompt prefix ran once as a KV cache: SpeechLLM.forward), and the
default's eager attention against PyTorch's sdpa (its kernel before issue 19). Prints seconds per
step (median over the batches), steps per minute, the bf16 / fp32 ratio, the CPU's ISA and whether it computes bf16
natively, and the precision ``fit`` picks here (lightning_speechllm.precision).

On an AVX2-only CPU bf16 autocast is emulated: expect bf16 tens of times slower than fp32 (so fewer ``--batches``).
``ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2`` caps a newer CPU's kernels at AVX2.
Batches are the first ``--batches`` x ``--batch_size`` utterances of the synthetic train set (``data synth`` first).

    python scripts/bench/default_step.py --threads 2 --batches 4 --batch_size 12 [--no_bf16]
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

import yaml  # noqa: E402

from lightning_speechllm.config_utils import from_dict  # noqa: E402
from lightning_speechllm.data.batch import SpeechBatch  # noqa: E402
from lightning_speechllm.model.prompts import PromptConfig  # noqa: E402
from lightning_speechllm.model.speechllm import SpeechLLM, SpeechLLMConfig  # noqa: E402
from lightning_speechllm.precision import choose_precision, cpu_has_native_bf16  # noqa: E402

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "default.yaml"
OLD_PROMPT = PromptConfig()


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


def step_seconds(model: SpeechLLM, batches: list[SpeechBatch], bf16: bool, shared_prefix: bool = True) -> float:
    times = []
    for batch in [batches[0], *batches]:  # the first batch warms up
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss, _, _ = model(batch, shared_prefix=shared_prefix)
        loss.backward()
        model.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--manifest", type=Path, default=Path("data_cache/synth/train.jsonl"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--batch_size", type=int, default=12)
    parser.add_argument("--no_bf16", action="store_true",
                        help="skip the bf16 row (minutes per step where bf16 is emulated, as on AVX2-only CPUs)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    default = yaml.safe_load(DEFAULT_CONFIG.read_text())["model"]["model"]
    config = from_dict(SpeechLLMConfig, default)
    model = SpeechLLM.from_config(config).train()
    new_prompt = config.prompt
    batches = load_batches(args.manifest, args.batches, args.batch_size)
    cached = [with_cached_frames(model, b) for b in batches]
    rows = []
    for name, prompt, bf16, data, shared in (
            ("issue-11 baseline: fp32, live encoder, default system prompt, every row whole", OLD_PROMPT, False,
             batches, False),
            ("default recipe, fp32, every row whole (before the shared prefix)", new_prompt, False, cached, False),
            ("default recipe, fp32 (32-true)", new_prompt, False, cached, True),
            ("default recipe, bf16 autocast (bf16-mixed)", new_prompt, True, cached, True))[:3 if args.no_bf16 else 4]:
        model.config.prompt = prompt
        model.prompts = type(model.prompts)(model.tokenizer, prompt)
        rows.append((name, step_seconds(model, data, bf16, shared)))
        print(f"  {name}: {rows[-1][1]:.3f} s/step", flush=True)
    # the attention kernel: the default's eager against the sdpa it used before, at the precision fit picks here
    sdpa = SpeechLLM.from_config(from_dict(SpeechLLMConfig, {**default, "attn_implementation": "sdpa"})).train()
    bf16_here = not args.no_bf16
    kernels = {"eager": step_seconds(model, cached, bf16_here), "sdpa": step_seconds(sdpa, cached, bf16_here)}
    native, described = cpu_has_native_bf16()
    print(f"\n{args.batches} batches of {args.batch_size} utterances, {args.threads} threads; CPU: {cpu_name()} "
          f"({described}; native bf16: {'yes' if native else 'no'})")
    print("| recipe | s/step | steps/min | speed-up over the baseline |\n|---|---:|---:|---:|")
    for name, seconds in rows:
        print(f"| {name} | {seconds:.3f} | {60 / seconds:.1f} | {rows[0][1] / seconds:.2f}x |")
    print(f"attention kernel, {'bf16' if bf16_here else 'fp32'}: eager {kernels['eager']:.3f} s/step, sdpa (before) "
          f"{kernels['sdpa']:.3f} s/step: eager / sdpa {kernels['eager'] / kernels['sdpa']:.2f}")
    whole, fp32 = rows[1][1], rows[2][1]
    print(f"shared prompt prefix run once as a KV cache / every row whole, fp32: {fp32 / whole:.2f}")
    if args.no_bf16:
        print(f"bf16 not measured (--no_bf16); fit picks {choose_precision('cpu').line()}")
        return
    bf16 = rows[3][1]
    print(f"bf16 autocast / fp32 step time on this CPU: {bf16 / fp32:.2f} "
          f"({'bf16 faster' if bf16 < fp32 else 'fp32 faster'}); fit picks {choose_precision('cpu').line()}")


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


if __name__ == "__main__":
    main()
