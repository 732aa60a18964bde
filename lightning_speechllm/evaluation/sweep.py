"""Pruning sweep: score a SpeechLLM at several pruning sizes, optionally heal each, and apply the paper's stopping rule.

For each point (a fraction of the decoder layers, or a layer count ``n``; by default n = 1, 2, ... until the rule
has failed twice in a row, see :mod:`~lightning_speechllm.evaluation.sweep_grid`) :func:`run_sweep` builds a
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

Stopping rule (Moumen et al., 2026): keep the largest removed fraction whose relative WER increase is at most
``max_rel_wer_increase`` (0.25) on every ASR set and whose relative BLEU drop is at most ``max_rel_bleu_drop``
(0.10) on every translation set, judged after healing when healing ran. The curves need not be monotone: the rule
takes the *largest passing* fraction even when a smaller one fails (see :func:`choose_point`).
"""
from __future__ import annotations

import copy
import csv
import hashlib
import io
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from torch import Tensor, nn

from lightning_speechllm.evaluation.sweep_grid import DEFAULT_WALK_STOP_AFTER, GridError, explicit_grid, visit_points
from lightning_speechllm.io_utils import atomic_write_text
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
from lightning_speechllm.redundancy.report import read_json, write_json

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

SWEEP_FORMAT_VERSION = 1
METRICS = ("wer", "bleu")
SweepMethod = Literal["angular", "block_influence", "last"]
Scores = dict[str, dict[str, float]]
"""Per evaluation set, its metrics: ``{"clean": {"wer": 4.2}, "covost": {"bleu": 31.0}}`` (percent)."""


class SweepError(ValueError):
    """A bad sweep configuration, or a point file that does not belong to this sweep."""


# ------------------------------------------------------------------------------------------------ configuration
@dataclass
class Thresholds:
    """The stopping rule's tolerances, relative to the unpruned baseline."""

    max_rel_wer_increase: float = 0.25
    """Largest allowed (WER - WER_base) / WER_base on every ASR set."""
    max_rel_bleu_drop: float = 0.10
    """Largest allowed (BLEU_base - BLEU) / BLEU_base on every translation set."""


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
    max_rel_wer_increase: float = 0.25
    """Stopping rule: largest relative WER increase on every ASR set."""
    max_rel_bleu_drop: float = 0.10
    """Stopping rule: largest relative BLEU drop on every translation set."""
    max_batches: int | None = None
    """Score at most this many batches per set (None: all)."""
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

    def check(self) -> None:
        """Raise :class:`SweepError` for inconsistent options."""
        self.values()
        if self.walk_stop_after < 1:
            raise SweepError(f"walk_stop_after must be >= 1, got {self.walk_stop_after}")
        if self.method in ("angular", "block_influence") and not self.map_path:
            raise SweepError(f"method {self.method!r} needs map_path (a redundancy map JSON)")
        if self.test_sets and self.stage != "validate":
            raise SweepError(f"test_sets {self.test_sets} needs stage 'validate' (the rule would otherwise choose on "
                             "test sets)")
        if self.heal and self.heal_steps < 1:
            raise SweepError(f"heal_steps must be >= 1 when heal is true, got {self.heal_steps}")
        if self.max_rel_wer_increase < 0 or self.max_rel_bleu_drop < 0:
            raise SweepError(f"thresholds must be >= 0, got max_rel_wer_increase={self.max_rel_wer_increase}, "
                             f"max_rel_bleu_drop={self.max_rel_bleu_drop}")


# ------------------------------------------------------------------------------------------------- the table
@dataclass
class SweepPoint:
    """One pruned model: its plan and its scores before and (when healed) after healing."""

    method: str
    value: float | int
    """The requested fraction or n."""
    kind: Literal["fraction", "n"]
    n: int
    num_layers: int
    removed_layers: list[int]
    before: Scores
    after: Scores | None = None
    heal_steps: int = 0

    @property
    def removed_fraction(self) -> float:
        """Share of the decoder layers removed: n / num_layers."""
        return self.n / self.num_layers

    @property
    def final(self) -> Scores:
        """The scores the rule judges: after healing when healing ran, else before."""
        return self.after if self.after is not None else self.before

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["before"], data["after"] = _scores_to_json(self.before), _scores_to_json(self.after)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "<dict>") -> "SweepPoint":
        try:
            return cls(method=data["method"], value=data["value"], kind=data["kind"], n=int(data["n"]),
                       num_layers=int(data["num_layers"]), removed_layers=[int(i) for i in data["removed_layers"]],
                       before=_scores_from_json(data["before"]), after=_scores_from_json(data.get("after")),
                       heal_steps=int(data.get("heal_steps", 0)))
        except KeyError as error:
            raise SweepError(f"{source}: missing key {error.args[0]!r}") from error


@dataclass
class SweepTable:
    """The baseline scores and every sweep point."""

    baseline: Scores
    num_layers: int
    points: list[SweepPoint] = field(default_factory=list)

    @property
    def healed(self) -> bool:
        return any(point.after is not None for point in self.points)

    def set_metrics(self) -> list[tuple[str, str]]:
        """``(set, metric)`` pairs of the baseline, sorted by set name, WER before BLEU."""
        return [(name, metric) for name in sorted(self.baseline) for metric in METRICS if metric in self.baseline[name]]

    def to_dict(self) -> dict[str, Any]:
        return {"format_version": SWEEP_FORMAT_VERSION, "baseline": _scores_to_json(self.baseline),
                "num_layers": self.num_layers, "points": [point.to_dict() for point in self.points]}

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "<dict>") -> "SweepTable":
        if data.get("format_version") != SWEEP_FORMAT_VERSION:
            raise SweepError(f"{source}: unsupported format_version {data.get('format_version')!r}, "
                             f"expected {SWEEP_FORMAT_VERSION}")
        points = [SweepPoint.from_dict(p, f"{source}: points[{i}]") for i, p in enumerate(data.get("points", []))]
        return cls(baseline=_scores_from_json(data["baseline"]) or {}, num_layers=int(data["num_layers"]),
                   points=points)


def _scores_to_json(scores: Scores | None) -> dict | None:
    if scores is None:
        return None
    return {name: {k: (v if math.isfinite(v) else None) for k, v in metrics.items()}
            for name, metrics in scores.items()}


def _scores_from_json(data: dict | None) -> Scores | None:
    if data is None:
        return None
    return {name: {k: (math.nan if v is None else float(v)) for k, v in metrics.items()}
            for name, metrics in data.items()}


# ---------------------------------------------------------------------------------------------- the rule
def relative_change(value: float, baseline: float) -> float:
    """``(value - baseline) / baseline``; with a zero baseline 0 when equal, else ±inf; NaN stays NaN."""
    if math.isnan(value) or math.isnan(baseline):
        return math.nan
    if baseline == 0:
        return 0.0 if value == 0 else math.copysign(math.inf, value)
    return (value - baseline) / baseline


def _metric_passes(metric: str, change: float, thresholds: Thresholds) -> bool:
    if math.isnan(change):
        return False
    if metric == "wer":
        return change <= thresholds.max_rel_wer_increase + 1e-12
    return -change <= thresholds.max_rel_bleu_drop + 1e-12


def passes(point: SweepPoint, baseline: Scores, thresholds: Thresholds = Thresholds()) -> tuple[bool, list[str]]:
    """Whether ``point`` (its :attr:`~SweepPoint.final` scores) meets the rule on every set of ``baseline``; the
    second item lists the failures (``"clean wer +31.0%"``, ``"covost bleu missing"``)."""
    failures = []
    for name in sorted(baseline):
        for metric in METRICS:
            if metric not in baseline[name]:
                continue
            value = point.final.get(name, {}).get(metric)
            if value is None:
                failures.append(f"{name} {metric} missing")
                continue
            change = relative_change(value, baseline[name][metric])
            if not _metric_passes(metric, change, thresholds):
                failures.append(f"{name} {metric} {100 * change:+.1f}%")
    return not failures, failures


def choose_point(table: SweepTable, thresholds: Thresholds = Thresholds()) -> SweepPoint | None:
    """The paper's stopping rule: the point with the largest removed fraction that passes :func:`passes`.

    This is "largest passing", not "last before the first failure": on a non-monotone curve (say 20% fails, 30%
    passes) the 30% point is chosen. None when no point passes (or the baseline has no WER/BLEU).
    """
    if not table.set_metrics():
        return None
    passing = [point for point in table.points if passes(point, table.baseline, thresholds)[0]]
    return max(passing, key=lambda point: point.removed_fraction, default=None)


def choose_fraction(table: SweepTable, thresholds: Thresholds = Thresholds()) -> float | None:
    """The removed fraction (n / num_layers) of :func:`choose_point`, or None when no point passes."""
    point = choose_point(table, thresholds)
    return None if point is None else point.removed_fraction


# ------------------------------------------------------------------------------------------------ evaluation
def _trainer(trainer_kwargs: dict[str, Any] | None, **overrides: Any) -> L.Trainer:
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
    ``Trainer.test``; returns the logged ``<val|test>/<set>/{wer,bleu}`` (percent) of ``sets`` (default: all)."""
    if stage not in ("validate", "test"):
        raise SweepError(f"stage must be 'validate' or 'test', got {stage!r}")
    decoding = copy.copy(decoding or DecodingConfig())
    decoding.generate_in_validation = True
    module = SpeechLLMModule(speechllm=speechllm, decoding=decoding)
    limit = {"limit_val_batches" if stage == "validate" else "limit_test_batches": max_batches or 1.0}
    trainer = _trainer(trainer_kwargs, **limit)
    getattr(trainer, stage)(module, datamodule=datamodule, verbose=False)
    prefix = "val" if stage == "validate" else "test"
    scores: Scores = {}
    for key, value in trainer.callback_metrics.items():
        parts = key.split("/")
        if len(parts) == 3 and parts[0] == prefix and parts[2] in METRICS:
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
    steps with a :class:`HealingModule` (LoRA on the receiving layer, trainable projector, task cross-entropy), and
    yield it healed and masked; no second copy of the decoder is made.

    On exit, also after an exception (in healing or in the body), the model is restored exactly: the mask reset, the
    LoRA modules removed without merging (PEFT ``unload``), the trainable weights (projector, a tuned encoder) put
    back, and ``speechllm.config``, every ``requires_grad`` flag and every module's train/eval mode as on entry.
    """
    from lightning_speechllm.healing.module import HealingConfig, HealingModule

    if speechllm.has_lora:
        raise SweepError("healing in a sweep needs a model without LoRA adapters (merge a LoRA-tuned decoder's "
                         "adapters into its weights first): the healing LoRA would be taken for them")
    if speechllm.layer_mask.removed_layers:
        raise SweepError(f"healing in a sweep starts unpruned; the model masks layers "
                         f"{list(speechllm.layer_mask.removed_layers)}")
    snapshot = _Snapshot.take(speechllm)
    try:
        lora = LoraConfig(layers=None, r=config.heal_lora_r, alpha=config.heal_lora_alpha, dropout=0.05)
        module = HealingModule(healing=HealingConfig(removed_layers=list(plan.removed_layers), lora=lora),
                               optim=OptimConfig(lr=config.heal_lr, warmup_steps=config.heal_warmup_steps,
                                                 schedule="linear"),
                               speechllm=speechllm)
        trainer = _trainer(trainer_kwargs, max_steps=config.heal_steps, limit_val_batches=0, num_sanity_val_steps=0)
        trainer.fit(module, datamodule=datamodule)
        del module, trainer  # the optimizer state goes with them
        yield speechllm
    finally:
        snapshot.restore(speechllm)


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


def _signature(config: SweepConfig, speechllm: SpeechLLM, decoding: DecodingConfig | None) -> dict[str, Any]:
    """What a point file must agree on to be reused (the thresholds need not: the rule is re-applied): the settings,
    the model (base paths and a hash of its trained weights) and the content of the redundancy map."""
    decoding = decoding or DecodingConfig()
    healing = {key: getattr(config, key) for key in ("heal_steps", "heal_lr", "heal_warmup_steps", "heal_lora_r",
                                                     "heal_lora_alpha")} if config.heal else {}
    return {"method": config.method, "map_path": config.map_path, "map_sha256": _file_sha256(config.map_path),
            "stage": config.stage, "sets": config.sets, "heal": config.heal, **healing,
            "num_layers": speechllm.layer_mask.num_layers, "llm_path": speechllm.config.llm_path,
            "encoder_path": speechllm.config.encoder_path, "trained_weights_sha256": _weights_sha256(speechllm),
            "max_batches": config.max_batches, "max_new_tokens": decoding.max_new_tokens,
            "num_beams": decoding.num_beams}


def _file_sha256(path: str | None) -> str | None:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest() if path and Path(path).is_file() else None


def _weights_sha256(speechllm: SpeechLLM) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(speechllm.trainable_state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()


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
    if mask.removed_layers:
        raise SweepError(f"the model already masks layers {list(mask.removed_layers)}; a sweep starts unpruned")
    num_layers = mask.num_layers
    signature = _signature(config, speechllm, decoding)
    if config.heal and speechllm.has_lora:
        log.info("sweep: merging the model's LoRA adapters into its decoder weights (healing adds its own)")
        speechllm.merge_lora()
    result = RedundancyResult.from_json(config.map_path) if config.method != "last" else None
    model_id = getattr(speechllm.config, "llm_path", None)

    def run_eval(model: SpeechLLM) -> Scores:
        return score(model, datamodule, stage=config.stage, decoding=decoding, trainer_kwargs=trainer_kwargs,
                     max_batches=config.max_batches, sets=config.sets)

    baseline_file = out / "points" / "baseline.json"
    stored = _load_reusable(baseline_file, signature)
    if stored is None:
        baseline = run_eval(speechllm)
        write_json({"signature": signature, "scores": _scores_to_json(baseline)}, baseline_file)
    else:
        baseline = _scores_from_json(stored["scores"]) or {}
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
    (``Trainer.test``, ``max_batches`` as in the sweep), after the rule chose on the validation sets; None without
    test sets or without a chosen point.

    The chosen plan is masked again and, when the sweep healed, healed again with the same settings (the sweep does
    not keep healed weights), so the test score is the one of a second healing run of the chosen plan. The result
    goes to ``<output_dir>/test.json`` (reused by a rerun with the same settings and choice) and into ``sweep.json``
    under ``"test"``.
    """
    if not config.test_sets or chosen is None:
        return None
    out = Path(config.output_dir)
    signature = {**_signature(config, speechllm, decoding), "test_sets": list(config.test_sets),
                 "removed_layers": list(chosen.removed_layers)}
    stored = read_json(out / "test.json") if (out / "test.json").is_file() else None
    if stored is not None and stored.get("signature") == signature:
        result = stored["result"]
    else:
        score = evaluate_fn or evaluate

        def run_test(model: SpeechLLM) -> Scores:
            return score(model, datamodule, stage="test", decoding=decoding, trainer_kwargs=trainer_kwargs,
                         max_batches=config.max_batches, sets=config.test_sets)

        baseline = run_test(speechllm)
        model_id = getattr(speechllm.config, "llm_path", None)
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
                  "healed": config.heal, "baseline": _scores_to_json(baseline), "chosen": _scores_to_json(final)}
        write_json({"signature": signature, "result": result}, out / "test.json")
    summary_path = out / "sweep.json"
    if summary_path.is_file():
        summary = read_json(summary_path)
        summary["test"] = result
        write_json(summary, summary_path)
    return result


def describe_test(result: dict[str, Any]) -> str:
    """The scores of :func:`score_chosen_on_test`, one line per set and metric: baseline -> chosen (relative change)."""
    baseline, final = _scores_from_json(result["baseline"]) or {}, _scores_from_json(result["chosen"]) or {}
    lines = [f"test sets (scored once, after the rule chose {result['requested']} on the validation sets; "
             f"layers {result['removed_layers']}{', healed again' if result['healed'] else ''}):"]
    for name in sorted(baseline):
        for metric in METRICS:
            if metric in baseline[name]:
                base, value = baseline[name][metric], final.get(name, {}).get(metric, math.nan)
                lines.append(f"  {name} {metric}: {base:.2f} -> {value:.2f} "
                             f"({100 * relative_change(value, base):+.1f}%)")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ outputs
def _columns(table: SweepTable) -> list[str]:
    columns = ["method", "requested", "n", "removed_fraction", "removed_layers", "passes"]
    stages = ("before", "after") if table.healed else ("before",)
    for name, metric in table.set_metrics():
        for stage in stages:
            columns += [f"{name}/{metric}_{stage}", f"{name}/rel_d{metric}_{stage}"]
    return columns


def _rows(table: SweepTable, thresholds: Thresholds) -> list[dict[str, Any]]:
    base_row: dict[str, Any] = {"method": "baseline", "requested": "", "n": 0, "removed_fraction": 0.0,
                                "removed_layers": "", "passes": ""}
    for name, metric in table.set_metrics():
        for stage in ("before", "after"):
            base_row[f"{name}/{metric}_{stage}"] = table.baseline[name][metric]
            base_row[f"{name}/rel_d{metric}_{stage}"] = 0.0
    rows = [base_row]
    for point in sorted(table.points, key=lambda p: (p.removed_fraction, str(p.value))):
        row: dict[str, Any] = {"method": point.method, "requested": f"{point.kind}={point.value:g}", "n": point.n,
                               "removed_fraction": point.removed_fraction,
                               "removed_layers": " ".join(str(i) for i in point.removed_layers),
                               "passes": passes(point, table.baseline, thresholds)[0]}
        for name, metric in table.set_metrics():
            for stage, scores in (("before", point.before), ("after", point.after)):
                value = (scores or {}).get(name, {}).get(metric, math.nan)
                row[f"{name}/{metric}_{stage}"] = value
                row[f"{name}/rel_d{metric}_{stage}"] = relative_change(value, table.baseline[name][metric])
        rows.append(row)
    return rows


def _fmt(value: Any, percent: bool = False) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        return f"{100 * value:+.1f}%" if percent else f"{value:.2f}"
    return str(value)


def write_csv(table: SweepTable, path: str | Path, thresholds: Thresholds = Thresholds()) -> Path:
    """One row per point (and the baseline first), columns from :func:`_columns`; empty cells for NaN."""
    columns = _columns(table)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in _rows(table, thresholds):
        writer.writerow({k: ("" if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()})
    return atomic_write_text(buffer.getvalue(), path)


def format_markdown(table: SweepTable, thresholds: Thresholds = Thresholds(),
                    chosen: SweepPoint | None = None) -> str:
    """The sweep as a Markdown table plus the rule's verdict."""
    columns = _columns(table)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in _rows(table, thresholds):
        lines.append("| " + " | ".join(_fmt(row.get(c, ""), percent="/rel_d" in c) for c in columns) + " |")
    lines.append("")
    lines.append(describe_choice(table, thresholds, chosen))
    return "\n".join(lines) + "\n"


def describe_choice(table: SweepTable, thresholds: Thresholds, chosen: SweepPoint | None) -> str:
    """One sentence stating the rule and its outcome."""
    judged = "after healing" if table.healed else "without healing"
    rule = (f"rule: largest removed fraction with relative WER increase <= {thresholds.max_rel_wer_increase:.0%} on "
            f"every ASR set and relative BLEU drop <= {thresholds.max_rel_bleu_drop:.0%} on every AST set, {judged}")
    if chosen is None:
        return f"No sweep point passes ({rule})."
    return (f"Chosen: remove {chosen.n}/{chosen.num_layers} layers ({chosen.removed_fraction:.1%}), layers "
            f"{chosen.removed_layers} ({rule}).")


def plot_curves(table: SweepTable, path: str | Path, thresholds: Thresholds = Thresholds(),
                chosen: SweepPoint | None = None) -> Path:
    """WER/BLEU vs removed fraction per set: before (and after) healing, the baseline and the allowed band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pairs = table.set_metrics()
    if not pairs:
        raise SweepError("nothing to plot: the baseline has no WER/BLEU")
    figure, axes = plt.subplots(1, len(pairs), figsize=(4.2 * len(pairs), 3.4), squeeze=False)
    points = sorted(table.points, key=lambda p: p.removed_fraction)
    for ax, (name, metric) in zip(axes[0], pairs):
        base = table.baseline[name][metric]
        xs = [0.0] + [p.removed_fraction for p in points]
        before = [base] + [p.before.get(name, {}).get(metric, math.nan) for p in points]
        ax.plot(xs, before, "o-", label="pruned")
        if table.healed:
            after = [base] + [(p.after or {}).get(name, {}).get(metric, math.nan) for p in points]
            ax.plot(xs, after, "s--", label="pruned + healed")
        ax.axhline(base, color="grey", lw=1, label="baseline")
        if metric == "wer":
            ax.axhspan(base, base * (1 + thresholds.max_rel_wer_increase), color="green", alpha=0.12,
                       label=f"allowed (+{thresholds.max_rel_wer_increase:.0%})")
        else:
            ax.axhspan(base * (1 - thresholds.max_rel_bleu_drop), base, color="green", alpha=0.12,
                       label=f"allowed (-{thresholds.max_rel_bleu_drop:.0%})")
        if chosen is not None:
            ax.axvline(chosen.removed_fraction, color="red", ls=":", lw=1, label="chosen")
        ax.set_xlabel("fraction of decoder layers removed")
        ax.set_ylabel(f"{metric.upper()} (%)")
        ax.set_title(name)
        ax.legend(fontsize=7)
    figure.tight_layout()
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(target, dpi=110)
    plt.close(figure)
    return target


def write_outputs(table: SweepTable, out_dir: str | Path, thresholds: Thresholds = Thresholds(),
                  chosen: SweepPoint | None = None) -> dict[str, Path]:
    """``sweep.csv``, ``sweep.md``, ``sweep.json`` (table, thresholds, chosen) and ``sweep.png`` in ``out_dir``."""
    out = Path(out_dir)
    paths = {"csv": write_csv(table, out / "sweep.csv", thresholds),
             "md": atomic_write_text(format_markdown(table, thresholds, chosen), out / "sweep.md")}
    summary = table.to_dict()
    summary["thresholds"] = asdict(thresholds)
    summary["chosen"] = None if chosen is None else {
        "n": chosen.n, "removed_fraction": chosen.removed_fraction, "removed_layers": chosen.removed_layers,
        "requested": f"{chosen.kind}={chosen.value:g}"}
    summary["rule"] = describe_choice(table, thresholds, chosen)
    paths["json"] = write_json(summary, out / "sweep.json")
    if table.set_metrics():
        paths["png"] = plot_curves(table, out / "sweep.png", thresholds, chosen)
    return paths
