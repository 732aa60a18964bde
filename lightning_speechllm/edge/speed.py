"""``efficiency --runtime llama.cpp``: ``gguf`` folders (full and pruned) run by llama.cpp in each GGUF type, and
their checkpoints by PyTorch eager, on the same utterances and threads, side by side in one run.

Each configuration runs in a process of its own, so its peak RSS (``VmHWM``) is its own. llama.cpp goes end to end
(mtmd's log-mel, Whisper and projector from the mmproj, then the decoder); PyTorch through
:func:`~lightning_speechllm.evaluation.efficiency.measure_latency`. Both generate exactly ``max_new_tokens`` tokens
(end of generation suppressed). Reported per configuration: speech encoding ms (mtmd's 30 s window, or the
framework's encoder and projector), prefill ms (the prompt with its speech positions, to the first token), decode
tokens/s, RTF (everything over the audio's seconds), peak RSS and file size (model + mmproj, or the active weights);
then pruned vs full per runtime, against the FLOP ideal of one decoding step when the checkpoints are given.
"""
from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

__all__ = ["compare_runtimes", "format_runtimes", "measure_gguf"]


def peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM: it starts anew at exec, unlike ru_maxrss)."""
    line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024


def measure_gguf(gguf_dir: str | Path, kind: str, waves: list[np.ndarray], new_tokens: int, repeats: int,
                 threads: int) -> dict[str, float]:
    """Median encode / prefill / per-token decode of ``repeats`` passes over `waves` (one untimed pass first)."""
    from .runtime import SAMPLE_RATE, LlamaCppSpeechModel

    runtime = LlamaCppSpeechModel.from_dir(gguf_dir, kind, n_threads=threads)
    passes = []
    try:
        for repeat in range(repeats + 1):
            encode = prefill = decode = 0.0
            for wave in waves:
                out = runtime.transcribe(wave, max_new_tokens=new_tokens, min_new_tokens=new_tokens)
                encode, prefill = encode + out.encode_seconds, prefill + out.prefill_seconds
                decode += out.decode_seconds / (len(out.tokens) - 1)
            if repeat:
                passes.append((encode / len(waves), prefill / len(waves), decode / len(waves)))
    finally:
        runtime.close()
    encode, prefill, step = (statistics.median(p[i] for p in passes) for i in range(3))
    audio = float(np.mean([len(w) for w in waves])) / SAMPLE_RATE
    folder = Path(gguf_dir)
    size = sum((folder / name).stat().st_size for name in (f"model-{kind}.gguf", "mmproj-f16.gguf"))
    return {"encode_ms": 1000 * encode, "prefill_ms": 1000 * prefill, "decode_tok_s": 1 / step,
            "rtf": (encode + prefill + step * (new_tokens - 1)) / audio, "peak_rss_mb": peak_rss_mb(),
            "size_mb": size / 2**20}


def measure_checkpoint(ckpt: str, waves: list[np.ndarray], new_tokens: int, repeats: int,
                       threads: int) -> dict[str, float]:
    """The same numbers for a checkpoint in PyTorch eager (its encoder window as trained)."""
    import torch

    from lightning_speechllm.checkpoints import load_module
    from lightning_speechllm.evaluation.efficiency import measure_latency
    from lightning_speechllm.model.layer_mask import unwrap_peft

    from .evaluate import wave_batch

    torch.set_num_threads(threads)
    speechllm = load_module(ckpt).speechllm.eval()
    batches = [wave_batch(wave) for wave in waves]
    report = measure_latency(speechllm, batches, max_new_tokens=new_tokens, repeats=repeats, warmup=1)
    speech = report.speech_ms or 0.0
    return {"encode_ms": speech, "prefill_ms": report.prefill_ms - speech,
            "decode_tok_s": 1000 / report.decode_ms_per_token, "rtf": report.rtf, "peak_rss_mb": peak_rss_mb(),
            "size_mb": report.active_weight_bytes / 2**20, "decoder_layers": report.decoder_layers,
            "context": report.prompt_tokens + new_tokens / 2, "config": unwrap_peft(speechllm.llm).config.to_dict()}


def _in_own_process(task: dict) -> dict:
    done = subprocess.run([sys.executable, "-m", "lightning_speechllm.edge.speed", json.dumps(task)],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"the {task['runtime']} measurement of {task['source']} failed:\n"
                           + "\n".join(done.stderr.strip().splitlines()[-6:]))
    return json.loads(done.stdout.strip().splitlines()[-1])


def compare_runtimes(gguf: dict[str, str], ckpt: dict[str, str], types: list[str], waves: list[np.ndarray],
                     new_tokens: int, repeats: int, threads: int) -> dict[str, dict[str, dict]]:
    """{runtime: {model name: numbers}}, every configuration measured in its own process."""
    rows: dict[str, dict[str, dict]] = {}
    with tempfile.TemporaryDirectory() as temp:
        wave_files = []
        for index, wave in enumerate(waves):
            wave_files.append(str(Path(temp) / f"{index}.npy"))
            np.save(wave_files[-1], wave.astype(np.float32))
        common = {"waves": wave_files, "new_tokens": new_tokens, "repeats": repeats, "threads": threads}
        for kind in types:
            for name, folder in gguf.items():
                task = {**common, "runtime": f"llama.cpp {kind}", "source": folder, "kind": kind}
                rows.setdefault(task["runtime"], {})[name] = _in_own_process(task)
                print(f"{task['runtime']} {name}: {_brief(rows[task['runtime']][name])}", flush=True)
        for name, path in ckpt.items():
            task = {**common, "runtime": "pytorch eager", "source": path}
            rows.setdefault(task["runtime"], {})[name] = _in_own_process(task)
            print(f"pytorch eager {name}: {_brief(rows[task['runtime']][name])}", flush=True)
    return rows


def _brief(row: dict) -> str:
    return ", ".join(f"{key} {row[key]:.1f}" for key in ("encode_ms", "prefill_ms", "decode_tok_s", "peak_rss_mb"))


def format_runtimes(rows: dict[str, dict[str, dict]], full: str, pruned: str) -> str:
    """Markdown table of every configuration, then `pruned` vs `full` (model names) per runtime, and the FLOP ideal
    when PyTorch measured both checkpoints."""
    lines = ["| runtime | model | speech ms | prefill ms | decode tok/s | RTF | peak RSS MB | size MB |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for runtime, models in rows.items():
        for name, row in models.items():
            lines.append(f"| {runtime} | {name} | {row['encode_ms']:.0f} | {row['prefill_ms']:.0f} | "
                         f"{row['decode_tok_s']:.1f} | {row['rtf']:.3f} | {row['peak_rss_mb']:.0f} | "
                         f"{row['size_mb']:.0f} |")
    ideal = _ideal(rows.get("pytorch eager", {}), full, pruned)
    lines.append("")
    if ideal is not None:
        lines.append(f"FLOP ideal of one decoding step: {ideal:.3f}x")
    for runtime, models in rows.items():
        if full in models and pruned in models:
            speedup = models[pruned]["decode_tok_s"] / models[full]["decode_tok_s"]
            prefill = models[full]["prefill_ms"] / models[pruned]["prefill_ms"]
            of_ideal = f" = {speedup / ideal:.2f} of ideal" if ideal is not None else ""
            lines.append(f"{runtime}: {pruned} decodes {speedup:.2f}x faster than {full}{of_ideal}; prefill "
                         f"{prefill:.2f}x")
    return "\n".join(lines)


def _ideal(models: dict[str, dict], full: str, pruned: str) -> float | None:
    from types import SimpleNamespace

    from lightning_speechllm.evaluation.efficiency import ideal_speedup

    if full not in models or pruned not in models:
        return None
    config = SimpleNamespace(**models[full]["config"])
    return ideal_speedup(config, models[pruned]["decoder_layers"], context_len=round(models[full]["context"]),
                         num_layers=models[full]["decoder_layers"])


def _worker(task: dict) -> dict:
    waves = [np.load(path) for path in task["waves"]]
    if task["runtime"] == "pytorch eager":
        return measure_checkpoint(task["source"], waves, task["new_tokens"], task["repeats"], task["threads"])
    return measure_gguf(task["source"], task["kind"], waves, task["new_tokens"], task["repeats"], task["threads"])


if __name__ == "__main__":
    print(json.dumps(_worker(json.loads(sys.argv[1]))))
