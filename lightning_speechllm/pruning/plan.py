"""Pruning plans: which decoder layers to remove, why, and for which model.

A :class:`PruningPlan` is a small JSON-serialisable record (``format_version`` 1) built from a measured redundancy
map (:class:`~lightning_speechllm.redundancy.analysis.RedundancyResult`) or from a fixed rule:

* ``angular`` — the block ``l*(n) .. l*(n)+n-1`` of the pruning path (Gromov et al.),
* ``block_influence`` — the ``n`` layers of lowest Block Influence (ShortGPT), possibly non-contiguous,
* ``last`` — the deepest ``n`` layers with the final layer kept (Gromov's simple heuristic),
* ``explicit`` — a user-given list,
* ``attention`` — the attention sublayers (not whole layers) of the ``n`` layers whose attention changes the
  residual stream least (LLM-Drop), from a :class:`~lightning_speechllm.redundancy.sublayers.SublayerMap`,
* ``greedy`` — blocks removed one at a time, re-measuring the model after each cut (SLEB-style; built on the model
  itself by :func:`lightning_speechllm.pruning.greedy.plan_greedy`), possibly non-contiguous.

Layer indices are positions in the decoder the plan is for (``num_layers`` layers); :func:`apply_plan` masks them on
a :class:`~lightning_speechllm.model.speechllm.SpeechLLM`, a :class:`DecoderLayerMask` or a bare HF causal LM.
"""
from __future__ import annotations

import datetime as dt
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args

from torch import nn

from lightning_speechllm.io_utils import read_json, write_json
from lightning_speechllm.model.layer_mask import DecoderLayerMask
from lightning_speechllm.redundancy.analysis import RedundancyResult

if TYPE_CHECKING:
    from lightning_speechllm.redundancy.sublayers import SublayerMap

__all__ = [
    "PLAN_FORMAT_VERSION",
    "PLAN_KIND",
    "PLAN_METHODS",
    "PlanError",
    "PlanMethod",
    "PruningPlan",
    "apply_plan",
    "block_size",
    "plan_angular",
    "plan_block_influence",
    "plan_explicit",
    "plan_last",
    "plan_sublayers",
    "same_model_id",
]

PLAN_FORMAT_VERSION = 1
PLAN_KIND = "lightning_speechllm.pruning_plan"
PlanMethod = Literal["angular", "block_influence", "last", "explicit", "greedy", "attention", "budget"]
PLAN_METHODS: tuple[str, ...] = get_args(PlanMethod)


class PlanError(ValueError):
    """An invalid plan, or a plan that does not fit the model it is applied to."""


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def same_model_id(a: str, b: str) -> bool:
    """Whether two model ids (asset names or paths) name the same model: equal strings, the same existing
    directory, or the same final path component (``smollm2-135m`` == ``checkpoints/pretrained/smollm2-135m``)."""
    if a == b:
        return True
    path_a, path_b = Path(a).expanduser(), Path(b).expanduser()
    if path_a.exists() and path_b.exists() and path_a.resolve() == path_b.resolve():
        return True
    name_a, name_b = path_a.name, path_b.name
    return bool(name_a) and name_a == name_b


def receiving_layers(removed: list[int] | tuple[int, ...], num_layers: int) -> list[int]:
    """The kept layer that receives each removed block: the first kept layer after it (or, for a block at the
    end of the decoder, the last kept layer before it)."""
    removed_set = set(removed)
    kept = [i for i in range(num_layers) if i not in removed_set]
    if not kept:
        raise PlanError(f"the plan removes all {num_layers} decoder layers")
    receivers = set()
    for i in removed_set:
        if i - 1 in removed_set:
            continue  # not the start of a block
        end = i
        while end + 1 in removed_set:
            end += 1
        after = [k for k in kept if k > end]
        receivers.add(after[0] if after else max(k for k in kept if k < i))
    return sorted(receivers)


@dataclass
class PruningPlan:
    """Decoder layers to remove from a model of ``num_layers`` layers.

    ``removed_layers`` are sorted indices (no duplicates, in range, at least one layer left); ``params`` records the
    builder's arguments (``{"n": 4}``, ``{"fraction": 0.3, "n": 9}``...); ``source_map`` is the redundancy JSON the
    plan came from (or None) and ``model_id`` the LLM path/name it is meant for (or None: not checked).
    """

    removed_layers: list[int]
    num_layers: int
    method: PlanMethod
    params: dict[str, Any] = field(default_factory=dict)
    source_map: str | None = None
    model_id: str | None = None
    created: str = field(default_factory=_now)
    removed_attention: list[int] = field(default_factory=list)
    """Layers that keep their MLP but lose their attention sublayer (and KV cache)."""
    removed_mlp: list[int] = field(default_factory=list)
    """Layers that keep their attention but lose their MLP sublayer."""

    def __post_init__(self) -> None:
        if self.method not in PLAN_METHODS:
            raise PlanError(f"unknown plan method {self.method!r}; expected one of {PLAN_METHODS}")
        if isinstance(self.num_layers, bool) or not isinstance(self.num_layers, int) or self.num_layers < 1:
            raise PlanError(f"num_layers must be a positive int, got {self.num_layers!r}")
        if isinstance(self.removed_layers, (str, bytes)) or not isinstance(self.removed_layers, Sequence):
            raise PlanError(f"removed_layers must be a list of ints, got {type(self.removed_layers).__name__}")
        for position, index in enumerate(self.removed_layers):
            if isinstance(index, bool) or not isinstance(index, int):
                raise PlanError(f"removed_layers[{position}]={index!r} is not an int")
        duplicates = sorted({i for i in self.removed_layers if list(self.removed_layers).count(i) > 1})
        if duplicates:
            raise PlanError(f"duplicate layer indices in removed_layers: {duplicates}")
        self.removed_layers = sorted(self.removed_layers)
        self.removed_attention = sorted(int(i) for i in self.removed_attention)
        self.removed_mlp = sorted(int(i) for i in self.removed_mlp)
        self.params = dict(self.params)
        self._check_layers(self.num_layers)

    # ----------------------------------------------------------------------------------------------- derived
    @property
    def kept_layers(self) -> list[int]:
        """Indices of the layers that stay, sorted."""
        removed = set(self.removed_layers)
        return [i for i in range(self.num_layers) if i not in removed]

    @property
    def receiving_layer(self) -> int | None:
        """The first kept layer after the last removed layer: the layer that receives the cut and that LoRA heals by
        default. None when nothing is removed or the cut reaches the last layer."""
        if not self.removed_layers:
            return None
        after = [i for i in self.kept_layers if i > self.removed_layers[-1]]
        return after[0] if after else None

    @property
    def receiving_layers(self) -> list[int]:
        """The kept layer receiving each removed block (what healing puts LoRA on by default); unlike
        :attr:`receiving_layer`, a block at the end of the decoder is received by the last kept layer before it."""
        return receiving_layers(self.removed_layers, self.num_layers) if self.removed_layers else []

    @property
    def receiving_layer_pruned(self) -> int | None:
        """:attr:`receiving_layer` as an index of the pruned model (layers renumbered ``0..k-1``)."""
        layer = self.receiving_layer
        return None if layer is None else self.kept_layers.index(layer)

    @property
    def is_contiguous(self) -> bool:
        """Whether the removed layers form one block."""
        layers = self.removed_layers
        return not layers or layers[-1] - layers[0] + 1 == len(layers)

    # ----------------------------------------------------------------------------------------------- validation
    def _check_layers(self, num_layers: int) -> None:
        for position, index in enumerate(self.removed_layers):
            if not 0 <= index < num_layers:
                raise PlanError(
                    f"removed layer index {index} (removed_layers[{position}]) is out of range for a decoder of "
                    f"{num_layers} layers (valid: 0..{num_layers - 1})"
                )
        both = sorted(set(self.removed_attention) & set(self.removed_mlp))
        if both:
            raise PlanError(f"layers {both} are in both removed_attention and removed_mlp: remove them as whole layers "
                            "(removed_layers) instead")
        for key in ("removed_attention", "removed_mlp"):
            values = getattr(self, key)
            bad = [i for i in values if not 0 <= i < num_layers or i in self.removed_layers]
            if bad or len(set(values)) != len(values):
                raise PlanError(f"{key} {values}: indices {bad} are out of range for {num_layers} layers or already "
                                "removed as whole layers (or listed twice)")
        if len(self.removed_layers) >= num_layers:
            raise PlanError(
                f"the plan removes all {num_layers} decoder layers: nothing left (at least one layer must stay)"
            )

    def validate_for(self, num_layers: int, model_id: str | None = None) -> None:
        """Raise :class:`PlanError` unless the plan fits a decoder of ``num_layers`` layers (and, when both the plan
        and the caller name one, the model ``model_id``)."""
        if num_layers != self.num_layers:
            raise PlanError(
                f"layer count mismatch: the plan is for a decoder of {self.num_layers} layers but the model has "
                f"{num_layers}"
            )
        self._check_layers(num_layers)
        if model_id is not None and self.model_id is not None and not same_model_id(self.model_id, model_id):
            raise PlanError(
                f"model mismatch: the plan was made for model {self.model_id!r} but is applied to {model_id!r}"
            )

    # ----------------------------------------------------------------------------------------------- JSON
    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict, with the derived ``kept_layers`` and ``receiving_layer`` for readers."""
        return {
            "format_version": PLAN_FORMAT_VERSION,
            "kind": PLAN_KIND,
            "method": self.method,
            "params": self.params,
            "num_layers": self.num_layers,
            "removed_layers": list(self.removed_layers),
            "kept_layers": self.kept_layers,
            "receiving_layer": self.receiving_layer,
            "removed_attention": list(self.removed_attention),
            "removed_mlp": list(self.removed_mlp),
            "source_map": self.source_map,
            "model_id": self.model_id,
            "created": self.created,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "<dict>") -> "PruningPlan":
        """Inverse of :meth:`to_dict`; ``source`` names the file in error messages. Derived keys are checked."""
        version = data.get("format_version")
        if version != PLAN_FORMAT_VERSION:
            raise PlanError(f"{source}: unsupported format_version {version!r}, expected {PLAN_FORMAT_VERSION}")
        if data.get("kind", PLAN_KIND) != PLAN_KIND:
            raise PlanError(f"{source}: kind is {data.get('kind')!r}, expected {PLAN_KIND!r} (not a pruning plan)")
        missing = [key for key in ("removed_layers", "num_layers", "method") if key not in data]
        if missing:
            raise PlanError(f"{source}: missing key(s) {missing}")
        try:
            plan = cls(removed_layers=list(data["removed_layers"]), num_layers=data["num_layers"],
                       method=data["method"], params=dict(data.get("params") or {}),
                       source_map=data.get("source_map"), model_id=data.get("model_id"),
                       created=data.get("created") or _now(),
                       removed_attention=list(data.get("removed_attention") or []),
                       removed_mlp=list(data.get("removed_mlp") or []))
        except (PlanError, TypeError) as error:
            raise PlanError(f"{source}: {error}") from error
        for key in ("kept_layers", "receiving_layer"):
            if key in data and data[key] != getattr(plan, key):
                raise PlanError(f"{source}: {key} is {data[key]!r} but removed_layers imply {getattr(plan, key)!r}")
        return plan

    def to_json(self, path: str | Path) -> Path:
        """Write the plan as JSON atomically (temporary file + rename); returns the path."""
        return write_json(self.to_dict(), path)

    @classmethod
    def from_json(cls, path: str | Path) -> "PruningPlan":
        """Read a plan written by :meth:`to_json`; errors name the file (and line for invalid JSON)."""
        try:
            data = read_json(path)
        except FileNotFoundError as error:
            raise PlanError(f"pruning plan file {path} does not exist") from error
        except ValueError as error:
            raise PlanError(str(error)) from error
        return cls.from_dict(data, source=str(path))

    @property
    def dropped_sublayers(self) -> list[int]:
        """Layers that lose a sublayer (attention or MLP), sorted."""
        return sorted({*self.removed_attention, *self.removed_mlp})

    def summary(self) -> str:
        """One line: method, removed and kept counts, receiving layer, dropped sublayers."""
        fraction = len(self.removed_layers) / self.num_layers
        line = (f"{self.method} plan: remove {len(self.removed_layers)}/{self.num_layers} layers ({fraction:.1%}) "
                f"{self.removed_layers}; keep {self.kept_layers}; receiving layer {self.receiving_layer}")
        if self.removed_attention:
            line += f"; attention dropped at {self.removed_attention}"
        if self.removed_mlp:
            line += f"; MLP dropped at {self.removed_mlp}"
        return line


# --------------------------------------------------------------------------------------------------- builders
def block_size(num_layers: int, n: int | None = None, fraction: float | None = None) -> int:
    """The number of layers to remove: ``n``, or ``round(fraction * num_layers)`` (half up, at least 1).

    Exactly one of ``n`` / ``fraction`` must be given; the result is in ``1 .. num_layers - 1``.
    """
    if (n is None) == (fraction is None):
        raise PlanError(f"give exactly one of n / fraction, got n={n!r}, fraction={fraction!r}")
    if fraction is not None:
        if not 0.0 < fraction < 1.0:
            raise PlanError(f"fraction must be in (0, 1), got {fraction!r}")
        n = max(1, math.floor(fraction * num_layers + 0.5))
    assert n is not None
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise PlanError(f"n must be a positive int, got {n!r}")
    if n >= num_layers:
        raise PlanError(
            f"cannot remove {n} of {num_layers} decoder layers: nothing left (n must be at most {num_layers - 1})"
        )
    return n


def _params(n: int, fraction: float | None) -> dict[str, Any]:
    return {"n": n} if fraction is None else {"fraction": fraction, "n": n}


def plan_angular(result: RedundancyResult, n: int | None = None, fraction: float | None = None,
                 source_map: str | Path | None = None) -> PruningPlan:
    """Remove the block ``l*(n) .. l*(n)+n-1`` of the measured pruning path (minimum angular distance d(l, n))."""
    size = block_size(result.num_layers, n, fraction)
    first = int(result.path[size - 1])
    if not 0 <= first <= result.num_layers - size:
        raise PlanError(f"path[{size - 1}] = {first} is not a valid first layer for a block of {size} layers "
                        f"in a decoder of {result.num_layers} layers")
    params = _params(size, fraction)
    params["distance"] = float(result.table[size - 1, first])
    return PruningPlan(removed_layers=list(range(first, first + size)), num_layers=result.num_layers,
                       method="angular", params=params, source_map=_str(source_map), model_id=result.model_id)


def plan_block_influence(result: RedundancyResult, n: int | None = None, fraction: float | None = None,
                         source_map: str | Path | None = None) -> PruningPlan:
    """Remove the ``n`` layers of lowest Block Influence (ShortGPT); they need not be contiguous."""
    size = block_size(result.num_layers, n, fraction)
    removed = sorted(int(i) for i in result.bi_ranking[:size])
    return PruningPlan(removed_layers=removed, num_layers=result.num_layers, method="block_influence",
                       params=_params(size, fraction), source_map=_str(source_map), model_id=result.model_id)


def plan_last(num_layers: int, n: int | None = None, fraction: float | None = None,
              model_id: str | None = None) -> PruningPlan:
    """Remove the deepest ``n`` layers but keep the final one: layers ``L-1-n .. L-2`` (Gromov et al.)."""
    size = block_size(num_layers, n, fraction)
    return PruningPlan(removed_layers=list(range(num_layers - 1 - size, num_layers - 1)), num_layers=num_layers,
                       method="last", params=_params(size, fraction), model_id=model_id)


def plan_sublayers(result: "SublayerMap", num_layers: int, n: int | None = None, fraction: float | None = None,
                   kind: str = "attention", source_map: str | Path | None = None) -> PruningPlan:
    """Drop the ``kind`` ('attention') sublayer of the ``n`` layers where it changes the residual stream least
    (``fraction`` counts sublayers of that kind, like layers for the other methods)."""
    if kind != "attention":
        raise PlanError(f"only attention sublayer plans are built from a map, got kind {kind!r}")
    if len(result.layers) != num_layers:
        raise PlanError(f"the sublayer map covers {len(result.layers)} layers, the decoder has {num_layers}")
    if (n is None) == (fraction is None):
        raise PlanError(f"give exactly one of n / fraction, got n={n!r}, fraction={fraction!r}")
    size = n if n is not None else max(1, math.floor(fraction * num_layers + 0.5))
    if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= num_layers:
        raise PlanError(f"cannot drop {size} attention sublayers of {num_layers}")
    params = _params(size, fraction)
    return PruningPlan(removed_layers=[], num_layers=num_layers, method="attention", params=params,
                       source_map=_str(source_map), model_id=result.model_id,
                       removed_attention=result.lowest("attention", size))


def plan_explicit(num_layers: int, indices: Sequence[int], model_id: str | None = None) -> PruningPlan:
    """Remove exactly ``indices`` (any order; checked for range, duplicates and that a layer is left)."""
    return PruningPlan(removed_layers=list(indices), num_layers=num_layers, method="explicit", model_id=model_id)


def _str(path: str | Path | None) -> str | None:
    return None if path is None else str(path)


# --------------------------------------------------------------------------------------------------- applying
def _mask_and_model_id(target: Any) -> tuple[DecoderLayerMask, str | None]:
    """The layer mask of a SpeechLLM / DecoderLayerMask / HF causal LM, and the model id it knows."""
    if isinstance(target, DecoderLayerMask):
        return target, None
    mask = getattr(target, "layer_mask", None)
    if isinstance(mask, DecoderLayerMask):
        config = getattr(target, "config", None)
        return mask, getattr(config, "model_id", None)
    if isinstance(target, nn.Module):
        return DecoderLayerMask(target), None
    raise PlanError(f"cannot apply a pruning plan to a {type(target).__name__}: expected a SpeechLLM, a "
                    "DecoderLayerMask or a transformers causal LM")


def apply_plan(target: Any, plan: PruningPlan, model_id: str | None = None) -> DecoderLayerMask:
    """Mask out ``plan.removed_layers`` and drop ``plan.removed_attention`` / ``removed_mlp`` sublayers on ``target``
    (a SpeechLLM, DecoderLayerMask or HF causal LM) after :meth:`PruningPlan.validate_for`; returns the layer mask.
    ``model_id`` defaults to a SpeechLLM's ``config.model_id``.

    Both selections replace any previous ones; indices refer to the model as first masked (``mask.num_layers``).
    """
    from lightning_speechllm.model.sublayer_mask import SublayerMask

    mask, known_id = _mask_and_model_id(target)
    plan.validate_for(mask.num_layers, model_id if model_id is not None else known_id)
    mask.remove_layers(plan.removed_layers)
    SublayerMask(mask.model).drop(plan.removed_attention, plan.removed_mlp)
    return mask
