"""The run state the phases hand on to each other, and the model, data, trainer and settings they build from it."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .options import Options
from .timing import Counts


@dataclass
class Context:
    """What the phases hand on to each other."""

    opts: Options
    work_dir: Path
    paths: dict[str, Path] = field(default_factory=dict)
    counts: Counts | None = None
    removed_layers: list[int] = field(default_factory=list)
    fit: dict[str, Any] = field(default_factory=dict)
    reloaded: Any = None
    fit_step_s: float | None = None

    def release_for(self, phase: str) -> None:
        """Drop what `phase` does not use (the fitted model, the reloaded one) before its peak memory is reset."""
        if phase not in ("validate", "checkpoint"):
            self.fit.clear()
        if phase != "heal":
            self.reloaded = None


def model_config(ctx: Context) -> Any:
    from lightning_speechllm.model.projector import ProjectorConfig
    from lightning_speechllm.model.speechllm import SpeechLLMConfig

    return SpeechLLMConfig(llm_path=str(ctx.paths["llm"]), encoder_path=str(ctx.paths["whisper"]),
                           llm_dtype=ctx.opts.llm_dtype, encoder_dtype=ctx.opts.encoder_dtype,
                           projector=ProjectorConfig(downsample=5, hidden_dim=ctx.opts.sizes.projector_hidden))


def datamodule(ctx: Context) -> Any:
    from lightning_speechllm.data.datamodule import SpeechDataModule

    sizes = ctx.opts.sizes
    return SpeechDataModule(train=str(ctx.paths["train"]), val_sets={"val": str(ctx.paths["val"])},
                            max_duration=sizes.max_duration, max_cuts=sizes.max_cuts, seed=0,
                            num_workers=sizes.num_workers, pin_memory=ctx.opts.cuda)


def trainer(ctx: Context, name: str, max_steps: int = -1, callbacks: list | None = None, strategy: Any = "auto",
            validate: bool = False) -> Any:
    import lightning as L

    return L.Trainer(accelerator="gpu" if ctx.opts.cuda else "cpu", devices=1, strategy=strategy,
                     precision=ctx.opts.precision, max_steps=max_steps, limit_val_batches=None if validate else 0,
                     num_sanity_val_steps=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, use_distributed_sampler=False, log_every_n_steps=1,
                     callbacks=callbacks or [], default_root_dir=str(ctx.work_dir / "runs" / name))


def optim_config() -> Any:
    from lightning_speechllm.model.module import OptimConfig

    return OptimConfig(lr=1e-4, warmup_steps=2, schedule="constant")


def decoding_config(ctx: Context, generate: bool = True) -> Any:
    from lightning_speechllm.model.module import DecodingConfig

    return DecodingConfig(max_new_tokens=ctx.opts.sizes.max_new_tokens, generate_in_validation=generate)


def trainable_params(module: Any) -> int:
    mask = module.speechllm.layer_mask
    with mask.active(range(mask.num_layers)):
        return sum(p.numel() for p in module.parameters() if p.requires_grad)
