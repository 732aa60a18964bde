"""``python -m lightning_speechllm heal``: heal a pruned SpeechLLM with LightningCLI (``fit`` of a HealingModule).

Examples::

    python -m lightning_speechllm heal --config configs/heal_kd.yaml
    python -m lightning_speechllm heal --config configs/heal_kd.yaml --ckpt_path last      # resume (newest)
    python -m lightning_speechllm heal --print_config > heal.yaml                          # every option is a key
    python -m lightning_speechllm heal --model.llm_path smollm2-135m --healing.plan_path plan.json \\
        --data.train data_cache/synth/train.jsonl --trainer.max_steps 5000

Iterative prune-heal rounds: add ``lightning_speechllm.healing.iterative.IterativePruning`` to
``trainer.callbacks`` (see that module).
"""
from __future__ import annotations

import warnings

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from lightning_speechllm.cli import TRAINER_DEFAULTS, HardwarePrecision, SafeResume
from lightning_speechllm.data.datamodule import SpeechDataModule
from lightning_speechllm.healing.module import HealingConfig, HealingModule
from lightning_speechllm.model.module import DecodingConfig, OptimConfig
from lightning_speechllm.model.speechllm import SpeechLLMConfig
from lightning_speechllm.preemption import ResumeLast, with_preemption_checkpoint
from lightning_speechllm.progress import hide_lightning_product_tips, progress_defaults

__all__ = ["HealingCLI", "main"]

HEAL_TRAINER_DEFAULTS = {**TRAINER_DEFAULTS, "default_root_dir": "checkpoints/heal"}


class HealingCLI(SafeResume, ResumeLast, HardwarePrecision, LightningCLI):
    """LightningCLI bound to HealingModule + SpeechDataModule (fit only); ``--ckpt_path`` is read as data only."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """Show the full nested model / healing / optim / decoding configs (not null) in ``--print_config``."""
        parser.set_defaults({"model.model": SpeechLLMConfig(), "model.healing": HealingConfig(),
                             "model.optim": OptimConfig(), "model.decoding": DecodingConfig()})


def main(argv: list[str] | None = None) -> int:
    """Run ``fit`` of a HealingModule; ``argv`` are the LightningCLI options (``--config``, ``--ckpt_path`` ...)."""
    import sys

    warnings.filterwarnings("ignore", message=".*args parameter is intended to run from within Python.*")
    args = list(sys.argv[1:] if argv is None else argv)
    hide_lightning_product_tips()
    try:
        HealingCLI(
            HealingModule, SpeechDataModule, args=["fit", *args],
            trainer_defaults=with_preemption_checkpoint({**HEAL_TRAINER_DEFAULTS, **progress_defaults()}),
            save_config_kwargs={"overwrite": True}, seed_everything_default=0, auto_configure_optimizers=False,
        )
    except SystemExit as stop:  # --help / --print_config / argument errors exit through jsonargparse
        return int(stop.code or 0) if isinstance(stop.code, int) or stop.code is None else 2
    return 0
