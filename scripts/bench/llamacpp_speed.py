"""llama.cpp (F16, Q8_0) vs PyTorch eager, full vs pruned, side by side in one run (issue 22).

The Voxtral-shaped default (Whisper tiny.en + SmolLM2-135M from checkpoints/pretrained, a bias-free 4-frame projector
on the whole 30 s window, random: speed does not depend on it) and the same with ``--remove`` layers removed (default
the block 14..25, 12 of 30, as ``pruned_speed.py``) are exported by ``export --format voxtral``'s writer and converted
by llama.cpp's own converter. Each configuration runs in a process of its own (its peak RSS is its own): llama.cpp
F16 and Q8_0 through :mod:`lightning_speechllm.edge.runtime`, and PyTorch eager float32 through
:func:`lightning_speechllm.evaluation.efficiency.measure_latency`, on the same threads and utterances, with
``--new_tokens`` tokens forced (end of generation suppressed).

The speech embeddings are the framework's (llama.cpp's Voxtral audio graph cannot run them: see
``edge/runtime.py``), so every time is the decoder's, where pruning acts: prefill (prompt + 375 speech positions) ms,
decode tokens/s, the decoder's real-time factor (prefill + decode over the audio's seconds), peak RSS, file size.
The last lines print pruned/full for each runtime against the FLOP ideal of one decoding step (goal >= 0.9).

    python scripts/bench/llamacpp_speed.py --threads 2 --repeats 3 --new_tokens 32
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

SECONDS = (2.0, 3.0, 4.0)


def _speechllm(removed: list[int]):
    from lightning_speechllm.model.projector import ProjectorConfig
    from lightning_speechllm.model.speechllm import SpeechLLM, SpeechLLMConfig

    torch.manual_seed(0)
    model = SpeechLLM.from_config(SpeechLLMConfig(
        encoder_whole_window=True, projector=ProjectorConfig(downsample=4, hidden_dim=576, bias=False))).eval()
    with torch.no_grad():
        for param in model.projector.parameters():
            param.normal_(0.0, 0.05)
    if removed:
        model.layer_mask.remove_layers(removed)
    return model


def _batch(seconds: float):
    from tests.test_speechllm import make_batch

    return make_batch(seconds=(seconds,))


def _worker(args: argparse.Namespace) -> dict:
    from lightning_speechllm.edge.speed import peak_rss_mb

    torch.set_num_threads(args.threads)
    removed = json.loads(args.removed)
    if args.runtime == "pytorch":
        from lightning_speechllm.evaluation.efficiency import measure_latency

        model = _speechllm(removed)
        report = measure_latency(model, [_batch(s) for s in SECONDS], max_new_tokens=args.new_tokens,
                                 repeats=args.repeats, warmup=1)
        prefill = report.prefill_ms - (report.speech_ms or 0.0)
        decode_s = report.decode_ms_per_token / 1000
        size = 4 * report.decoder_params  # float32 decoder weights, as the GGUF columns hold the decoder
    else:
        from lightning_speechllm.edge.runtime import LlamaCppSpeechModel

        runtime = LlamaCppSpeechModel.from_dir(args.gguf, args.runtime, n_threads=args.threads)
        embeddings = [np.load(Path(args.embeddings) / f"{s}.npy") for s in SECONDS]
        runs = []
        for repeat in range(args.repeats + 1):
            for emb in embeddings:
                out = runtime.generate(emb, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens)
                if repeat:  # the first pass warms up
                    runs.append((out.prefill_seconds, out.decode_seconds / (len(out.tokens) - 1)))
        prefill = 1000 * float(np.median([r[0] for r in runs]))
        decode_s = float(np.median([r[1] for r in runs]))
        size = (Path(args.gguf) / f"model-{args.runtime}.gguf").stat().st_size
        runtime.close()
    audio = float(np.mean(SECONDS))
    rtf = (prefill / 1000 + decode_s * (args.new_tokens - 1)) / audio
    return {"prefill_ms": prefill, "decode_tok_s": 1 / decode_s, "rtf": rtf, "peak_rss_mb": peak_rss_mb(),
            "size_mb": size / 2**20}


def _prepare(work: Path, removed: list[int]) -> dict:
    from lightning_speechllm.edge import convert_export
    from lightning_speechllm.evaluation.efficiency import ideal_speedup
    from lightning_speechllm.model.voxtral_layout import save_voxtral

    paths = {}
    for name, cut in (("full", []), ("pruned", removed)):
        model = _speechllm(cut)
        voxtral = save_voxtral(model, work / name / "voxtral")
        started = time.perf_counter()
        convert_export(voxtral, work / name / "gguf", ("f16", "q8_0"))
        print(f"{name}: exported and converted in {time.perf_counter() - started:.1f} s", flush=True)
        embeddings = work / name / "embeddings"
        embeddings.mkdir()
        with torch.no_grad():
            for seconds in SECONDS:
                batch = _batch(seconds)
                frames, lens = model.encode_frames(batch.audio, batch.audio_lens)
                out, positions = model.projector(frames, lens)
                np.save(embeddings / f"{seconds}.npy", out[0, : positions[0]].numpy())
        paths[name] = {"voxtral": voxtral, "gguf": work / name / "gguf", "embeddings": embeddings, "removed": cut}
        if not cut:  # one decoding step at the prompt's length, full over pruned
            layers = model.layer_mask.num_layers
            paths["ideal"] = ideal_speedup(model.llm.config, layers - len(removed), context_len=400)
    return paths


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--new_tokens", type=int, default=32)
    parser.add_argument("--remove", type=str, default=json.dumps(list(range(14, 26))))
    parser.add_argument("--work_dir", type=str, default=None, help="keep the exports here (default: a temp dir)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    for name in ("runtime", "removed", "gguf", "embeddings"):
        parser.add_argument(f"--{name}", type=str, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(_worker(args)))
        return 0
    removed = json.loads(args.remove)
    with tempfile.TemporaryDirectory() as temp:
        work = Path(args.work_dir or temp)
        paths = _prepare(work, removed)
        rows = {}
        for runtime in ("pytorch", "f16", "q8_0"):
            for name in ("full", "pruned"):
                spec = paths[name]
                command = [sys.executable, __file__, "--worker", "--runtime", runtime, "--removed",
                           json.dumps(spec["removed"]), "--gguf", str(spec["gguf"]),
                           "--embeddings", str(spec["embeddings"]), "--threads", str(args.threads),
                           "--repeats", str(args.repeats), "--new_tokens", str(args.new_tokens)]
                done = subprocess.run(command, capture_output=True, text=True, check=True)
                rows[runtime, name] = json.loads(done.stdout.strip().splitlines()[-1])
                print(f"{runtime} {name}: {rows[runtime, name]}", flush=True)
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "unknown CPU")
    print(f"\n{cpu}, {args.threads} threads; {len(removed)} of 30 decoder layers removed; {args.new_tokens} new "
          "tokens; prompt = 375 speech positions + the prompt's text")
    print("| runtime | model | prefill ms | decode tok/s | decoder RTF | peak RSS MB | decoder MB |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for (runtime, name), row in rows.items():
        print(f"| {runtime} | {name} | {row['prefill_ms']:.0f} | {row['decode_tok_s']:.1f} | {row['rtf']:.3f} | "
              f"{row['peak_rss_mb']:.0f} | {row['size_mb']:.0f} |")
    print(f"\nFLOP ideal of one decoding step (context 400): {paths['ideal']:.2f}x")
    for runtime in ("pytorch", "f16", "q8_0"):
        speedup = rows[runtime, "pruned"]["decode_tok_s"] / rows[runtime, "full"]["decode_tok_s"]
        prefill = rows[runtime, "full"]["prefill_ms"] / rows[runtime, "pruned"]["prefill_ms"]
        print(f"{runtime}: pruned decode speed-up {speedup:.2f}x = {speedup / paths['ideal']:.2f} of ideal; prefill "
              f"{prefill:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
