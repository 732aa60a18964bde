"""Pluggable healing losses: task cross-entropy, logit distillation (KL family) and hidden-state matching.

Every loss is a :class:`HealingLoss` that reads one :class:`HealingInputs` and returns ``(loss, extras)``; extras
are detached tensors worth logging (e.g. per-layer terms). A YAML list of :class:`LossSpec` builds a
:class:`WeightedHealingLoss` (the weighted sum; every part is reported separately)::

    losses:
      - class_path: TaskCrossEntropy          # short names resolve in this module
      - class_path: KLDivergence
        init_args: {direction: forward, temperature: 2.0}
        weight: 0.5
      - class_path: my_package.losses.MyLoss  # any importable HealingLoss subclass

Conventions: sequences are LEFT-padded as built by :meth:`lightning_speechllm.model.speechllm.SpeechLLM.build_inputs`,
so the targets are right-aligned. The logits (student and teacher), ``labels`` and ``target_mask`` cover the TARGET
WINDOW only: the last ``W`` of the ``T`` positions, ``W = target_window(labels)`` = the longest target + 1, i.e.
every position whose logits predict a target token (a ``[B, T, V]`` tensor at a 150k vocabulary is GBs).
``target_mask[b, t]`` is True where the logits at window position ``t`` predict a target token, i.e.
``labels[b, t + 1] != -100`` (see :func:`prediction_mask`). ``attention_mask`` and the hidden states keep all ``T``
positions; :meth:`HealingInputs.in_window` cuts them to the window. A loss that needs logits at every position
sets ``needs_full_logits = True`` (then ``W == T``). Hidden states are the pre-norm residual stream recorded by
:meth:`lightning_speechllm.model.layer_mask.DecoderLayerMask.record_residual_stream`.
"""
from __future__ import annotations

import importlib
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from lightning_speechllm.model.speechllm import IGNORE_INDEX

__all__ = [
    "HealingInputs",
    "HealingLoss",
    "HiddenStateCosine",
    "HiddenStateMSE",
    "KLDivergence",
    "LossSpec",
    "ReplacementMSE",
    "TaskCrossEntropy",
    "TextTeacherKL",
    "WeightedHealingLoss",
    "build_losses",
    "layer_map_for",
    "load_loss",
    "prediction_mask",
    "upcast",
]


def prediction_mask(labels: Tensor) -> Tensor:
    """Bool ``[B, T]``: True at positions whose logits predict a target token (``labels[:, t + 1] != -100``)."""
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return mask


def layer_map_for(kept_layers: Sequence[int], stream_targets: Sequence[int] | None = None) -> dict[int, int]:
    """Student residual-state index -> teacher residual-state index.

    The student runs the kept layers ``kept_layers`` (original numbering, sorted); its state ``x^0`` (embeddings)
    is the teacher's ``x^0`` and its state ``x^k`` (output of its k-th kept layer, original layer ``i``) is the
    teacher's state after the same original layer, ``x^(i+1)``. With replacement modules in the layer list, give
    ``stream_targets`` (:meth:`~lightning_speechllm.model.layer_mask.DecoderLayerMask.stream_targets`): the teacher
    state each student state stands for.
    """
    kept = list(kept_layers)
    if kept != sorted(set(kept)) or any(i < 0 for i in kept):
        raise ValueError(f"kept layers must be sorted, unique and non-negative, got {kept}")
    targets = [layer + 1 for layer in kept] if stream_targets is None else list(stream_targets)
    return {0: 0, **{k + 1: target for k, target in enumerate(targets)}}


@dataclass
class HealingInputs:
    """Everything a healing loss may read for one batch.

    Logits, ``labels`` and ``target_mask`` cover the target window: the last ``W`` of the batch's ``T`` positions
    (``W = target_window(labels)``: every position whose logits predict a target token; ``W == T`` when a loss
    sets ``needs_full_logits``). ``attention_mask`` and hidden states cover all ``T`` positions."""

    student_logits: Tensor
    """``[B, W, V]`` logits of the pruned (student) model at the window's positions."""
    labels: Tensor
    """``[B, W]`` token ids of the targets, -100 elsewhere (unshifted, as built by ``build_inputs``, cut to the
    window)."""
    target_mask: Tensor
    """``[B, W]`` bool: logits at window position ``t`` predict a target token (see :func:`prediction_mask`)."""
    attention_mask: Tensor | None = None
    """``[B, T]`` 1 on real tokens, 0 on padding, over ALL positions (for losses over all tokens)."""
    teacher_logits: Tensor | None = None
    """``[B, W, V]`` logits of the unpruned teacher at the same positions, when a loss needs them."""
    student_hidden: list[Tensor] = field(default_factory=list)
    """Student residual states ``x^0 .. x^K`` (K kept layers), each ``[B, T, D]`` (all positions)."""
    teacher_hidden: list[Tensor] = field(default_factory=list)
    """Teacher residual states ``x^0 .. x^L`` (all layers), each ``[B, T, D]`` (all positions)."""
    layer_map: dict[int, int] = field(default_factory=dict)
    """Student state index -> teacher state index (see :func:`layer_map_for`)."""
    replacement_states: list[int] = field(default_factory=list)
    """Student state indices produced by replacement modules (each mapped in ``layer_map`` to the teacher state
    after the block it replaces)."""

    @property
    def window(self) -> int:
        """``W``: how many final positions the logits, labels and target mask cover."""
        return self.labels.shape[1]

    def in_window(self, tensor: Tensor) -> Tensor:
        """The last ``W`` positions of an all-positions ``[B, T, ...]`` tensor (a hidden state, the attention
        mask), aligned with the logits, labels and target mask."""
        return tensor[:, tensor.shape[1] - self.window:]


class HealingLoss(nn.Module):
    """Base class: ``forward(inputs) -> (scalar loss, {name: detached tensor to log})``.

    Subclasses declare what they read, so the healing module runs the teacher / records hidden states only when
    some loss needs them.
    """

    needs_teacher: bool = False
    needs_hidden_states: bool = False
    needs_full_logits: bool = False
    """True: the logits cover every position (``W == T``), not just the target window; costly at a large vocabulary."""
    teacher_reads_text: bool = False
    """True: the teacher reads each utterance's transcript as text, through the same prompt, instead of its speech."""
    teacher_response: bool = False
    """True: the response both models are teacher-forced on is the teacher's own greedy answer, not the target."""

    def forward(self, inputs: HealingInputs) -> tuple[Tensor, dict[str, Tensor]]:  # pragma: no cover - abstract
        raise NotImplementedError(f"{type(self).__name__} must implement forward(inputs)")


def _require(value: Any, what: str, loss: HealingLoss) -> Any:
    if value is None or (isinstance(value, list) and not value):
        raise ValueError(f"{type(loss).__name__} needs {what}, but the healing inputs have none")
    return value


def upcast(tensor: Tensor) -> Tensor:
    """Half-precision tensors in float32 (float32/float64 stay as they are)."""
    return tensor.float() if tensor.dtype in (torch.float16, torch.bfloat16) else tensor




class TaskCrossEntropy(HealingLoss):
    """Next-token cross-entropy of the student on the target tokens (the plain healing objective)."""

    def __init__(self, label_smoothing: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        self.label_smoothing = label_smoothing

    def forward(self, inputs: HealingInputs) -> tuple[Tensor, dict[str, Tensor]]:
        labels = _require(inputs.labels, "labels", self)
        targets = labels[:, 1:] != IGNORE_INDEX
        # Only the target positions are upcast (the mean over them is what ignore_index gave on all positions).
        logits = upcast(inputs.student_logits[:, :-1][targets])
        loss = nn.functional.cross_entropy(logits, labels[:, 1:][targets], label_smoothing=self.label_smoothing)
        return loss, {}


KL_DIRECTIONS = ("forward", "reverse", "symmetric", "skew")


class KLDivergence(HealingLoss):
    """Logit distillation from the teacher over the target tokens, scaled by ``temperature**2``.

    With ``p = softmax(teacher / T)`` and ``q = softmax(student / T)`` per token:
    ``forward`` = KL(p || q) (mean-seeking, classic KD); ``reverse`` = KL(q || p) (mode-seeking);
    ``symmetric`` = Jensen-Shannon, ½ KL(p || m) + ½ KL(q || m) with m = ½ (p + q);
    ``skew`` = KL(p || α p + (1 - α) q) with α = ``skew_alpha`` (skew KL of DistiLLM).
    The per-token divergences are averaged over the target tokens.
    """

    needs_teacher = True

    def __init__(self, direction: str = "forward", temperature: float = 1.0, skew_alpha: float = 0.1) -> None:
        super().__init__()
        if direction not in KL_DIRECTIONS:
            raise ValueError(f"KLDivergence direction must be one of {KL_DIRECTIONS}, got {direction!r}")
        if temperature <= 0:
            raise ValueError(f"KLDivergence temperature must be > 0, got {temperature}")
        if not 0.0 < skew_alpha < 1.0:
            raise ValueError(f"KLDivergence skew_alpha must be in (0, 1), got {skew_alpha}")
        self.direction, self.temperature, self.skew_alpha = direction, temperature, skew_alpha

    def forward(self, inputs: HealingInputs) -> tuple[Tensor, dict[str, Tensor]]:
        teacher = _require(inputs.teacher_logits, "teacher logits", self)
        mask = inputs.target_mask
        log_q = torch.log_softmax(upcast(inputs.student_logits[mask]) / self.temperature, dim=-1)
        log_p = torch.log_softmax(upcast(teacher[mask]).detach() / self.temperature, dim=-1)
        if log_q.shape[0] == 0:
            raise ValueError("KLDivergence: the batch has no target tokens (empty target_mask)")
        per_token = self._divergence(log_p, log_q)
        return per_token.mean() * self.temperature ** 2, {}

    def _divergence(self, log_p: Tensor, log_q: Tensor) -> Tensor:
        if self.direction == "forward":
            return _kl(log_p, log_q)
        if self.direction == "reverse":
            return _kl(log_q, log_p)
        if self.direction == "symmetric":
            log_m = torch.logsumexp(torch.stack([log_p, log_q]), dim=0) - math.log(2.0)
            return 0.5 * _kl(log_p, log_m) + 0.5 * _kl(log_q, log_m)
        alpha = self.skew_alpha
        log_mix = torch.logaddexp(log_p + math.log(alpha), log_q + math.log(1 - alpha))
        return _kl(log_p, log_mix)


RESPONSES = ("teacher", "target")


class TextTeacherKL(KLDivergence):
    """Distillation from a text teacher (DiVA, Ultravox): the unpruned LLM reads the utterance's *transcript as text*
    through the same prompt, the pruned speech model hears it, and the loss is the KL between their distributions over
    the response tokens (``direction`` / ``temperature`` / ``skew_alpha`` as :class:`KLDivergence`).

    ``response='teacher'`` (label-free): both are teacher-forced on the teacher's own greedy answer to the text
    (at most ``max_response_tokens``), so no ground-truth response is read; the transcript is only the teacher's
    input. ``response='target'``: on the batch's target text. Alone, it needs no `TaskCrossEntropy` (beside
    ``response='teacher'``, a `TaskCrossEntropy` trains on the teacher's answers, cut at ``max_response_tokens``, as
    pseudo-labels); hidden-state losses and the speech-input `KLDivergence` cannot join it (their teacher hears the
    speech), nor losses that need logits at every position.
    """

    teacher_reads_text = True

    def __init__(self, direction: str = "forward", temperature: float = 1.0, skew_alpha: float = 0.1,
                 response: str = "teacher", max_response_tokens: int = 64) -> None:
        super().__init__(direction, temperature, skew_alpha)
        if response not in RESPONSES:
            raise ValueError(f"TextTeacherKL response must be one of {RESPONSES}, got {response!r}")
        if max_response_tokens < 1:
            raise ValueError(f"TextTeacherKL max_response_tokens must be >= 1, got {max_response_tokens}")
        self.response, self.max_response_tokens = response, max_response_tokens
        self.teacher_response = response == "teacher"


def _kl(log_a: Tensor, log_b: Tensor) -> Tensor:
    """Per-row KL(a || b) from log-probabilities (0 · log 0 counts as 0)."""
    terms = log_a.exp() * (log_a - log_b)
    return torch.where(torch.isneginf(log_a), torch.zeros_like(terms), terms).sum(-1)


class _HiddenStateLoss(HealingLoss):
    """Shared selection of layers and tokens for the hidden-state losses."""

    needs_teacher = True
    needs_hidden_states = True

    def __init__(self, states: list[int] | None = None, tokens: str = "target") -> None:
        super().__init__()
        if tokens not in ("target", "all"):
            raise ValueError(f"tokens must be 'target' or 'all' (non-pad), got {tokens!r}")
        self.states, self.tokens = states, tokens

    def _pairs(self, inputs: HealingInputs) -> list[tuple[int, int]]:
        layer_map = _require(inputs.layer_map, "a layer map", self)
        _require(inputs.student_hidden, "student hidden states", self)
        _require(inputs.teacher_hidden, "teacher hidden states", self)
        n = len(inputs.student_hidden)
        chosen = [s for s in sorted(layer_map) if s > 0] if self.states is None else self.states
        pairs = []
        for s in chosen:
            index = s + n if s < 0 else s
            if index not in layer_map:
                raise ValueError(f"{type(self).__name__}: student state {s} is not in the layer map "
                                 f"(mapped states: {sorted(layer_map)})")
            pairs.append((index, layer_map[index]))
        return pairs

    def _token_mask(self, inputs: HealingInputs) -> Tensor:
        """``[B, n]`` bool over the LAST n positions of the hidden states: all of them with tokens='all', the
        target window otherwise."""
        if self.tokens == "all":
            mask = _require(inputs.attention_mask, "an attention mask (tokens='all')", self)
            return mask.bool()
        return inputs.target_mask

    def _per_token(self, student: Tensor, teacher: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, inputs: HealingInputs) -> tuple[Tensor, dict[str, Tensor]]:
        mask = self._token_mask(inputs)
        if not bool(mask.any()):
            raise ValueError(f"{type(self).__name__}: the batch has no selected tokens (empty mask)")
        terms = {}
        for s, t in self._pairs(inputs):
            # The chosen tokens are picked first, then upcast: [N, D] in float32, not [B, T, D].
            student = upcast(_last(inputs.student_hidden[s], mask.shape[1])[mask])
            teacher = upcast(_last(inputs.teacher_hidden[t], mask.shape[1])[mask]).detach()
            terms[f"state{s}"] = self._per_token(student, teacher).mean()
        loss = torch.stack(list(terms.values())).mean()
        return loss, {k: v.detach() for k, v in terms.items()}


def _last(tensor: Tensor, count: int) -> Tensor:
    """The last `count` positions of a ``[B, T, ...]`` tensor."""
    return tensor[:, tensor.shape[1] - count:]


class HiddenStateMSE(_HiddenStateLoss):
    """Mean squared error between mapped student and teacher residual states (mean over features, tokens,
    layers). ``states``: student state indices to match (negative = from the end); None = every kept layer."""

    def _per_token(self, student: Tensor, teacher: Tensor) -> Tensor:
        return (student - teacher).pow(2).mean(-1)


class ReplacementMSE(_HiddenStateLoss):
    """MSE between each replacement module's output and the teacher's state after the block it replaces,
    ``x^(l+n)`` (LLM-Streamline), over all non-pad tokens by default. ``relative``: divided by the teacher state's
    mean square, so the loss is scale-free (about 1 for a zero output) and mixes with CE without tuning."""

    def __init__(self, tokens: str = "all", relative: bool = True) -> None:
        super().__init__(states=None, tokens=tokens)
        self.relative = relative

    def _pairs(self, inputs: HealingInputs) -> list[tuple[int, int]]:
        chosen = _require(inputs.replacement_states, "replacement modules (healing.replacement)", self)
        layer_map = _require(inputs.layer_map, "a layer map", self)
        return [(s, layer_map[s]) for s in chosen]

    def _per_token(self, student: Tensor, teacher: Tensor) -> Tensor:
        error = (student - teacher).pow(2).mean(-1)
        return error / teacher.pow(2).mean(-1).clamp_min(1e-12) if self.relative else error


class HiddenStateCosine(_HiddenStateLoss):
    """``1 - cos(student, teacher)`` between mapped residual states, averaged over tokens and layers."""

    def _per_token(self, student: Tensor, teacher: Tensor) -> Tensor:
        return 1.0 - nn.functional.cosine_similarity(student, teacher, dim=-1, eps=1e-8)


# ------------------------------------------------------------------------------------------------ construction
@dataclass
class LossSpec:
    """One entry of the YAML ``losses`` list."""

    class_path: str = "TaskCrossEntropy"
    """A loss of this module by class name, or ``package.module.ClassName`` of any HealingLoss subclass."""
    init_args: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments of the loss constructor."""
    weight: float = 1.0
    """Weight in the total loss."""
    name: str | None = None
    """Name in the logs (``train/loss/<name>``); defaults to the class name in snake case."""


def load_loss(class_path: str, init_args: dict[str, Any] | None = None) -> HealingLoss:
    """Import ``class_path`` (a bare name resolves in this module) and build it with ``init_args``."""
    module_name, _, class_name = class_path.rpartition(".")
    module_name = module_name or __name__
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as error:
        raise ImportError(f"healing loss class_path {class_path!r} does not import: {error}") from error
    if not (isinstance(cls, type) and issubclass(cls, HealingLoss)):
        raise TypeError(f"healing loss class_path {class_path!r} is {cls!r}, not a subclass of HealingLoss")
    try:
        return cls(**(init_args or {}))
    except TypeError as error:
        raise TypeError(f"cannot build {class_path!r} with init_args {init_args}: {error}") from error


def _snake(name: str) -> str:
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "_", name).lower()


class WeightedHealingLoss(nn.Module):
    """The weighted sum of named healing losses; returns the total and every (unweighted) part."""

    def __init__(self, losses: dict[str, HealingLoss], weights: dict[str, float]) -> None:
        super().__init__()
        if not losses:
            raise ValueError("at least one healing loss is needed")
        if set(losses) != set(weights):
            raise ValueError(f"loss names {sorted(losses)} and weight names {sorted(weights)} differ")
        self.parts = nn.ModuleDict(losses)
        self.weights = dict(weights)

    @property
    def needs_teacher(self) -> bool:
        return any(loss.needs_teacher for loss in self.parts.values())

    @property
    def needs_hidden_states(self) -> bool:
        return any(loss.needs_hidden_states for loss in self.parts.values())

    @property
    def needs_full_logits(self) -> bool:
        return any(loss.needs_full_logits for loss in self.parts.values())

    @property
    def teacher_reads_text(self) -> bool:
        return any(loss.teacher_reads_text for loss in self.parts.values())

    @property
    def teacher_response_tokens(self) -> int | None:
        """The longest answer a loss asks the teacher to generate as the response (None: the batch's targets)."""
        lengths = [getattr(loss, "max_response_tokens", 64) for loss in self.parts.values() if loss.teacher_response]
        return max(lengths) if lengths else None

    def check_teachers(self) -> None:
        """Refuse losses whose teachers would read different inputs (one teacher pass serves them all)."""
        text = {name for name, loss in self.parts.items() if loss.teacher_reads_text}
        speech = {name for name, loss in self.parts.items() if loss.needs_teacher and not loss.teacher_reads_text}
        hidden = {name for name, loss in self.parts.items() if loss.needs_hidden_states}
        full = {name for name, loss in self.parts.items() if loss.needs_full_logits}
        if text and full:
            raise ValueError(f"healing losses {sorted(text)} read a text teacher, whose prompt positions do not line "
                             f"up with the speech input's, and {sorted(full)} need logits at every position")
        if text and (speech or hidden):
            raise ValueError(f"healing losses {sorted(text)} read a teacher that hears the transcript as text, and "
                             f"{sorted(speech | hidden)} one that hears the speech (or compare hidden states position "
                             "by position, which a text input does not line up with): use one kind")

    def forward(self, inputs: HealingInputs) -> tuple[Tensor, dict[str, Tensor]]:
        """``(total, parts)``: parts holds each loss (graph kept, unweighted) and its extras as ``name/key``."""
        parts: dict[str, Tensor] = {}
        total: Tensor | None = None
        for name, loss in self.parts.items():
            value, extras = loss(inputs)
            parts[name] = value
            parts.update({f"{name}/{key}": extra for key, extra in extras.items()})
            weighted = self.weights[name] * value
            total = weighted if total is None else total + weighted
        return total, parts


def build_losses(specs: Sequence[LossSpec | dict[str, Any]]) -> WeightedHealingLoss:
    """A :class:`WeightedHealingLoss` from specs (dicts are accepted); repeated names get ``_2``, ``_3`` ..."""
    losses: dict[str, HealingLoss] = {}
    weights: dict[str, float] = {}
    for position, spec in enumerate(specs):
        if isinstance(spec, dict):
            unknown = sorted(set(spec) - {"class_path", "init_args", "weight", "name"})
            if unknown or "class_path" not in spec:
                raise KeyError(f"losses[{position}]: needs 'class_path', unknown keys {unknown}")
            spec = LossSpec(**spec)
        name = spec.name or _snake(spec.class_path.rpartition(".")[2])
        base, suffix = name, 2
        while name in losses:
            name, suffix = f"{base}_{suffix}", suffix + 1
        losses[name] = load_loss(spec.class_path, spec.init_args)
        weights[name] = float(spec.weight)
    combined = WeightedHealingLoss(losses, weights)
    combined.check_teachers()
    return combined
