"""``python -m lightning_speechllm measure``: a validation-only pass that measures decoder-layer redundancy.

Examples::

    python -m lightning_speechllm measure --data.val_sets '{dev: data_cache/synth/dev.jsonl}' --modalities [text]
    python -m lightning_speechllm measure --ckpt_path runs/last.ckpt --data.val_sets '{clean: clean.jsonl}'
    python -m lightning_speechllm measure --config measure.yaml          # every option is a YAML key
    python -m lightning_speechllm measure --print_config > measure.yaml

The model (``--model.*``, a :class:`SpeechLLMConfig`) is loaded from local directories or registered offline
assets; with ``--ckpt_path`` it is rebuilt from the checkpoint instead (a ``SpeechLLMModule`` or a healing
checkpoint: its own model settings win over ``--model.*``, its trained projector / LoRA are loaded, and a healing
checkpoint's pruned model is measured, so the map covers its remaining layers). Text-only
measurement needs no trained projector; speech measurement without one measures an untrained projector's input.
Results (JSON, CSV, PNG per set/modality, speech-vs-text agreement, ``summary.csv``) go to ``--output_dir``
(default ``<log dir>/redundancy``); a table of the best block per size and the text-vs-speech ρ is printed.
"""
from __future__ import annotations

import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import lightning as L
from jsonargparse import ActionConfigFile, ArgumentError, ArgumentParser, Namespace

from lightning_speechllm.checkpoints import load_module
from lightning_speechllm.config_utils import from_dict, parsed_values
from lightning_speechllm.data.datamodule import SpeechDataModule
from lightning_speechllm.model.module import DecodingConfig, SpeechLLMModule
from lightning_speechllm.model.speechllm import SpeechLLMConfig
from lightning_speechllm.precision import resolve_precision
from lightning_speechllm.progress import hide_lightning_product_tips
from lightning_speechllm.redundancy.analysis import RedundancyResult
from lightning_speechllm.redundancy.callback import RedundancyCallback
from lightning_speechllm.redundancy.metrics import TokenSelection
from lightning_speechllm.redundancy.report import write_summary_csv

__all__ = ["MeasureArgs", "build_module", "build_parser", "format_summary", "main", "run"]

SUMMARY_MAX_BLOCK = 8


@dataclass
class MeasureArgs:
    """Options of the ``measure`` command (besides ``--model.*`` and ``--data.*``). With --ckpt_path the model is
    rebuilt from that checkpoint's own model settings (--model.* is ignored; values given differently are logged)
    and trained weights; a healing checkpoint's removed layers stay removed: the pruned model is measured."""

    ckpt_path: str | None = None
    """SpeechLLMModule or HealingModule checkpoint. The model is then rebuilt from the checkpoint's own model
    settings (the --model.* options are ignored; the ones given differently are logged) with its trained projector
    / LoRA; a healing checkpoint's removed layers stay removed, so the pruned model is measured."""
    token_selection: TokenSelection = "last"
    """Token positions averaged: last (Gromov et al.), last_prompt (where generation starts), all, speech, prompt
    or target."""
    agreement_selections: list[TokenSelection] = field(default_factory=lambda: ["last_prompt", "last"])
    """Token selections at which speech and text maps are compared; the first gives the headline agreement
    (last_prompt: only the input modality differs; last: both read the same teacher-forced transcript)."""
    n_perm: int = 1000
    """Permutations of the agreement's null (p-values beside rho and path overlap; 0: none)."""
    per_task: bool = True
    """Also measure each task of a set that mixes tasks (ASR and AST), as the set <set>/<task>."""
    modalities: list[Literal["speech", "text"]] = field(default_factory=lambda: ["speech", "text"])
    """Measure the speech input, the text-only input (transcripts), or both (then also their agreement)."""
    sets: list[str] | None = None
    """Names of the --data.val_sets to measure (default: all)."""
    max_batches: int | None = None
    """At most this many batches per set."""
    output_dir: str | None = None
    """Where results go (default: <root_dir>/<logger dir>/redundancy)."""
    n_boot: int = 1000
    """Bootstrap resamples for the 95% CIs (0: none)."""
    decode: bool = False
    """Also decode and score WER/BLEU during the pass (slower; not needed to measure)."""
    sublayers: bool = False
    """Also write sublayer maps, the angular distance across each attention and each MLP sublayer (one more forward
    per batch): <output_dir>/sublayers/<set>/<modality>.json and .png, what attention-only plans are built from."""
    segments: bool = False
    """Also write per-segment maps of the speech input, how much each layer changes the speech, prompt and target
    positions (one more forward per batch): <output_dir>/segments/<set>.json and .png, what speech-token layer skipping
    (`model.speech_skip_layers`) is chosen from."""
    root_dir: str = "checkpoints/measure"
    """Trainer default_root_dir; the logger writes under it."""
    logger: Literal["csv", "tensorboard"] = "csv"
    """Scalar logger (TensorBoard also receives the figures)."""
    accelerator: str = "auto"
    """Lightning accelerator."""
    precision: str | None = None
    """Lightning precision, e.g. bf16-mixed or 32-true (default: what the hardware computes natively: bf16-mixed on a
    GPU or CPU with native bf16, else 32-true; one printed line says which and why)."""
    seed: int = 0
    """Seed of the projector initialisation when no checkpoint is given."""


def build_parser() -> ArgumentParser:
    """The jsonargparse parser: :class:`MeasureArgs` flags, ``--model.*``, ``--data.*``, ``--config``."""
    parser = ArgumentParser(prog="python -m lightning_speechllm measure", description=__doc__.split("\n")[0],
                            print_config="--print_config", exit_on_error=False)
    parser.add_argument("--config", action=ActionConfigFile, help="YAML file with any of the options below")
    parser.add_class_arguments(MeasureArgs, as_group=True, help=" ".join(MeasureArgs.__doc__.split()))
    parser.add_class_arguments(SpeechLLMConfig, "model", help="The SpeechLLM to measure.")
    parser.add_class_arguments(SpeechDataModule, "data", help="Validation sets (--data.val_sets name: manifest).")
    return parser


def parse_args(argv: list[str] | None = None) -> tuple[MeasureArgs, SpeechLLMConfig, dict]:
    """Parse ``argv`` into the command options, the model config and the datamodule keyword arguments."""
    namespace: Namespace = build_parser().parse_args(argv)
    values = parsed_values(namespace)
    args = MeasureArgs(**{key: values[key] for key in MeasureArgs.__dataclass_fields__})
    return args, from_dict(SpeechLLMConfig, values["model"]), dict(values["data"])


def build_module(args: MeasureArgs, model: SpeechLLMConfig) -> SpeechLLMModule:
    """The module to measure: built from ``model``, or, with ``--ckpt_path``, rebuilt from the checkpoint by
    :func:`~lightning_speechllm.checkpoints.load_module` (its own model settings, trained weights and, for a
    healing checkpoint, its pruning plan: the pruned model is measured)."""
    decoding = DecodingConfig(generate_in_validation=args.decode)
    if args.ckpt_path is None:
        return SpeechLLMModule(model=model, decoding=decoding)
    loaded = load_module(args.ckpt_path, requested=model)
    return SpeechLLMModule(speechllm=loaded.speechllm, decoding=decoding)


def format_summary(results: dict[tuple[str, str], RedundancyResult], agreements: dict[str, dict]) -> str:
    """Table of the best block ``l*(n)`` and its ``d`` for n = 1..min(L, 8) per set/modality, and ρ per set."""
    if not results:
        return "no redundancy result (no batch was measured)"
    num_blocks = min(SUMMARY_MAX_BLOCK, max(result.num_layers for result in results.values()))
    header = f"{'set':<14} {'modality':<8} {'N':>5}  " + " ".join(f"{f'n={n}':>12}" for n in range(1, num_blocks + 1))
    lines = ["best block l*(n) (d) per block size n", header, "-" * len(header)]
    for (set_name, modality), result in sorted(results.items()):
        cells = []
        for block in range(1, num_blocks + 1):
            if block > result.num_layers:
                cells.append(f"{'-':>12}")
                continue
            first = result.path[block - 1]
            cells.append(f"{f'{first} ({result.table[block - 1, first]:.3f})':>12}")
        lines.append(f"{set_name:<14} {modality:<8} {result.num_samples:>5}  " + " ".join(cells))
    for set_name, agreement in sorted(agreements.items()):
        for selection, values in (agreement.get("by_token_selection") or {"": agreement}).items():
            p_value = (values.get("null") or {}).get("spearman_rho", {}).get("p_value")
            null = "" if p_value is None else f" (null p = {p_value:.3g})"
            at = f" [{selection} tokens]" if selection else ""
            lines.append(f"{set_name}: text vs speech Spearman rho = {values['spearman_rho']:.3f}{null}{at}, "
                         f"same block for {100 * values['path_exact']:.0f}% of n, "
                         f"overlapping for {100 * values['path_overlap']:.0f}%")
    return "\n".join(lines)


def _logger(args: MeasureArgs):
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    kind = TensorBoardLogger if args.logger == "tensorboard" else CSVLogger
    return kind(save_dir=args.root_dir, name="measure")


def run(args: MeasureArgs, model: SpeechLLMConfig, data: dict) -> RedundancyCallback:
    """Build the module, datamodule and trainer, run ``Trainer.validate`` with the callback; return it."""
    if not data.get("val_sets"):
        raise ValueError("--data.val_sets is empty: give at least one name: manifest")
    L.seed_everything(args.seed, verbose=False)
    module = build_module(args, model)
    modalities = list(dict.fromkeys(args.modalities))
    if module.speechllm.encoder is None and "speech" in modalities:
        modalities.remove("speech")
        print("measure: the model has no speech encoder, measuring text only", file=sys.stderr)
    if not modalities:
        raise ValueError("nothing to measure: --modalities is empty (or speech only on a model without encoder)")
    if modalities == ["text"]:
        data["text_only"] = True  # the module's own forward is then the text forward: no audio, no extra pass
    elif "speech" in modalities and args.ckpt_path is None and not model.pretrained:  # a released model is trained
        warnings.warn("measuring speech input without --ckpt_path: the projector is untrained", stacklevel=2)
    datamodule = SpeechDataModule(**data)
    callback = RedundancyCallback(token_selection=args.token_selection, modalities=modalities, sets=args.sets,
                                  max_batches=args.max_batches, output_dir=args.output_dir, n_boot=args.n_boot,
                                  agreement_selections=args.agreement_selections, n_perm=args.n_perm,
                                  per_task=args.per_task)
    precision = resolve_precision(args.precision, args.accelerator, source="--precision")
    trainer = L.Trainer(accelerator=args.accelerator, devices=1, logger=_logger(args), use_distributed_sampler=False,
                        enable_progress_bar=True, enable_model_summary=False, enable_checkpointing=False,
                        default_root_dir=args.root_dir, limit_val_batches=args.max_batches or 1.0,
                        callbacks=[callback], precision=precision)
    trainer.validate(module, datamodule=datamodule)
    if callback.results and trainer.is_global_zero:
        write_summary_csv([callback.results[key] for key in sorted(callback.results)],
                          Path(callback.output_dir) / "summary.csv")
    if args.sublayers:
        speechllm = module.speechllm.to(trainer.strategy.root_device)  # Lightning left it on the CPU
        write_sublayer_maps(speechllm, datamodule, modalities, args, Path(callback.output_dir) / "sublayers")
    if args.segments and "speech" in modalities:
        speechllm = module.speechllm.to(trainer.strategy.root_device)
        write_segment_maps(speechllm, datamodule, args, Path(callback.output_dir) / "segments")
    return callback


def write_sublayer_maps(speechllm, datamodule: SpeechDataModule, modalities: list[str], args: MeasureArgs,
                        out: Path) -> list[Path]:
    """The :class:`~lightning_speechllm.redundancy.sublayers.SublayerMap` of every (set, modality), JSON + plot."""
    import itertools

    from lightning_speechllm.redundancy.sublayers import measure_sublayers, plot_sublayer_map

    written = []
    loaders = {"speech": datamodule.val_dataloader, "text": datamodule.text_only_val_dataloaders}
    for modality in modalities:
        for set_name, loader in zip(datamodule.val_set_names, loaders[modality]()):
            if args.sets is not None and set_name not in args.sets:
                continue
            batches = itertools.islice(loader, args.max_batches) if args.max_batches else loader
            result = measure_sublayers(speechllm, batches, args.token_selection)
            json_path = result.to_json(out / set_name / f"{modality}.json")
            plot_sublayer_map(result, json_path.with_suffix(".png"))
            written.append(json_path)
    return written


def write_segment_maps(speechllm, datamodule: SpeechDataModule, args: MeasureArgs, out: Path) -> list[Path]:
    """The :class:`~lightning_speechllm.redundancy.segments.SegmentMap` of every set's speech input, JSON + plot."""
    import itertools

    from lightning_speechllm.redundancy.segments import measure_segments, plot_segment_map

    written = []
    for set_name, loader in zip(datamodule.val_set_names, datamodule.val_dataloader()):
        if args.sets is not None and set_name not in args.sets:
            continue
        batches = itertools.islice(loader, args.max_batches) if args.max_batches else loader
        result = measure_segments(speechllm, batches)
        json_path = result.to_json(out / f"{set_name}.json")
        plot_segment_map(result, json_path.with_suffix(".png"))
        written.append(json_path)
    return written


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m lightning_speechllm measure``; returns an exit code (2 on bad input)."""
    hide_lightning_product_tips()
    try:
        args, model, data = parse_args(argv)
    except SystemExit as stop:  # --help, --print_config, or a parse error already reported by jsonargparse
        return stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 2)
    except ArgumentError as error:
        print(f"measure: error: {error}", file=sys.stderr)
        return 2
    try:
        callback = run(args, model, data)
    except (FileNotFoundError, KeyError, ValueError) as error:
        print(f"measure: error: {error}", file=sys.stderr)
        return 2
    print(format_summary(callback.results, callback.agreements))
    print(f"results in {callback.output_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
