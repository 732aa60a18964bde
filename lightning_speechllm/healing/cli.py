"""``python -m lightning_speechllm heal``: heal a pruned SpeechLLM with LightningCLI (``fit`` of a HealingModule).

Examples::

    python -m lightning_speechllm heal --config configs/heal_kd.yaml
    python -m lightning_speechllm heal --config configs/heal_kd.yaml --ckpt_path last      # resume (newest)
    python -m lightning_speechllm heal --print_config > heal.yaml                          # every option is a key
    python -m lightning_speechllm heal --config configs/heal/linear_patch.yaml ...        # training-free (no step)
    python -m lightning_speechllm heal --model.llm_path smollm2-135m --healing.plan_path plan.json \\
        --data.train data_cache/synth/train.jsonl --trainer.max_steps 5000

Iterative prune-heal rounds: add ``lightning_speechllm.healing.iterative.IterativePruning`` to
``trainer.callbacks`` (see that module).
"""
from __future__ import annotations

import warnings
from pathlib import Path

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from lightning_speechllm.cli import TRAINER_DEFAULTS, HardwarePrecision, SafeResume
from lightning_speechllm.data.datamodule import SpeechDataModule
from lightning_speechllm.healing.module import HealingConfig, HealingModule
from lightning_speechllm.model.module import DecodingConfig, OptimConfig
from lightning_speechllm.model.speechllm import SpeechLLMConfig
from lightning_speechllm.preemption import ResumeLast, with_preemption_checkpoint
from lightning_speechllm.progress import hide_lightning_product_tips, progress_defaults

__all__ = ["HealingCLI", "main", "save_training_free"]

HEAL_TRAINER_DEFAULTS = {**TRAINER_DEFAULTS, "default_root_dir": "checkpoints/heal"}
LINEAR_PATCH_CHECKPOINT = "linear_patch.ckpt"


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
        cli = HealingCLI(
            HealingModule, SpeechDataModule, args=["fit", *args],
            trainer_defaults=with_preemption_checkpoint({**HEAL_TRAINER_DEFAULTS, **progress_defaults()}),
            save_config_kwargs={"overwrite": True}, seed_everything_default=0, auto_configure_optimizers=False,
        )
    except SystemExit as stop:  # --help / --print_config / argument errors exit through jsonargparse
        return int(stop.code or 0) if isinstance(stop.code, int) or stop.code is None else 2
    save_training_free(cli.trainer, cli.model)
    return 0


def save_training_free(trainer, module: HealingModule) -> None:
    """`--trainer.max_steps 0` with `healing.linear_patch`: no step ran, so no checkpoint callback fired; the patched
    model is saved as <default_root_dir>/linear_patch.ckpt (`export --ckpt`, `test --ckpt_path` read it)."""
    if trainer.global_step != 0 or module.linear_patch is None:
        return
    path = Path(trainer.default_root_dir) / LINEAR_PATCH_CHECKPOINT
    trainer.save_checkpoint(path, weights_only=False)  # the full state: a later `heal --ckpt_path` resumes it
    if trainer.is_global_zero:
        print(f"training-free healing (linear patch, no step): {path}")
