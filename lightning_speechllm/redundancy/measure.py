"""One-pass measurement on a SpeechLLM: record x^0..x^L of the active layers, update d(l, n) and BI."""
from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from lightning_speechllm.data.batch import SpeechBatch
from lightning_speechllm.model.speechllm import SpeechLLM
from lightning_speechllm.redundancy.analysis import Modality, RedundancyResult
from lightning_speechllm.redundancy.metrics import (
    AngularDistanceMetric,
    BlockInfluenceMetric,
    TokenSelection,
    select_tokens,
)


def utterance_keys(ids: Sequence[str], device: torch.device | None = None) -> torch.Tensor:
    """``[B]`` int64 keys of utterance ids (the first 8 bytes of their BLAKE2b digest): the per-sample tables of every
    map measured on the same utterances carry the same keys, whatever the rank, batch or modality."""
    digests = [hashlib.blake2b(str(uid).encode("utf-8"), digest_size=8).digest() for uid in ids]
    return torch.tensor([int.from_bytes(d, "little", signed=True) for d in digests], dtype=torch.long, device=device)


def keyed_row_order(keys: torch.Tensor, tables: torch.Tensor) -> torch.Tensor:
    """Indices sorting rows by utterance key (ties, e.g. one id measured twice, by value): the same utterances come
    out in the same order in every map, so speech and text rows stay paired."""
    by_value = canonical_row_order(tables)
    return by_value[torch.argsort(keys.cpu()[by_value.cpu()], stable=True).to(by_value.device)]


def canonical_row_order(tables: torch.Tensor) -> torch.Tensor:
    """Indices sorting ``[S, L, L]`` per-utterance tables by their values (NaNs ignored, rounded to 1e-6), so that
    the same utterances measured on other ranks or in other batches come out in the same order."""
    flat = torch.nan_to_num(tables.reshape(len(tables), -1).double().cpu(), nan=0.0)
    keys = torch.round(flat * 1e6).numpy()
    return torch.as_tensor(np.lexsort(keys.T[::-1]), dtype=torch.long, device=tables.device)


class RedundancyAccumulator(nn.Module):
    """d(l, n) and BI of one (set, modality) over many batches; one teacher-forced forward per batch."""

    def __init__(self, num_layers: int, token_selection: TokenSelection = "last", keep_per_sample: bool = True,
                 compute_dtype: torch.dtype = torch.float64) -> None:
        super().__init__()
        self.token_selection = token_selection
        # ShortGPT's Block Influence is an expectation over all tokens; a segment selection narrows both measures.
        self.bi_token_selection: TokenSelection = "all" if token_selection in ("last", "last_prompt") else token_selection
        self.angular = AngularDistanceMetric(num_layers, keep_per_sample=keep_per_sample, compute_dtype=compute_dtype)
        self.influence = BlockInfluenceMetric(num_layers, compute_dtype=compute_dtype)

    @torch.no_grad()
    def update(self, speechllm: SpeechLLM, batch: SpeechBatch) -> None:
        """Forward `batch` (speech or text-only, with its target) and add its residual stream to the metrics."""
        self.update_states(*self.record(speechllm, batch), sample_keys=utterance_keys(batch.ids))

    @staticmethod
    @torch.no_grad()
    def record(speechllm: SpeechLLM, batch: SpeechBatch) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The residual stream x^0..x^L and segment ids of one teacher-forced forward of `batch`."""
        inputs = speechllm.build_inputs(batch, with_targets=True)
        with speechllm.layer_mask.record_residual_stream() as stream:
            speechllm.llm(inputs_embeds=inputs.inputs_embeds, attention_mask=inputs.attention_mask,
                          position_ids=inputs.position_ids, use_cache=False, logits_to_keep=1)
        return stream.states, inputs.segment_ids

    @torch.no_grad()
    def update_states(self, states: list[torch.Tensor], segment_ids: torch.Tensor,
                      sample_keys: torch.Tensor | None = None) -> None:
        """Add an already recorded residual stream ``x^0..x^L`` (each ``[B, T, D]``) with its segment ids and (for
        paired CIs) the rows' :func:`utterance_keys`."""
        token_mask = select_tokens(segment_ids, self.token_selection)
        self.angular.update(states, token_mask, sample_keys=sample_keys)
        self.influence.update(states, select_tokens(segment_ids, self.bi_token_selection))

    def global_utterance_count(self) -> int:
        """Utterances measured on all ranks together (a collective under DDP)."""
        return self.angular.global_utterance_count()

    def result(self, *, model_id: str, set_name: str, modality: Modality, epoch: int | None = None,
               n_boot: int = 1000) -> RedundancyResult:
        """The synced table, BI, pruning path and (with per-sample tables) bootstrap 95% CIs; ``num_samples`` counts
        the utterances of every rank."""
        num_samples = self.global_utterance_count()
        per_sample = self.angular.compute_per_sample() if self.angular.keep_per_sample else None
        keys = self.angular.compute_per_sample_keys() if self.angular.keep_per_sample else None
        if per_sample is not None:  # CIs must not depend on how utterances were sharded across ranks or batched
            order = canonical_row_order(per_sample) if keys is None else keyed_row_order(keys, per_sample)
            per_sample = per_sample[order]
            keys = None if keys is None else keys[order.to(keys.device)]
        has_samples = per_sample is not None and per_sample.shape[0] > 1
        return RedundancyResult.from_tables(
            self.angular.compute(), self.influence.compute(), model_id=model_id,
            token_selection=self.token_selection, set_name=set_name, modality=modality,
            num_samples=num_samples, per_sample_tables=per_sample if has_samples else None,
            per_sample_keys=keys.cpu().numpy() if has_samples and keys is not None else None,
            epoch=epoch, n_boot=n_boot, extra={"bi_token_selection": self.bi_token_selection},
        )

    def reset(self) -> None:
        self.angular.reset()
        self.influence.reset()
