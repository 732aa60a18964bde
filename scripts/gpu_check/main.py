"""The command line: parse the options, run the phases in order, write the JSON and print the summary."""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any

from .context import Context
from .helpers import PeakMemory
from .options import H100_BF16_DENSE_TFLOPS, Options
from .phases import PHASES
from .runner import run_phases
from .summary import summary_lines
from .wheels import download_wheels, missing_modules


def json_path(opts: Options) -> Path:
    if opts.json_out:
        return Path(opts.json_out)
    if os.environ.get("OUT"):
        return Path(os.environ["OUT"]) / "gpu_check.json"
    return Path("gpu_check.json")


def write_json(path: Path, results: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(results, indent=1, default=str) + "\n")
    partial.replace(path)


def build_parser() -> argparse.ArgumentParser:
    # The description is the package docstring (what each phase measures, how a lent device runs the check).
    parser = argparse.ArgumentParser(prog="scripts/gpu_check.py", description=sys.modules[__package__].__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny encoder/decoder, a few steps (CPU smoke test)")
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument("--precision", default="bf16-mixed", help="Lightning precision (default bf16-mixed)")
    parser.add_argument("--llm_dtype", default="bfloat16", help="frozen decoder weights (default bfloat16)")
    parser.add_argument("--encoder_dtype", default="bfloat16", help="frozen encoder weights (default bfloat16)")
    parser.add_argument("--budget_s", type=float, default=450.0,
                        help="skip the phases that would start after this many seconds (default 450)")
    parser.add_argument("--peak_tflops", type=float, default=H100_BF16_DENSE_TFLOPS,
                        help="the card's dense bf16 peak for MFU (default: H100 SXM, 989)")
    parser.add_argument("--prune_fraction", type=float, default=0.25, help="share of decoder layers healing removes")
    parser.add_argument("--phases", default="", help=f"comma-separated subset of {','.join(PHASES)} (default: all)")
    parser.add_argument("--fit_steps", type=int, help="override the fit steps (20; tiny 4)")
    parser.add_argument("--heal_steps", type=int, help="override the heal steps (20; tiny 4)")
    parser.add_argument("--fsdp_steps", type=int, help="override the FSDP fit steps (10; tiny 2)")
    parser.add_argument("--json_out", help="where the JSON goes (default: $OUT/gpu_check.json, else ./gpu_check.json)")
    parser.add_argument("--work_dir", help="keep the random checkpoints, WAVs and run files here (default: a temp "
                                           "dir, removed at the end)")
    parser.add_argument("--download_wheels", metavar="DIR",
                        help="only download the wheels the device needs into DIR (run here, not on the device)")
    return parser


def main(argv: list[str] | None = None) -> int:
    namespace = build_parser().parse_args(argv)
    if namespace.download_wheels:
        return download_wheels(namespace.download_wheels)
    phases = [p for p in namespace.phases.split(",") if p]
    unknown = sorted(set(phases) - set(PHASES))
    if unknown:
        print(f"error: unknown phases {unknown}; choose from {list(PHASES)}", file=sys.stderr)
        return 2
    opts = Options(**{k: v for k, v in vars(namespace).items() if k in Options.__dataclass_fields__ and k != "phases"},
                   phases=phases)
    out_path = json_path(opts)
    results: dict[str, Any] = {"schema": 1, "options": {**asdict(opts), "sizes": asdict(opts.sizes)},
                               "phases": {}, "json": str(out_path)}
    missing = missing_modules()
    if missing:
        results["error"] = (f"modules not installed: {missing}; carry wheels (python scripts/gpu_check.py "
                            "--download_wheels .whl here, then install them as the docstring says)")
        write_json(out_path, results)
        print(json.dumps(results, indent=1), flush=True)
        return 2
    import torch

    if opts.cuda and not torch.cuda.is_available():
        results["error"] = "--device cuda, but torch.cuda.is_available() is False"
        write_json(out_path, results)
        print(json.dumps(results, indent=1), flush=True)
        return 2
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*smaller than the logging interval.*")
    for name in ("lightning.pytorch", "lightning.fabric", "lightning_speechllm"):
        logging.getLogger(name).setLevel(logging.WARNING)
    import transformers

    transformers.logging.set_verbosity_error()
    work_dir = Path(opts.work_dir) if opts.work_dir else Path(tempfile.mkdtemp(prefix="gpu_check_"))
    work_dir.mkdir(parents=True, exist_ok=True)
    ctx = Context(opts=opts, work_dir=work_dir)
    try:
        run_phases(ctx, results, PHASES, write=lambda: write_json(out_path, results), meter=PeakMemory(opts))
    finally:
        ctx.fit.clear()
        ctx.reloaded = None
        if not opts.work_dir:
            shutil.rmtree(work_dir, ignore_errors=True)
    results["failed"] = [n for n, r in results["phases"].items() if r["status"] == "failed"]
    results["skipped"] = [n for n, r in results["phases"].items() if r["status"] == "skipped"]
    results["summary"] = summary_lines(results)
    write_json(out_path, results)
    print("\n" + json.dumps(results, indent=1, default=str))
    print("\n" + "\n".join(results["summary"]) + f"\nJSON: {out_path}", flush=True)
    return 1 if results["failed"] else 0
