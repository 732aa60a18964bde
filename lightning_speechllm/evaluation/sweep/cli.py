"""``python -m lightning_speechllm sweep``: prune at several sizes, score (and optionally heal) each, pick the fraction.

Examples::

    python -m lightning_speechllm sweep --ckpt_path runs/last.ckpt --data.val_sets '{clean: clean.jsonl}' \\
        --sweep.map_path runs/redundancy/clean/speech/epoch=0.json --sweep.fractions '[0.1, 0.2, 0.3]'
    python -m lightning_speechllm sweep --ckpt_path runs/last.ckpt --sweep.ns '[1, 2, 14]' ...   # layer counts
    python -m lightning_speechllm sweep --config sweep.yaml --sweep.heal true --sweep.heal_steps 500 \\
        --data.train data_cache/synth/train.jsonl
    python -m lightning_speechllm sweep --print_config > sweep.yaml          # every option is a YAML key

Without ``--sweep.fractions`` or ``--sweep.ns`` (they exclude each other) the sweep walks n = 1, 2, ... removed
layers and stops once the rule has failed ``--sweep.walk_stop_after`` (2) times in a row. ``--sweep.heal_steps``
defaults to 200; the paper heals 5,000 steps per point.

With ``--ckpt_path`` the model is rebuilt from the checkpoint's own settings (``--model.*`` is ignored); the
checkpoint must hold an unpruned model: a healing checkpoint is refused.

The table (WER/BLEU per set before/after healing, relative deltas vs the unpruned baseline), the fraction chosen by
the paper's rule and the path of ``report.md`` / ``report.html`` (written into ``--sweep.output_dir``) are printed.
The rule reads the validation sets; ``--sweep.test_sets '[test-clean]'`` (names in ``--data.test_sets``) then scores
the baseline and the chosen point once on those test sets, afterwards (``test.json``; printed too).
Rerunning with the same ``--sweep.output_dir`` resumes: finished points are read back, not recomputed.
"""
from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
from jsonargparse import ActionConfigFile, ArgumentError, ArgumentParser

from lightning_speechllm.checkpoints import load_module
from lightning_speechllm.config_utils import from_dict, parsed_values
from lightning_speechllm.data.datamodule import SpeechDataModule
from lightning_speechllm.evaluation.report import write_report
from lightning_speechllm.evaluation.sweep.run import (
    SweepConfig,
    SweepError,
    SweepPoint,
    SweepTable,
    describe_test,
    format_markdown,
    run_sweep,
    score_chosen_on_test,
)
from lightning_speechllm.model.checkpoint import CheckpointError, read_checkpoint
from lightning_speechllm.model.module import DecodingConfig, SpeechLLMModule
from lightning_speechllm.model.speechllm import SpeechLLM, SpeechLLMConfig
from lightning_speechllm.precision import resolve_precision

__all__ = ["SweepArgs", "TrainerArgs", "build_parser", "decoding_differences", "main", "parse_args", "run"]

log = logging.getLogger(__name__)


@dataclass
class SweepArgs:
    """Options of the ``sweep`` command besides the groups. With --ckpt_path the model is rebuilt from that
    checkpoint's own model settings (--model.* is ignored; values given differently are logged) and trained weights;
    it must be the checkpoint of an unpruned model: a healing checkpoint (removed layers) is refused."""

    ckpt_path: str | None = None
    """SpeechLLMModule checkpoint of the unpruned model. The model is then rebuilt from the checkpoint's own model
    settings (the --model.* options are ignored; the ones given differently are logged) with its trained projector
    (and LoRA). A checkpoint of a pruned model (a healing checkpoint) is refused."""
    seed: int = 0
    """Seed of the projector initialisation when no checkpoint is given, and of healing."""
    report: bool = True
    """Write report.md / report.html into --sweep.output_dir."""
    redundancy_dir: str | None = None
    """Redundancy output to include in the report (default: <output_dir>/redundancy, else the folder the map is in)."""
    efficiency_json: str | None = None
    """Efficiency result (`efficiency --json_out`) to include in the report (default: <output_dir>/efficiency.json)."""


@dataclass
class TrainerArgs:
    """Lightning Trainer options used for scoring and healing."""

    accelerator: str = "auto"
    """cpu, gpu, auto ..."""
    devices: int = 1
    """Devices (scoring and healing run on one process)."""
    precision: str | None = None
    """e.g. bf16-mixed or 32-true (default: what the hardware computes natively: bf16-mixed on a GPU or CPU with
    native bf16, else 32-true; one printed line says which and why)."""


def build_parser() -> ArgumentParser:
    """jsonargparse parser: command flags, ``--sweep.*``, ``--model.*``, ``--data.*``, ``--decoding.*``,
    ``--trainer.*`` and ``--config``."""
    parser = ArgumentParser(prog="python -m lightning_speechllm sweep", description=__doc__.split("\n")[0],
                            print_config="--print_config", exit_on_error=False)
    parser.add_argument("--config", action=ActionConfigFile, help="YAML file with any of the options below")
    parser.add_class_arguments(SweepArgs, as_group=True, help=" ".join(SweepArgs.__doc__.split()))
    parser.add_class_arguments(SweepConfig, "sweep", help="Sweep points, healing, thresholds, output directory.")
    parser.add_class_arguments(SpeechLLMConfig, "model", help="The unpruned SpeechLLM.")
    parser.add_class_arguments(SpeechDataModule, "data",
                               help="Evaluation sets (--data.val_sets name: manifest) and, to heal, --data.train.")
    parser.add_class_arguments(DecodingConfig, "decoding", help="Decoding for WER/BLEU (greedy by default).")
    parser.add_class_arguments(TrainerArgs, "trainer", help="Lightning Trainer options.")
    return parser


def parse_args(argv: list[str] | None = None) -> dict[str, Any]:
    """Parse ``argv`` into ``{"args", "sweep", "model", "data", "decoding", "trainer"}`` (dataclasses / kwargs)."""
    values = parsed_values(build_parser().parse_args(argv))
    return {"args": SweepArgs(**{key: values[key] for key in SweepArgs.__dataclass_fields__}),
            "sweep": from_dict(SweepConfig, values["sweep"]), "model": from_dict(SpeechLLMConfig, values["model"]),
            "data": dict(values["data"]), "decoding": from_dict(DecodingConfig, values["decoding"]),
            "trainer": from_dict(TrainerArgs, values["trainer"])}


def build_model(model: SpeechLLMConfig, ckpt_path: str | None) -> SpeechLLM:
    """The unpruned SpeechLLM of ``model``, or, with ``ckpt_path``, the one rebuilt from the checkpoint by
    :func:`~lightning_speechllm.checkpoints.load_module` (its own model settings win over ``model``). A
    checkpoint whose model has removed layers (a healing checkpoint) is refused: a sweep starts unpruned."""
    if ckpt_path is None:
        return SpeechLLMModule(model=model).speechllm
    try:
        module = load_module(ckpt_path, requested=model, allow_pruned=False)
    except CheckpointError as error:
        raise SweepError(f"--ckpt_path: {error}; a sweep prunes from the unpruned model (e.g. the checkpoint of "
                         "the `fit` run that trained its projector)") from error
    return module.speechllm


def decoding_differences(ckpt_path: str, decoding: DecodingConfig) -> dict[str, tuple[int, int]]:
    """``{setting: (the sweep's, the checkpoint's)}`` for the decoding settings in which the sweep differs from the
    `fit` run that wrote ``ckpt_path`` (its validation and test decoded with the checkpoint's): the two WERs of one
    model then differ by these too."""
    saved = from_dict(DecodingConfig, read_checkpoint(ckpt_path)["hyper_parameters"].get("decoding"))
    return {key: (getattr(decoding, key), getattr(saved, key)) for key in ("max_new_tokens", "num_beams")
            if getattr(decoding, key) != getattr(saved, key)}


def build_datamodule(data: dict[str, Any], sweep: SweepConfig) -> L.LightningDataModule:
    """A :class:`SpeechDataModule` restricted to ``sweep.sets`` (of the val or test sets, per ``sweep.stage``)."""
    key = "val_sets" if sweep.stage == "validate" else "test_sets"
    sets = dict(data.get(key) or {})
    if not sets:
        raise SweepError(f"--data.{key} is empty: give at least one name: manifest to score")
    if sweep.sets is not None:
        unknown = [name for name in sweep.sets if name not in sets]
        if unknown:
            raise SweepError(f"--sweep.sets names {unknown}, not in --data.{key} ({sorted(sets)})")
        data = {**data, key: {name: sets[name] for name in sweep.sets}}
    if sweep.test_sets:
        test_sets = dict(data.get("test_sets") or {})
        unknown = [name for name in sweep.test_sets if name not in test_sets]
        if unknown:
            raise SweepError(f"--sweep.test_sets names {unknown}, not in --data.test_sets ({sorted(test_sets)})")
        data = {**data, "test_sets": {name: test_sets[name] for name in sweep.test_sets}}
    if (sweep.heal or sweep.compare_methods) and not data.get("train"):
        raise SweepError("--sweep.heal and --sweep.compare_methods heal: give training data with --data.train")
    return SpeechDataModule(**data)


def _redundancy_dir(args: SweepArgs, sweep: SweepConfig) -> Path | None:
    if args.redundancy_dir:
        return Path(args.redundancy_dir)
    if (Path(sweep.output_dir) / "redundancy").is_dir() or not sweep.map_path:
        return None
    parents = Path(sweep.map_path).parents  # .../redundancy/<set>/<modality>/epoch=E.json
    return parents[2] if len(parents) > 2 and parents[2].is_dir() else None


def run(parsed: dict[str, Any], speechllm: SpeechLLM | None = None, datamodule: L.LightningDataModule | None = None
        ) -> tuple[SweepTable | list, SweepPoint | None, Path | None, dict[str, Any] | None]:
    """Run the sweep (``speechllm`` / ``datamodule`` inject ready-made ones), score the chosen point on
    ``--sweep.test_sets`` and write the report; returns the table, the chosen point, the report.md path (None with
    ``--report false``) and the test result (None without test sets or chosen point). With
    ``--sweep.compare_methods``: the comparison's rows, then None three times (its outputs are comparison.*)."""
    args, sweep = parsed["args"], parsed["sweep"]
    sweep.check()
    L.seed_everything(args.seed, verbose=False)
    datamodule = datamodule or build_datamodule(parsed["data"], sweep)
    speechllm = speechllm or build_model(parsed["model"], args.ckpt_path)
    if args.ckpt_path:
        differences = decoding_differences(args.ckpt_path, parsed["decoding"])
        if differences:
            log.warning("sweep decodes with %s, the checkpoint's run with %s: its WER/BLEU are not comparable with "
                        "that run's (set --decoding.* to the checkpoint's values to compare)",
                        {k: ours for k, (ours, _) in differences.items()},
                        {k: theirs for k, (_, theirs) in differences.items()})
    trainer = parsed["trainer"]
    trainer_kwargs = {"accelerator": trainer.accelerator, "devices": trainer.devices,
                      "precision": resolve_precision(trainer.precision, trainer.accelerator)}
    if sweep.compare_methods:
        from lightning_speechllm.evaluation.method_comparison import compare_methods

        rows = compare_methods(speechllm, datamodule, sweep, decoding=parsed["decoding"], trainer_kwargs=trainer_kwargs)
        return rows, None, None, None
    table, chosen = run_sweep(speechllm, datamodule, sweep, decoding=parsed["decoding"], trainer_kwargs=trainer_kwargs)
    L.seed_everything(args.seed, verbose=False)  # the chosen point's second healing starts from the same seed
    test = score_chosen_on_test(speechllm, datamodule, sweep, chosen, decoding=parsed["decoding"],
                                trainer_kwargs=trainer_kwargs)
    report = None
    if args.report:
        report, _ = write_report(sweep.output_dir, sweep_dir=sweep.output_dir,
                                 redundancy_dir=_redundancy_dir(args, sweep), efficiency_json=args.efficiency_json)
    return table, chosen, report, test


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m lightning_speechllm sweep``; returns an exit code (2 on bad input)."""
    try:
        parsed = parse_args(argv)
    except SystemExit as stop:  # --help, --print_config, or a parse error already reported by jsonargparse
        return stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 2)
    except ArgumentError as error:
        print(f"sweep: error: {error}", file=sys.stderr)
        return 2
    try:
        table, chosen, report, test = run(parsed)
    except (FileNotFoundError, KeyError, ValueError) as error:  # SweepError / PlanError are ValueErrors
        print(f"sweep: error: {error}", file=sys.stderr)
        return 2
    sweep = parsed["sweep"]
    if sweep.compare_methods:
        from lightning_speechllm.evaluation.method_comparison import summary_markdown

        print(summary_markdown(table), end="")
        print(f"method comparison in {sweep.output_dir} (comparison.md/.csv/.json/.png)")
        return 0
    print(format_markdown(table, sweep.thresholds, chosen), end="")
    print(f"chosen fraction: {'none' if chosen is None else f'{chosen.removed_fraction:.3f}'}")
    if test is not None:
        print(describe_test(test))
    elif sweep.test_sets:
        print(f"test sets {sweep.test_sets} not scored: no sweep point passes the rule")
    print(f"sweep results in {sweep.output_dir}")
    if report is not None:
        print(f"report: {report}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
