"""Layer-redundancy metrics on the recorded residual stream of a decoder.

Inputs are the residual-stream states ``x^0 … x^L`` (each ``[B, T, D]``; ``x^0`` = input embeddings,
``x^L`` = output of the last layer *before* the final norm) and a boolean token mask ``[B, T]`` built by
:func:`select_tokens` from the model's ``segment_ids``.

* :class:`AngularDistanceMetric` — Gromov et al.'s angular distance
  ``d(l, n) = arccos(cos(x^l, x^(l+n))) / π`` for every block size ``n = 1..L`` and first layer
  ``l = 0..L-n``, all from one set of states.
* :class:`BlockInfluenceMetric` — ShortGPT's ``BI_i = 1 − E_t[cos(x^i_t, x^(i+1)_t)]`` per layer.

Both keep float64 sums and counts reduced with ``"sum"``, so they synchronise under DDP.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal, Union, get_args

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities.data import dim_zero_cat
from torchmetrics.utilities.distributed import gather_all_tensors

from lightning_speechllm.model.segments import Segment

TokenSelection = Literal["last", "last_prompt", "all", "speech", "prompt", "target"]
Reduction = Literal["token", "utterance"]
StatesLike = Union[Sequence[Tensor], Tensor]

TOKEN_SELECTIONS: tuple[str, ...] = get_args(TokenSelection)
_SEGMENT_OF_MODE = {"speech": Segment.SPEECH, "prompt": Segment.PROMPT, "target": Segment.TARGET}


def select_tokens(segment_ids: Tensor, mode: TokenSelection) -> Tensor:
    """Boolean mask ``[B, T]`` of the token positions a redundancy metric averages over.

    ``last``: the last non-PAD position of each sequence (Gromov et al.), whatever its segment — with
    teacher-forced targets in the batch that is the target's end token; ``last_prompt``: the last PROMPT position,
    the one that predicts the first target token (where generation starts): its state has read the speech (or, in
    text mode, the transcript) but no target token, so speech and text maps compared there differ only by the input
    modality; ``all``: every non-PAD position; ``speech`` / ``prompt`` / ``target``: the positions of that
    :class:`Segment`. PAD is never selected.
    """
    if segment_ids.dim() != 2:
        raise ValueError(f"segment_ids must be [B, T], got shape {tuple(segment_ids.shape)}")
    if segment_ids.dtype.is_floating_point or segment_ids.dtype == torch.bool:
        raise TypeError(f"segment_ids must be an integer tensor, got dtype {segment_ids.dtype}")
    valid = segment_ids != Segment.PAD
    if mode == "all":
        return valid
    if mode in ("last", "last_prompt"):
        candidates = valid if mode == "last" else segment_ids == Segment.PROMPT
        positions = torch.arange(segment_ids.shape[1], device=segment_ids.device).expand_as(segment_ids)
        last = torch.where(candidates, positions, -1).amax(dim=1)
        return (positions == last.unsqueeze(1)) & candidates
    if mode in _SEGMENT_OF_MODE:
        return segment_ids == _SEGMENT_OF_MODE[mode]
    raise ValueError(f"unknown token selection mode {mode!r}; expected one of {TOKEN_SELECTIONS}")


def _check_states(states: StatesLike, token_mask: Tensor, num_layers: int) -> list[Tensor]:
    """Validate ``states`` (L+1 tensors [B, T, D]) against ``token_mask`` [B, T]; return them as a list."""
    state_list = list(states.unbind(0)) if isinstance(states, Tensor) else list(states)
    if len(state_list) != num_layers + 1:
        raise ValueError(
            f"expected num_layers + 1 = {num_layers + 1} residual states x^0..x^L, got {len(state_list)}"
        )
    if token_mask.dtype != torch.bool or token_mask.dim() != 2:
        raise ValueError(f"token_mask must be a bool tensor [B, T], got {token_mask.dtype} {tuple(token_mask.shape)}")
    shape = state_list[0].shape
    for index, state in enumerate(state_list):
        if state.dim() != 3 or state.shape != shape:
            raise ValueError(f"state x^{index} has shape {tuple(state.shape)}, expected [B, T, D] = {tuple(shape)}")
    if tuple(shape[:2]) != tuple(token_mask.shape):
        raise ValueError(f"token_mask shape {tuple(token_mask.shape)} does not match states [B, T] = {tuple(shape[:2])}")
    return state_list


def _gather_states(states: list[Tensor], flat_index: Tensor, dtype: torch.dtype) -> Tensor:
    """Selected tokens of every state as one ``[N, L+1, D]`` tensor in ``dtype`` (a single conversion copy)."""
    dim = states[0].shape[-1]
    picked = torch.empty(flat_index.numel(), len(states), dim, dtype=dtype, device=states[0].device)
    for index, state in enumerate(states):
        picked[:, index].copy_(state.reshape(-1, dim).index_select(0, flat_index))
    return picked


def _inverse_norms(picked: Tensor) -> Tensor:
    """``1 / ‖x‖`` over the last dimension (zero vectors then give cosine 0, not NaN)."""
    return torch.linalg.vector_norm(picked, dim=-1).clamp_min(torch.finfo(picked.dtype).tiny).reciprocal()


def _pairwise_cosines(picked: Tensor) -> Tensor:
    """Cosine between every pair of states per token, ``[N, L+1, L+1]``, clamped to [-1, 1]."""
    inverse = _inverse_norms(picked)
    gram = torch.bmm(picked, picked.transpose(1, 2))
    return (gram * inverse.unsqueeze(2) * inverse.unsqueeze(1)).clamp_(-1.0, 1.0)


def _unit_tokens(state: Tensor, flat_index: Tensor, dtype: torch.dtype) -> Tensor:
    """Selected tokens of one state ``[B, T, D]`` as unit vectors ``[N, D]`` in ``dtype``."""
    picked = state.reshape(-1, state.shape[-1]).index_select(0, flat_index).to(dtype)
    return picked * _inverse_norms(picked).unsqueeze(-1)


_CHUNK_BYTES = 256 * 2**20


def _chunk_size(requested: int | None, states: list[Tensor], dtype: torch.dtype) -> int:
    """Tokens per chunk: ``requested`` or the most that keep ``[chunk, L+1, D]`` under ~256 MiB."""
    if requested is not None:
        return requested
    per_token = len(states) * states[0].shape[-1] * torch.finfo(dtype).bits // 8
    return max(1, _CHUNK_BYTES // per_token)


def block_table_index(num_layers: int, device: torch.device | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Index tensors ``(first, end, valid)``, each ``[L, L]``, for the table layout used here.

    Row ``n-1`` holds block size ``n``, column ``l`` the first layer; cell (n-1, l) compares
    ``x^l`` with ``x^(l+n)``. ``valid`` is False where ``l + n > L``; ``end = l + n`` is clamped to ``L`` there.
    """
    block = torch.arange(1, num_layers + 1, device=device).unsqueeze(1)
    first = torch.arange(num_layers, device=device).unsqueeze(0).expand(num_layers, num_layers)
    end = first + block
    valid = end <= num_layers
    return first, end.clamp(max=num_layers), valid


class AngularDistanceMetric(Metric):
    """Angular distance table ``d(l, n)`` between residual states, accumulated over batches.

    Args:
        num_layers: number of decoder layers L (``update`` expects L+1 states).
        reduction: ``"token"`` (default) — mean over all selected tokens of all utterances, so long
            utterances weigh more under ``all``/segment selections; ``"utterance"`` — mean over utterances
            of each utterance's token mean. Identical for ``last`` (one token per utterance).
        keep_per_sample: also keep each utterance's token-mean table (float32, ``dist_reduce_fx="cat"``)
            for bootstrap confidence intervals; utterances with no selected token are skipped.
        compute_dtype: precision of the cosine/arccos computation (float64 by default; arccos is
            ill-conditioned near cos = 1, i.e. for the small distances that matter).
        token_chunk_size: tokens processed at once (memory ~ ``chunk × (L+1) × D``); ``None`` picks the
            largest chunk whose normalised states fit in about 256 MiB.
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    def __init__(
        self,
        num_layers: int,
        reduction: Reduction = "token",
        keep_per_sample: bool = False,
        compute_dtype: torch.dtype = torch.float64,
        token_chunk_size: int | None = None,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        if reduction not in get_args(Reduction):
            raise ValueError(f"reduction must be one of {get_args(Reduction)}, got {reduction!r}")
        if not compute_dtype.is_floating_point:
            raise ValueError(f"compute_dtype must be a floating dtype, got {compute_dtype}")
        if token_chunk_size is not None and token_chunk_size < 1:
            raise ValueError(f"token_chunk_size must be >= 1, got {token_chunk_size}")
        self.num_layers = num_layers
        self.reduction = reduction
        self.keep_per_sample = keep_per_sample
        self.compute_dtype = compute_dtype
        self.token_chunk_size = token_chunk_size
        zeros = torch.zeros(num_layers, num_layers, dtype=torch.float64)
        self.add_state("token_sum", default=zeros.clone(), dist_reduce_fx="sum")
        self.add_state("token_count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("utterance_sum", default=zeros.clone(), dist_reduce_fx="sum")
        self.add_state("utterance_count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        if keep_per_sample:
            self.add_state("per_sample", default=[], dist_reduce_fx="cat")
            self.add_state("per_sample_key", default=[], dist_reduce_fx="cat")

    def update(self, states: StatesLike, token_mask: Tensor,  # type: ignore[override]
               sample_keys: Tensor | None = None) -> None:
        """Add the selected tokens of one batch of residual states ``x^0..x^L`` (each ``[B, T, D]``).

        ``sample_keys`` (``[B]`` int64, e.g. :func:`~lightning_speechllm.redundancy.measure.utterance_keys`) names
        each row's utterance, so per-sample tables of two maps can be paired utterance by utterance."""
        state_list = _check_states(states, token_mask, self.num_layers)
        if sample_keys is not None and tuple(sample_keys.shape) != (token_mask.shape[0],):
            raise ValueError(f"sample_keys must be [B] = [{token_mask.shape[0]}], got {tuple(sample_keys.shape)}")
        batch_size = token_mask.shape[0]
        token_mask = token_mask.to(state_list[0].device)
        flat_index = token_mask.reshape(-1).nonzero().squeeze(1)
        utterance_of_token = flat_index // token_mask.shape[1]
        first, end, valid = block_table_index(self.num_layers, device=flat_index.device)
        per_utterance = torch.zeros(batch_size, self.num_layers, self.num_layers, dtype=torch.float64,
                                    device=flat_index.device)
        chunk_size = _chunk_size(self.token_chunk_size, state_list, self.compute_dtype)
        for start in range(0, flat_index.numel(), chunk_size):
            chunk = flat_index[start:start + chunk_size]
            cosine = _pairwise_cosines(_gather_states(state_list, chunk, self.compute_dtype))
            dist = torch.arccos(cosine[:, first, end]) / math.pi  # [N, L, L]
            dist = torch.where(valid, dist, torch.zeros((), dtype=dist.dtype, device=dist.device)).double()
            per_utterance.index_add_(0, utterance_of_token[start:start + chunk_size], dist)
        tokens_per_utterance = token_mask.sum(dim=1)
        present = tokens_per_utterance > 0
        utterance_means = per_utterance[present] / tokens_per_utterance[present].view(-1, 1, 1).double()
        self.token_sum += per_utterance.sum(dim=0).to(self.token_sum.device)
        self.token_count += int(flat_index.numel())
        self.utterance_sum += utterance_means.sum(dim=0).to(self.utterance_sum.device)
        self.utterance_count += int(present.sum())
        if self.keep_per_sample:
            self.per_sample.append(utterance_means.float().to(self.token_sum.device))
            if sample_keys is not None:
                self.per_sample_key.append(sample_keys.to(torch.long).to(present.device)[present].to(
                    self.token_sum.device))

    def _sync_dist(self, dist_sync_fn=gather_all_tensors, process_group=None) -> None:  # noqa: ANN001
        """A rank that saw no utterance (a per-task accumulator, a shard of padding copies) gathers a ``[0, L, L]``
        table instead of torchmetrics' empty 1-D placeholder: ranks must agree on the number of dimensions, or
        gloo aborts ("Received data size doesn't match expected size"). ``sync`` caches the states before this
        call and ``unsync`` restores them, so the placeholder never outlives the sync."""
        if self.keep_per_sample and isinstance(self.per_sample, list) and not self.per_sample:
            self.per_sample = [torch.zeros(0, self.num_layers, self.num_layers, dtype=torch.float32,
                                           device=self.token_sum.device)]
        super()._sync_dist(dist_sync_fn, process_group)

    def compute(self) -> Tensor:
        """``[L, L]`` float64 table: row ``n-1`` = block size n, column l; NaN where ``l + n > L``."""
        if self.reduction == "token":
            total, count = self.token_sum, self.token_count
        else:
            total, count = self.utterance_sum, self.utterance_count
        if int(count) == 0:
            raise RuntimeError("AngularDistanceMetric.compute() called before any token was selected in update()")
        _, _, valid = block_table_index(self.num_layers, device=total.device)
        return torch.where(valid, total / count, torch.full((), float("nan"), dtype=total.dtype, device=total.device))

    def global_utterance_count(self) -> int:
        """Utterances seen on every rank together (a collective under DDP: call it on every rank, in the same order)."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return int(sum(gather_all_tensors(self.utterance_count, group=self.process_group)))
        return int(self.utterance_count)

    def compute_per_sample(self) -> Tensor:
        """``[S, L, L]`` float32 per-utterance tables (NaN where ``l + n > L``); needs ``keep_per_sample``.

        Under DDP the tables of all ranks are gathered (like ``compute``), in rank order.
        """
        if not self.keep_per_sample:
            raise RuntimeError("per-sample tables were not kept: construct with keep_per_sample=True")
        with self.sync_context(dist_sync_fn=self.dist_sync_fn, should_sync=self.sync_on_compute):
            if isinstance(self.per_sample, list) and not self.per_sample:
                raise RuntimeError("AngularDistanceMetric.compute_per_sample() called before update()")
            tables = dim_zero_cat(self.per_sample).clone()
        _, _, valid = block_table_index(self.num_layers, device=tables.device)
        return torch.where(valid, tables, torch.full((), float("nan"), dtype=tables.dtype, device=tables.device))

    def compute_per_sample_keys(self) -> Tensor | None:
        """``[S]`` int64 utterance keys of :meth:`compute_per_sample`'s rows, in the same order; ``None`` when some
        update came without ``sample_keys`` (the rows cannot be paired with another map's)."""
        if not self.keep_per_sample:
            raise RuntimeError("per-sample tables were not kept: construct with keep_per_sample=True")
        with self.sync_context(dist_sync_fn=self.dist_sync_fn, should_sync=self.sync_on_compute):
            keys = self.per_sample_key
            keys = keys.clone() if isinstance(keys, Tensor) else (dim_zero_cat(keys).clone() if keys else None)
            tables = self.per_sample
            rows = tables.shape[0] if isinstance(tables, Tensor) else sum(len(t) for t in tables)
        return keys if keys is not None and keys.numel() == rows else None


class BlockInfluenceMetric(Metric):
    """ShortGPT Block Influence ``BI_i = 1 − E_t[cos(x^i_t, x^(i+1)_t)]`` for layers ``i = 0..L-1``.

    The expectation is a mean over all selected tokens of all utterances (token mean). States are
    streamed pairwise, so memory stays at two ``[N, D]`` copies; ``compute_dtype`` is float64 by default.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(
        self,
        num_layers: int,
        compute_dtype: torch.dtype = torch.float64,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        if not compute_dtype.is_floating_point:
            raise ValueError(f"compute_dtype must be a floating dtype, got {compute_dtype}")
        self.num_layers = num_layers
        self.compute_dtype = compute_dtype
        self.add_state("cos_sum", default=torch.zeros(num_layers, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("token_count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, states: StatesLike, token_mask: Tensor) -> None:  # type: ignore[override]
        """Add the selected tokens of one batch of residual states ``x^0..x^L`` (each ``[B, T, D]``)."""
        state_list = _check_states(states, token_mask, self.num_layers)
        flat_index = token_mask.to(state_list[0].device).reshape(-1).nonzero().squeeze(1)
        sums = torch.zeros(self.num_layers, dtype=torch.float64, device=flat_index.device)
        previous = _unit_tokens(state_list[0], flat_index, self.compute_dtype)
        for layer, state in enumerate(state_list[1:]):
            current = _unit_tokens(state, flat_index, self.compute_dtype)
            sums[layer] = torch.linalg.vecdot(previous, current).clamp_(-1.0, 1.0).sum()
            previous = current
        self.cos_sum += sums.to(self.cos_sum.device)
        self.token_count += int(flat_index.numel())

    def compute(self) -> Tensor:
        """``[L]`` float64 Block Influence per layer (higher = the layer changes the stream more)."""
        if int(self.token_count) == 0:
            raise RuntimeError("BlockInfluenceMetric.compute() called before any token was selected in update()")
        return 1.0 - self.cos_sum / self.token_count
