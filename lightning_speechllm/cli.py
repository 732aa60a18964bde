"""LightningCLI front end for fit / validate / test / predict: every option is a YAML key, `--print_config` works."""
from __future__ import annotations

import warnings

from lightning.pytorch.cli import LightningCLI

from lightning_speechllm.data.datamodule import SpeechDataModule
from lightning_speechllm.model.module import SpeechLLMModule

TRAINER_DEFAULTS = {
    # The Lhotse samplers shard batches across ranks themselves.
    "use_distributed_sampler": False,
    "default_root_dir": "checkpoints/runs",
}


class SpeechLLMCLI(LightningCLI):
    """LightningCLI bound to SpeechLLMModule + SpeechDataModule."""


def run(subcommand: str, argv: list[str]) -> int:
    warnings.filterwarnings("ignore", message=".*args parameter is intended to run from within Python.*")
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
