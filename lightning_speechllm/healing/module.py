"""`HealingModule`: heal a pruned SpeechLLM with LoRA on the receiving layer, the projector, and pluggable losses.

The student is the SpeechLLM with the pruning plan applied as a decoder-layer mask. When a loss needs a teacher
(logit KL, hidden-state losses), the teacher is the SAME module with every layer active and the LoRA adapters
disabled, run under ``torch.no_grad()``: no second copy of the decoder. Its speech embeddings come from a frozen copy
of the projector taken when healing starts (or the teacher checkpoint's projector), so the distillation target does
not drift while the student's projector trains. The teacher runs in eval mode (no dropout) whatever the training mode.

A LoRA-tuned fit checkpoint given as ``teacher_checkpoint`` has its LoRA merged into the decoder's base weights
(W += alpha/r * B @ A, done by hand, so it commutes with the healing adapters): teacher and student then both start
from the fit model. The healing checkpoint carries that LoRA (``checkpoint["healing"]["merged_lora"]``) and loading
merges it again, so a healed checkpoint is self-contained (``load_module`` rebuilds it without the teacher file).

An injected model that already carries LoRA adapters is taken as carrying the healing adapters (that is how a
checkpointed run is rebuilt); merge adapters that belong to the unpruned model (a LoRA-tuned SpeechLLM) into its
weights first, or the teacher, which disables adapters, would lose them.

Checkpoints hold only the trainable weights (see :class:`SpeechLLMModule`), the plan, the base model paths, the
merged fit LoRA and the teacher's projector snapshot; loading refuses a checkpoint made for another plan, another
base model or another fit LoRA.
"""
from __future__ import annotations

import copy
import itertools
from collections.abc import Iterable, Iterator
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel

from lightning_speechllm.config_utils import from_dict
from lightning_speechllm.data.batch import SpeechBatch
from lightning_speechllm.healing.linear_patch import (
    LinearPatchConfig,
    PatchFit,
    fit_linear_patch,
    fold_linear_patch,
)
from lightning_speechllm.healing.losses import (
    HealingInputs,
    LossSpec,
    WeightedHealingLoss,
    build_losses,
    layer_map_for,
    prediction_mask,
)
from lightning_speechllm.model.checkpoint import load_checkpoint_file
from lightning_speechllm.model.layer_mask import find_decoder_layers, get_layer_mask_state
from lightning_speechllm.model.module import DecodingConfig, OptimConfig, SpeechLLMModule
from lightning_speechllm.model.replacement import REPLACEMENT_KINDS, ReplacementLayer, build_replacement
from lightning_speechllm.model.speechllm import (
    LLMInputs,
    LoraConfig,
    SpeechLLM,
    SpeechLLMConfig,
    eval_mode,
    target_window,
)
from lightning_speechllm.pruning.plan import receiving_layers

__all__ = ["HealingConfig", "HealingModule", "NonFiniteLossError", "PlanMismatchError", "load_plan", "receiving_layers"]

ON_NAN = ("raise", "skip")


class NonFiniteLossError(FloatingPointError):
    """A healing loss went NaN/inf (raised before the optimizer step, so no weight is poisoned)."""


class PlanMismatchError(ValueError):
    """A checkpoint or model does not fit the configured pruning plan or base model."""


@dataclass
class ReplacementConfig:
    """A light trainable module in place of each removed block (LLM-Streamline), identity at initialisation."""

    kind: str = "ffn"
    """'ffn': the block's first layer's pre-MLP norm and MLP, down projection zeroed (exports as a stock decoder
    layer); 'linear': x + W x with W zero (does not export to stock transformers)."""
    width: int | None = None
    """Hidden units of the ffn replacement (its first `width` units are copied); None = the MLP's full width."""


def _healing_lora() -> LoraConfig:
    return LoraConfig(layers=None, r=64, alpha=64, dropout=0.05)


@dataclass
class HealingConfig:
    """What is pruned and how it heals."""

    removed_layers: list[int] = field(default_factory=list)
    """Decoder layers to remove (original numbering); ignored when `plan_path` is given."""
    removed_attention: list[int] = field(default_factory=list)
    """Layers whose attention sublayer is dropped (their MLP stays); ignored when `plan_path` is given."""
    removed_mlp: list[int] = field(default_factory=list)
    """Layers whose MLP sublayer is dropped (their attention stays); ignored when `plan_path` is given."""
    plan_path: str | None = None
    """A pruning-plan JSON file written by `PruningPlan.to_json` (validated for the model's layer count and id)."""
    lora: LoraConfig | None = field(default_factory=_healing_lora)
    """LoRA on the decoder; `layers: null` means the layer(s) receiving the cut (every layer when nothing is
    removed). None: no LoRA."""
    losses: list[dict[str, Any]] = field(default_factory=lambda: [{"class_path": "TaskCrossEntropy"}])
    """Weighted healing losses, each {class_path, init_args, weight, name} (see `LossSpec`; `LossSpec` objects are
    accepted too). Plain dicts, because jsonargparse reserves `class_path`/`init_args` for its subclass syntax."""
    on_nan: str = "raise"
    """Non-finite loss: 'raise' (error naming step and loss part) or 'skip' (skip the optimizer step)."""
    teacher_checkpoint: str | None = None
    """A `SpeechLLMModule` checkpoint of the unpruned model (its projector, optional LoRA) to distil from instead of
    the bare base model. Its LoRA is merged into the decoder's base weights (student and teacher both start from the
    fit model) and saved in the healing checkpoints, which thus reload without this file."""
    init_projector_from_teacher: bool = True
    """With `teacher_checkpoint`: start the student's projector from the teacher's."""
    linear_patch: LinearPatchConfig | None = None
    """Before the first step, fit a closed-form linear patch for each removed block on the first training batches and
    fold it into the layer before the block (ReplaceMe; `lightning_speechllm.healing.linear_patch`): training-free
    healing, which LoRA/CE then continue from. Not with a teacher-based loss (the teacher shares the patched weights)
    nor with `replacement`."""
    replacement: ReplacementConfig | None = None
    """Put a trainable replacement module where each removed block was (train it with `ReplacementMSE`, the MSE to
    the teacher's state after the block, optionally plus CE/KL); None: the paper's healing (no replacement). Set
    `lora: null` for replacement-only healing."""


def load_plan(config: HealingConfig, num_layers: int, model_id: str | None = None) -> dict[str, Any]:
    """The pruning plan as a plain dict (removed_layers, num_layers, receiving_layers, model_id), validated for a
    decoder of `num_layers` layers (and, for a plan file naming one, the model `model_id`)."""
    if config.plan_path:
        from lightning_speechllm.pruning.plan import PlanError, PruningPlan

        try:
            plan = PruningPlan.from_json(config.plan_path)
            plan.validate_for(num_layers, model_id)
        except PlanError as error:
            raise PlanMismatchError(f"pruning plan {config.plan_path}: {error}") from error
        removed, plan_model_id = list(plan.removed_layers), plan.model_id
        sublayers = {"removed_attention": list(plan.removed_attention), "removed_mlp": list(plan.removed_mlp)}
    else:
        removed, plan_model_id = list(config.removed_layers), None
        sublayers = {"removed_attention": list(config.removed_attention), "removed_mlp": list(config.removed_mlp)}
        bad = [i for i in removed if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < num_layers]
        if bad or len(set(removed)) != len(removed):
            raise PlanMismatchError(f"healing.removed_layers {removed} invalid for a decoder of {num_layers} layers "
                                    f"(bad entries: {bad}, or duplicates)")
    cut = sorted({*removed, *sublayers["removed_attention"], *sublayers["removed_mlp"]})
    plan = {"removed_layers": sorted(removed), "num_layers": num_layers,
            "receiving_layers": receiving_layers(cut, num_layers) if cut else [], "model_id": plan_model_id}
    return {**plan, **{key: value for key, value in sublayers.items() if value}}


class HealingModule(SpeechLLMModule):
    """Heal a pruned SpeechLLM: student = plan-masked model + LoRA + projector; optional shared-weight teacher."""

    def __init__(self, model: SpeechLLMConfig | None = None, healing: HealingConfig | None = None,
                 optim: OptimConfig | None = None, decoding: DecodingConfig | None = None,
                 speechllm: SpeechLLM | None = None) -> None:
        """`speechllm` injects an already built (unpruned, or already carrying this plan) model."""
        super().__init__(model=model, optim=optim, decoding=decoding, speechllm=speechllm)
        self.healing = from_dict(HealingConfig, healing)
        if self.healing.on_nan not in ON_NAN:
            raise ValueError(f"healing.on_nan must be one of {ON_NAN}, got {self.healing.on_nan!r}")
        self.healing.losses = [asdict(s) if isinstance(s, LossSpec) else dict(s) for s in self.healing.losses]
        self.plan = load_plan(self.healing, self.speechllm.layer_mask.num_layers, self.model_config.model_id)
        self._apply_plan()
        self.model_config = self.speechllm.config
        self.save_hyperparameters({"model": asdict(self.model_config), "healing": asdict(self.healing)})
        self.loss_fn: WeightedHealingLoss = build_losses(self.healing.losses)
        self.skipped_steps = 0
        self._skip_optimizer_step = False
        self.teacher_projector: torch.nn.Module | None = None
        self.merged_lora: dict[str, Any] | None = None  # the fit LoRA merged into the base: {source, config, state}
        self.projector_snapshot = False  # teacher_projector is our own snapshot (saved in checkpoints for resume)
        self.linear_patch: dict[int, Tensor] | None = None  # {first removed layer: T}, folded into the layer before
        self.patch_fits: list[PatchFit] = []
        self._check_linear_patch()
        if self.healing.teacher_checkpoint:
            self._load_teacher(self.healing.teacher_checkpoint)
        if (self.teacher_projector is None and self.loss_fn.needs_teacher and not self.loss_fn.teacher_reads_text
                and self.speechllm.projector is not None):
            # The KD target must not follow the student's projector as it trains: freeze a copy of it as it is now.
            # (Made before configure_model, so under FSDP it stays a plain replicated module.)
            self.teacher_projector = copy.deepcopy(self.speechllm.projector).requires_grad_(False)
            self.projector_snapshot = True

    # ------------------------------------------------------------------------------------------------ the plan
    def _apply_plan(self) -> None:
        """Add the healing LoRA (unless the model has one) and mask the removed layers."""
        sl = self.speechllm
        if self.healing.lora is not None and not sl.has_lora:
            layers = self.healing.lora.layers or self.plan["receiving_layers"] or None
            lora = replace(self.healing.lora, layers=layers)
            sl.add_lora(lora)
            sl.config.lora = lora
        removed = tuple(self.plan["removed_layers"])
        current = sl.layer_mask.removed_layers
        if current and current != removed:
            raise PlanMismatchError(f"the injected model already masks layers {list(current)}, the plan removes "
                                    f"{list(removed)}")
        if removed:
            sl.layer_mask.remove_layers(removed)
        sl.config.removed_layers = list(removed)
        attention, mlp = self.plan.get("removed_attention", []), self.plan.get("removed_mlp", [])
        if attention or mlp:
            sl.sublayer_mask.drop(attention, mlp)
            sl.config.removed_attention, sl.config.removed_mlp = list(attention), list(mlp)
        if self.healing.replacement is not None:
            self._add_replacements(removed)

    def _add_replacements(self, removed: tuple[int, ...]) -> None:
        """An identity-initialised replacement module (trainable) in place of each removed block."""
        if not removed:
            raise PlanMismatchError("healing.replacement needs removed layers: the plan removes none")
        sl, config = self.speechllm, from_dict(ReplacementConfig, self.healing.replacement)
        if config.kind not in REPLACEMENT_KINDS:
            raise PlanMismatchError(f"healing.replacement.kind must be one of {REPLACEMENT_KINDS}, got {config.kind!r}")
        layers = get_layer_mask_state(sl.layer_mask.model).layer_list
        starts = [i for i in removed if i - 1 not in removed]
        modules = {i: build_replacement(layers[i], config.kind, config.width).requires_grad_(True) for i in starts}
        sl.replacements.update({str(i): module for i, module in modules.items()})
        sl.layer_mask.set_replacements(modules)

    def remove_more_layers(self, layers: list[int] | tuple[int, ...], iterative: bool = True) -> None:
        """Remove `layers` (original numbering) on top of the current plan (an iterative prune-heal round); the
        plan, the mask and the model config follow. `iterative` marks the plan so that a checkpoint taken after
        the round reloads into a module built with the first-round plan."""
        sl = self.speechllm
        num_layers = sl.layer_mask.num_layers
        if self.healing.replacement is not None or self.healing.linear_patch is not None:
            raise PlanMismatchError("iterative rounds with replacement modules or a linear patch are unsupported "
                                    "(each round would need new ones)")
        bad = [i for i in layers if not 0 <= int(i) < num_layers or int(i) in self.plan["removed_layers"]]
        if bad:
            raise PlanMismatchError(f"cannot remove layers {bad}: out of range for {num_layers} layers or already "
                                    f"removed ({self.plan['removed_layers']})")
        removed = sorted({*self.plan["removed_layers"], *(int(i) for i in layers)})
        sl.layer_mask.remove_layers(removed)
        sl.config.removed_layers = list(removed)
        self.plan = {**self.plan, "removed_layers": removed, "receiving_layers": receiving_layers(removed, num_layers),
                     "iterative": bool(iterative or self.plan.get("iterative"))}

    def masked_trainables(self) -> list[torch.nn.Parameter]:
        """Trainable weights inside the masked decoder layers (the LoRA adapters of layers an iterative round
        removed). They are gone from `parameters()` but stay in the optimizer and, when removed after DDP wrapped
        the model, in DDP's reducer."""
        mask = self.speechllm.layer_mask
        layers = get_layer_mask_state(mask.model).layer_list
        return [p for i in mask.removed_layers for p in layers[i].parameters() if p.requires_grad]

    def _keep_masked_in_graph(self, loss: Tensor) -> Tensor:
        """`loss` + 0 * (each masked trainable summed), under DDP only.

        DDP's reducer (find_unused_parameters=False, as configs/trainer/ddp.yaml) expects a gradient for every
        trainable weight it registered when it wrapped the model, and it never re-reads the model: the adapters of
        a layer removed later get none and the next step fails. The zero term gives them a zero gradient, so any
        DDP setting works; `on_before_optimizer_step` then drops it. Cost: one sum per masked adapter weight (the
        all-reduce is unchanged, DDP reduces every registered bucket anyway)."""
        if self._trainer is None or not isinstance(self.trainer.model, DistributedDataParallel):
            return loss  # one process or FSDP: an unused weight simply gets no gradient
        masked = self.masked_trainables()
        return loss + 0.0 * sum(p.sum() for p in masked) if masked else loss

    def zero_loss(self) -> Tensor:
        return self._keep_masked_in_graph(super().zero_loss())

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """A masked layer never updates: its (zero, DDP-only) gradients are dropped, so AdamW skips those weights
        (no moment update, no decoupled weight decay) exactly as in a one-process run."""
        super().on_before_optimizer_step(optimizer)
        for param in self.masked_trainables():
            param.grad = None

    # ------------------------------------------------------------------------------------------------ linear patch
    def _check_linear_patch(self) -> None:
        if self.healing.linear_patch is None:
            return
        self.healing.linear_patch = from_dict(LinearPatchConfig, self.healing.linear_patch)
        if self.healing.replacement is not None:
            raise PlanMismatchError("healing.linear_patch and healing.replacement both stand in for the removed "
                                    "blocks: choose one")
        if self.loss_fn.needs_teacher:
            raise PlanMismatchError("healing.linear_patch changes the weights of the layer before each removed block, "
                                    "which the teacher shares: use it with task losses only (e.g. TaskCrossEntropy)")
        if not self.plan["removed_layers"]:
            raise PlanMismatchError("healing.linear_patch needs removed layers: the plan removes none")

    def on_fit_start(self) -> None:
        """Fit and fold the linear patch before the first step, also when `trainer.max_steps` is 0 (training-free
        healing); not on a resumed run, whose checkpoint folded it already."""
        super().on_fit_start()
        if self.healing.linear_patch is not None and self.linear_patch is None and self.trainer.datamodule is not None:
            self.fit_linear_patch(self.trainer.datamodule.train_dataloader())

    def on_train_start(self) -> None:
        """(Dataloaders given to `fit` directly, without a datamodule: they exist from here on.)"""
        super().on_train_start()
        if self.healing.linear_patch is not None and self.linear_patch is None:
            self.fit_linear_patch(self.trainer.train_dataloader)

    def fit_linear_patch(self, loader: Iterable[SpeechBatch]) -> None:
        """Fit the patch of each removed block on the first `healing.linear_patch.batches` batches of `loader` (the
        unpruned model's states; statistics summed over ranks) and fold it into the layer before the block."""
        config = self.healing.linear_patch
        batches = [batch.to(self.device) for batch in itertools.islice(iter(loader), config.batches)]
        mask, removed = self.speechllm.layer_mask, self.plan["removed_layers"]
        mask.set_active_layers(sorted({*mask.active_layers, *removed}))  # the patch fits on the unpruned states
        trainer = self._trainer
        distributed = trainer is not None and trainer.world_size > 1
        reduce = (lambda t: trainer.strategy.reduce(t, reduce_op="sum")) if distributed else None
        fitted = fit_linear_patch(self.speechllm, removed, batches, config, reduce=reduce,
                                  progress=trainer is None or trainer.is_global_zero)
        self.linear_patch, self.patch_fits = fitted.patches, fitted.fits
        for fit in fitted.fits:
            self.print(f"linear patch for layers {fit.start}-{fit.end - 1} (folded into layer {fit.start - 1}): "
                       f"stream error {fit.removal_error:.4f} removed -> {fit.patched_error:.4f} patched, "
                       f"{fit.tokens} tokens, {fit.seconds:.1f} s")

    # ------------------------------------------------------------------------------------------ teacher checkpoint
    def _load_teacher(self, path: str) -> None:
        """Teacher projector (a frozen copy) and LoRA (merged into the decoder's base weights) from a checkpoint,
        read as data only (a teacher checkpoint often comes from someone else)."""
        checkpoint = load_checkpoint_file(path)
        state = {k.removeprefix("speechllm."): v for k, v in checkpoint.get("state_dict", {}).items()}
        projector = {k.removeprefix("projector."): v for k, v in state.items() if k.startswith("projector.")}
        if projector:
            if self.speechllm.projector is None:
                raise PlanMismatchError(f"teacher checkpoint {path} has a projector, this model is text-only")
            self.teacher_projector = copy.deepcopy(self.speechllm.projector).requires_grad_(False)
            self.teacher_projector.load_state_dict(projector)
            if self.healing.init_projector_from_teacher:
                self.speechllm.projector.load_state_dict(projector)
        lora = {k: v for k, v in state.items() if "lora_" in k}
        if lora:
            config = dict(checkpoint["hyper_parameters"]["model"]["lora"])
            self._merge_fit_lora({"source": str(path), "config": config, "state": lora})
        unused = sorted(set(state) - {f"projector.{k}" for k in projector} - set(lora))
        if unused:
            raise PlanMismatchError(f"teacher checkpoint {path} holds weights the teacher cannot use: {unused[:5]}")

    def _merge_fit_lora(self, record: dict[str, Any]) -> None:
        """Merge a fit run's LoRA ({source, config, state}) into the decoder's base weights, W += alpha/r * B @ A.

        By hand rather than PEFT's merge_and_unload: the healing adapters stay as they are (the merge only changes the
        frozen base weight under them, so the order does not matter), and the teacher, which disables the healing
        adapters, is then exactly the fit model."""
        sl, source = self.speechllm, record["source"]
        if sl.sharded:
            raise PlanMismatchError(f"cannot merge the fit LoRA of {source} into a sharded model: build the module "
                                    "with healing.teacher_checkpoint set, so that it merges before sharding")
        lora = from_dict(LoraConfig, record["config"])
        mask = sl.layer_mask
        with mask.active(range(mask.num_layers)), torch.no_grad():
            bases = {_base_weight_name(name): param for name, param in sl.named_parameters()}
            for prefix, (a, b) in _lora_pairs(record["state"], source).items():
                weight = bases.get(f"{_base_weight_name(prefix)}.weight")
                if weight is None or weight.shape != (b.shape[0], a.shape[1]):
                    raise PlanMismatchError(f"teacher checkpoint {source}: LoRA module {prefix} has no matching "
                                            f"decoder weight of shape {(b.shape[0], a.shape[1])} in this model")
                delta = (lora.alpha / lora.r) * (b.float() @ a.float())
                weight.add_(delta.to(device=weight.device, dtype=weight.dtype))
        self.merged_lora = {"source": str(source), "config": dict(record["config"]),
                            "state": {k: v.detach().cpu().clone() for k, v in record["state"].items()}}

    def teacher_inputs(self, batch: SpeechBatch, student_inputs: LLMInputs) -> LLMInputs:
        """The student's inputs, or (with a teacher projector) the same batch embedded by the teacher's projector, or
        (a text teacher, `TextTeacherKL`) the batch's transcripts read as text through the same prompt."""
        if self.loss_fn.teacher_reads_text:
            return self.text_teacher_inputs(batch, student_inputs)
        if self.teacher_projector is None or batch.text_only:
            return student_inputs
        sl = self.speechllm
        student_projector = sl.projector
        try:
            sl.projector = self.teacher_projector
            with torch.no_grad(), eval_mode(self.teacher_projector):
                inputs = sl.build_inputs(batch, with_targets=True)
        finally:
            sl.projector = student_projector
        if not torch.equal(inputs.segment_ids, student_inputs.segment_ids):
            raise PlanMismatchError("the teacher projector lays the batch out differently from the student's "
                                    "(another downsampling?); logits cannot be compared token by token")
        return inputs

    def text_teacher_inputs(self, batch: SpeechBatch, student_inputs: LLMInputs) -> LLMInputs:
        """The batch's transcripts as text through the same prompt, with the same response tokens as the student's,
        right-aligned: the target windows of the two line up position by position."""
        inputs = self.speechllm.build_inputs(batch.as_text_only(), with_targets=True)
        window = target_window(student_inputs.labels)
        if inputs.labels is None or not torch.equal(inputs.labels[:, -window:], student_inputs.labels[:, -window:]):
            raise PlanMismatchError(f"batch {batch.ids[:3]}...: the text teacher's response tokens differ from the "
                                    "student's (the prompt tokenizes the response differently after text input)")
        return inputs

    def with_teacher_responses(self, batch: SpeechBatch) -> SpeechBatch:
        """The batch with each target replaced by the teacher's greedy answer to the transcript as text (the
        label-free response of `TextTeacherKL(response='teacher')`)."""
        with self.as_teacher():
            answers = self.speechllm.generate(batch.as_text_only(),
                                              max_new_tokens=self.loss_fn.teacher_response_tokens)
        return replace(batch, texts=answers)

    # ------------------------------------------------------------------------------------------------- passes
    @contextmanager
    def as_teacher(self) -> Iterator[None]:
        """The unpruned model inside the context: every layer and sublayer active, the healing adapters off (a
        teacher checkpoint's LoRA is merged), eval mode, no gradients."""
        sl = self.speechllm
        mask = sl.layer_mask
        with ExitStack() as stack:
            stack.enter_context(torch.no_grad())
            stack.enter_context(mask.active(range(mask.num_layers)))
            stack.enter_context(sl.sublayer_mask.suspended())
            if sl.has_lora:
                stack.enter_context(sl.llm.disable_adapter())
            stack.enter_context(eval_mode(sl.llm))
            yield

    def teacher_pass(self, inputs: LLMInputs, hidden: bool = False,
                     logits_to_keep: int = 0) -> tuple[Tensor, list[Tensor]]:
        """Logits of the last `logits_to_keep` positions (0 = all) and, when `hidden`, residual states x^0..x^L (all
        positions) of the unpruned model without the healing adapters (a teacher checkpoint's LoRA is merged)."""
        sl = self.speechllm
        mask = sl.layer_mask
        with ExitStack() as stack:
            stack.enter_context(self.as_teacher())
            stream = stack.enter_context(mask.record_residual_stream()) if hidden else None
            output = sl.llm(inputs_embeds=inputs.inputs_embeds.detach(), attention_mask=inputs.attention_mask,
                            position_ids=inputs.position_ids, use_cache=False, logits_to_keep=logits_to_keep)
        return output.logits, (stream.states if stream is not None else [])

    def student_pass(self, inputs: LLMInputs, hidden: bool = False,
                     logits_to_keep: int = 0) -> tuple[Tensor, list[Tensor]]:
        """Logits of the last `logits_to_keep` positions (0 = all) and, when `hidden`, residual states x^0..x^K
        (all positions, with their graph) of the pruned model (checkpointed with `gradient_checkpointing`)."""
        sl = self.speechllm
        with sl.layer_mask.record_residual_stream(detach=False) if hidden else nullcontext() as stream:
            output = sl.run_decoder(inputs, logits_to_keep=logits_to_keep)
        return output.logits, (stream.states if stream is not None else [])

    def healing_inputs(self, batch: SpeechBatch) -> HealingInputs:
        """Student pass, plus the teacher pass when a loss needs it. Logits, labels and target mask cover the
        target window only (see `HealingInputs`), the same positions for student and teacher."""
        if self.loss_fn.teacher_response_tokens is not None:
            batch = self.with_teacher_responses(batch)
        inputs = self.speechllm.build_inputs(batch, with_targets=True)
        if inputs.labels is None:
            raise ValueError(f"batch {batch.ids[:3]}... has no target tokens: cannot heal on it")
        self.tokens_in_last_batch = inputs.attention_mask.sum().detach()
        hidden = self.loss_fn.needs_hidden_states
        # Targets are right-aligned (left padding): the LM head runs on the last `window` positions only.
        window = 0 if self.loss_fn.needs_full_logits else target_window(inputs.labels)
        student_logits, student_hidden = self.student_pass(inputs, hidden, logits_to_keep=window)
        teacher_logits, teacher_hidden = (
            self.teacher_pass(self.teacher_inputs(batch, inputs), hidden, logits_to_keep=window)
            if self.loss_fn.needs_teacher else (None, []))
        labels = inputs.labels[:, -window:] if window else inputs.labels
        return HealingInputs(
            student_logits=student_logits, labels=labels, target_mask=prediction_mask(labels),
            attention_mask=inputs.attention_mask, teacher_logits=teacher_logits, student_hidden=student_hidden,
            teacher_hidden=teacher_hidden, layer_map=layer_map_for(self.speechllm.layer_mask.active_layers,
                                                                   self.speechllm.layer_mask.stream_targets()),
            replacement_states=self.replacement_states(),
        )

    def replacement_states(self) -> list[int]:
        """Student residual-state indices that replacement modules produce (see `HealingInputs`)."""
        parent, name = find_decoder_layers(self.speechllm.llm)
        return [k + 1 for k, layer in enumerate(getattr(parent, name)) if isinstance(layer, ReplacementLayer)]

    def healing_step(self, batch: SpeechBatch) -> tuple[Tensor, dict[str, Tensor]]:
        """(weighted total loss, every part) for one batch."""
        return self.loss_fn(self.healing_inputs(batch))

    # ----------------------------------------------------------------------------------------------- training
    def training_step(self, batch: SpeechBatch, batch_idx: int) -> Tensor:
        if len(batch) == 0:
            return self.empty_batch_loss()
        total, parts = self.healing_step(batch)
        bad = _non_finite(total, parts)
        if self._any_rank(bool(bad)):
            if self.healing.on_nan == "raise":
                where = f"loss part(s) {bad}" if bad else "a loss part on another rank"
                raise NonFiniteLossError(f"non-finite healing loss at global step {self.global_step}: {where}; "
                                         "set healing.on_nan='skip' to skip such steps")
            self.skipped_steps += 1
            self.log("train/skipped_nonfinite", float(self.skipped_steps), batch_size=len(batch))
            self._skip_optimizer_step = True
            # A zero loss, not None (which Lightning refuses under DDP): every rank still runs backward and the
            # gradient all-reduce; optimizer_step then skips the update on every rank.
            return self.zero_loss()
        size = len(batch)
        self.log("train/loss", total, prog_bar=True, batch_size=size)
        for name, value in parts.items():
            self.log(f"train/loss/{name}", value.detach(), batch_size=size)
        return self._keep_masked_in_graph(total)

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer, optimizer_closure=None) -> None:
        """Skip the update of a step whose loss was non-finite on some rank (``on_nan='skip'``). The closure (training
        step + backward) runs alone, as Lightning documents for skipped steps, so no weight, moment or decay moves."""
        if optimizer_closure is None or self.healing.on_nan != "skip":
            return super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        loss = optimizer_closure()
        if self._skip_optimizer_step:
            self._skip_optimizer_step = False
            return None
        return optimizer.step(closure=lambda: loss)  # the backward ran; precision plugins see its loss

    def _any_rank(self, flag: bool) -> bool:
        """True when `flag` holds on any rank (all ranks then take the same branch under DDP)."""
        if self._trainer is None:
            return flag
        return bool(self.trainer.strategy.reduce_boolean_decision(flag, all=False))

    def configure_optimizers(self) -> dict:
        """As SpeechLLMModule, over the trainables of EVERY layer (masked ones too), so that the optimizer's
        parameter groups do not depend on the mask (iterative rounds, resume after a round)."""
        mask = self.speechllm.layer_mask
        with mask.active(range(mask.num_layers)):
            return super().configure_optimizers()

    # ----------------------------------------------------------------------------------------------- checkpoints
    def base_model_ids(self) -> dict[str, str | None]:
        if self.model_config.pretrained:  # a released model: its llm_path / encoder_path are unused
            return {"pretrained": self.model_config.pretrained}
        return {"llm_path": self.model_config.llm_path, "encoder_path": self.model_config.encoder_path}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["healing"] = {"plan": dict(self.plan), "base_model": self.base_model_ids(),
                                 "replacement": _replacement_record(self.healing.replacement)}
        if self.merged_lora is not None:
            checkpoint["healing"]["merged_lora"] = self.merged_lora
        if self.linear_patch is not None:
            checkpoint["healing"]["linear_patch"] = {"patches": {str(k): v for k, v in self.linear_patch.items()},
                                                     "fits": [fit.as_dict() for fit in self.patch_fits]}
        if self.projector_snapshot:  # a resumed run must distil from the projector of the first start, not a new one
            checkpoint["healing"]["teacher_projector"] = {k: v.detach().cpu().clone()
                                                          for k, v in self.teacher_projector.state_dict().items()}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse a checkpoint whose plan (removed layers) or base model differs from this module's."""
        saved = checkpoint.get("healing")
        if not isinstance(saved, dict) or "plan" not in saved:
            raise PlanMismatchError("not a healing checkpoint: it has no 'healing' plan entry")
        theirs, ours = saved["plan"]["removed_layers"], self.plan["removed_layers"]
        if saved["plan"].get("iterative") and set(ours) < set(theirs):
            self.remove_more_layers(sorted(set(theirs) - set(ours)))  # later rounds of an iterative schedule
            ours = self.plan["removed_layers"]
        if list(theirs) != list(ours):
            raise PlanMismatchError(f"checkpoint was healed with removed layers {list(theirs)}, this module removes "
                                    f"{list(ours)}")
        for key in ("removed_attention", "removed_mlp"):
            if list(saved["plan"].get(key, [])) != list(self.plan.get(key, [])):
                raise PlanMismatchError(f"checkpoint was healed with {key} {saved['plan'].get(key, [])}, this module "
                                        f"has {self.plan.get(key, [])}")
        ours_replacement = _replacement_record(self.healing.replacement)
        if saved.get("replacement") != ours_replacement:
            raise PlanMismatchError(f"checkpoint was healed with replacement {saved.get('replacement')}, this module "
                                    f"with {ours_replacement} (set healing.replacement the same way)")
        their_ids, our_ids = saved.get("base_model", {}), self.base_model_ids()
        if not _same_models(their_ids, our_ids):
            raise PlanMismatchError(f"checkpoint base model {their_ids} differs from this module's {our_ids}")
        their_id, our_id = saved["plan"].get("model_id"), self.plan.get("model_id")
        if their_id and our_id and their_id != our_id:
            raise PlanMismatchError(f"checkpoint plan model_id {their_id!r} differs from this plan's {our_id!r}")
        self._load_merged_lora(saved.get("merged_lora"))
        self._load_linear_patch(saved.get("linear_patch"))
        if self.projector_snapshot and "teacher_projector" in saved:
            self.teacher_projector.load_state_dict(saved["teacher_projector"])

    def _load_linear_patch(self, saved: dict[str, Any] | None) -> None:
        """Fold the checkpoint's linear patch into the freshly loaded base weights (once)."""
        if (saved is None) != (self.healing.linear_patch is None):
            raise PlanMismatchError(f"the checkpoint was healed {'without' if saved is None else 'with'} a linear "
                                    f"patch, this module {'with' if saved is None else 'without'} one (set "
                                    "healing.linear_patch the same way)")
        if saved is None or self.linear_patch is not None:
            return
        patches = {int(k): v for k, v in saved["patches"].items()}
        starts = sorted(patches)
        expected = [i for i in self.plan["removed_layers"] if i - 1 not in self.plan["removed_layers"]]
        if starts != expected:
            raise PlanMismatchError(f"the checkpoint's linear patch is for blocks starting at {starts}, this plan's "
                                    f"blocks start at {expected}")
        fold_linear_patch(self.speechllm, patches)
        self.linear_patch, self.patch_fits = patches, [PatchFit(**fit) for fit in saved.get("fits", [])]

    def _load_merged_lora(self, theirs: dict[str, Any] | None) -> None:
        """Merge the checkpoint's fit LoRA (a module rebuilt without the teacher file, as ``load_module`` does), or
        check that it is the one this module merged from its teacher checkpoint."""
        ours = self.merged_lora
        if theirs is None and ours is None:
            return
        if ours is None:
            self._merge_fit_lora(theirs)
            return
        if theirs is None:
            raise PlanMismatchError(f"this module merged the fit LoRA of {ours['source']} into its decoder; the "
                                    "checkpoint was healed without it (an older checkpoint, or another run)")
        same = (theirs["config"] == ours["config"] and set(theirs["state"]) == set(ours["state"])
                and all(torch.equal(theirs["state"][k].cpu(), ours["state"][k]) for k in ours["state"]))
        if not same:
            raise PlanMismatchError(f"the checkpoint was healed on the fit LoRA of {theirs['source']}, which differs "
                                    f"from the one merged from healing.teacher_checkpoint {ours['source']}")


def _replacement_record(config: ReplacementConfig | dict | None) -> dict[str, Any] | None:
    """The replacement settings as a plain dict (None without replacement), for checkpoints."""
    return None if config is None else asdict(from_dict(ReplacementConfig, config))


def _same_models(a: dict[str, str | None], b: dict[str, str | None]) -> bool:
    """Whether two base-model path records name the same LLM and encoder (asset name == its directory)."""
    from lightning_speechllm.pruning.plan import same_model_id

    if set(a) != set(b):
        return False
    return all(a[k] == b[k] or (a[k] is not None and b[k] is not None and same_model_id(a[k], b[k])) for k in a)


def _base_weight_name(name: str) -> str:
    """A decoder weight's name without PEFT's wrappers, the same with and without adapters on its layer."""
    return name.replace("base_model.model.", "").replace(".base_layer", "")


def _lora_pairs(state: dict[str, Tensor], source: str) -> dict[str, tuple[Tensor, Tensor]]:
    """{module name: (lora_A, lora_B)} of a PEFT LoRA state dict (adapter 'default')."""
    pairs: dict[str, dict[str, Tensor]] = {}
    for key, value in state.items():
        for part in ("lora_A", "lora_B"):
            suffix = f".{part}.default.weight"
            if key.endswith(suffix):
                pairs.setdefault(key[: -len(suffix)], {})[part] = value
                break
        else:
            raise PlanMismatchError(f"teacher checkpoint {source}: LoRA weight {key} is not a lora_A/lora_B weight "
                                    "of the 'default' adapter; only plain LoRA can be merged")
    broken = sorted(name for name, parts in pairs.items() if len(parts) != 2)
    if broken:
        raise PlanMismatchError(f"teacher checkpoint {source}: LoRA modules {broken[:3]} lack lora_A or lora_B")
    return {name: (parts["lora_A"], parts["lora_B"]) for name, parts in pairs.items()}




def _non_finite(total: Tensor, parts: dict[str, Tensor]) -> dict[str, float]:
    """{name: value} of the loss parts (or 'total') that are NaN/inf; empty when all are finite."""
    bad = {name: float(value.detach()) for name, value in parts.items() if not torch.isfinite(value).all()}
    if not bad and not torch.isfinite(total).all():
        bad = {"total": float(total.detach())}
    return bad
