"""`SpeechLLMModule`: the LightningModule that trains a SpeechLLM (projector, optional LoRA) and scores it.

Checkpoints hold only what trains (projector, LoRA, a tuned encoder) plus the base model paths in the hyper-parameters,
never a second copy of the frozen decoder.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from lightning.pytorch.utilities.warnings import PossibleUserWarning
from torch import nn
from torchmetrics.aggregation import SumMetric

from lightning_speechllm.config_utils import from_dict
from lightning_speechllm.data.batch import SpeechBatch, is_padding_duplicate
from lightning_speechllm.data.manifest import TASKS
from lightning_speechllm.evaluation import FailureModeCounts, WordErrorCounts, corpus_bleu_metric
from lightning_speechllm.model.speechllm import IGNORE_INDEX, SpeechLLM, SpeechLLMConfig

STATE_PREFIX = "speechllm."
EVAL_SPLITS = {"fit": ("val",), "validate": ("val",), "test": ("test",)}
"""Trainer stage -> the metric stages whose sets it evaluates."""


@dataclass
class OptimConfig:
    """AdamW with linear warm-up then decay."""

    lr: float = 1e-4
    """Peak learning rate."""
    lora_lr: float | None = None
    """Peak learning rate of the LoRA adapters (same schedule); None: `lr`. The projector trains well at 1e-2, far
    above what LoRA on a pretrained decoder tolerates."""
    weight_decay: float = 0.0
    """Decoupled weight decay."""
    betas: tuple[float, float] = (0.9, 0.999)
    """Adam betas."""
    eps: float = 1e-8
    """Adam epsilon (added to the root of the second moment)."""
    warmup_steps: int = 100
    """Linear warm-up steps from 0 to `lr`."""
    schedule: str = "linear"
    """Decay after warm-up: 'linear' (to `min_lr_ratio * lr` at the last step), 'cosine' or 'constant'."""
    min_lr_ratio: float = 0.0
    """Floor of the decay, as a fraction of `lr`."""
    decay_fraction: float = 1.0
    """Share of the post-warm-up steps the decay takes, at the end; the LR stays at `lr` before it
    (warmup-stable-decay). 1.0 decays from the end of warm-up on."""
    ctc_warmup_steps: int = 0
    """Optimizer steps at the start that train the projector alone, with CTC against the transcript's tokens scored
    by the decoder's own embedding table (``SpeechLLM.alignment_loss``: no decoder pass, a few times cheaper than a
    decoder step). Then the optimizer state is reset and the cross-entropy through the decoder takes over with its own
    warm-up and the decay over the remaining steps. 0 (the default): cross-entropy from the start. Measured on the
    embedded default (fp32, 24 s batches): 150 CTC steps took 4 min on 2 busy cores, but the cross-entropy after them
    sat on the same plateau (loss 3.3 after 70-90 steps) as without them, so it is off by default."""
    ctc_weight: float = 0.0
    """Weight of that CTC alignment loss added to the cross-entropy at every step after the CTC warm-up (a joint
    auxiliary loss: no extra decoder pass, one speech-by-vocabulary product). 0 (the default): cross-entropy alone.
    Measured on the embedded default (fp32, peak LR 1e-2, weight 0.2): cross-entropy 3.26 against 2.44 without it at
    step 120, and steps 40% slower (the product over SmolLM2's 49k-token table), so it is off by default."""


@dataclass
class DecodingConfig:
    """How hypotheses are produced during validation and test."""

    max_new_tokens: int = 96
    """Longest hypothesis in tokens."""
    num_beams: int = 1
    """1 = greedy (the paper); > 1 = beam search."""
    generate_in_validation: bool = True
    """Decode during validation (for WER/BLEU and callbacks); False logs only the loss."""


@dataclass
class Hypothesis:
    """One decoded utterance, kept for metrics and callbacks."""

    set_name: str
    id: str
    task: str
    reference: str
    hypothesis: str


def lr_lambda(step: int, warmup: int, total: int, schedule: str, floor: float, decay_fraction: float = 1.0) -> float:
    """Multiplier of the peak LR at optimiser step `step`: linear warm-up, the peak, then the decay over the last
    `decay_fraction` of the post-warm-up steps."""
    if not 0.0 < decay_fraction <= 1.0:
        raise ValueError(f"decay_fraction must be in (0, 1], got {decay_fraction}")
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant" or total <= warmup:
        return 1.0
    decay_start = total - round(decay_fraction * (total - warmup))
    if step < decay_start:
        return 1.0
    progress = min(1.0, (step - decay_start) / max(1, total - decay_start))
    if schedule == "linear":
        return floor + (1.0 - floor) * (1.0 - progress)
    if schedule == "cosine":
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown LR schedule {schedule!r}; expected 'linear', 'cosine' or 'constant'")


def phased_lr_lambda(step: int, cfg: OptimConfig, total: int) -> float:
    """The LR multiplier with a CTC warm-up: its steps warm up to the peak and stay there; the cross-entropy phase
    after it has its own warm-up and decays over the remaining steps (:func:`lr_lambda` each)."""
    ctc = cfg.ctc_warmup_steps
    if step < ctc:
        return lr_lambda(step, cfg.warmup_steps, ctc, "constant", cfg.min_lr_ratio)
    return lr_lambda(step - ctc, cfg.warmup_steps, total - ctc, cfg.schedule, cfg.min_lr_ratio, cfg.decay_fraction)


class SpeechLLMModule(L.LightningModule):
    """Train and evaluate a SpeechLLM; every validation set is logged under its own name."""

    def __init__(self, model: SpeechLLMConfig = SpeechLLMConfig(), optim: OptimConfig = OptimConfig(),
                 decoding: DecodingConfig = DecodingConfig(), speechllm: SpeechLLM | None = None) -> None:
        """`speechllm` injects an already built model (tests, notebooks); otherwise `model` says what to load."""
        super().__init__()
        self.model_config = from_dict(SpeechLLMConfig, speechllm.config if speechllm else model)
        self.optim_config = from_dict(OptimConfig, optim)
        self.decoding = from_dict(DecodingConfig, decoding)
        self.save_hyperparameters({"model": asdict(self.model_config), "optim": asdict(self.optim_config),
                                   "decoding": asdict(self.decoding)})
        self.speechllm = speechllm or SpeechLLM.from_config(self.model_config)
        self.strict_loading = False  # checkpoints hold only the trainable weights; load_state_dict checks them
        self.eval_metrics = nn.ModuleDict()
        self.eval_counts = nn.ModuleDict()  # per metric key: utterances scored, summed across ranks
        self.failure_metrics = nn.ModuleDict()  # per "stage|set": loops, empties, max_new_tokens cut-offs
        self.hypotheses: list[Hypothesis] = []
        self.empty_batches = 0
        self.tokens_in_last_batch: torch.Tensor | int = 0  # LLM input tokens of the last training batch (a tensor:
        # read by the progress log only when it prints, so training never waits on the device for it)

    # ----------------------------------------------------------------------------------------------- steps
    def model_step(self, batch: SpeechBatch) -> tuple[torch.Tensor, Any]:
        """Shared by training, validation and test: teacher-forced cross-entropy on the target tokens."""
        loss, output, inputs = self.speechllm(batch)
        return loss, (output, inputs)

    def training_step(self, batch: SpeechBatch, batch_idx: int) -> torch.Tensor:
        if len(batch) == 0:
            return self.empty_batch_loss()
        if self.in_ctc_warmup():
            loss, positions = self.speechllm.alignment_loss(batch)
            self.tokens_in_last_batch = positions
            self.log("train/ctc_loss", loss, batch_size=len(batch))
            self.log("train/loss", loss, prog_bar=True, batch_size=len(batch))
            return loss
        if self.optim_config.ctc_warmup_steps and self.global_step == self.optim_config.ctc_warmup_steps:
            self._reset_optimizer_state()  # CTC's gradient scale is not the cross-entropy's: Adam starts afresh
        loss, (_, inputs) = self.model_step(batch)
        self.tokens_in_last_batch = inputs.attention_mask.sum().detach()
        if self.optim_config.ctc_weight:
            self.log("train/ce_loss", loss, batch_size=len(batch))
            ctc, _ = self.speechllm.alignment_loss(batch)
            self.log("train/ctc_loss", ctc, batch_size=len(batch))
            loss = loss + self.optim_config.ctc_weight * ctc
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch))
        return loss

    def in_ctc_warmup(self) -> bool:
        """Whether this training step is one of the CTC warm-up's (``OptimConfig.ctc_warmup_steps``)."""
        return self.global_step < self.optim_config.ctc_warmup_steps

    def _reset_optimizer_state(self) -> None:
        for optimizer in self.trainer.optimizers:
            optimizer.state.clear()

    def validation_step(self, batch: SpeechBatch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step("val", batch, dataloader_idx)

    def test_step(self, batch: SpeechBatch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step("test", batch, dataloader_idx)

    def predict_step(self, batch: SpeechBatch, batch_idx: int, dataloader_idx: int = 0) -> list[dict[str, str]]:
        hyps = self.speechllm.generate(batch, self.decoding.max_new_tokens, self.decoding.num_beams)
        return [{"id": i, "hypothesis": h} for i, h in zip(batch.ids, hyps)]

    def empty_batch_loss(self) -> torch.Tensor:
        """A zero loss on every trainable weight, for a batch whose utterances were all rejected by the data layer
        (on_bad_sample='skip'): the step still runs, so DDP ranks stay in step; gradients are zero (AdamW's decoupled
        weight decay, if set, still applies)."""
        self.empty_batches += 1
        self.log("train/empty_batches", float(self.empty_batches))
        return self.zero_loss()

    def zero_loss(self) -> torch.Tensor:
        """0 attached to every trainable weight: backward (and DDP's gradient all-reduce) runs, gradients are zero."""
        return sum((p * 0.0).sum() for p in self.parameters() if p.requires_grad)

    def _eval_step(self, stage: str, batch: SpeechBatch, dataloader_idx: int) -> None:
        scored = [i for i, uid in enumerate(batch.ids) if not is_padding_duplicate(uid)]  # Lhotse's DDP padding
        # A batch of padding copies only is not scored, but under FSDP its forwards still run: every rank must join
        # the weight gathers of the same calls (the loss forward, and generation where the other ranks generate).
        if not scored and not (self.speechllm.sharded and len(batch)):
            return
        if scored and len(scored) < len(batch):
            batch = batch.subset(scored)
        loss, (_, inputs) = self.model_step(batch)
        if scored:
            self._log_eval_loss(stage, dataloader_idx, loss, inputs)
        if stage == "val" and not self.decoding.generate_in_validation:
            return
        output = self.speechllm.generate_with_details(batch, self.decoding.max_new_tokens, self.decoding.num_beams)
        if scored:
            self._update_metrics(stage, self.set_name(stage, dataloader_idx), batch, output.texts,
                                 output.hit_max_tokens)

    def _log_eval_loss(self, stage: str, dataloader_idx: int, loss: torch.Tensor, inputs: Any) -> None:
        """The set's loss, weighted by target tokens: the corpus's per-token loss, however it was batched or
        sharded."""
        set_name = self.set_name(stage, dataloader_idx)
        tokens = int((inputs.labels[:, 1:] != IGNORE_INDEX).sum())
        self.log(f"{stage}/{set_name}/loss", loss, batch_size=tokens, add_dataloader_idx=False, sync_dist=True)
        if stage == "val" and dataloader_idx == 0:
            self.log("val/loss", loss, batch_size=tokens, add_dataloader_idx=False, sync_dist=True, prog_bar=True)

    def _update_metrics(self, stage: str, set_name: str, batch: SpeechBatch, hyps: list[str],
                        hit_max_tokens: list[bool]) -> None:
        """Score ``hyps``; ``hit_max_tokens[i]``: the i-th ran out of ``max_new_tokens`` without a stop token."""
        for task in sorted(set(batch.tasks)):
            rows = [i for i, t in enumerate(batch.tasks) if t == task]
            metric, counter = self._metric(stage, set_name, task)
            counter.update(float(len(rows)))
            self._failure_metric(stage, set_name).update(
                [hyps[i] for i in rows], [hit_max_tokens[i] for i in rows], normalize=task == "asr")
            if task == "asr":
                metric.update([hyps[i] for i in rows], [batch.texts[i] for i in rows])
            else:
                metric.update([hyps[i] for i in rows], [[batch.texts[i]] for i in rows])
        self.hypotheses.extend(Hypothesis(set_name, uid, task, ref, hyp)
                               for uid, task, ref, hyp in zip(batch.ids, batch.tasks, batch.texts, hyps))

    def gathered_hypotheses(self) -> list[Hypothesis]:
        """The hypotheses of the last evaluation epoch from every rank (a collective under DDP: call it on all)."""
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return list(self.hypotheses)
        shards: list[list[Hypothesis] | None] = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(shards, self.hypotheses)
        return [hypothesis for shard in shards for hypothesis in shard or []]

    def _metric(self, stage: str, set_name: str, task: str) -> tuple[nn.Module, SumMetric]:
        """The metric of (stage, set, task) and its utterance counter; created here only when :meth:`setup` could
        not create them up front."""
        key = f"{stage}|{set_name}|{task}"
        if key not in self.eval_metrics:
            metric = WordErrorCounts() if task == "asr" else corpus_bleu_metric()
            self.eval_metrics[key] = metric.to(self.device)
            self.eval_counts[key] = SumMetric().to(self.device)
        return self.eval_metrics[key], self.eval_counts[key]

    def _failure_metric(self, stage: str, set_name: str) -> FailureModeCounts:
        """The failure-mode counts of (stage, set), over all its tasks; created like :meth:`_metric`'s."""
        key = f"{stage}|{set_name}"
        if key not in self.failure_metrics:
            self.failure_metrics[key] = FailureModeCounts().to(self.device)
        return self.failure_metrics[key]

    def setup(self, stage: str) -> None:
        """Create every (stage, set, task) metric of the datamodule's named sets before the first batch, so that all
        DDP ranks compute (and sync) the same metrics in the same order, whatever utterances their shards hold."""
        for split in EVAL_SPLITS.get(stage, ()):
            for set_name, tasks in self.expected_eval_tasks(split).items():
                for task in tasks:
                    self._metric(split, set_name, task)
                self._failure_metric(split, set_name)
        if stage == "fit":
            self._use_encoder_cache()

    def configure_model(self) -> None:
        """Shard the SpeechLLM with FSDP2 under :class:`~lightning_speechllm.model.sharding.FSDP2Strategy` (its device
        mesh is set); other strategies leave the model as it is."""
        mesh = self._device_mesh
        if mesh is None or self.speechllm.sharded:
            return
        strategy = self.trainer.strategy
        self.speechllm.shard(mesh["data_parallel"], getattr(strategy, "reshard_after_forward", True))

    def on_fit_start(self) -> None:
        """Say once which parts are frozen in eval mode, in place of Lightning's start-of-training warning about
        "modules in eval mode" (which our frozen parts would trigger on every run: that is intended, not a bug)."""
        frozen = self.speechllm.frozen_eval_parts()
        if frozen:
            warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode at the start of training",
                                    category=PossibleUserWarning)
            rank_zero_info(f"frozen, in eval mode (no dropout, SpecAugment or LayerDrop): {', '.join(frozen)}")

    def _use_encoder_cache(self) -> None:
        """Hand the datamodule this model's frozen encoder (moved to the training device) and its cache key, so that
        the train set's encoder outputs are computed once (the datamodule's ``encoder_cache``)."""
        datamodule = getattr(self.trainer, "datamodule", None)
        use_cache = getattr(datamodule, "use_encoder_cache", None)
        model = self.speechllm
        if not callable(use_cache) or getattr(datamodule, "encoder_cache", None) is None or model.encoder is None:
            return
        if model.config.train_encoder:
            warnings.warn("data.encoder_cache is ignored: the encoder trains (model.train_encoder)", stacklevel=2)
            return
        model.encoder.to(self.trainer.strategy.root_device)
        use_cache(model.encode_frames, model.encoder_cache_key(), model.encoder_description())

    def expected_eval_tasks(self, split: str) -> dict[str, tuple[str, ...]]:
        """{set name: tasks} of the datamodule's ``split`` ('val'/'test') sets: from its ``eval_set_tasks`` when it
        has one, else every task for each name in ``<split>_set_names``; empty without a datamodule (the metrics are
        then created lazily, which is safe on one process only)."""
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if datamodule is None:
            return {}
        eval_set_tasks = getattr(datamodule, "eval_set_tasks", None)
        if callable(eval_set_tasks):
            return {name: tuple(tasks) for name, tasks in eval_set_tasks(split).items()}
        return {name: TASKS for name in getattr(datamodule, f"{split}_set_names", None) or []}

    def on_validation_epoch_start(self) -> None:
        self.hypotheses = []

    def on_test_epoch_start(self) -> None:
        self.hypotheses = []

    def on_validation_epoch_end(self) -> None:
        self._log_metrics("val")

    def on_test_epoch_end(self) -> None:
        self._log_metrics("test")

    def _log_metrics(self, stage: str) -> None:
        """Compute every metric of ``stage`` on every rank (same keys, same order: the same collectives), and log
        those that scored at least one utterance on some rank (a count summed across ranks), with
        ``{stage}/{set}/utterances``: how many utterances the scores are of (a limited number of batches scores a
        subset, and a subset's WER is not the set's)."""
        utterances: dict[str, int] = {}
        for key, metric in sorted(self.eval_metrics.items()):
            metric_stage, set_name, task = key.split("|")
            if metric_stage != stage:
                continue
            counter = self.eval_counts[key]
            with warnings.catch_warnings():  # a rank whose shard had none of this set/task still joins the sync
                warnings.filterwarnings("ignore", message=r".*was called before the ``update`` method.*")
                scored = int(counter.compute())
                value = metric.compute()
            counter.reset()
            metric.reset()
            if scored == 0:
                continue
            utterances[set_name] = utterances.get(set_name, 0) + scored
            # The values are already global (synced metric states), so sync_dist's mean over ranks returns them.
            if task == "asr":
                self.log(f"{stage}/{set_name}/wer", 100 * value["wer"], add_dataloader_idx=False, sync_dist=True)
                for part in ("substitutions", "deletions", "insertions"):
                    self.log(f"{stage}/{set_name}/{part}", value[part].float(), add_dataloader_idx=False,
                             sync_dist=True)
                self.log(f"{stage}/{set_name}/insertion_rate", 100 * value["insertion_rate"],
                         add_dataloader_idx=False, sync_dist=True)
            else:
                self.log(f"{stage}/{set_name}/bleu", 100 * value, add_dataloader_idx=False, sync_dist=True)
        for set_name, count in utterances.items():
            self.log(f"{stage}/{set_name}/utterances", float(count), add_dataloader_idx=False, sync_dist=True)
        self._log_failure_modes(stage)

    def _log_failure_modes(self, stage: str) -> None:
        """Log ``{stage}/{set}/{loop,empty,max_tokens}_rate`` (percent of the set's hypotheses, all tasks) of every
        set that scored a hypothesis on some rank; computed on every rank in the same order, as in _log_metrics."""
        for key, metric in sorted(self.failure_metrics.items()):
            metric_stage, set_name = key.split("|")
            if metric_stage != stage:
                continue
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=r".*was called before the ``update`` method.*")
                value = metric.compute()
            metric.reset()
            if int(value["hypotheses"]) == 0:
                continue
            for rate in ("loop_rate", "empty_rate", "max_tokens_rate"):
                self.log(f"{stage}/{set_name}/{rate}", 100 * value[rate], add_dataloader_idx=False, sync_dist=True)

    def set_name(self, stage: str, dataloader_idx: int) -> str:
        """The validation/test set name the datamodule gave this dataloader (or '<stage><idx>')."""
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        names = getattr(datamodule, f"{stage}_set_names", None) or []
        return names[dataloader_idx] if dataloader_idx < len(names) else f"{stage}{dataloader_idx}"

    # ------------------------------------------------------------------------------------------ optimisation
    def configure_optimizers(self) -> dict:
        named = [(name, p) for name, p in self.named_parameters() if p.requires_grad]
        if not named:
            projector = self.speechllm.projector
            why = (" (this model's projector has no weights: its audio tower projects to the decoder itself, so train "
                   "model.train_encoder or LoRA)"
                   if projector is not None and next(projector.parameters(), None) is None else "")
            raise ValueError(f"nothing to train: the projector, encoder and LoRA are all frozen{why}")
        cfg = self.optim_config
        if cfg.lora_lr is not None and cfg.lora_lr <= 0:
            raise ValueError(f"optim.lora_lr must be > 0 (or null for optim.lr), got {cfg.lora_lr}")
        lora = [p for name, p in named if "lora_" in name]
        rest = [p for name, p in named if "lora_" not in name]
        groups = [{"params": rest, "lr": cfg.lr}] if rest else []
        if lora:
            groups.append({"params": lora, "lr": cfg.lr if cfg.lora_lr is None else cfg.lora_lr})
        optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
                                      weight_decay=cfg.weight_decay)
        total = int(self.trainer.estimated_stepping_batches)
        if cfg.ctc_warmup_steps < 0 or (cfg.ctc_warmup_steps and not cfg.ctc_warmup_steps < total):
            raise ValueError(f"optim.ctc_warmup_steps must be in [0, {total}) (the training steps), got "
                             f"{cfg.ctc_warmup_steps}")
        if cfg.ctc_weight < 0:
            raise ValueError(f"optim.ctc_weight must be >= 0, got {cfg.ctc_weight}")
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: phased_lr_lambda(step, cfg, total))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # -------------------------------------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = self.speechllm.trainable_state_dict()
        checkpoint["state_dict"] = {STATE_PREFIX + k: v for k, v in state.items()}
        checkpoint["speechllm"] = self.speechllm.describe()

    def load_state_dict(self, state_dict: dict[str, torch.Tensor], strict: bool = True, assign: bool = False):
        """Load a trainable-only state dict (original layer numbering), refusing one that does not fit."""
        foreign = [k for k in state_dict if not k.startswith(STATE_PREFIX)]
        if foreign:
            raise KeyError(f"unexpected keys outside '{STATE_PREFIX}': {foreign[:5]}")
        self.speechllm.load_trainable_state_dict({k[len(STATE_PREFIX):]: v for k, v in state_dict.items()})
        return nn.modules.module._IncompatibleKeys([], [])
