"""``RedundancyCallback``: measure d(l, n) and Block Influence of the decoder during validation, per set and modality.

For every validation batch of a measured set the callback feeds two accumulators:

* the batch's own modality ("speech" for audio batches, "text" for text-only ones) is taken from the module's own
  teacher-forced forward (a forward hook on ``pl_module.speechllm`` records the pre-norm residual stream), so it
  costs no extra forward pass;
* the other modality — text-only, built from the same batch's transcripts — needs one extra teacher-forced forward.

At the end of a measured validation epoch each (set, modality) gives a :class:`RedundancyResult`, written under
``<output_dir>/<set>/<modality>/epoch=E.{json,csv,png}`` (+ ``epoch=E_bi.png``, and ``epoch=E_per_sample.npy`` with
the per-utterance tables when CIs are on), and each set measured in both modalities gives
``<output_dir>/<set>/agreement_epoch=E.json`` and ``speech_vs_text_epoch=E.png``.

Speech-vs-text agreement is measured at each of ``agreement_selections`` (default ``last_prompt``, then ``last``).
Under ``last`` with teacher forcing both modalities are read at the target's end token, after the *same* reference
transcript, which inflates their agreement; ``last_prompt`` (the position predicting the first target token) differs
only by the input modality, so it is the headline number. The maps of an agreement selection other than
``token_selection`` go to ``<set>/<modality>/<selection>/epoch=E.{json,csv}``. Each statistic carries a null
(``analysis.spearman_null`` / ``path_nulls``, on surrogates that keep each map's shape): agreement that chance alone
reaches is not agreement.

A set whose datamodule declares several tasks (``eval_set_tasks``: e.g. ASR and AST in one manifest) is also measured
per task, as the set ``<set>/<task>`` (files under ``<output_dir>/<set>/<task>/``), besides the whole set. Scalars go to
``pl_module.log``; figures also go to a TensorBoard logger. The accumulators are torchmetrics, so under DDP every
rank measures its shard and the maps are synced; only rank 0 writes files.
"""
from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import nn

from lightning_speechllm.data.batch import SpeechBatch, is_padding_duplicate
from lightning_speechllm.io_utils import write_json
from lightning_speechllm.redundancy import plots
from lightning_speechllm.redundancy.analysis import (
    RedundancyResult,
    path_agreement,
    path_nulls,
    spearman_null,
    spearman_rho,
)
from lightning_speechllm.redundancy.measure import RedundancyAccumulator, utterance_keys
from lightning_speechllm.redundancy.metrics import TOKEN_SELECTIONS, TokenSelection

__all__ = ["MODALITIES", "RedundancyCallback"]

log = logging.getLogger(__name__)
MODALITIES: tuple[str, ...] = ("speech", "text")


def figure_to_rgb(figure: Figure) -> np.ndarray:
    """Render a (pyplot-free) matplotlib figure to an ``[H, W, 3]`` uint8 array."""
    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


class RedundancyCallback(L.Callback):
    """Measure decoder-layer redundancy (Gromov d(l, n), ShortGPT BI) on the validation sets, speech and text.

    Args:
        every_n_epochs: measure on validation epochs where ``(current_epoch + 1) % every_n_epochs == 0`` while
            fitting (Lightning's ``check_val_every_n_epoch`` convention); ``Trainer.validate`` always measures.
        token_selection: which positions are averaged (``last``: Gromov et al.; see ``select_tokens``).
        modalities: any of ``"speech"``, ``"text"``. Speech is skipped for a model without encoder and for
            text-only batches.
        sets: names of the validation sets to measure; ``None`` = all.
        max_batches: measure at most this many batches per set and epoch (``None`` = all).
        output_dir: where results go; default ``<trainer.log_dir or default_root_dir>/redundancy``.
        n_boot: bootstrap resamples for the 95% CIs (0 = no CIs).
        log_block_sizes: block sizes n whose best first layer ``l*(n)`` and distance are logged as scalars.
        write_figures: also write PNG figures (and send them to a TensorBoard logger).
        agreement_selections: token selections at which speech and text maps are compared; the first one gives the
            headline numbers of ``agreement_epoch=E.json`` and the logged scalars, every one is under
            ``by_token_selection``. ``last`` shares the teacher-forced transcript between modalities (inflated).
        n_perm: permutations of the agreement's null (p-values and 95% null quantiles); 0 = none.
        per_task: also measure each task of a set the datamodule declares multi-task (``<set>/<task>``).
    """

    def __init__(
        self,
        every_n_epochs: int = 1,
        token_selection: TokenSelection = "last",
        modalities: Sequence[str] = MODALITIES,
        sets: list[str] | None = None,
        max_batches: int | None = None,
        output_dir: str | Path | None = None,
        n_boot: int = 1000,
        log_block_sizes: Sequence[int] = (1, 2, 4, 8),
        write_figures: bool = True,
        agreement_selections: Sequence[TokenSelection] = ("last_prompt", "last"),
        n_perm: int = 1000,
        per_task: bool = True,
    ) -> None:
        super().__init__()
        if every_n_epochs < 1:
            raise ValueError(f"every_n_epochs must be >= 1, got {every_n_epochs}")
        if token_selection not in TOKEN_SELECTIONS:
            raise ValueError(f"token_selection must be one of {TOKEN_SELECTIONS}, got {token_selection!r}")
        unknown = [m for m in modalities if m not in MODALITIES]
        if unknown or not modalities:
            raise ValueError(f"modalities must be a non-empty subset of {MODALITIES}, got {list(modalities)}")
        if token_selection == "speech" and "text" in modalities:
            raise ValueError("token_selection 'speech' selects no token of a text-only input; drop 'text' from "
                             "modalities or pick another selection")
        if max_batches is not None and max_batches < 1:
            raise ValueError(f"max_batches must be >= 1 or None, got {max_batches}")
        if n_boot < 0:
            raise ValueError(f"n_boot must be >= 0, got {n_boot}")
        bad = [m for m in agreement_selections if m not in TOKEN_SELECTIONS or m == "speech"]
        if bad or not agreement_selections:
            raise ValueError(f"agreement_selections must be a non-empty list of {TOKEN_SELECTIONS} without 'speech' "
                             f"(a text input has no speech token), got {list(agreement_selections)}")
        if n_perm < 0:
            raise ValueError(f"n_perm must be >= 0, got {n_perm}")
        if any(k < 1 for k in log_block_sizes):
            raise ValueError(f"log_block_sizes must be >= 1, got {list(log_block_sizes)}")
        self.every_n_epochs = every_n_epochs
        self.token_selection = token_selection
        self.modalities = tuple(dict.fromkeys(modalities))
        self.sets = None if sets is None else list(sets)
        self.max_batches = max_batches
        self.output_dir = None if output_dir is None else Path(output_dir)
        self.n_boot = n_boot
        self.log_block_sizes = tuple(log_block_sizes)
        self.write_figures = write_figures
        self.agreement_selections = tuple(dict.fromkeys(agreement_selections))
        self.n_perm = n_perm
        self.per_task = per_task
        self.accumulators: dict[tuple[str, str], RedundancyAccumulator] = {}
        """Accumulators of the running epoch, by (set, modality), on the module's device."""
        self.results: dict[tuple[str, str], RedundancyResult] = {}
        """Results of the last measured epoch, by (set, modality)."""
        self.agreements: dict[str, dict[str, Any]] = {}
        """Speech-vs-text agreement of the last measured epoch, by set."""
        self.selection_accumulators: dict[tuple[str, str, str], RedundancyAccumulator] = {}
        """Accumulators of the agreement selections other than ``token_selection``, by (set, modality, selection)."""
        self.selection_results: dict[tuple[str, str, str], RedundancyResult] = {}
        """Their results of the last measured epoch, by (set, modality, selection)."""
        self._task_splits: dict[str, tuple[str, ...]] = {}
        self._batches_seen: dict[str, int] = {}
        self._measuring = False
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []
        self._recorder: contextlib.ExitStack | None = None
        self._recorded: tuple[list[torch.Tensor], torch.Tensor] | None = None

    # ---------------------------------------------------------------------------------------------- lightning
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.output_dir is None:  # trainer.log_dir broadcasts, so every rank must ask
            self.output_dir = Path(trainer.log_dir or trainer.default_root_dir) / "redundancy"
        speechllm = _speechllm(pl_module)
        if speechllm.encoder is None and self.modalities == ("speech",):
            raise ValueError("RedundancyCallback(modalities=['speech']) on a SpeechLLM without speech encoder")

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._measuring = self._should_measure(trainer)
        self.accumulators, self.selection_accumulators = {}, {}
        self._batches_seen = {}
        if self._measuring:
            self._create_accumulators(pl_module)

    def _create_accumulators(self, pl_module: L.LightningModule) -> None:
        """One accumulator per (named set, modality) before the first batch, so that every DDP rank syncs the same
        ones in the same order, whatever its shard holds (a rank that lazily missed one would hang the others)."""
        expected = getattr(pl_module, "expected_eval_tasks", None)
        names = list(expected("val")) if callable(expected) else []
        self._task_splits = self._declared_task_splits(pl_module)
        has_encoder = _speechllm(pl_module).encoder is not None
        for set_name in names:
            if self.sets is None or set_name in self.sets:
                for name in [set_name] + [f"{set_name}/{task}" for task in self._task_splits.get(set_name, ())]:
                    for modality in self.modalities:
                        if modality == "text" or has_encoder:
                            self._accumulator(name, modality, pl_module)

    def _declared_task_splits(self, pl_module: L.LightningModule) -> dict[str, tuple[str, ...]]:
        """{set: tasks} of the sets the datamodule declares multi-task (read from the whole set, so every rank agrees);
        nothing without ``per_task`` or a datamodule that declares its sets' tasks."""
        if not self.per_task or pl_module._trainer is None:
            return {}
        declared = getattr(getattr(pl_module.trainer, "datamodule", None), "eval_set_tasks", None)
        if not callable(declared):
            return {}
        return {name: tuple(tasks) for name, tasks in declared("val").items() if len(tasks) > 1}

    def on_validation_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                                  batch_idx: int, dataloader_idx: int = 0) -> None:
        if not self._wants_batch(pl_module, dataloader_idx):
            return
        own = "text" if batch.text_only else "speech"
        if own in self._modalities_for(pl_module, batch):
            self._attach_recorder(_speechllm(pl_module))

    def on_validation_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        recorded = self._detach_recorder()
        if not self._wants_batch(pl_module, dataloader_idx):
            return
        set_name = pl_module.set_name("val", dataloader_idx)
        self._batches_seen[set_name] = self._batches_seen.get(set_name, 0) + 1
        # Lhotse's DDP padding copies are not measured, but every rank still runs its forwards (FSDP gathers in them).
        rows = [i for i, uid in enumerate(batch.ids) if not is_padding_duplicate(uid)]
        speechllm = _speechllm(pl_module)
        own = "text" if batch.text_only else "speech"
        targets = self._targets(set_name, batch, rows)
        for modality in self._modalities_for(pl_module, batch):
            # The step's own forward serves its own modality; the other modality (or a step that did not call the
            # SpeechLLM) gets a forward of its own.
            stream = recorded if modality == own and recorded is not None else RedundancyAccumulator.record(
                speechllm, batch if modality == own else batch.as_text_only())
            for name, subset in targets:
                states = _recorded_rows(stream, subset, rows, len(batch))
                keys = utterance_keys([batch.ids[row] for row in subset], device=states[1].device)  # pairs speech/text
                for accumulator in self._accumulators_of(name, modality, pl_module):
                    accumulator.update_states(*states, sample_keys=keys)

    def _targets(self, set_name: str, batch: SpeechBatch, rows: list[int]) -> list[tuple[str, list[int]]]:
        """(accumulated set name, batch rows) pairs a batch feeds: the whole set, and each declared task's rows."""
        targets = [(set_name, rows)] if rows else []
        for task in self._task_splits.get(set_name, ()):
            subset = [row for row in rows if batch.tasks[row] == task]
            if subset:
                targets.append((f"{set_name}/{task}", subset))
        return targets

    def _accumulators_of(self, set_name: str, modality: str,
                         pl_module: L.LightningModule) -> list[RedundancyAccumulator]:
        """The map's accumulator, then one per extra agreement selection (only when both modalities are measured)."""
        main = self._accumulator(set_name, modality, pl_module)  # creates the selection ones with it, in one order
        return [main] + [self.selection_accumulators[(set_name, modality, s)] for s in self._extra_selections()]

    def _extra_selections(self) -> list[str]:
        if not set(MODALITIES) <= set(self.modalities):
            return []  # agreement needs both modalities: no extra maps for one
        return [s for s in self.agreement_selections if s != self.token_selection]

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._detach_recorder()
        if not self._measuring or not self.accumulators:
            return
        epoch = trainer.current_epoch
        model_id = str(_speechllm(pl_module).config.model_id)
        self.results, self.agreements, self.selection_results = {}, {}, {}
        layer_indices = list(_speechllm(pl_module).layer_mask.active_layers)
        # Same order on every rank: compute() syncs the metric states under DDP.
        for (set_name, modality), accumulator in sorted(self.accumulators.items()):
            if accumulator.global_utterance_count() == 0:  # e.g. no speech in a text-only set: same on every rank
                continue
            result = accumulator.result(model_id=model_id, set_name=set_name, modality=modality, epoch=epoch,
                                        n_boot=self.n_boot)
            result.extra["layer_indices"] = layer_indices
            self.results[(set_name, modality)] = result
            self._log_result(pl_module, result)
        for (set_name, modality, selection), accumulator in sorted(self.selection_accumulators.items()):
            if accumulator.global_utterance_count() == 0:
                continue
            result = accumulator.result(model_id=model_id, set_name=set_name, modality=modality, epoch=epoch,
                                        n_boot=self.n_boot)
            result.extra["layer_indices"] = layer_indices
            self.selection_results[(set_name, modality, selection)] = result
        for set_name in sorted({s for s, _ in self.results}):
            if (set_name, "speech") in self.results and (set_name, "text") in self.results:
                self.agreements[set_name] = self._agreement(set_name, epoch)
                self._log_agreement(pl_module, set_name)
        if trainer.is_global_zero:
            self._write(trainer, epoch)
        self.accumulators, self.selection_accumulators = {}, {}

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._detach_recorder()

    # -------------------------------------------------------------------------------------------- measuring
    def _should_measure(self, trainer: L.Trainer) -> bool:
        if trainer.sanity_checking:
            return False
        if trainer.state.fn != "fit":
            return True
        return (trainer.current_epoch + 1) % self.every_n_epochs == 0

    def _wants_batch(self, pl_module: L.LightningModule, dataloader_idx: int) -> bool:
        if not self._measuring:
            return False
        set_name = pl_module.set_name("val", dataloader_idx)
        if self.sets is not None and set_name not in self.sets:
            return False
        return self.max_batches is None or self._batches_seen.get(set_name, 0) < self.max_batches

    def _modalities_for(self, pl_module: L.LightningModule, batch: SpeechBatch) -> list[str]:
        if not isinstance(batch, SpeechBatch):
            raise TypeError(f"RedundancyCallback expects SpeechBatch validation batches, got {type(batch).__name__}")
        has_speech = not batch.text_only and _speechllm(pl_module).encoder is not None
        return [m for m in self.modalities if m == "text" or has_speech]

    def _accumulator(self, set_name: str, modality: str, pl_module: L.LightningModule) -> RedundancyAccumulator:
        key = (set_name, modality)
        if key not in self.accumulators:
            num_layers = len(_speechllm(pl_module).layer_mask.active_layers)
            self.accumulators[key] = RedundancyAccumulator(
                num_layers, token_selection=self.token_selection, keep_per_sample=self.n_boot > 0,
            ).to(pl_module.device)
            for selection in self._extra_selections():
                self.selection_accumulators[(set_name, modality, selection)] = RedundancyAccumulator(
                    num_layers, token_selection=selection, keep_per_sample=self.n_boot > 0,
                ).to(pl_module.device)
        return self.accumulators[key]

    def _attach_recorder(self, speechllm: nn.Module) -> None:
        """Record the residual stream of the module's own teacher-forced ``speechllm(batch)`` call (not of
        ``generate``, which does not go through ``__call__``)."""
        self._detach_recorder()

        def before(_module: nn.Module, _args: tuple) -> None:
            if self._recorded is None and self._recorder is None:
                self._recorder = contextlib.ExitStack()
                self._stream = self._recorder.enter_context(speechllm.layer_mask.record_residual_stream())

        def after(_module: nn.Module, _args: tuple, output: Any) -> None:
            if self._recorder is None:
                return
            inputs = output[2] if isinstance(output, tuple) and len(output) == 3 else None
            states = self._stream.states
            self._recorder.close()
            self._recorder = None
            if inputs is not None and getattr(inputs, "segment_ids", None) is not None and states:
                self._recorded = (states, inputs.segment_ids)

        self._hooks = [speechllm.register_forward_pre_hook(before), speechllm.register_forward_hook(after)]

    def _detach_recorder(self) -> tuple[list[torch.Tensor], torch.Tensor] | None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []
        if self._recorder is not None:
            self._recorder.close()
            self._recorder = None
        recorded, self._recorded = self._recorded, None
        return recorded

    # ------------------------------------------------------------------------------------------- reporting
    def _pair(self, set_name: str, selection: str) -> tuple[RedundancyResult, RedundancyResult] | None:
        """The (speech, text) results of ``set_name`` at ``selection``, if both were measured."""
        source = (self.results if selection == self.token_selection else
                  {(s, m): r for (s, m, sel), r in self.selection_results.items() if sel == selection})
        speech, text = source.get((set_name, "speech")), source.get((set_name, "text"))
        return None if speech is None or text is None else (speech, text)

    def _agreement(self, set_name: str, epoch: int) -> dict[str, Any]:
        """Agreement at every measured agreement selection (``by_token_selection``); the first one's numbers at the
        top level (the map's own selection when none of them was measured)."""
        selections = [s for s in (*self.agreement_selections, self.token_selection) if self._pair(set_name, s)]
        by_selection = {selection: self._selection_agreement(*self._pair(set_name, selection))
                        for selection in dict.fromkeys(selections)}
        headline = selections[0]
        speech, text = self._pair(set_name, headline)
        return {"set_name": set_name, "epoch": epoch, "model_id": speech.model_id, "token_selection": headline,
                "map_token_selection": self.token_selection, "num_layers": speech.num_layers,
                "num_samples": {"speech": speech.num_samples, "text": text.num_samples},
                **by_selection[headline], "by_token_selection": by_selection}

    def _selection_agreement(self, speech: RedundancyResult, text: RedundancyResult) -> dict[str, Any]:
        """ρ and path agreement of two maps, each with its surrogate null (``analysis.surrogate_tables`` of text)."""
        paths = path_agreement(speech.path, text.path)
        agreement: dict[str, Any] = {"spearman_rho": spearman_rho(speech.table, text.table), "path_exact": paths.exact,
                                     "path_overlap": paths.overlap, "path_mean_jaccard": paths.mean_jaccard,
                                     "path_speech": speech.path, "path_text": text.path}
        if self.n_perm > 0:
            nulls = path_nulls(speech.table, text.table, self.n_perm)
            agreement["null"] = {"spearman_rho": spearman_null(speech.table, text.table, self.n_perm).to_dict(),
                                 "path_overlap": nulls["overlap"].to_dict(), "path_exact": nulls["exact"].to_dict(),
                                 "path_mean_jaccard": nulls["jaccard"].to_dict()}
        return agreement

    def _log_result(self, pl_module: L.LightningModule, result: RedundancyResult) -> None:
        prefix = f"redundancy/{result.set_name}/{result.modality}"
        for block in self.log_block_sizes:
            if block <= result.num_layers:
                first = result.path[block - 1]
                # Maps come from synced accumulators: equal on every rank, so sync_dist's mean returns them.
                pl_module.log(f"{prefix}/best_block_n{block}", float(first), add_dataloader_idx=False, sync_dist=True)
                pl_module.log(f"{prefix}/best_d_n{block}", float(result.table[block - 1, first]),
                              add_dataloader_idx=False, sync_dist=True)

    def _log_agreement(self, pl_module: L.LightningModule, set_name: str) -> None:
        agreement = self.agreements[set_name]
        for name, key in (("rho", "spearman_rho"), ("path_exact", "path_exact"), ("path_overlap", "path_overlap")):
            pl_module.log(f"redundancy/{set_name}/{name}", float(agreement[key]), add_dataloader_idx=False,
                          sync_dist=True)
        if "null" in agreement:
            pl_module.log(f"redundancy/{set_name}/rho_p_value", float(agreement["null"]["spearman_rho"]["p_value"]),
                          add_dataloader_idx=False, sync_dist=True)

    def _write(self, trainer: L.Trainer, epoch: int) -> None:
        assert self.output_dir is not None
        figures: dict[str, Figure] = {}
        for (set_name, modality), result in self.results.items():
            stem = self.output_dir / set_name / modality / f"epoch={epoch}"
            result.to_json(stem.with_suffix(".json"))
            result.to_csv(stem.with_suffix(".csv"))
            result.save_per_sample(stem.with_suffix(".json"))  # for compare's bootstrap CIs of the agreement
            if self.write_figures:
                figures[f"redundancy/{set_name}/{modality}/map"] = plots.plot_result_heatmap(
                    result, save_to=stem.with_suffix(".png"))
                plots.plot_block_influence(
                    result.block_influence, num_marked=min(4, result.num_layers),
                    title=f"{result.model_id} — {set_name} ({modality}) Block Influence",
                    save_to=stem.parent / f"epoch={epoch}_bi.png")
        for (set_name, modality, selection), result in self.selection_results.items():
            stem = self.output_dir / set_name / modality / selection / f"epoch={epoch}"
            result.to_json(stem.with_suffix(".json"))
            result.to_csv(stem.with_suffix(".csv"))
            result.save_per_sample(stem.with_suffix(".json"))
        for set_name, agreement in self.agreements.items():
            write_json(agreement, self.output_dir / set_name / f"agreement_epoch={epoch}.json")
            if self.write_figures:
                figures[f"redundancy/{set_name}/speech_vs_text"] = plots.plot_speech_vs_text(
                    self.results[(set_name, "speech")], self.results[(set_name, "text")],
                    title=f"{set_name} ({self.token_selection} tokens)",
                    save_to=self.output_dir / set_name / f"speech_vs_text_epoch={epoch}.png")
        self._send_figures(trainer, figures)
        log.info("redundancy maps of epoch %d written to %s", epoch, self.output_dir)

    @staticmethod
    def _send_figures(trainer: L.Trainer, figures: dict[str, Figure]) -> None:
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                for tag, figure in figures.items():
                    logger.experiment.add_image(tag, figure_to_rgb(figure), global_step=trainer.global_step,
                                                dataformats="HWC")


def _recorded_rows(recorded: tuple[list[torch.Tensor], torch.Tensor], subset: list[int], kept: list[int],
                   batch_size: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The recorded residual states and segment ids of the batch rows ``subset`` (of the measured rows ``kept``); a
    module whose step already dropped the padding copies recorded only the ``kept`` rows, in order."""
    states, segment_ids = recorded
    if segment_ids.shape[0] == batch_size:
        positions = subset
    elif segment_ids.shape[0] == len(kept):
        positions = [kept.index(row) for row in subset]
    else:
        raise ValueError(f"recorded {segment_ids.shape[0]} rows for a batch of {batch_size} ({len(kept)} measured)")
    if len(positions) == segment_ids.shape[0]:
        return recorded
    index = torch.tensor(positions, device=segment_ids.device)
    return [state[index] for state in states], segment_ids[index]


def _speechllm(pl_module: L.LightningModule) -> nn.Module:
    speechllm = getattr(pl_module, "speechllm", None)
    if speechllm is None or not hasattr(speechllm, "layer_mask"):
        raise TypeError(f"RedundancyCallback needs a LightningModule with a `speechllm` (SpeechLLM) attribute, "
                        f"got {type(pl_module).__name__}")
    return speechllm
