"""`python -m lightning_speechllm <command> ...`: each command maps to one function (litgpt style)."""
from __future__ import annotations

import importlib
import sys
from collections.abc import Callable

# command -> ("module:function" taking argv and returning an exit code, one-line help). Imported lazily so that
# `--help` and light commands stay fast.
COMMANDS: dict[str, tuple[str, str]] = {
    "fit": ("lightning_speechllm.cli:fit", "train a SpeechLLM (projector, optional LoRA) with LightningCLI"),
    "validate": ("lightning_speechllm.cli:validate", "score a checkpoint on the validation sets"),
    "test": ("lightning_speechllm.cli:test", "score a checkpoint on the test sets"),
    "predict": ("lightning_speechllm.cli:predict", "transcribe / translate a manifest"),
    "measure": ("lightning_speechllm.redundancy.cli:main", "measure layer redundancy (speech and text) on val sets"),
    "compare": ("lightning_speechllm.redundancy.compare:main", "agreement of N redundancy maps (rho, paths, null)"),
    "prune": ("lightning_speechllm.pruning.cli:main", "build a pruning plan and optionally export the pruned decoder"),
    "heal": ("lightning_speechllm.healing.cli:main", "heal a pruned SpeechLLM: LoRA and/or distillation from the full model"),
    "sweep": ("lightning_speechllm.evaluation.sweep.cli:main", "prune -> evaluate -> heal -> evaluate over fractions; the paper's rule"),
    "efficiency": ("lightning_speechllm.evaluation.efficiency:main", "full vs pruned: parameters, latency, RTF, memory"),
    "export": ("lightning_speechllm.healing.export:main", "write a (healed, pruned) checkpoint as an HF decoder + projector"),
    "gguf": ("lightning_speechllm.edge.cli:main", "GGUF (text model + mmproj) of an `export --format llamacpp` folder"),
    "gguf-eval": ("lightning_speechllm.edge.evaluate:main", "WER and speed of gguf folders in llama.cpp, beside PyTorch"),
    "gguf-transcribe": ("lightning_speechllm.edge.evaluate:transcribe_main", "transcribe audio files in llama.cpp"),
    "assets": ("lightning_speechllm.assets:main", "list or pull the offline pretrained weights"),
    "data": ("lightning_speechllm.data.prepare:main", "synthesize the espeak corpus or prepare real corpora"),
    "demo": ("lightning_speechllm.demo:main", "pull the default model, measure its text redundancy, run one utterance"),
}


def _usage() -> str:
    lines = ["usage: python -m lightning_speechllm <command> [options]", "", "commands:"]
    lines += [f"  {name:<10} {help_text}" for name, (_, help_text) in COMMANDS.items()]
    lines += ["", "Run `python -m lightning_speechllm <command> --help` for the options of a command."]
    return "\n".join(lines)


def _resolve(target: str) -> Callable[[list[str]], int]:
    module_name, function_name = target.split(":")
    return getattr(importlib.import_module(module_name), function_name)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"error: unknown command {command!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    return int(_resolve(COMMANDS[command][0])(rest) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
