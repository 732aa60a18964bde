"""``python -m lightning_speechllm prune``: build a pruning plan, write it, optionally export the pruned decoder.

Examples::

    python -m lightning_speechllm prune --method angular --map redundancy.json --fraction 0.3 --out plan.json
    python -m lightning_speechllm prune --method last --n 4 --llm_path smollm2-135m --export pruned/
    python -m lightning_speechllm prune --config prune.yaml          # every option is a YAML key
    python -m lightning_speechllm prune --method explicit --layers [3,4,5] --num_layers 30 --print_config
    python -m lightning_speechllm prune --method greedy --ckpt_path runs/last.ckpt --data.val_sets '{dev: dev.jsonl}' \\
        --n 8 --step 2 --calibration_batches 8 --out plan.json
    python -m lightning_speechllm prune --method budget --budget 0.2 --ckpt_path runs/last.ckpt \\
        --data.val_sets '{dev: dev.jsonl}' --out plan.json        # 20% of the decoder layers' parameters, mixed
    python -m lightning_speechllm prune --method budget --budget 0.25 --budget_unit latency --search evolutionary \\
        --ckpt_path runs/last.ckpt --data.val_sets '{dev: dev.jsonl}' --out plan.json   # 25% of the decoding step

``greedy`` re-measures the model after every removed block (:func:`~lightning_speechllm.pruning.greedy.plan_greedy`):
it needs the model (``--ckpt_path`` of the unpruned model, else ``--model.*``) and calibration data (the first
``--calibration_batches`` batches of ``--calibration_set``, one of ``--data.val_sets``), not a map.

The layer count comes from ``--map`` (angular / block_influence), else ``--llm_path``'s ``config.json``, else
``--num_layers``; when several are given they must agree. ``--export DIR`` loads the causal LM from ``--llm_path``
(a local HF directory or a registered asset name), masks the plan's layers and writes a stock HF directory (weights,
config with the cut layer count, tokenizer, ``pruning.json``) plus the plan as ``pruning_plan.json``.
"""
from __future__ import annotations

import sys
import warnings
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any, Literal

import torch
from jsonargparse import ActionConfigFile, ArgumentParser
from torch import nn

from lightning_speechllm.checkpoints import load_module
from lightning_speechllm.config_utils import from_dict, parsed_values
from lightning_speechllm.data.batch import SpeechBatch
from lightning_speechllm.data.datamodule import SpeechDataModule
from lightning_speechllm.model.speechllm import SpeechLLM, SpeechLLMConfig
from lightning_speechllm.pruning.budget import (
    budget_summary,
    latency_costs,
    measured_speedup,
    parameter_costs,
    plan_budget,
)
from lightning_speechllm.pruning.greedy import plan_greedy
from lightning_speechllm.pruning.plan import (
    PlanError,
    PruningPlan,
    apply_plan,
    plan_angular,
    plan_block_influence,
    plan_explicit,
    plan_last,
    plan_sublayers,
    same_model_id,
)
from lightning_speechllm.redundancy.metrics import TokenSelection

__all__ = ["PLAN_IN_EXPORT", "PruneArgs", "build_greedy_plan", "build_parser", "build_plan", "calibration_batches",
           "export_pruned", "main", "parse_command"]

PLAN_IN_EXPORT = "pruning_plan.json"
MEASURED_METHODS = ("greedy", "budget")  # plans measured on the model and calibration data, not read from a map
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


@dataclass
class PruneArgs:
    """Options of the ``prune`` command."""

    method: Literal["angular", "block_influence", "last", "explicit", "greedy", "attention", "budget"] = "angular"
    """How to choose the layers: pruning-path block, lowest Block Influence, deepest layers, --layers, greedy
    (blocks of --step layers removed one at a time, re-measuring the model on calibration data after each),
    attention (the attention sublayers, not whole layers, that change the residual stream least; from a sublayer
    map, `measure --sublayers true`), or budget (whole layers and attention sublayers mixed, the one that changes the
    stream least per parameter removed each round, re-measured, until --budget parameters are gone)."""
    map: str | None = None
    """Redundancy JSON (RedundancyResult) for angular / block_influence; a sublayer map JSON
    (<output_dir>/sublayers/<set>/<modality>.json) for attention."""
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
    ckpt_path: str | None = None
    """greedy: checkpoint of the unpruned model (its own model settings and trained projector / LoRA win over
    --model.*); without it the model is built from --model.*."""
    step: int = 1
    """greedy: layers removed per re-measured round (the last round may remove fewer)."""
    budget: float | None = None
    """budget: what to remove, as a share (< 1) of the decoder layers' parameters or of the decoding step's time
    (--budget_unit), or a whole number of parameters (>= 1)."""
    budget_unit: Literal["params", "latency"] = "params"
    """budget: price units by their parameters, or by their decode time per token measured on the calibration
    batches (--latency_tokens forced tokens a batch; the plan records the speed-up measured afterwards)."""
    search: Literal["greedy", "evolutionary"] = "greedy"
    """budget: the greedy plan, or the greedy plan refined by an evolutionary search (EvoPress-style: mutants scored
    by their KL divergence from the unpruned model on the calibration batches' target tokens)."""
    generations: int = 20
    """budget, evolutionary: generations of the search."""
    offspring: int = 8
    """budget, evolutionary: mutants scored per generation."""
    latency_tokens: int = 16
    """budget, latency: tokens generated per calibration batch while timing."""
    token_selection: TokenSelection = "last"
    """greedy: token positions averaged by d(l, n) (as measure's --token_selection)."""
    calibration_set: str | None = None
    """greedy: the --data.val_sets set measured (default: the first)."""
    calibration_batches: int = 8
    """greedy: batches of --calibration_set measured in every round."""
    calibration_modality: Literal["speech", "text"] = "speech"
    """greedy: measure the speech input or the text-only input (transcripts); text for a model without encoder."""
    device: str = "auto"
    """greedy: where the model runs: auto (cuda when available), cpu, cuda, cuda:1..."""
    seed: int = 0
    """greedy / budget: seed of the projector initialisation when no checkpoint is given, and of the evolutionary
    search."""


def build_parser() -> ArgumentParser:
    """The jsonargparse parser: one flag per :class:`PruneArgs` field, ``--config`` YAML, ``--print_config``."""
    parser = ArgumentParser(prog="python -m lightning_speechllm prune", description=__doc__.split("\n")[0],
                            print_config="--print_config")
    parser.add_argument("--config", action=ActionConfigFile, help="YAML file with any of the options below")
    parser.add_class_arguments(PruneArgs, as_group=True)
    parser.add_class_arguments(SpeechLLMConfig, "model", help="greedy: the SpeechLLM to measure (without --ckpt_path).")
    parser.add_class_arguments(SpeechDataModule, "data",
                               help="greedy: calibration data (--data.val_sets name: manifest).")
    return parser


def parse_command(argv: list[str] | None = None) -> tuple[PruneArgs, SpeechLLMConfig, dict]:
    """Parse ``argv`` into :class:`PruneArgs`, the model config and the datamodule keyword arguments (greedy)."""
    values = parsed_values(build_parser().parse_args(argv))
    args = PruneArgs(**{key: values[key] for key in PruneArgs.__dataclass_fields__})
    return args, from_dict(SpeechLLMConfig, values["model"]), dict(values["data"])


def parse_args(argv: list[str] | None = None) -> PruneArgs:
    """Parse ``argv`` into :class:`PruneArgs`."""
    return parse_command(argv)[0]


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
    if args.method in MEASURED_METHODS:
        raise PlanError(f"--method {args.method} measures the model: build it with build_greedy_plan(args, model, "
                        "data)")
    if args.ckpt_path is not None:
        raise PlanError(f"--ckpt_path is only for --method greedy / budget, not {args.method}")
    _refuse_budget_options(args)
    if args.method in ("angular", "block_influence", "attention") and args.map is None:
        kind = "a sublayer map JSON (measure --sublayers true)" if args.method == "attention" else "a redundancy JSON"
        raise PlanError(f"--method {args.method} needs --map ({kind})")
    if args.method == "explicit" and args.layers is None:
        raise PlanError("--method explicit needs --layers")
    if args.method != "explicit" and args.layers is not None:
        raise PlanError(f"--layers is only for --method explicit, not {args.method}")
    if args.method == "explicit" and (args.n is not None or args.fraction is not None):
        raise PlanError("--method explicit takes --layers, not --n / --fraction")
    result = _read_map(args)
    map_layers = None if result is None else (len(result.layers) if args.method == "attention" else result.num_layers)
    llm_layers = llm_num_layers(_llm_dir(args.llm_path)) if args.llm_path is not None else None
    num_layers = _agreed_num_layers({"--map": map_layers, "--llm_path config.json": llm_layers,
                                     "--num_layers": args.num_layers})
    if num_layers is None:
        raise PlanError(f"--method {args.method} needs the layer count: give --num_layers, --llm_path or --map")
    if args.method == "angular":
        plan = plan_angular(result, n=args.n, fraction=args.fraction, source_map=args.map)
    elif args.method == "block_influence":
        plan = plan_block_influence(result, n=args.n, fraction=args.fraction, source_map=args.map)
    elif args.method == "attention":
        plan = plan_sublayers(result, num_layers, n=args.n, fraction=args.fraction, source_map=args.map)
    elif args.method == "last":
        plan = plan_last(num_layers, n=args.n, fraction=args.fraction, model_id=args.llm_path)
    else:
        plan = plan_explicit(num_layers, args.layers, model_id=args.llm_path)
    model_id = None if args.ignore_model_id else args.llm_path
    plan.validate_for(num_layers, model_id)
    if plan.model_id is None and args.llm_path is not None:
        plan.model_id = args.llm_path
    return plan


def _read_map(args: PruneArgs) -> Any:
    """``--map``: a sublayer map for ``--method attention``, else a redundancy map (None without ``--map``)."""
    from lightning_speechllm.redundancy.analysis import RedundancyResult
    from lightning_speechllm.redundancy.sublayers import SublayerMap

    if args.map is None:
        return None
    if args.method != "attention":
        return RedundancyResult.from_json(args.map)
    try:
        return SublayerMap.from_json(args.map)
    except ValueError as error:
        raise PlanError(f"--map: {error}") from error


def _check_greedy_args(args: PruneArgs, model: SpeechLLMConfig, data: dict) -> None:
    """Refuse, before loading anything, a measured (greedy / budget) run that misses an input or is given one it
    does not use."""
    method = args.method
    if args.map is not None:
        raise PlanError(f"--map is not used by --method {method} (it measures the model itself): drop it")
    if args.layers is not None:
        raise PlanError(f"--layers is only for --method explicit, not {method}")
    if method == "greedy" and args.n is None and args.fraction is None:
        raise PlanError("--method greedy needs --n or --fraction (the number of layers to remove)")
    if method == "greedy":
        _refuse_budget_options(args)
    if method == "budget":
        _check_budget(args)
    if not data.get("val_sets"):
        raise PlanError(f"--method {method} needs calibration data: give --data.val_sets '{{name: manifest}}'")
    if args.calibration_set is not None and args.calibration_set not in data["val_sets"]:
        raise PlanError(f"--calibration_set {args.calibration_set!r} is not one of --data.val_sets "
                        f"{sorted(data['val_sets'])}")
    if args.calibration_batches < 1 or args.step < 1:
        raise PlanError(f"--calibration_batches and --step must be >= 1, got {args.calibration_batches}, {args.step}")
    for key in ("removed_layers", "removed_attention", "removed_mlp"):
        if args.ckpt_path is None and getattr(model, key):
            raise PlanError(f"--model.{key} {getattr(model, key)}: {method} starts from the unpruned model")


_BUDGET_OPTIONS = ("budget", "budget_unit", "search", "generations", "offspring", "latency_tokens")


def _refuse_budget_options(args: PruneArgs) -> None:
    """A budget option given to another method is refused, not silently ignored."""
    defaults = PruneArgs()
    given = [f"--{key}" for key in _BUDGET_OPTIONS if getattr(args, key) != getattr(defaults, key)]
    if given:
        raise PlanError(f"{', '.join(given)} {'is' if len(given) == 1 else 'are'} only for --method budget, not "
                        f"{args.method}")


def _check_budget(args: PruneArgs) -> None:
    if args.budget is None or args.n is not None or args.fraction is not None:
        raise PlanError("--method budget takes --budget (a parameter count, or a fraction < 1), not --n / --fraction")
    if args.budget <= 0 or (args.budget >= 1 and args.budget != int(args.budget)):
        raise PlanError(f"--budget {args.budget}: give a share of the decoder layers' parameters in (0, 1) or a "
                        "whole number of parameters")
    if args.budget_unit == "latency" and args.budget >= 1:
        raise PlanError(f"--budget {args.budget} with --budget_unit latency: give a share of the decoding step's "
                        "time in (0, 1)")
    if args.generations < 1 or args.offspring < 1 or args.latency_tokens < 2:
        raise PlanError(f"--generations and --offspring must be >= 1 and --latency_tokens >= 2, got "
                        f"{args.generations}, {args.offspring}, {args.latency_tokens}")
    if args.step != 1:
        raise PlanError(f"--step {args.step} is for --method greedy: a budget plan removes one unit per round")


def _greedy_model(args: PruneArgs, model: SpeechLLMConfig) -> SpeechLLM:
    """The unpruned SpeechLLM to measure, on ``--device``, in eval mode: from ``--ckpt_path`` or ``--model.*``."""
    torch.manual_seed(args.seed)
    if args.ckpt_path is None:
        speechllm = SpeechLLM.from_config(model)
    else:
        speechllm = load_module(args.ckpt_path, requested=model, allow_pruned=False).speechllm
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    return speechllm.to(device).eval()


def _calibration_modality(args: PruneArgs, speechllm: SpeechLLM) -> str:
    if args.calibration_modality == "speech" and speechllm.encoder is None:
        print("prune: the model has no speech encoder, calibrating on text", file=sys.stderr)
        return "text"
    if args.calibration_modality == "speech" and args.ckpt_path is None and speechllm.released is None:
        warnings.warn("greedy calibration on speech without --ckpt_path: the projector is untrained", stacklevel=2)
    return args.calibration_modality


def calibration_batches(args: PruneArgs, data: dict, text_only: bool) -> list[SpeechBatch]:
    """The first ``--calibration_batches`` batches of ``--calibration_set`` (default: the first validation set)."""
    name = args.calibration_set or next(iter(data["val_sets"]))
    datamodule = SpeechDataModule(**{**data, "val_sets": {name: data["val_sets"][name]},
                                     "text_only": text_only or bool(data.get("text_only"))})
    datamodule.setup("validate")
    batches = list(islice(datamodule.val_dataloader()[0], args.calibration_batches))
    if not batches:
        raise PlanError(f"calibration set {name!r} ({data['val_sets'][name]}) yielded no batch")
    return batches


def _budget_plan(args: PruneArgs, speechllm: SpeechLLM, batches: list[SpeechBatch], model_id: str) -> PruningPlan:
    latency = args.budget_unit == "latency"
    costs = (latency_costs(speechllm, batches, new_tokens=args.latency_tokens) if latency
             else parameter_costs(speechllm))
    size = {"fraction": args.budget} if args.budget < 1 else {"remove": float(args.budget)}
    plan = plan_budget(speechllm, batches, costs=costs, token_selection=args.token_selection, search=args.search,
                       generations=args.generations, offspring=args.offspring, seed=args.seed, model_id=model_id,
                       **size)
    if latency:
        plan.params["measured"] = measured_speedup(speechllm, batches, plan, new_tokens=args.latency_tokens)
    print(budget_summary(plan))
    return plan


def build_greedy_plan(args: PruneArgs, model: SpeechLLMConfig, data: dict) -> PruningPlan:
    """The greedy plan of ``args``: the model measured on the calibration batches, one round per ``--step`` block;
    checked against ``--num_layers`` / ``--llm_path`` when given."""
    _check_greedy_args(args, model, data)
    speechllm = _greedy_model(args, model)
    llm_layers = llm_num_layers(_llm_dir(args.llm_path)) if args.llm_path is not None else None
    num_layers = _agreed_num_layers({"the model": speechllm.layer_mask.num_layers,
                                     "--llm_path config.json": llm_layers, "--num_layers": args.num_layers})
    model_id = speechllm.config.model_id
    if not args.ignore_model_id and args.llm_path is not None and not same_model_id(model_id, args.llm_path):
        raise PlanError(f"model mismatch: the measured model is {model_id!r} but --llm_path is {args.llm_path!r}")
    text_only = _calibration_modality(args, speechllm) == "text"
    batches = calibration_batches(args, data, text_only)
    if args.method == "budget":
        plan = _budget_plan(args, speechllm, batches, model_id)
    else:
        plan = plan_greedy(speechllm, batches, n=args.n, fraction=args.fraction, step=args.step,
                           token_selection=args.token_selection, model_id=model_id)
    plan.params["calibration_set"] = args.calibration_set or next(iter(data["val_sets"]))
    plan.params["calibration_modality"] = "text" if text_only else "speech"
    plan.validate_for(num_layers)
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
    from lightning_speechllm.model.released import is_released_dir

    llm_dir = _llm_dir(llm_path)
    if is_released_dir(llm_dir):
        return _export_released(plan, str(llm_dir), out_dir, dtype, check_model_id=check_model_id,
                                model_id=llm_path)
    model = AutoModelForCausalLM.from_pretrained(llm_dir, dtype=getattr(torch, dtype)).eval()
    before = parameter_count(model)
    apply_plan(model, plan, model_id=llm_path if check_model_id else None)
    after = parameter_count(model)
    out = save_pruned_decoder(model, out_dir, tokenizer=_load_tokenizer(llm_dir))
    plan.to_json(out / PLAN_IN_EXPORT)
    return out, before, after


def _export_released(plan: PruningPlan, directory: str, out_dir: str | Path, dtype: str, check_model_id: bool,
                     model_id: str) -> tuple[Path, int, int]:
    """:func:`export_pruned` for a released SpeechLLM: the whole model, pruned, in its own class."""
    from lightning_speechllm.model.released.export import save_released

    speechllm = SpeechLLM.from_config(SpeechLLMConfig(pretrained=directory, llm_dtype=dtype))
    before = parameter_count(speechllm.llm)
    apply_plan(speechllm, plan, model_id=model_id if check_model_id else None)
    after = parameter_count(speechllm.llm)
    out = save_released(speechllm, out_dir)
    plan.to_json(out / PLAN_IN_EXPORT)
    return out, before, after


def run(args: PruneArgs, model: SpeechLLMConfig | None = None, data: dict | None = None) -> PruningPlan:
    """Build the plan (greedy: on ``model`` and the calibration ``data``), write ``--out`` and ``--export``, and print
    a summary. A greedy plan exports the decoder it measured unless ``--llm_path`` is given."""
    greedy = args.method in MEASURED_METHODS
    if args.out is None and args.export is None:
        raise PlanError("nothing to write: give --out PLAN.json and/or --export DIR")
    if args.export is not None and args.llm_path is None and not greedy:
        raise PlanError("--export needs --llm_path (the causal LM to prune)")
    plan = build_greedy_plan(args, model or SpeechLLMConfig(), data or {}) if greedy else build_plan(args)
    print(plan.summary())
    if args.out is not None:
        print(f"plan written to {plan.to_json(args.out)}")
    if args.export is not None:
        llm_path = args.llm_path if args.llm_path is not None else plan.model_id
        out, before, after = export_pruned(plan, llm_path, args.export, args.dtype,
                                           check_model_id=not args.ignore_model_id)
        print(f"parameters: {before:,} -> {after:,} ({1 - after / before:.1%} fewer)")
        print(f"pruned decoder written to {out}")
    return plan


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m lightning_speechllm prune``; returns an exit code (2 on bad input)."""
    try:
        args, model, data = parse_command(argv)
    except SystemExit as stop:  # --help, --print_config, or a parse error already reported by jsonargparse
        return stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 2)
    try:
        run(args, model, data)
    except (PlanError, FileNotFoundError, KeyError, ValueError) as error:
        print(f"prune: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
