"""GGUF files of an export for llama.cpp (``export --format llamacpp`` or ``voxtral``), written by llama.cpp's own
converter.

The converter is ``convert_hf_to_gguf.py`` with its ``conversion/`` package and ``gguf-py``, as the pinned
llama-cpp-python sdist vendors them (llama.cpp's Python tools are not on the package index on their own). They are
extracted once from that sdist, fetched through the package index pip uses and checked by sha256
(:func:`~lightning_speechllm.data.real_speakers.fetch_sdist`), into ``data_cache/llama.cpp/``. The converter runs
in a subprocess of this Python, so its failure is reported with its own message and never leaves a partial file.

An export becomes two kinds of file: the text model (the pruned decoder, layers renumbered ``blk.0..k-1``,
``llama.block_count`` = k) in each requested type, and ``mmproj`` (the Whisper encoder and the projector), which
llama.cpp's audio path (mtmd) reads beside it: projector type ``glma`` from a ``llamacpp/`` export (k frames
stacked, the graph that runs ours), ``voxtral`` from a ``voxtral/`` one (which the pinned llama.cpp cannot run, see
:mod:`lightning_speechllm.edge.runtime`). ``speech.json`` is written beside them: the prompt and how many speech
positions the model reads (:data:`lightning_speechllm.model.llamacpp_layout.SPEECH_FILE`).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

from lightning_speechllm.data.real_speakers import Sdist, fetch_sdist
from lightning_speechllm.model.llamacpp_layout import SPEECH_FILE

__all__ = ["GGUF_OUTTYPES", "LLAMA_CPP_SDIST", "GGUFExportError", "convert_export", "converter_dir", "gguf_summary"]

LLAMA_CPP_SDIST = Sdist("llama_cpp_python", "0.3.36",
                        "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e")
"""The llama-cpp-python release whose vendored llama.cpp converts (and, built, runs) the exports."""
DEFAULT_TOOLS_DIR = Path("data_cache/llama.cpp")
GGUF_OUTTYPES = ("f32", "f16", "bf16", "q8_0")
"""Text-model types the converter writes (the mmproj is always f16)."""
_CONVERTER_PARTS = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/")
_MARKER = ".complete"


class GGUFExportError(RuntimeError):
    """llama.cpp's converter is unavailable, or it refused the directory (its message included)."""


def converter_dir(tools_dir: str | Path = DEFAULT_TOOLS_DIR, fetch: bool = True) -> Path:
    """The folder holding llama.cpp's ``convert_hf_to_gguf.py`` (with ``conversion/`` and ``gguf-py/``), extracted
    from the pinned llama-cpp-python sdist (fetched when missing and `fetch`)."""
    tools = Path(tools_dir).expanduser()
    target = tools / LLAMA_CPP_SDIST.stem
    if (target / _MARKER).is_file():
        return target
    why = fetch_sdist(LLAMA_CPP_SDIST, tools, fetch=fetch)
    if why is not None:
        raise GGUFExportError(f"llama.cpp's converter is not available: {why}")
    root = f"{LLAMA_CPP_SDIST.stem}/vendor/llama.cpp/"
    with tarfile.open(tools / LLAMA_CPP_SDIST.filename) as tar:
        members = [m for m in tar.getmembers()
                   if m.name.startswith(root) and m.name[len(root):].startswith(_CONVERTER_PARTS)]
        for member in members:
            member.name = member.name[len(root):]
        tar.extractall(target, members=members, filter="data")
    if not (target / "convert_hf_to_gguf.py").is_file():
        raise GGUFExportError(f"{tools / LLAMA_CPP_SDIST.filename} holds no vendor/llama.cpp/convert_hf_to_gguf.py")
    (target / _MARKER).write_text(f"{LLAMA_CPP_SDIST.filename} sha256 {LLAMA_CPP_SDIST.sha256}\n")
    return target


def _convert(converter: Path, source: Path, outfile: Path, outtype: str, *extra: str) -> Path:
    part = outfile.with_name(outfile.name + ".part")
    command = [sys.executable, str(converter / "convert_hf_to_gguf.py"), str(source), "--outfile", str(part),
               "--outtype", outtype, *extra]
    # the converter's own gguf-py (it reads NO_LOCAL_GGUF to use the installed gguf instead)
    env = {key: value for key, value in os.environ.items() if key != "NO_LOCAL_GGUF"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0 or not part.is_file():
        part.unlink(missing_ok=True)
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-6:])
        raise GGUFExportError(f"llama.cpp's converter failed on {source} ({' '.join((outtype, *extra))}):\n{tail}")
    part.replace(outfile)
    return outfile


def _sources(source: Path) -> tuple[Path, Path, dict]:
    """The text model's directory, the mmproj's directory and the speech.json content of an export folder."""
    if (source / SPEECH_FILE).is_file() and (source / "decoder").is_dir() and (source / "audio").is_dir():
        return source / "decoder", source / "audio", json.loads((source / SPEECH_FILE).read_text())
    if (source / "config.json").is_file() and (source / "pruning.json").is_file():  # export --format voxtral
        info = json.loads((source / "pruning.json").read_text())
        if info.get("format") == "voxtral":
            speech = {"format": "voxtral", "projector_type": "voxtral", "prompt": info["prompt"],
                      "speech_placeholder": info["speech_placeholder"], "frames_per_position": 4,
                      "speech_positions": "window", "boundary_rows": 0, "trained_window_seconds": 30}
            return source, source, speech
    raise GGUFExportError(f"{source} is neither the llamacpp/ folder of `export --format llamacpp` (decoder/, audio/, "
                          f"{SPEECH_FILE}) nor the voxtral/ folder of `export --format voxtral`")


def convert_export(source_dir: str | Path, out_dir: str | Path, outtypes: tuple[str, ...] = ("f16", "q8_0"),
                   tools_dir: str | Path = DEFAULT_TOOLS_DIR) -> dict[str, Path]:
    """``model-<type>.gguf`` for each of `outtypes`, ``mmproj-f16.gguf`` and ``speech.json`` from an export folder
    (``llamacpp/`` or ``voxtral/``), by llama.cpp's own converter; returns them by name (``model-f16``, ...,
    ``mmproj``, ``speech``)."""
    source = Path(source_dir).expanduser().resolve()
    text, audio, speech = _sources(source)
    bad = [t for t in outtypes if t not in GGUF_OUTTYPES]
    if bad or not outtypes:
        raise GGUFExportError(f"GGUF types must be among {GGUF_OUTTYPES}, got {list(outtypes)}")
    converter = converter_dir(tools_dir)
    out = Path(out_dir).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    files = {f"model-{t}": _convert(converter, text, out / f"model-{t}.gguf", t) for t in outtypes}
    files["mmproj"] = _convert(converter, audio, out / "mmproj-f16.gguf", "f16", "--mmproj")
    part = out / (SPEECH_FILE + ".part")
    part.write_text(json.dumps(speech, indent=2) + "\n")
    files["speech"] = part.replace(out / SPEECH_FILE)
    return files


def gguf_summary(path: str | Path) -> dict[str, object]:
    """A GGUF file's scalar and string metadata (arrays as their lengths) and its tensor names, read with the
    ``gguf`` package."""
    from gguf import GGUFReader, GGUFValueType

    reader = GGUFReader(str(path))
    metadata: dict[str, object] = {}
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name.startswith("tokenizer.ggml."):
            continue
        if field.types and field.types[0] == GGUFValueType.ARRAY:
            metadata[name] = f"array[{len(field.data)}]"
        else:
            metadata[name] = field.contents()
    return {"metadata": metadata, "tensors": [tensor.name for tensor in reader.tensors]}
