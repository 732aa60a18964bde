"""``python -m lightning_speechllm prune``: build a pruning plan, write it, optionally export the pruned decoder.

Examples::

    python -m lightning_speechllm prune --method angular --map redundancy.json --fraction 0.3 --out plan.json
    python -m lightning_speechllm prune --method last --n 4 --llm_path smollm2-135m --export pruned/
    python -m lightning_speechllm prune --config prune.yaml          # every option is a YAML key
    python -m lightning_speechllm prune --method explicit --layers [3,4,5] --num_layers 30 --print_config

The layer count comes from ``--map`` (angular / block_influence), else ``--llm_path``'s ``config.json``, else
``--num_layers``; when several are given they must agree. ``--export DIR`` loads the causal LM from ``--llm_path``
(a local HF directory or a registered asset name), masks the plan's layers and writes a stock HF directory (weights,
config with the cut layer count, tokenizer, ``pruning.json``) plus the plan as ``pruning_plan.json``.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from jsonargparse import ActionConfigFile, ArgumentParser
from torch import nn

from lightning_speechllm.pruning.plan import (
    PlanError,
    PruningPlan,
    apply_plan,
    plan_angular,
    plan_block_influence,
    plan_explicit,
    plan_last,
)

__all__ = ["PLAN_IN_EXPORT", "PruneArgs", "build_parser", "build_plan", "export_pruned", "main"]

PLAN_IN_EXPORT = "pruning_plan.json"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


@dataclass
class PruneArgs:
    """Options of the ``prune`` command."""

    method: Literal["angular", "block_influence", "last", "explicit"] = "angular"
    """How to choose the layers: pruning-path block, lowest Block Influence, deepest layers, or --layers."""
    map: str | None = None
    """Redundancy JSON (RedundancyResult) for angular / block_influence."""
    n: int | None = None
    """Number of layers to remove (exclusive with --fraction)."""
    fraction: float | None = None
    """Fraction of the layers to remove, in (0, 1); rounded half up, at least 1 layer."""
    layers: list[int] | None = None
    """Layer indices to remove (method explicit)."""
    num_layers: int | None = None
    """Decoder layer count, for last / explicit without --map or --llm_path."""
    llm_path: str | None = None
    """Causal LM: local HF directory or registered asset name (needed by --export)."""
    out: str | None = None
    """Where to write the plan JSON."""
    export: str | None = None
    """Directory for the pruned HF decoder (stock AutoModelForCausalLM reload)."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Weight dtype used to load and export the LLM."""
    ignore_model_id: bool = False
    """Do not check that the map's model id matches --llm_path."""


def build_parser() -> ArgumentParser:
    """The jsonargparse parser: one flag per :class:`PruneArgs` field, ``--config`` YAML, ``--print_config``."""
    parser = ArgumentParser(prog="python -m lightning_speechllm prune", description=__doc__.split("\n")[0],
                            print_config="--print_config")
    parser.add_argument("--config", action=ActionConfigFile, help="YAML file with any of the options below")
    parser.add_class_arguments(PruneArgs, as_group=True)
    return parser


def parse_args(argv: list[str] | None = None) -> PruneArgs:
    """Parse ``argv`` into :class:`PruneArgs`."""
    parser = build_parser()
    namespace = parser.parse_args(argv)
    values = {key: value for key, value in namespace.as_dict().items() if key in PruneArgs.__dataclass_fields__}
    return PruneArgs(**values)


def _llm_dir(llm_path: str) -> Path:
    from lightning_speechllm.assets import resolve

    return resolve(llm_path)


def llm_num_layers(llm_dir: Path) -> int:
    """``num_hidden_layers`` of the (text) config in ``llm_dir``."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(llm_dir)
    text_config = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    num_layers = getattr(text_config, "num_hidden_layers", None)
    if not isinstance(num_layers, int):
        raise PlanError(f"{llm_dir}/config.json has no integer num_hidden_layers")
    return num_layers


def _agreed_num_layers(sources: dict[str, int | None]) -> int | None:
    given = {name: value for name, value in sources.items() if value is not None}
    if len(set(given.values())) > 1:
        detail = ", ".join(f"{name}: {value}" for name, value in given.items())
        raise PlanError(f"the layer counts disagree ({detail})")
    return next(iter(given.values()), None)


def build_plan(args: PruneArgs) -> PruningPlan:
    """The plan described by ``args`` (validated against every layer count and model id given)."""
    from lightning_speechllm.redundancy.analysis import RedundancyResult

    if args.method in ("angular", "block_influence") and args.map is None:
        raise PlanError(f"--method {args.method} needs --map (a redundancy JSON)")
    if args.method == "explicit" and args.layers is None:
        raise PlanError("--method explicit needs --layers")
    if args.method != "explicit" and args.layers is not None:
        raise PlanError(f"--layers is only for --method explicit, not {args.method}")
    if args.method == "explicit" and (args.n is not None or args.fraction is not None):
        raise PlanError("--method explicit takes --layers, not --n / --fraction")
    result = RedundancyResult.from_json(args.map) if args.map is not None else None
    llm_layers = llm_num_layers(_llm_dir(args.llm_path)) if args.llm_path is not None else None
    num_layers = _agreed_num_layers({"--map": None if result is None else result.num_layers,
                                     "--llm_path config.json": llm_layers, "--num_layers": args.num_layers})
    if num_layers is None:
        raise PlanError(f"--method {args.method} needs the layer count: give --num_layers, --llm_path or --map")
    if args.method == "angular":
        plan = plan_angular(result, n=args.n, fraction=args.fraction, source_map=args.map)
    elif args.method == "block_influence":
        plan = plan_block_influence(result, n=args.n, fraction=args.fraction, source_map=args.map)
    elif args.method == "last":
        plan = plan_last(num_layers, n=args.n, fraction=args.fraction, model_id=args.llm_path)
    else:
        plan = plan_explicit(num_layers, args.layers, model_id=args.llm_path)
    model_id = None if args.ignore_model_id else args.llm_path
    plan.validate_for(num_layers, model_id)
    if plan.model_id is None and args.llm_path is not None:
        plan.model_id = args.llm_path
    return plan


def parameter_count(model: nn.Module) -> int:
    """Number of distinct registered parameters (tied weights counted once; masked-out layers not counted)."""
    return sum(p.numel() for p in model.parameters())


def _load_tokenizer(llm_dir: Path):
    """The tokenizer saved in ``llm_dir``, or None when the directory holds no tokenizer files."""
    if not any((llm_dir / name).exists() for name in _TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(llm_dir)


def export_pruned(plan: PruningPlan, llm_path: str, out_dir: str | Path, dtype: str = "float32",
                  check_model_id: bool = True) -> tuple[Path, int, int]:
    """Load the causal LM ``llm_path``, mask ``plan``'s layers and write the pruned HF directory with the plan inside.

    Returns ``(directory, parameters before, parameters after)``.
    """
    from transformers import AutoModelForCausalLM

    from lightning_speechllm.model.export import save_pruned_decoder

    llm_dir = _llm_dir(llm_path)
    model = AutoModelForCausalLM.from_pretrained(llm_dir, dtype=getattr(torch, dtype)).eval()
    before = parameter_count(model)
    apply_plan(model, plan, model_id=llm_path if check_model_id else None)
    after = parameter_count(model)
    out = save_pruned_decoder(model, out_dir, tokenizer=_load_tokenizer(llm_dir))
    plan.to_json(out / PLAN_IN_EXPORT)
    return out, before, after


def run(args: PruneArgs) -> PruningPlan:
    """Build the plan, write ``--out`` and ``--export``, and print a summary."""
    if args.out is None and args.export is None:
        raise PlanError("nothing to write: give --out PLAN.json and/or --export DIR")
    if args.export is not None and args.llm_path is None:
        raise PlanError("--export needs --llm_path (the causal LM to prune)")
    plan = build_plan(args)
    print(plan.summary())
    if args.out is not None:
        print(f"plan written to {plan.to_json(args.out)}")
    if args.export is not None:
        out, before, after = export_pruned(plan, args.llm_path, args.export, args.dtype,
                                           check_model_id=not args.ignore_model_id)
        print(f"parameters: {before:,} -> {after:,} ({1 - after / before:.1%} fewer)")
        print(f"pruned decoder written to {out}")
    return plan


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m lightning_speechllm prune``; returns an exit code (2 on bad input)."""
    try:
        args = parse_args(argv)
    except SystemExit as stop:  # --help, --print_config, or a parse error already reported by jsonargparse
        return stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 2)
    try:
        run(args)
    except (PlanError, FileNotFoundError, KeyError, ValueError) as error:
        print(f"prune: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
