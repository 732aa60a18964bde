"""LightningCLI front end for fit / validate / test / predict: every option is a YAML key, `--print_config` works."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

from lightning.pytorch.cli import LightningCLI

from lightning_speechllm.data.datamodule import SpeechDataModule
from lightning_speechllm.model.module import SpeechLLMModule

TRAINER_DEFAULTS = {
    # The Lhotse samplers shard batches across ranks themselves.
    "use_distributed_sampler": False,
    "default_root_dir": "checkpoints/runs",
}


DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "default.yaml"
DEFAULT_CORPUS = Path("data_cache/synth")


class SpeechLLMCLI(LightningCLI):
    """LightningCLI bound to SpeechLLMModule + SpeechDataModule; synthesizes the default corpus when it is used."""

    def before_instantiate_classes(self) -> None:
        config = self.config.get(self.subcommand, self.config)
        manifests = [config.data.train, *(config.data.val_sets or {}).values(), *(config.data.test_sets or {}).values()]
        if any(m and Path(str(m)).parent == DEFAULT_CORPUS and not Path(str(m)).exists() for m in manifests):
            from lightning_speechllm.data.synth import synthesize_corpus

            print(f"synthesizing the default espeak-ng corpus into {DEFAULT_CORPUS}/ (once, about 2 minutes)")
            synthesize_corpus(DEFAULT_CORPUS)

    def after_fit(self) -> None:
        """Print the last validation scores and write report.md/html (redundancy maps, agreement) into the run."""
        from lightning_speechllm.evaluation.report import write_report

        if not self.trainer.is_global_zero:
            return
        scores = {k: round(float(v), 4) for k, v in sorted(self.trainer.callback_metrics.items())
                  if k.startswith("val/") and k.count("/") == 2}
        print("last validation:", json.dumps(scores))
        run_dir = Path(self.trainer.log_dir or self.trainer.default_root_dir)
        markdown, page = write_report(run_dir, title="lightning_speechllm fit")
        checkpoints = self.trainer.checkpoint_callback.dirpath if self.trainer.checkpoint_callback else run_dir
        print(f"report: {markdown} and {page}; checkpoints in {checkpoints}")


def run(subcommand: str, argv: list[str]) -> int:
    """Run a LightningCLI subcommand; with no options at all, `fit` uses configs/default.yaml (the embedded default)."""
    warnings.filterwarnings("ignore", message=".*args parameter is intended to run from within Python.*")
    if not argv and subcommand == "fit" and DEFAULT_CONFIG.is_file():
        argv = ["--config", str(DEFAULT_CONFIG)]
    SpeechLLMCLI(
        SpeechLLMModule, SpeechDataModule, args=[subcommand, *argv], trainer_defaults=TRAINER_DEFAULTS,
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
