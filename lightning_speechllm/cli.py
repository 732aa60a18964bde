"""LightningCLI front end for fit / validate / test / predict: every option is a YAML key, `--print_config` works."""
from __future__ import annotations

import json
import time
import warnings
from dataclasses import asdict
from pathlib import Path

from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI

from lightning_speechllm.data.datamodule import SpeechDataModule
from lightning_speechllm.data.default_corpora import prepare_default_corpora
from lightning_speechllm.io_utils import atomic_write_text
from lightning_speechllm.model.checkpoint import check_checkpoint_file
from lightning_speechllm.model.module import SpeechLLMModule
from lightning_speechllm.precision import resolve_precision
from lightning_speechllm.preemption import ResumeLast, with_preemption_checkpoint
from lightning_speechllm.progress import hide_lightning_product_tips, progress_defaults

TRAINER_DEFAULTS = {
    # The Lhotse samplers shard batches across ranks themselves.
    "use_distributed_sampler": False,
    "default_root_dir": "checkpoints/runs",
}


DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "default.yaml"


class SafeResume:
    """LightningCLI mixin: a ``--ckpt_path`` checkpoint is read as data (tensors, plain containers), never as code.

    Lightning hands ``--weights_only`` (default None) to ``torch.load`` when it resumes; None means torch's own
    default, True since torch 2.6 but False under ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1`` and on older torch, so our
    default is an explicit True. A checkpoint file holding anything else is refused before Lightning opens it, with a
    CheckpointError naming the file and the offending object (Lightning's own refusal names neither).
    """

    def parse_arguments(self, parser: LightningArgumentParser, args: ArgsType) -> None:
        parser.set_defaults({f"{subcommand}.weights_only": True for subcommand in self.subcommands()})
        super().parse_arguments(parser, args)  # type: ignore[misc]
        config = self.config.get(str(self.config.get("subcommand")), self.config)  # type: ignore[attr-defined]
        ckpt_path = config.get("ckpt_path")
        if ckpt_path and Path(ckpt_path).is_file():  # "last", "best" ...: Lightning finds them, weights_only=True
            check_checkpoint_file(ckpt_path)


class HardwarePrecision:
    """LightningCLI mixin: an unset ``trainer.precision`` becomes the one the hardware runs natively (bf16-mixed or
    32-true, :func:`~lightning_speechllm.precision.choose_precision`); a set one wins. One printed line says which
    and why."""

    def before_instantiate_classes(self) -> None:
        config = self.config.get(self.subcommand, self.config)  # type: ignore[attr-defined]
        trainer = config.trainer
        trainer.precision = resolve_precision(trainer.precision, trainer.accelerator)
        super().before_instantiate_classes()  # type: ignore[misc]


class SpeechLLMCLI(SafeResume, ResumeLast, HardwarePrecision, LightningCLI):
    """LightningCLI bound to SpeechLLMModule + SpeechDataModule; prepares the default corpora when they are used."""

    def before_instantiate_classes(self) -> None:
        self._created = time.monotonic()  # preparing the corpora and loading the models come next
        super().before_instantiate_classes()
        config = self.config.get(self.subcommand, self.config)
        prepare_default_corpora(config.data)
        trainer = config.trainer
        if self.subcommand == "fit" and trainer.val_check_interval is None and trainer.check_val_every_n_epoch is None \
                and (trainer.max_steps or -1) > 0:
            trainer.val_check_interval = trainer.max_steps  # validate (and checkpoint) once, at the last step

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--test_after_fit", type=bool, default=False,
                            help="After `fit`, test the best checkpoint (by the ModelCheckpoint monitor; the last "
                                 "weights without one) on the datamodule's test sets; scores go to scores.json and "
                                 "the report.")

        parser.add_argument("--anchor_sets", type=list[str] | None, default=None,
                            help="Validation/test set names scored also by Whisper tiny.en's own decoder (the "
                                 "anchor, cached in data_cache/anchor), written beside the model's WER in scores.json "
                                 "and the report. Default: every set whose manifest folder's prepare.json marks real "
                                 "speech (data prepare real_speakers / asterisk); [] for none.")

    def before_fit(self) -> None:
        self._fit_started = time.monotonic()

    def after_fit(self) -> None:
        """Test the best checkpoint (with --test_after_fit), print the scores and write scores.json and
        report.md/html (scores, examples, redundancy maps, agreement) into the run directory."""
        seconds = {"startup": self._fit_started - self._created, "fit (encoder cache, training, validation)":
                   time.monotonic() - self._fit_started}
        validation = _scores(self.trainer.callback_metrics, "val/")
        test_started = time.monotonic()
        test = self._test_best() if self.config[self.subcommand].get("test_after_fit") else {}
        if test:
            seconds["test"] = time.monotonic() - test_started
        summary = {"global_step": self.trainer.global_step, "seconds": seconds, "validation": validation,
                   "test": test, "test_checkpoint": self._best_checkpoint() if test else None}
        run_dir = self._write_summary(summary, examples=bool(test))
        if run_dir is not None:
            self._print_sweep_command(run_dir)

    def before_validate(self) -> None:
        self._evaluation_started = time.monotonic()

    def after_validate(self) -> None:
        """Print the validation scores and write scores.json and the report (maps included) into the run directory."""
        summary = {"global_step": self.trainer.global_step, "seconds": self._evaluation_seconds("validate"),
                   "validation": _scores(self.trainer.callback_metrics, "val/"), "test": {}, "test_checkpoint": None}
        self._write_summary(summary, examples=False)

    def before_test(self) -> None:
        self._evaluation_started = time.monotonic()

    def after_test(self) -> None:
        """Print the test scores and write scores.json (with test examples) and the report into the run directory."""
        summary = {"global_step": self.trainer.global_step, "seconds": self._evaluation_seconds("test"),
                   "validation": {}, "test": _scores(self.trainer.callback_metrics, "test/"),
                   "test_checkpoint": self.trainer.ckpt_path}
        self._write_summary(summary, examples=True)

    def _evaluation_seconds(self, phase: str) -> dict[str, float]:
        return {"startup": self._evaluation_started - self._created, phase: time.monotonic() - self._evaluation_started}

    def _write_summary(self, summary: dict, examples: bool) -> Path | None:
        """On every rank: gather the test hypotheses and find the run directory (collectives); on rank 0: print the
        scores, write scores.json and report.md/html. Returns the run directory on rank 0, None elsewhere."""
        from lightning_speechllm.evaluation.report import write_report

        hypotheses = self.model.gathered_hypotheses() if examples else []
        run_dir = Path(self.trainer.log_dir or self.trainer.default_root_dir)  # a broadcast: every rank joins it
        if not self.trainer.is_global_zero:
            return None
        if summary["validation"]:
            print("last validation:", json.dumps(summary["validation"]))
        if summary["test"]:
            print(f"test ({'best checkpoint' if self.subcommand == 'fit' else summary['test_checkpoint']}):",
                  json.dumps(summary["test"]))
        summary = {**summary, "seconds": {k: round(v, 1) for k, v in summary["seconds"].items()},
                   "anchor": self._anchor(summary),
                   "test_examples": [asdict(h) for h in _examples_per_set(
                       hypotheses, getattr(self.datamodule, "test_set_names", None) or ())]}
        atomic_write_text(json.dumps(summary, indent=2), run_dir / "scores.json")
        markdown, page = write_report(run_dir, title=f"lightning_speechllm {self.subcommand}")
        checkpoints = self.trainer.checkpoint_callback.dirpath if self.trainer.checkpoint_callback else None
        print(f"report: {markdown} and {page}" + (f"; checkpoints in {checkpoints}"
                                                   if self.subcommand == "fit" and checkpoints else ""))
        return run_dir

    def _anchor(self, summary: dict) -> dict:
        """Whisper tiny.en's own WER on the real-speech sets that were scored (``--anchor_sets``), printed beside
        the model's; {} when none (a failure is a printed note, never an error of the run)."""
        config = self.config.get(self.subcommand, self.config)
        wanted = config.get("anchor_sets")
        stages = {"validation": getattr(self.datamodule, "val_sets", None) or {},
                  "test": getattr(self.datamodule, "test_sets", None) or {}}
        try:
            return anchor_summary(summary, stages, wanted)
        except Exception as err:  # noqa: BLE001 - the anchor is a reference number, not part of the run
            print(f"note: the Whisper anchor was not computed: {type(err).__name__}: {err}")
            return {}

    def _print_sweep_command(self, run_dir: Path) -> None:
        """The next step: the `sweep` of this run's best checkpoint along its latest speech map."""
        maps = sorted(run_dir.glob("redundancy/*/speech/epoch=*.json"), key=lambda p: p.stat().st_mtime)
        checkpoint = self._best_checkpoint()
        if maps and checkpoint:
            print("prune and heal this model along its speech map (configs/sweep/default.yaml fits the default run):\n"
                  f"  python -m lightning_speechllm sweep --config configs/sweep/default.yaml --ckpt_path {checkpoint} "
                  f"--sweep.map_path '{maps[-1]}'")

    def _best_checkpoint(self) -> str | None:
        callback = self.trainer.checkpoint_callback
        return callback.best_model_path if callback is not None and callback.best_model_path else None

    def _test_best(self) -> dict[str, float]:
        if not getattr(self.datamodule, "test_set_names", None):
            warnings.warn("--test_after_fit: the datamodule has no test sets; nothing tested", stacklevel=2)
            return {}
        self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path=self._best_checkpoint(), verbose=False)
        return _scores(self.trainer.callback_metrics, "test/")


def anchor_summary(summary: dict, stages: dict[str, dict], wanted: list[str] | None,
                   decoder=None, cache_dir: Path | str | None = None) -> dict:
    """``{stage: {set: anchor}}`` for the sets of each scored stage that are real speech (``wanted`` None) or named
    in ``wanted``; prints each anchor beside the model's WER."""
    from lightning_speechllm.evaluation.anchor import DEFAULT_CACHE_DIR, anchor_scores, is_real_speech

    out: dict = {}
    for stage, sets in stages.items():
        scores = summary.get(stage) or {}
        prefix = "val" if stage == "validation" else "test"
        chosen = {name: path for name, path in sets.items() if f"{prefix}/{name}/wer" in scores
                  and (name in wanted if wanted is not None else is_real_speech(str(path)))}
        if not chosen:
            continue
        # chosen above: named sets count as real speech whatever their prepare.json says
        results = anchor_scores(chosen, decoder, cache_dir=cache_dir or DEFAULT_CACHE_DIR, real_only=False)
        for name, result in results.items():
            print(f"anchor ({result['model']}'s own decoder) on {stage} set {name}: WER {result['wer']:.1f}% "
                  f"(this model: {scores[f'{prefix}/{name}/wer']:.1f}%)")
        if results:
            out[stage] = results
    return out


def _examples_per_set(hypotheses: list, set_names: list[str] | tuple[str, ...] = (), per_set: int = 8) -> list:
    """The first `per_set` hypotheses of each test set, sets in `set_names` order (then first appearance), ids
    sorted within a set: the examples do not depend on the number of ranks."""
    counts: dict[str, int] = {}
    picked = []
    first_seen = [*set_names, *dict.fromkeys(h.set_name for h in hypotheses)]
    set_order = {name: first_seen.index(name) for name in first_seen}
    for hypothesis in sorted(hypotheses, key=lambda h: (set_order[h.set_name], h.id)):
        counts[hypothesis.set_name] = counts.get(hypothesis.set_name, 0) + 1
        if counts[hypothesis.set_name] <= per_set:
            picked.append(hypothesis)
    return picked


def _scores(metrics: dict, prefix: str) -> dict[str, float]:
    """Per-set scores (`<stage>/<set>/<metric>`) from Lightning's callback metrics, rounded for printing."""
    return {k: round(float(v), 4) for k, v in sorted(metrics.items()) if k.startswith(prefix) and k.count("/") == 2}


def with_embedded_default(subcommand: str, argv: list[str]) -> list[str]:
    """`fit` without a `--config` starts from configs/default.yaml (the embedded default), so options on the command
    line override it (`fit --trainer.max_steps 1000` trains the default longer); any `--config` replaces it."""
    if subcommand != "fit" or not DEFAULT_CONFIG.is_file() or _names_a_config(argv):
        return argv
    return ["--config", str(DEFAULT_CONFIG), *argv]


def _names_a_config(argv: list[str]) -> bool:
    return any(arg in ("--config", "-c") or arg.startswith("--config=") for arg in argv)


def run(subcommand: str, argv: list[str]) -> int:
    """Run a LightningCLI subcommand (`fit` starts from the embedded default unless a `--config` is given)."""
    warnings.filterwarnings("ignore", message=".*args parameter is intended to run from within Python.*")
    argv = with_embedded_default(subcommand, argv)
    hide_lightning_product_tips()
    trainer_defaults = {**TRAINER_DEFAULTS, **progress_defaults()}
    if subcommand == "fit":  # SIGTERM / SLURM's SIGUSR1: checkpoint at a step, stop, requeue (preemption.py)
        trainer_defaults = with_preemption_checkpoint(trainer_defaults)
    SpeechLLMCLI(
        SpeechLLMModule, SpeechDataModule, args=[subcommand, *argv], trainer_defaults=trainer_defaults,
        save_config_kwargs={"overwrite": True}, seed_everything_default=0, auto_configure_optimizers=False,
    )
    return 0


def fit(argv: list[str]) -> int:
    return run("fit", argv)


def validate(argv: list[str]) -> int:
    return run("validate", argv)


def test(argv: list[str]) -> int:
    return run("test", argv)


def predict(argv: list[str]) -> int:
    return run("predict", argv)
