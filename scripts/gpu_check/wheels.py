"""The modules the run needs and the wheels that bring the ones the device image lacks (``--download_wheels``)."""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path


DEVICE_WHEELS = ("lhotse", "cytoolz", "intervaltree", "soundfile", "cffi", "pycparser", "jiwer", "rapidfuzz",
                 "jsonargparse", "typeshed_client", "docstring_parser", "whisper_normalizer", "more_itertools")


REQUIRED_MODULES = ("torch", "torchaudio", "lightning", "transformers", "peft", "tokenizers", "safetensors",
                    "torchmetrics", "sacrebleu", "numpy", "yaml", "lhotse", "cytoolz", "intervaltree", "soundfile",
                    "jiwer", "rapidfuzz", "jsonargparse", "whisper_normalizer", "more_itertools")


WHEEL_PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
                   "manylinux1_x86_64")


def missing_modules() -> list[str]:
    return [name for name in REQUIRED_MODULES if importlib.util.find_spec(name) is None]


def download_wheels(target: str) -> int:
    """pip download (here, where PyPI is reachable) the cp312 x86-64 wheels the device image lacks, in the versions
    installed here."""
    from importlib.metadata import PackageNotFoundError, version

    pins = []
    for name in DEVICE_WHEELS:
        try:
            pins.append(f"{name}=={version(name)}")
        except PackageNotFoundError:
            pins.append(name)
    platforms = [arg for p in WHEEL_PLATFORMS for arg in ("--platform", p)]
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
               "--implementation", "cp", *platforms, "-d", target, *pins]
    print(" ".join(command), flush=True)
    done = subprocess.run(command, check=False)
    if done.returncode == 0:
        size = sum(f.stat().st_size for f in Path(target).glob("*.whl"))
        print(f"{len(list(Path(target).glob('*.whl')))} wheels, {size / 2**20:.1f} MiB in {target}")
    return done.returncode
