"""Pruning sweep: score a SpeechLLM at several pruning sizes, optionally heal each, and apply the paper's stopping rule.

For each point (a fraction of the decoder layers, or a layer count ``n``; by default n = 1, 2, ... until the rule
has failed twice in a row, see :mod:`~lightning_speechllm.evaluation.sweep.grid`) :func:`run_sweep` builds a
:class:`~lightning_speechllm.pruning.plan.PruningPlan` (``angular`` / ``block_influence`` from a measured redundancy
map, or ``last``), masks the layers, scores every named evaluation set (WER for ASR sets, BLEU for translation sets)
with ``Trainer.validate`` / ``Trainer.test``, optionally heals the pruned model in place with a
:class:`~lightning_speechllm.healing.module.HealingModule` for ``heal_steps`` steps and scores it again (see
:func:`healed`: no copy of the decoder; the model is restored exactly afterwards), then resets the mask. The unpruned
baseline is scored first.

Every finished point is written at once (atomically) to ``<output_dir>/points/<method>_<value>.json`` and a rerun
skips the points already there, so an interrupted sweep resumes. The outputs are ``sweep.csv``, ``sweep.md``,
``sweep.json`` (table + chosen fraction) and ``sweep.png`` (metric vs removed fraction).

The rule reads the validation sets only. With ``test_sets``, :func:`score_chosen_on_test` then scores the unpruned
baseline and the chosen point once on those test sets (``test.json``, and ``"test"`` in ``sweep.json``): a report,
never an input of the choice.

This module runs the sweep. The table, its JSON form and the rule live in
:mod:`~lightning_speechllm.evaluation.sweep.table`, the outputs in :mod:`~lightning_speechllm.evaluation.sweep.report`;
every name of ``__all__`` below is importable from here (and from the package,
:mod:`lightning_speechllm.evaluation.sweep`) as before the sweep became a package.

Stopping rule (Moumen et al., 2026): keep the largest removed fraction whose relative WER increase is at most
``max_rel_wer_increase`` (0.25) on every ASR set and whose relative BLEU drop is at most ``max_rel_bleu_drop``
(0.10) on every translation set, judged after healing when healing ran. The curves need not be monotone: the rule
takes the *largest passing* fraction even when a smaller one fails (see :func:`choose_point`).
"""
from __future__ import annotations

import copy
import itertools
import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import lightning as L
import torch
from torch import Tensor, nn

from lightning_speechllm.evaluation.resume_key import data_key, file_sha256, run_key
from lightning_speechllm.evaluation.sweep.common import COMPARISON_METHODS, require_unpruned, trainer_device
from lightning_speechllm.evaluation.sweep.grid import DEFAULT_WALK_STOP_AFTER, GridError, explicit_grid, visit_points
from lightning_speechllm.evaluation.sweep.report import (
    describe_choice,
    describe_test,
    format_markdown,
    plot_curves,
    write_csv,
    write_outputs,
)
from lightning_speechllm.evaluation.sweep.table import (
    COUNT_METRIC,
    FAILURE_METRICS,
    METRICS,
    SWEEP_FORMAT_VERSION,
    Scores,
    SweepError,
    SweepPoint,
    SweepTable,
    Thresholds,
    choose_fraction,
    choose_point,
    passes,
    relative_change,
    scores_from_json,
    scores_to_json,
)
from lightning_speechllm.healing.linear_patch import (
    FittedPatch,
    LinearPatchConfig,
    LinearPatchError,
    fit_linear_patch,
    restore_weights,
)
from lightning_speechllm.io_utils import read_json, write_json
from lightning_speechllm.model.module import (
    DecodingConfig,
    OptimConfig,
    SpeechLLMModule,
)
from lightning_speechllm.model.speechllm import LoraConfig, SpeechLLM, SpeechLLMConfig
from lightning_speechllm.pruning.plan import (
    PruningPlan,
    plan_angular,
    plan_block_influence,
    plan_explicit,
    plan_last,
)
from lightning_speechllm.redundancy.analysis import RedundancyResult

if TYPE_CHECKING:
    from lightning_speechllm.healing.module import HealingConfig

__all__ = [
    "SWEEP_FORMAT_VERSION",
    "Scores",
    "SweepConfig",
    "SweepError",
    "SweepPoint",
    "SweepTable",
    "Thresholds",
    "build_plan",
    "choose_fraction",
    "choose_point",
    "describe_choice",
    "describe_test",
    "evaluate",
    "format_markdown",
    "healed",
    "passes",
    "plot_curves",
    "point_name",
    "relative_change",
    "run_sweep",
    "score_chosen_on_test",
    "write_csv",
    "write_outputs",
]

log = logging.getLogger(__name__)

SweepMethod = Literal["angular", "block_influence", "last"]
HEALING_VARIANTS = ("lora", "kd", "replacement", "linear_patch", "text_kd")
"""'linear_patch' is training-free: no heal steps (lightning_speechllm.healing.linear_patch); 'text_kd' reads no
ground-truth response (TextTeacherKL)."""


# ------------------------------------------------------------------------------------------------ configuration
@dataclass
class SweepConfig:
    """What to sweep, how to heal and where the results go."""

    method: SweepMethod = "angular"
    """Plan builder: angular (pruning path of the map), block_influence (lowest BI of the map) or last."""
    fractions: list[float] | None = None
    """Fractions of the decoder layers to remove (exclusive with `ns`). Neither given: walk n = 1, 2, ... (`ns`)."""
    ns: list[int] | None = None
    """Numbers of layers to remove (exclusive with `fractions`). Neither given: walk n = 1, 2, ..., num_layers - 1
    and stop once `walk_stop_after` consecutive points fail the rule (the paper's 14/32 or 1/16 are layer counts
    that no fraction grid of 0.1 steps hits)."""
    walk_stop_after: int = DEFAULT_WALK_STOP_AFTER
    """The default walk stops after this many consecutive failing points (2: "failed twice in a row")."""
    map_path: str | None = None
    """Redundancy map JSON (`RedundancyResult`, e.g. redundancy/<set>/<modality>/epoch=E.json); needed by angular and
    block_influence."""
    sets: list[str] | None = None
    """Names of the evaluation sets the rule looks at (default: every set the datamodule scores)."""
    stage: Literal["validate", "test"] = "validate"
    """Score the datamodule's validation sets (val/<set>/...) or its test sets (test/<set>/...)."""
    test_sets: list[str] | None = None
    """Names of test sets (--data.test_sets) on which the unpruned baseline and the chosen point are scored once, after
    the rule chose it on the validation sets (the rule never sees them; needs stage validate). None: no test."""
    heal: bool = False
    """Heal each pruned model (LoRA on the receiving layer + trainable projector) and score it again."""
    heal_steps: int = 200
    """Optimizer steps of healing per point. The paper heals 5,000 steps per point; 200 (and the embedded default's
    40) is a budget for quick sweeps: less healing, so the rule passes fewer points than it would after 5,000."""
    heal_lr: float = 5e-4
    """Peak learning rate of healing (linear decay, the paper's setting)."""
    heal_warmup_steps: int = 0
    """Linear warm-up steps of healing."""
    heal_lora_r: int = 64
    """LoRA rank of healing."""
    heal_lora_alpha: int = 64
    """LoRA alpha of healing."""
    heal_variant: str = "lora"
    """How a point heals: 'lora' (the paper: LoRA on the receiving layer + projector, task CE), 'kd' (the same plus
    logit distillation from the unpruned model), 'replacement' (an identity-initialised FFN in each removed block's
    place + projector, trained on the MSE to the unpruned model's state after the block + task CE; no LoRA) or
    'linear_patch' (training-free: a least-squares linear map per block, fitted on `linear_patch_batches` training
    batches and folded into the layer before the block; no step is taken) or 'text_kd' (LoRA + projector trained on
    `TextTeacherKL` alone: the unpruned LLM reading the transcript as text is the teacher, and both are
    teacher-forced on its own answer, so no ground-truth response is read; see `text_kd_response`)."""
    replacement_width: int | None = None
    """Hidden units of the replacement FFN (None: the MLP's full width, which exports to a stock decoder layer)."""
    kd_temperature: float = 1.0
    """Temperature of the 'kd' variant's logit distillation."""
    text_kd_response: Literal["teacher", "target"] = "teacher"
    """The 'text_kd' variant's response: the teacher's own greedy answer (label-free) or the batch's targets (for a
    teacher LLM that does not answer an instruction by copying the transcript)."""
    linear_patch_batches: int = 16
    """Training batches the 'linear_patch' variant fits on."""
    linear_patch_ridge: float = 1e-4
    """Ridge of the 'linear_patch' least squares, relative to the mean eigenvalue of MᵀM."""
    max_rel_wer_increase: float = 0.25
    """Stopping rule: largest relative WER increase on every ASR set."""
    max_rel_bleu_drop: float = 0.10
    """Stopping rule: largest relative BLEU drop on every translation set."""
    compare_methods: list[str] | None = None
    """Compare pruning methods on one table instead of sweeping `method`: any of angular, block_influence, last,
    greedy, attention, budget, budget_evo, each at every `fractions` point, unhealed and healed with each
    `compare_healing` variant (see `lightning_speechllm.evaluation.method_comparison`)."""
    compare_healing: list[str] = field(default_factory=lambda: ["lora", "replacement", "kd", "linear_patch",
                                                                "text_kd"])
    """Healing variants of a method comparison (each also sets `heal_variant` for its runs)."""
    calibration_batches: int = 4
    """Method comparison: batches of the first validation set that greedy plans and the sublayer map measure on."""
    speed_new_tokens: int = 16
    """Method comparison: tokens generated (forced) per decode-speed measurement."""
    budget_generations: int = 10
    """Method comparison, budget_evo: generations of the evolutionary search from the greedy budget plan."""
    budget_offspring: int = 8
    """Method comparison, budget_evo: mutants scored per generation."""
    max_batches: int | None = None
    """Score at most this many batches per validation set (None: all). The test sets (`test_sets`) are always scored
    whole, as `fit`'s test: a few batches' WER is a subset's, not the set's."""
    output_dir: str = "checkpoints/sweep"
    """Where points/, sweep.csv, sweep.md, sweep.json and sweep.png go."""

    @property
    def thresholds(self) -> Thresholds:
        return Thresholds(self.max_rel_wer_increase, self.max_rel_bleu_drop)

    def values(self) -> list[tuple[str, float | int]] | None:
        """The given points as ``("fraction", f)`` or ``("n", n)``, in order; None: walk n = 1, 2, ..."""
        try:
            return explicit_grid(self.fractions, self.ns)
        except GridError as error:
            raise SweepError(str(error)) from None

    def _check_comparison(self) -> None:
        unknown = sorted(set(self.compare_methods) - set(COMPARISON_METHODS)) + sorted(
            set(self.compare_healing) - set(HEALING_VARIANTS))
        if unknown:
            raise SweepError(f"unknown methods / healing variants {unknown}; methods (compare_methods): "
                             f"{COMPARISON_METHODS}, healing (compare_healing): {HEALING_VARIANTS}")
        if not self.fractions:
            raise SweepError("a method comparison needs sweep.fractions (e.g. [0.2, 0.4])")
        if self.calibration_batches < 1 or self.speed_new_tokens < 2:
            raise SweepError(f"calibration_batches must be >= 1 and speed_new_tokens >= 2, got "
                             f"{self.calibration_batches} and {self.speed_new_tokens}")
        if self.budget_generations < 1 or self.budget_offspring < 1:
            raise SweepError(f"budget_generations and budget_offspring must be >= 1, got {self.budget_generations} "
                             f"and {self.budget_offspring}")
        if self.test_sets or self.stage != "validate":
            raise SweepError("a method comparison scores the validation sets only (no test_sets, stage validate)")

    def check(self) -> None:
        """Raise :class:`SweepError` for inconsistent options."""
        self.values()
        if self.walk_stop_after < 1:
            raise SweepError(f"walk_stop_after must be >= 1, got {self.walk_stop_after}")
        for method in self.compare_methods or [self.method]:
            if method in ("angular", "block_influence") and not self.map_path:
                raise SweepError(f"method {method!r} needs map_path (a redundancy map JSON)")
        if self.compare_methods:
            self._check_comparison()
        if self.test_sets and self.stage != "validate":
            raise SweepError(f"test_sets {self.test_sets} needs stage 'validate' (the rule would otherwise choose on "
                             "test sets)")
        if self.heal_variant not in HEALING_VARIANTS:
            raise SweepError(f"heal_variant must be one of {HEALING_VARIANTS}, got {self.heal_variant!r}")
        if self.heal and self.heal_steps < 1:
            raise SweepError(f"heal_steps must be >= 1 when heal is true, got {self.heal_steps}")
        if self.max_rel_wer_increase < 0 or self.max_rel_bleu_drop < 0:
            raise SweepError(f"thresholds must be >= 0, got max_rel_wer_increase={self.max_rel_wer_increase}, "
                             f"max_rel_bleu_drop={self.max_rel_bleu_drop}")


# ------------------------------------------------------------------------------------------------ evaluation
def build_trainer(trainer_kwargs: dict[str, Any] | None, **overrides: Any) -> L.Trainer:
    defaults = dict(accelerator="auto", devices=1, logger=False, enable_progress_bar=False,
                    enable_model_summary=False, enable_checkpointing=False)
    # A sweep builds a trainer per evaluation and per healing: keep Lightning's accelerator banner and tips out.
    banner = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    level = banner.level
    banner.setLevel(logging.WARNING)
    try:
        return L.Trainer(**{**defaults, **(trainer_kwargs or {}), **overrides})
    finally:
        banner.setLevel(level)


def evaluate(speechllm: SpeechLLM, datamodule: L.LightningDataModule, stage: str = "validate",
             decoding: DecodingConfig | None = None, trainer_kwargs: dict[str, Any] | None = None,
             max_batches: int | None = None, sets: Sequence[str] | None = None) -> Scores:
    """Score ``speechllm`` as it is (mask included) on the datamodule's named sets with ``Trainer.validate`` or
    ``Trainer.test``; returns the logged ``<val|test>/<set>/{wer,bleu}`` (percent) of ``sets`` (default: all), with
    the set's FAILURE_METRICS (percent) and COUNT_METRIC (utterances scored; neither is read by the stopping rule).
    The scoring is `fit`'s own (:class:`SpeechLLMModule`'s validation/test step): one decoding path."""
    if stage not in ("validate", "test"):
        raise SweepError(f"stage must be 'validate' or 'test', got {stage!r}")
    decoding = copy.copy(decoding or DecodingConfig())
    decoding.generate_in_validation = True
    module = SpeechLLMModule(speechllm=speechllm, decoding=decoding)
    limit = {"limit_val_batches" if stage == "validate" else "limit_test_batches": max_batches or 1.0}
    trainer = build_trainer(trainer_kwargs, **limit)
    getattr(trainer, stage)(module, datamodule=datamodule, verbose=False)
    prefix = "val" if stage == "validate" else "test"
    scores: Scores = {}
    for key, value in trainer.callback_metrics.items():
        parts = key.split("/")
        if len(parts) == 3 and parts[0] == prefix and parts[2] in (*METRICS, *FAILURE_METRICS, COUNT_METRIC):
            scores.setdefault(parts[1], {})[parts[2]] = float(value)
    if sets is not None:
        missing = [name for name in sets if name not in scores]
        if missing:
            raise SweepError(f"evaluation sets {missing} were not scored (scored: {sorted(scores)}); check the "
                             "datamodule's set names")
        scores = {name: scores[name] for name in sets}
    if not scores:
        raise SweepError(f"{stage} logged no WER/BLEU: does the datamodule have named {prefix} sets?")
    return scores


@contextmanager
def healed(speechllm: SpeechLLM, plan: PruningPlan, datamodule: L.LightningDataModule, config: SweepConfig,
           trainer_kwargs: dict[str, Any] | None = None) -> Iterator[SpeechLLM]:
    """Heal ``speechllm`` itself (unmasked, without LoRA on entry), pruned by ``plan``, for ``config.heal_steps``
    steps with a :class:`HealingModule` as ``config.heal_variant`` says (:func:`healing_config`: LoRA on the receiving
    layer, + KD, or replacement modules; trainable projector), and yield it healed and masked; no second copy of the
    decoder is made.

    On exit, also after an exception (in healing or in the body), the model is restored exactly: the masks reset, the
    replacement modules dropped, the LoRA modules removed without merging (PEFT ``unload``), the trainable weights (projector, a tuned encoder) put
    back, and ``speechllm.config``, every ``requires_grad`` flag and every module's train/eval mode as on entry.
    """
    from lightning_speechllm.healing.module import HealingModule

    if speechllm.has_lora:
        raise SweepError("healing in a sweep needs a model without LoRA adapters (merge a LoRA-tuned decoder's "
                         "adapters into its weights first): the healing LoRA would be taken for them")
    require_unpruned(speechllm, "healing in a sweep")
    snapshot = _Snapshot.take(speechllm)
    patched: FittedPatch | None = None
    try:
        if config.heal_variant == "linear_patch":
            patched = _linear_patched(speechllm.to(trainer_device(trainer_kwargs)), plan, datamodule, config)
            yield speechllm
            return
        module = HealingModule(healing=healing_config(plan, config),
                               optim=OptimConfig(lr=config.heal_lr, warmup_steps=config.heal_warmup_steps,
                                                 schedule="linear"),
                               speechllm=speechllm)
        trainer = build_trainer(trainer_kwargs, max_steps=config.heal_steps, limit_val_batches=0,
                                num_sanity_val_steps=0)
        trainer.fit(module, datamodule=datamodule)
        del module, trainer  # the optimizer state goes with them
        yield speechllm
    finally:
        if patched is not None:
            restore_weights(speechllm, patched.originals)
        snapshot.restore(speechllm)


def _linear_patched(speechllm: SpeechLLM, plan: PruningPlan, datamodule: L.LightningDataModule,
                    config: SweepConfig) -> FittedPatch:
    """``plan`` applied with a linear patch per removed block, fitted on the first training batches (no step)."""
    if plan.removed_attention or plan.removed_mlp:
        raise SweepError(f"the {plan.method} plan drops sublayers: the linear patch stands in for whole layers only")
    datamodule.setup("fit")
    batches = list(itertools.islice(iter(datamodule.train_dataloader()), config.linear_patch_batches))
    try:
        fitted = fit_linear_patch(speechllm, plan.removed_layers, batches,
                                  LinearPatchConfig(batches=config.linear_patch_batches,
                                                    ridge=config.linear_patch_ridge), progress=False)
    except LinearPatchError as error:
        raise SweepError(f"linear patch of the {plan.method} plan: {error}") from error
    for fit in fitted.fits:
        log.info("linear patch %d-%d: stream error %.4f removed -> %.4f patched (%d tokens, %.1f s)", fit.start,
                 fit.end - 1, fit.removal_error, fit.patched_error, fit.tokens, fit.seconds)
    return fitted


def healing_config(plan: PruningPlan, config: SweepConfig) -> "HealingConfig":
    """The :class:`HealingConfig` of ``config.heal_variant`` for ``plan``."""
    from lightning_speechllm.healing.module import HealingConfig, ReplacementConfig

    lora = LoraConfig(layers=None, r=config.heal_lora_r, alpha=config.heal_lora_alpha, dropout=0.05)
    healing = HealingConfig(removed_layers=list(plan.removed_layers), removed_attention=list(plan.removed_attention),
                            removed_mlp=list(plan.removed_mlp), lora=lora)
    if config.heal_variant == "kd":
        healing.losses = [{"class_path": "TaskCrossEntropy"},
                          {"class_path": "KLDivergence", "init_args": {"temperature": config.kd_temperature}}]
    elif config.heal_variant == "text_kd":
        healing.losses = [{"class_path": "TextTeacherKL",
                           "init_args": {"temperature": config.kd_temperature,
                                         "response": config.text_kd_response}}]
    elif config.heal_variant == "replacement":
        if not plan.removed_layers:
            raise SweepError(f"the {plan.method} plan removes no whole layer: nothing to replace")
        healing.lora = None
        healing.replacement = ReplacementConfig(kind="ffn", width=config.replacement_width)
        healing.losses = [{"class_path": "ReplacementMSE"}, {"class_path": "TaskCrossEntropy"}]
    return healing


@dataclass
class _Snapshot:
    """What healing changes on a SpeechLLM, saved so that :func:`healed` can put it back."""

    config: SpeechLLMConfig
    trainable: dict[str, Tensor]
    requires_grad: list[tuple[nn.Parameter, bool]]
    modes: list[tuple[nn.Module, bool]]
    had_input_grad_hooks: bool

    @classmethod
    def take(cls, speechllm: SpeechLLM) -> _Snapshot:
        return cls(config=copy.deepcopy(speechllm.config), trainable=speechllm.trainable_state_dict(),
                   requires_grad=[(p, p.requires_grad) for p in speechllm.parameters()],
                   modes=[(m, m.training) for m in speechllm.modules()],
                   had_input_grad_hooks=bool(getattr(speechllm.llm, "_require_grads_hooks", None)))

    def restore(self, speechllm: SpeechLLM) -> None:
        """Mask reset, LoRA unloaded (not merged), config, trainable weights, flags and modes as snapshotted."""
        speechllm.layer_mask.reset()  # every layer back in the list, so that unload() reaches every LoRA module
        speechllm.layer_mask.set_replacements({})
        speechllm.replacements.clear()
        speechllm.sublayer_mask.reset()
        if speechllm.has_lora:
            speechllm.llm = speechllm.llm.unload()
        if not self.had_input_grad_hooks and hasattr(speechllm.llm, "disable_input_require_grads"):
            speechllm.llm.disable_input_require_grads()  # PEFT adds them to a gradient-checkpointing decoder
        for item in fields(self.config):
            if getattr(speechllm.config, item.name) != getattr(self.config, item.name):
                setattr(speechllm.config, item.name, copy.deepcopy(getattr(self.config, item.name)))
        with torch.no_grad():
            params = dict(speechllm.named_parameters())
            for name, value in self.trainable.items():
                params[name].copy_(value)
        for param, flag in self.requires_grad:
            param.requires_grad_(flag)
        for module, training in self.modes:
            module.training = training


# ------------------------------------------------------------------------------------------------ plans
def build_plan(config: SweepConfig, kind: str, value: float | int, num_layers: int,
               result: RedundancyResult | None, model_id: str | None = None) -> PruningPlan:
    """The plan of one sweep point (``kind`` 'fraction' or 'n')."""
    size = {"fraction": value} if kind == "fraction" else {"n": value}
    if config.method == "last":
        return plan_last(num_layers, model_id=model_id, **size)
    if result is None:
        raise SweepError(f"method {config.method!r} needs a redundancy map (map_path)")
    if result.num_layers != num_layers:
        raise SweepError(f"the map {config.map_path} is for {result.num_layers} layers, the model has {num_layers}")
    builder = plan_angular if config.method == "angular" else plan_block_influence
    return builder(result, source_map=config.map_path, **size)


def point_name(method: str, kind: str, value: float | int) -> str:
    """File stem of a point: ``angular_0.25`` for a fraction, ``angular_n3`` for a layer count."""
    return f"{method}_{value:g}" if kind == "fraction" else f"{method}_n{value}"


def resume_signature(config: SweepConfig, speechllm: SpeechLLM, datamodule: L.LightningDataModule,
               decoding: DecodingConfig | None, trainer_kwargs: dict[str, Any] | None) -> dict[str, Any]:
    """What a point file must agree on to be reused (the thresholds need not: the rule is re-applied): the settings,
    the content of the redundancy map, and the model, decoding, precision and data of
    :func:`~lightning_speechllm.evaluation.resume_key.run_key` (manifests by content, healing data when healing)."""
    healing = {key: getattr(config, key) for key in ("heal_steps", "heal_lr", "heal_warmup_steps", "heal_lora_r",
                                                     "heal_lora_alpha")} if config.heal else {}
    if config.heal and config.heal_variant != "lora":  # absent for 'lora', so earlier sweeps' points stay reusable
        healing.update(heal_variant=config.heal_variant, replacement_width=config.replacement_width,
                       kd_temperature=config.kd_temperature)
    if config.heal and config.heal_variant == "linear_patch":
        healing.update(linear_patch_batches=config.linear_patch_batches, linear_patch_ridge=config.linear_patch_ridge)
    if config.heal and config.heal_variant == "text_kd" and config.text_kd_response != "teacher":
        healing.update(text_kd_response=config.text_kd_response)  # absent at the default: older points stay reusable
    return {"method": config.method, "map_path": config.map_path, "map_sha256": file_sha256(config.map_path),
            "stage": config.stage, "sets": config.sets, "heal": config.heal, **healing,
            "num_layers": speechllm.layer_mask.num_layers, "max_batches": config.max_batches,
            **run_key(speechllm, datamodule, decoding, trainer_kwargs, config.stage, config.heal)}


def _load_reusable(path: Path, signature: dict[str, Any]) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    data = read_json(path)
    stored = data.get("signature")
    if stored != signature:
        raise SweepError(f"{path} was written by another sweep ({stored}); this one is {signature}: delete the file "
                         "or use another output_dir")
    return data


# ------------------------------------------------------------------------------------------------ the sweep
def run_sweep(speechllm: SpeechLLM, datamodule: L.LightningDataModule, config: SweepConfig,
              decoding: DecodingConfig | None = None, trainer_kwargs: dict[str, Any] | None = None,
              evaluate_fn: Callable[..., Scores] | None = None) -> tuple[SweepTable, SweepPoint | None]:
    """Baseline, then every point (plan -> mask -> score -> optional heal -> score -> reset); resumable.

    ``speechllm`` must be unpruned on entry (its mask is reset between points); with ``config.heal``, a LoRA-tuned
    model's adapters are merged into its decoder weights first, in place (the signature hashes them before). Returns
    the table and the point the stopping rule chooses; writes the points, ``sweep.{csv,md,json,png}`` under
    ``config.output_dir``.
    """
    config.check()
    score = evaluate_fn or evaluate
    out = Path(config.output_dir)
    mask = speechllm.layer_mask
    require_unpruned(speechllm, "a sweep")
    num_layers = mask.num_layers
    signature = resume_signature(config, speechllm, datamodule, decoding, trainer_kwargs)
    if config.heal and speechllm.has_lora:
        log.info("sweep: merging the model's LoRA adapters into its decoder weights (healing adds its own)")
        speechllm.merge_lora()
    result = RedundancyResult.from_json(config.map_path) if config.method != "last" else None
    model_id = getattr(speechllm.config, "model_id", None)

    def run_eval(model: SpeechLLM) -> Scores:
        return score(model, datamodule, stage=config.stage, decoding=decoding, trainer_kwargs=trainer_kwargs,
                     max_batches=config.max_batches, sets=config.sets)

    baseline_file = out / "points" / "baseline.json"
    stored = _load_reusable(baseline_file, signature)
    if stored is None:
        baseline = run_eval(speechllm)
        write_json({"signature": signature, "scores": scores_to_json(baseline)}, baseline_file)
    else:
        baseline = scores_from_json(stored["scores"]) or {}
    table = SweepTable(baseline=baseline, num_layers=num_layers)

    def point_at(kind: str, value: float | int) -> SweepPoint:
        plan = build_plan(config, kind, value, num_layers, result, model_id)
        path = out / "points" / f"{point_name(config.method, kind, value)}.json"
        stored = _load_reusable(path, signature)
        if stored is not None:
            log.info("sweep: reusing %s", path)
            return SweepPoint.from_dict(stored["point"], str(path))
        point = _run_point(speechllm, plan, kind, value, config, datamodule, trainer_kwargs, run_eval)
        write_json({"signature": signature, "point": point.to_dict(), "plan": plan.to_dict()}, path)
        return point

    table.points = visit_points(config.values(), num_layers, point_at,
                                lambda point: passes(point, baseline, config.thresholds)[0], config.walk_stop_after)
    chosen = choose_point(table, config.thresholds)
    write_outputs(table, out, config.thresholds, chosen)
    return table, chosen


def _run_point(speechllm: SpeechLLM, plan: PruningPlan, kind: str, value: float | int, config: SweepConfig,
               datamodule: L.LightningDataModule, trainer_kwargs: dict[str, Any] | None,
               run_eval: Callable[[SpeechLLM], Scores]) -> SweepPoint:
    mask = speechllm.layer_mask
    try:
        mask.remove_layers(plan.removed_layers)
        before = run_eval(speechllm)
    finally:
        mask.reset()
    after = None
    if config.heal:
        with healed(speechllm, plan, datamodule, config, trainer_kwargs) as model:
            after = run_eval(model)
    return SweepPoint(method=config.method, value=value, kind=kind, n=len(plan.removed_layers),
                      num_layers=plan.num_layers, removed_layers=list(plan.removed_layers), before=before,
                      after=after, heal_steps=config.heal_steps if config.heal else 0)


def score_chosen_on_test(speechllm: SpeechLLM, datamodule: L.LightningDataModule, config: SweepConfig,
                         chosen: SweepPoint | None, decoding: DecodingConfig | None = None,
                         trainer_kwargs: dict[str, Any] | None = None,
                         evaluate_fn: Callable[..., Scores] | None = None) -> dict[str, Any] | None:
    """Score the unpruned baseline and the ``chosen`` point of :func:`run_sweep` once on ``config.test_sets``
    (``Trainer.test``, every batch: ``max_batches`` limits the validation sets only, so the scores are of the same
    utterances as `fit`'s test), after the rule chose on the validation sets; None without test sets or without a
    chosen point. Each set's scores say how many utterances they are of (``utterances``).

    The chosen plan is masked again and, when the sweep healed, healed again with the same settings (the sweep does
    not keep healed weights), so the test score is the one of a second healing run of the chosen plan. The result
    goes to ``<output_dir>/test.json`` (reused by a rerun with the same settings and choice) and into ``sweep.json``
    under ``"test"``.
    """
    if not config.test_sets or chosen is None:
        return None
    out = Path(config.output_dir)
    signature = {**resume_signature(config, speechllm, datamodule, decoding, trainer_kwargs),
                 "test_sets": list(config.test_sets), "test_data": data_key(datamodule, "test", heal=False),
                 "test_batches": "all",  # earlier sweeps scored max_batches of them: a subset, not reused
                 "removed_layers": list(chosen.removed_layers)}
    stored = read_json(out / "test.json") if (out / "test.json").is_file() else None
    if stored is not None and stored.get("signature") == signature:
        result = stored["result"]
    else:
        score = evaluate_fn or evaluate

        def run_test(model: SpeechLLM) -> Scores:
            return score(model, datamodule, stage="test", decoding=decoding, trainer_kwargs=trainer_kwargs,
                         max_batches=None, sets=config.test_sets)

        baseline = run_test(speechllm)
        model_id = getattr(speechllm.config, "model_id", None)
        plan = plan_explicit(chosen.num_layers, chosen.removed_layers, model_id=model_id)
        if config.heal:
            with healed(speechllm, plan, datamodule, config, trainer_kwargs) as model:
                final = run_test(model)
        else:
            try:
                speechllm.layer_mask.remove_layers(plan.removed_layers)
                final = run_test(speechllm)
            finally:
                speechllm.layer_mask.reset()
        result = {"sets": list(config.test_sets), "requested": f"{chosen.kind}={chosen.value:g}", "n": chosen.n,
                  "removed_fraction": chosen.removed_fraction, "removed_layers": list(chosen.removed_layers),
                  "healed": config.heal, "baseline": scores_to_json(baseline), "chosen": scores_to_json(final)}
        write_json({"signature": signature, "result": result}, out / "test.json")
    summary_path = out / "sweep.json"
    if summary_path.is_file():
        summary = read_json(summary_path)
        summary["test"] = result
        write_json(summary, summary_path)
    return result
