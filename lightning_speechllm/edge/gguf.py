"""GGUF files of a Voxtral-layout export (``export --format voxtral``), written by llama.cpp's own converter.

The converter is ``convert_hf_to_gguf.py`` with its ``conversion/`` package and ``gguf-py``, as the pinned
llama-cpp-python sdist vendors them (llama.cpp's Python tools are not on the package index on their own). They are
extracted once from that sdist, fetched through the package index pip uses and checked by sha256
(:func:`~lightning_speechllm.data.real_speakers.fetch_sdist`), into ``data_cache/llama.cpp/``. The converter runs
in a subprocess of this Python, so its failure is reported with its own message and never leaves a partial file.

A Voxtral directory becomes two kinds of file: the text model (the pruned decoder, layers renumbered ``blk.0..k-1``,
``llama.block_count`` = k) in each requested type, and ``mmproj`` (the Whisper encoder and the projector, projector
type ``voxtral``, 4 frames stacked), which llama.cpp's audio path (mtmd) reads beside it.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from pathlib import Path

from lightning_speechllm.data.real_speakers import Sdist, fetch_sdist

__all__ = ["GGUF_OUTTYPES", "LLAMA_CPP_SDIST", "GGUFExportError", "convert_voxtral", "converter_dir", "gguf_summary"]

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


def convert_voxtral(voxtral_dir: str | Path, out_dir: str | Path, outtypes: tuple[str, ...] = ("f16", "q8_0"),
                    tools_dir: str | Path = DEFAULT_TOOLS_DIR) -> dict[str, Path]:
    """``model-<type>.gguf`` for each of `outtypes` and ``mmproj-f16.gguf`` from a stock Voxtral directory, by
    llama.cpp's own converter; returns them by name (``model-f16``, ..., ``mmproj``)."""
    source = Path(voxtral_dir).expanduser().resolve()
    if not (source / "config.json").is_file():
        raise GGUFExportError(f"{source} has no config.json: pass the voxtral/ folder that `export --format "
                              "voxtral` writes")
    bad = [t for t in outtypes if t not in GGUF_OUTTYPES]
    if bad or not outtypes:
        raise GGUFExportError(f"GGUF types must be among {GGUF_OUTTYPES}, got {list(outtypes)}")
    converter = converter_dir(tools_dir)
    out = Path(out_dir).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    files = {f"model-{t}": _convert(converter, source, out / f"model-{t}.gguf", t) for t in outtypes}
    files["mmproj"] = _convert(converter, source, out / "mmproj-f16.gguf", "f16", "--mmproj")
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
