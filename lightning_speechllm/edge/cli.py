"""``python -m lightning_speechllm gguf --source DIR --out DIR``: GGUF files by llama.cpp's own converter.

``--source`` is the ``llamacpp/`` folder that ``export --format llamacpp`` writes (or the ``voxtral/`` one of
``--format voxtral``). The output holds ``model-<type>.gguf`` for each ``--types`` entry (the text model),
``mmproj-f16.gguf`` (audio encoder + projector) and ``speech.json`` (prompt and speech positions), with their block
counts, projector type and sizes printed. ``gguf-eval``, ``gguf-transcribe`` and ``efficiency --runtime llama.cpp``
read that folder.
"""
from __future__ import annotations

import sys

from jsonargparse import ActionConfigFile, ArgumentError, ArgumentParser, Namespace

from .gguf import DEFAULT_TOOLS_DIR, GGUF_OUTTYPES, GGUFExportError, convert_export, gguf_summary

__all__ = ["build_parser", "main", "parsed_or_none", "unmatched_checkpoints"]

_SHOWN = ("general.architecture", "llama.block_count", "clip.projector_type", "clip.audio.block_count",
          "clip.audio.projector.stack_factor")


def parsed_or_none(parser: ArgumentParser, argv: list[str] | None) -> Namespace | None:
    """`argv` (default: the process's) parsed by `parser`; None, with the error printed, when it is refused."""
    try:
        return parser.parse_args(sys.argv[1:] if argv is None else argv)
    except ArgumentError as error:
        print(f"error: {error}", file=sys.stderr)
        return None


def unmatched_checkpoints(gguf: dict[str, str], ckpt: dict[str, str]) -> str | None:
    """The error when a ``--ckpt`` name has no ``--gguf`` folder of the same name (the two are run side by side)."""
    unknown = sorted(set(ckpt) - set(gguf))
    return f"--ckpt names {unknown} have no --gguf folder of the same name" if unknown else None


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="lightning_speechllm gguf", exit_on_error=False,
                            description="Convert an export for llama.cpp (export --format llamacpp, or voxtral) to "
                                        "GGUF with llama.cpp's own converter.")
    parser.add_argument("--config", action=ActionConfigFile)
    parser.add_argument("--source", type=str, required=True,
                        help="the llamacpp/ folder of `export --format llamacpp` (or voxtral/ of --format voxtral)")
    parser.add_argument("--out", type=str, required=True, help="output folder for the .gguf files")
    parser.add_argument("--types", type=list[str], default=["f16", "q8_0"],
                        help=f"text-model types, among {list(GGUF_OUTTYPES)} (the mmproj is f16)")
    parser.add_argument("--tools_dir", type=str, default=str(DEFAULT_TOOLS_DIR),
                        help="where llama.cpp's converter is extracted from the pinned llama-cpp-python sdist")
    return parser


def main(argv: list[str] | None = None) -> int:
    """CLI entry; 0 on success, 2 on bad arguments or a directory the converter refuses."""
    args = parsed_or_none(build_parser(), argv)
    if args is None:
        return 2
    try:
        files = convert_export(args.source, args.out, tuple(args.types), args.tools_dir)
    except GGUFExportError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for name, path in files.items():
        if path.suffix != ".gguf":
            continue
        metadata = gguf_summary(path)["metadata"]
        shown = ", ".join(f"{key}={metadata[key]}" for key in _SHOWN if key in metadata)
        print(f"{name}: {path} ({path.stat().st_size / 2**20:.1f} MiB; {shown})")
    return 0
