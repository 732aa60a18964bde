"""Compare pruning methods x healing variants on one table: WER/BLEU unhealed and healed, decoder parameters,
measured decode speed-up and measured KV cache, failure modes, and the paper's rule per method.

Methods: ``angular`` (the paper's contiguous block), ``block_influence`` (ShortGPT), ``last`` (deepest layers),
``greedy`` (SLEB-style, re-measured after each removal on calibration batches of the first validation set),
``attention`` (attention sublayers only, LLM-Drop, from a sublayer map measured on the same batches), ``budget``
(whole layers and attention sublayers mixed, re-measured each round, removing as many decoder parameters as the layer
plans of the same fraction: :mod:`lightning_speechllm.pruning.budget`) and ``budget_evo`` (that plan refined by the
evolutionary search, scored by the KL divergence from the unpruned model on the same batches). Healing variants are
those of :data:`~lightning_speechllm.evaluation.sweep.run.HEALING_VARIANTS` (``replacement`` and ``linear_patch`` do
not apply to ``attention``, nor to a budget plan that drops sublayers). For each removed fraction and method
the plan is scored unpruned -> pruned -> healed per variant, with the model restored exactly between runs (see
:func:`~lightning_speechllm.evaluation.sweep.run.healed`). Every row is written at once to ``rows/<name>.json`` and a
rerun with the same settings reuses it. Outputs: ``comparison.{csv,md,json,png}`` and ``frontier.png`` (WER against
the measured decode speed-up, the rows no other beats on both joined) in ``output_dir``.
"""
from __future__ import annotations

import csv
import dataclasses
import functools
import io
import itertools
import json
import logging
import statistics
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch

from lightning_speechllm.evaluation.efficiency import decoder_parameter_count, measure_latency
from lightning_speechllm.evaluation.resume_key import file_sha256, run_key
from lightning_speechllm.evaluation.sweep.common import (
    COMPARISON_METHODS,
    SUBLAYER_METHODS,
    require_unpruned,
    trainer_device,
)
from lightning_speechllm.evaluation.sweep.run import (
    SweepConfig,
    SweepError,
    build_plan,
    evaluate,
    healed,
)
from lightning_speechllm.evaluation.sweep.table import METRICS, Scores, SweepPoint, Thresholds, passes
from lightning_speechllm.io_utils import atomic_write_text, read_json, write_json
from lightning_speechllm.model.module import DecodingConfig
from lightning_speechllm.model.speechllm import SpeechLLM
from lightning_speechllm.pruning.budget import decoder_layer_parameters, plan_budget
from lightning_speechllm.pruning.plan import PruningPlan, apply_plan, block_size, plan_sublayers
from lightning_speechllm.redundancy.analysis import RedundancyResult

__all__ = ["COMPARISON_METHODS", "ComparisonRow", "compare_methods", "comparison_markdown", "frontier",
           "frontier_markdown", "plot_comparison", "plot_frontier", "summary_markdown", "write_comparison"]

log = logging.getLogger(__name__)


@dataclass
class ComparisonRow:
    """One (method, fraction, healing) result; ``healing`` is 'none' for the unhealed pruned model."""

    method: str
    fraction: float
    healing: str
    removed_layers: list[int]
    removed_attention: list[int]
    scores: Scores
    decoder_params: int
    decode_ms_per_token: float
    kv_cache_bytes: int
    decode_speedup: float = 1.0
    """Unpruned decode time per token / this model's, measured side by side (-1: not measured, see the table)."""
    chosen: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


def _sweep_config(config: SweepConfig, variant: str) -> SweepConfig:
    return dataclasses.replace(config, heal=True, heal_variant=variant)


def _calibration_batches(datamodule: L.LightningDataModule, count: int, device: torch.device) -> list:
    datamodule.setup("validate")
    batches = [batch.to(device) for batch in itertools.islice(iter(datamodule.val_dataloader()[0]), count)]
    if not batches:
        raise SweepError("the first validation set gave no batch: the comparison calibrates greedy plans and the "
                         "sublayer map, and times decoding, on it")
    return batches


class _Planner:
    """Builds each method's plan; greedy continues from its previous (smaller) plan."""

    def __init__(self, speechllm: SpeechLLM, config: SweepConfig, batches: list) -> None:
        self.speechllm, self.config, self.batches = speechllm, config, batches
        self.out = Path(config.output_dir) / "plans"
        self.num_layers = speechllm.layer_mask.num_layers
        self.model_id = speechllm.config.model_id
        self.result = RedundancyResult.from_json(config.map_path) if config.map_path else None
        self.token_selection = self.result.token_selection if self.result is not None else "last"
        self._greedy: PruningPlan | None = None
        self._sublayers = None
        self._layer_params = decoder_layer_parameters(speechllm)[0]

    def plan(self, method: str, fraction: float) -> PruningPlan:
        self.speechllm.to(self.batches[0].audio.device)  # Lightning leaves the model on the CPU after each run
        if method in ("angular", "block_influence", "last"):
            config = dataclasses.replace(self.config, method=method)
            return build_plan(config, "fraction", fraction, self.num_layers, self.result, self.model_id)
        if method == "greedy":
            from lightning_speechllm.pruning.greedy import plan_greedy

            self._greedy = plan_greedy(self.speechllm, self.batches, fraction=fraction,
                                       token_selection=self.token_selection, start_from=self._greedy)
            self._greedy.to_json(self.out / f"greedy_{fraction:g}.json")
            return self._greedy
        if method == "attention":
            if self._sublayers is None:
                from lightning_speechllm.redundancy.sublayers import measure_sublayers, plot_sublayer_map

                self._sublayers = measure_sublayers(self.speechllm, self.batches, self.token_selection)
                plot_sublayer_map(self._sublayers, self._sublayers.to_json(self.out / "sublayers.json")
                                  .with_suffix(".png"))
            return plan_sublayers(self._sublayers, self.num_layers, fraction=fraction)
        if method in ("budget", "budget_evo"):  # the share of the decoder layers' parameters layer plans remove
            size = block_size(self.num_layers, fraction=fraction)  # the layer count every layer plan removes
            search = {"search": "evolutionary", "generations": self.config.budget_generations,
                      "offspring": self.config.budget_offspring} if method == "budget_evo" else {}
            plan = plan_budget(self.speechllm, self.batches, remove=sum(self._layer_params[-size:]),
                               token_selection=self.token_selection, **search)
            plan.params["fraction"] = fraction
            plan.to_json(self.out / f"{method}_{fraction:g}.json")
            return plan
        raise SweepError(f"unknown comparison method {method!r}; expected one of {COMPARISON_METHODS}")


@contextmanager
def _unpruned(model: SpeechLLM) -> Iterator[None]:
    """Every layer and sublayer active (no replacement module) inside the context."""
    mask = model.layer_mask
    with mask.active(range(mask.num_layers)), model.sublayer_mask.suspended():
        yield


def _efficiency(speechllm: SpeechLLM, batch: Any, new_tokens: int, rounds: int = 3) -> dict[str, float]:
    """Active decoder parameters, measured KV-cache bytes and decode ms/token of the model as masked now, and its
    decode speed-up over the unpruned model measured side by side (interleaved rounds, medians), so that machine
    load hits both alike."""
    speechllm.to(batch.audio.device)  # Lightning leaves the model on the CPU after each run
    pruned, full = [], []
    for round_index in range(rounds + 1):  # round 0 warms both up
        with _unpruned(speechllm):
            unpruned_report = measure_latency(speechllm, batch, max_new_tokens=new_tokens, repeats=1, warmup=0)
        report = measure_latency(speechllm, batch, max_new_tokens=new_tokens, repeats=1, warmup=0)
        if round_index:
            full.append(unpruned_report.decode_ms_per_token)
            pruned.append(report.decode_ms_per_token)
    decode_ms = statistics.median(pruned)
    return {"decoder_params": decoder_parameter_count(speechllm.llm), "kv_cache_bytes": report.kv_cache_measured_bytes,
            "decode_ms_per_token": decode_ms, "decode_speedup": statistics.median(full) / decode_ms}


def compare_methods(speechllm: SpeechLLM, datamodule: L.LightningDataModule, config: SweepConfig,
                    decoding: DecodingConfig | None = None, trainer_kwargs: dict[str, Any] | None = None,
                    evaluate_fn: Callable[..., Scores] | None = None) -> list[ComparisonRow]:
    """Every (fraction, method, healing) of ``config.fractions`` x ``config.compare_methods`` x ``['none',
    *config.compare_healing]``, plus the unpruned baseline (method 'none', fraction 0); writes the rows and the
    outputs under ``config.output_dir``. Greedy plans and the sublayer map are measured on, and decoding is timed on,
    the first ``config.calibration_batches`` batches of the first validation set."""
    if not config.compare_methods:
        raise SweepError("a method comparison needs sweep.compare_methods (e.g. [angular, greedy, attention])")
    config.check()
    require_unpruned(speechllm, "a method comparison")
    score = evaluate_fn or evaluate
    out = Path(config.output_dir)
    device = trainer_device(trainer_kwargs)
    signature = resume_signature(config, speechllm, datamodule, decoding, trainer_kwargs)
    # keys of some rows only, so that rows stored before these options existed stay reusable
    evolution = {"budget_generations": config.budget_generations, "budget_offspring": config.budget_offspring}
    batches = _calibration_batches(datamodule, config.calibration_batches, device)
    speed_batch, speed_new_tokens = batches[0], config.speed_new_tokens

    def run_eval(model: SpeechLLM) -> Scores:
        return score(model, datamodule, stage=config.stage, decoding=decoding, trainer_kwargs=trainer_kwargs,
                     max_batches=config.max_batches, sets=config.sets)

    def cached(name: str, compute: Callable[[], ComparisonRow]) -> ComparisonRow:
        path = out / "rows" / f"{name}.json"
        stored = read_json(path) if path.is_file() else {}
        expected = {**signature, **(evolution if name.startswith("budget_evo_") else {}),
                    **({"text_kd_response": config.text_kd_response}
                       if name.endswith("_text_kd") and config.text_kd_response != "teacher" else {})}
        if stored.get("signature") == expected:
            return ComparisonRow(**stored["row"])
        row = compute()
        write_json({"signature": expected, "row": dataclasses.asdict(row)}, path)
        return row

    def baseline() -> ComparisonRow:
        speechllm.to(device)
        report = measure_latency(speechllm, speed_batch, max_new_tokens=speed_new_tokens, repeats=3, warmup=1)
        return ComparisonRow("none", 0.0, "none", [], [], run_eval(speechllm), decoder_parameter_count(speechllm.llm),
                             report.decode_ms_per_token, report.kv_cache_measured_bytes)

    rows = [cached("baseline", baseline)]
    planner = _Planner(speechllm, config, batches)
    for fraction, method in itertools.product(config.fractions, config.compare_methods):
        plan = functools.cache(lambda: planner.plan(method, fraction))  # measured only when a row needs it
        pruned = cached(f"{method}_{fraction:g}_none", lambda: _pruned_row(speechllm, plan(), method, fraction,
                                                                          run_eval, speed_batch, speed_new_tokens))
        rows.append(pruned)  # its plan's layers and sublayers: a stored row spares measuring the plan again
        for variant in config.compare_healing:
            if variant in ("replacement", "linear_patch") and (method in SUBLAYER_METHODS and
                                                               (method == "attention" or pruned.removed_attention)):
                continue  # dropped sublayers: nothing a replacement or patch stands in for
            if variant == "linear_patch" and 0 in pruned.removed_layers:
                log.info("%s %g: no linear patch, the block starts at layer 0 (no layer before it to fold into)",
                         method, fraction)
                continue
            rows.append(cached(f"{method}_{fraction:g}_{variant}", lambda: _healed_row(
                speechllm, plan(), method, fraction, variant, config, datamodule, trainer_kwargs, run_eval,
                speed_batch, speed_new_tokens)))
    mark_chosen(rows, config.thresholds)
    write_comparison(rows, out)
    return rows


def _pruned_row(speechllm: SpeechLLM, plan: PruningPlan, method: str, fraction: float, run_eval, speed_batch,
                speed_new_tokens: int) -> ComparisonRow:
    try:
        apply_plan(speechllm, plan)
        scores = run_eval(speechllm)
        speed = _efficiency(speechllm, speed_batch, speed_new_tokens)
    finally:
        speechllm.layer_mask.reset()
        speechllm.sublayer_mask.reset()
    return ComparisonRow(method, fraction, "none", list(plan.removed_layers), list(plan.removed_attention), scores,
                         extra={"plan_params": dict(plan.params)}, **speed)


def _healed_row(speechllm: SpeechLLM, plan: PruningPlan, method: str, fraction: float, variant: str,
                config: SweepConfig, datamodule, trainer_kwargs, run_eval, speed_batch,
                speed_new_tokens: int) -> ComparisonRow:
    with healed(speechllm, plan, datamodule, _sweep_config(config, variant), trainer_kwargs) as model:
        scores = run_eval(model)
        # LoRA merges into the weights at export, so a LoRA-healed model decodes as the unhealed pruned one; a
        # replacement module runs at inference and is timed.
        speed = ({"decoder_params": -1, "kv_cache_bytes": -1, "decode_ms_per_token": -1.0, "decode_speedup": -1.0}
                 if model.has_lora else _efficiency(model, speed_batch, speed_new_tokens))
    return ComparisonRow(method, fraction, variant, list(plan.removed_layers), list(plan.removed_attention), scores,
                         **speed)


def resume_signature(config: SweepConfig, speechllm: SpeechLLM, datamodule: L.LightningDataModule,
               decoding: DecodingConfig | None, trainer_kwargs: dict[str, Any] | None) -> dict[str, Any]:
    """What a stored row must agree on to be reused (each row is one method, fraction and healing: adding a method
    to the list reuses the rows already there): the settings, the map's content, and the model, decoding, precision
    and data (healing data included) of :func:`~lightning_speechllm.evaluation.resume_key.run_key`."""
    keys = ("map_path", "stage", "sets", "heal_steps", "heal_lr", "heal_warmup_steps", "heal_lora_r",
            "heal_lora_alpha", "replacement_width", "kd_temperature", "max_batches", "calibration_batches",
            "speed_new_tokens")
    if "linear_patch" in config.compare_healing:  # absent otherwise, so rows stored before the patch stay reusable
        keys += ("linear_patch_batches", "linear_patch_ridge")
    return {**{key: getattr(config, key) for key in keys}, "map_sha256": file_sha256(config.map_path),
            **run_key(speechllm, datamodule, decoding, trainer_kwargs, config.stage, heal=bool(config.compare_healing))}


# ------------------------------------------------------------------------------------------------ the rule
def _passes(row: ComparisonRow, baseline: Scores, thresholds: Thresholds) -> bool:
    point = SweepPoint(method=row.method, value=row.fraction, kind="fraction", n=len(row.removed_layers),
                       num_layers=1, removed_layers=row.removed_layers, before=row.scores)
    return passes(point, baseline, thresholds)[0]


def mark_chosen(rows: list[ComparisonRow], thresholds: Thresholds) -> None:
    """Per (method, healing): the largest fraction that passes the paper's rule is marked ``chosen``."""
    baseline = rows[0].scores
    for row in rows[1:]:
        row.chosen = False
    groups: dict[tuple[str, str], list[ComparisonRow]] = {}
    for row in rows[1:]:
        groups.setdefault((row.method, row.healing), []).append(row)
    for group in groups.values():
        passing = [row for row in group if _passes(row, baseline, thresholds)]
        if passing:
            max(passing, key=lambda row: row.fraction).chosen = True


# ------------------------------------------------------------------------------------------------ outputs
def _metric_cells(row: ComparisonRow, baseline: ComparisonRow) -> list[str]:
    cells = []
    for set_name in sorted(baseline.scores):
        values = row.scores.get(set_name, {})
        for metric in METRICS:
            if metric in values:
                cells.append(f"{values[metric]:.2f}")
        cells.append(f"{values.get('loop_rate', float('nan')):.1f}/{values.get('empty_rate', float('nan')):.1f}/"
                     f"{values.get('max_tokens_rate', float('nan')):.1f}")
    return cells


def comparison_markdown(rows: list[ComparisonRow]) -> str:
    """One Markdown table: per row the scores, loop/empty/max-token rates, decoder parameters, decode speed-up and
    KV cache relative to the baseline (first row)."""
    baseline = rows[0]
    header = ["method", "removed", "healing", "layers removed", "attention dropped"]
    for set_name in sorted(baseline.scores):
        header += [f"{set_name} {m}" for m in METRICS if m in baseline.scores[set_name]]
        header.append(f"{set_name} loop/empty/max %")
    header += ["decoder params (M)", "decode speed-up (measured)", "KV cache (measured)", "rule"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        speed = f"{row.decode_speedup:.2f}x" if row.decode_speedup > 0 else "as unhealed"
        kv = f"{row.kv_cache_bytes / baseline.kv_cache_bytes:.0%}" if row.kv_cache_bytes >= 0 else "as unhealed"
        params = f"{row.decoder_params / 1e6:.1f}" if row.decoder_params >= 0 else "as unhealed"
        cells = [row.method, f"{row.fraction:.0%}", row.healing, compact_indices(row.removed_layers),
                 compact_indices(row.removed_attention), *_metric_cells(row, baseline), params, speed, kv,
                 "chosen" if row.chosen else ""]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _headline(baseline: ComparisonRow) -> tuple[str, str]:
    """(set, metric) the summary and the plot show: the first set's WER or BLEU."""
    set_name = sorted(baseline.scores)[0]
    return set_name, next(m for m in METRICS if m in baseline.scores[set_name])


def summary_markdown(rows: list[ComparisonRow]) -> str:
    """One row per (method, fraction): the first set's metric unhealed and after each healing (``*``: the rule's
    choice for that method and healing), decoder parameters, measured decode speed-up and KV cache of the pruned
    model (a replacement adds its module: see the full table), and the unhealed failure rates."""
    baseline = rows[0]
    set_name, metric = _headline(baseline)
    healings = list(dict.fromkeys(row.healing for row in rows[1:] if row.healing != "none"))
    by_key = {(row.method, row.fraction, row.healing): row for row in rows[1:]}
    header = ["method", "removed", "layers removed", "attention dropped", f"{set_name} {metric} unhealed",
              *[f"healed: {h}" for h in healings], "decoder params (M)", "decode speed-up", "KV cache",
              "unhealed loop / empty / max-tokens %"]
    value = f"{baseline.scores[set_name][metric]:.1f}"
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
             "| " + " | ".join(["unpruned", "0%", "-", "-", value, *[value] * len(healings),
                               f"{baseline.decoder_params / 1e6:.1f}", "1.00x", "100%", "-"]) + " |"]
    for (method, fraction) in dict.fromkeys((row.method, row.fraction) for row in rows[1:]):
        pruned = by_key[(method, fraction, "none")]

        def cell(healing: str) -> str:
            row = by_key.get((method, fraction, healing))
            if row is None:
                return "n/a"
            return f"{row.scores[set_name][metric]:.1f}" + ("*" if row.chosen else "")

        rates = pruned.scores[set_name]
        failure = " / ".join(f"{rates.get(key, float('nan')):.0f}" for key in ("loop_rate", "empty_rate",
                                                                              "max_tokens_rate"))
        lines.append("| " + " | ".join([
            method, f"{fraction:.0%}", compact_indices(pruned.removed_layers),
            compact_indices(pruned.removed_attention),
            cell("none"), *[cell(h) for h in healings], f"{pruned.decoder_params / 1e6:.1f}",
            f"{pruned.decode_speedup:.2f}x", f"{pruned.kv_cache_bytes / baseline.kv_cache_bytes:.0%}", failure]) + " |")
    return "\n".join(lines) + "\n"


def compact_indices(indices: list[int]) -> str:
    """``[4, 5, 6, 9]`` -> ``4-6,9``."""
    runs: list[list[int]] = []
    for index in indices:
        if runs and index == runs[-1][-1] + 1:
            runs[-1].append(index)
        else:
            runs.append([index])
    return ",".join(f"{run[0]}-{run[-1]}" if len(run) > 1 else f"{run[0]}" for run in runs) or "-"


def plot_comparison(rows: list[ComparisonRow], path: Path) -> Path:
    """WER (or BLEU) of the first set vs removed fraction: one panel per healing, one line per method."""
    from matplotlib.figure import Figure

    from lightning_speechllm.redundancy.plots import save_figure

    baseline = rows[0]
    set_name, metric = _headline(baseline)
    healings = list(dict.fromkeys(row.healing for row in rows[1:]))
    figure = Figure(figsize=(4.2 * len(healings), 3.4), layout="tight")
    axes = figure.subplots(1, len(healings), sharey=True, squeeze=False)[0]
    for ax, healing in zip(axes, healings):
        for method in dict.fromkeys(row.method for row in rows[1:]):
            points = sorted((row.fraction, row.scores[set_name][metric]) for row in rows[1:]
                            if row.method == method and row.healing == healing)
            if points:
                ax.plot([0.0] + [p[0] for p in points], [baseline.scores[set_name][metric]] + [p[1] for p in points],
                        marker="o", label=method)
        ax.set_title(f"healing: {healing}")
        ax.set_xlabel("removed fraction")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"{set_name} {metric.upper()} (log scale)")
    axes[-1].legend(fontsize=8)
    save_figure(figure, path)
    return path


ADDS_MODULE = ("replacement",)
"""Healing variants whose model runs a module the unhealed pruned model does not (the others merge or fold into the
weights: LoRA, KD and the text teacher's LoRA at export, the linear patch at once)."""


def _row_speedup(row: ComparisonRow, rows: list[ComparisonRow]) -> float:
    """The row's decode speed-up: its own measurement for an unhealed row or one whose healing adds a module, else
    its unhealed row's (the same decoder: a second measurement would only add timing noise)."""
    if row.healing == "none" or row.healing in ADDS_MODULE:
        return row.decode_speedup
    return next(other.decode_speedup for other in rows
                if (other.method, other.fraction, other.healing) == (row.method, row.fraction, "none"))


def frontier(rows: list[ComparisonRow]) -> list[tuple[float, float, ComparisonRow]]:
    """``(speed-up, metric, row)`` of the rows no other row beats on both the measured decode speed-up and the first
    set's WER (BLEU: higher is better), the unpruned baseline included; by speed-up."""
    set_name, metric = _headline(rows[0])
    sign = -1.0 if metric == "bleu" else 1.0  # compare as "lower is better"
    points = [(_row_speedup(row, rows), row.scores[set_name][metric], row) for row in rows]

    def beaten(point: tuple[float, float, ComparisonRow]) -> bool:
        speed, value, _ = point
        return any(other_speed >= speed and sign * other_value <= sign * value
                   and (other_speed, other_value) != (speed, value) for other_speed, other_value, _ in points)

    return sorted((point for point in points if not beaten(point)), key=lambda point: point[0])


def frontier_markdown(rows: list[ComparisonRow]) -> str:
    """The frontier as a Markdown table."""
    set_name, metric = _headline(rows[0])
    header = ["decode speed-up", f"{set_name} {metric}", "method", "removed", "healing", "layers removed",
              "attention dropped"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for speed, value, row in frontier(rows):
        method = "unpruned" if row.method == "none" else row.method
        lines.append(f"| {speed:.2f}x | {value:.1f} | {method} | {row.fraction:.0%} | {row.healing} | "
                     f"{compact_indices(row.removed_layers)} | {compact_indices(row.removed_attention)} |")
    return "\n".join(lines) + "\n"


def plot_frontier(rows: list[ComparisonRow], path: Path) -> Path:
    """The first set's WER (or BLEU) against the measured decode speed-up: a colour per method, a marker per healing,
    the frontier joined by a line."""
    from matplotlib.figure import Figure

    from lightning_speechllm.redundancy.plots import save_figure

    set_name, metric = _headline(rows[0])
    methods = list(dict.fromkeys(row.method for row in rows))
    healings = list(dict.fromkeys(row.healing for row in rows))
    markers = "osD^v<>Pp*X"
    figure = Figure(figsize=(6.4, 4.4), layout="tight")
    ax = figure.subplots()
    colours = {method: f"C{index}" for index, method in enumerate(methods)}
    for row in rows:
        ax.scatter(_row_speedup(row, rows), row.scores[set_name][metric], color=colours[row.method],
                   marker=markers[healings.index(row.healing) % len(markers)], s=36, alpha=0.85)
    best = frontier(rows)
    ax.plot([p[0] for p in best], [p[1] for p in best], color="black", linewidth=1, linestyle="--", label="frontier")
    for method in methods:
        ax.scatter([], [], color=colours[method], marker="o", label="unpruned" if method == "none" else method)
    for index, healing in enumerate(healings):
        ax.scatter([], [], color="grey", marker=markers[index % len(markers)], label=f"healing: {healing}")
    ax.set_xlabel("decode speed-up (measured)")
    ax.set_ylabel(f"{set_name} {metric.upper()}" + (" (log scale)" if metric == "wer" else ""))
    if metric == "wer":
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    save_figure(figure, path)
    return path


def write_comparison(rows: list[ComparisonRow], out: Path) -> None:
    """``comparison.md`` / ``.json`` / ``.csv`` / ``.png`` and ``frontier.png``."""
    atomic_write_text("## Summary\n\n" + summary_markdown(rows) + "\n`*`: the largest removed fraction that passes the "
                      "paper's rule for that method and healing.\n\n## Speed-up / quality frontier\n\nThe rows no "
                      "other row beats on both (a healed row is given its unhealed row's measured speed-up unless "
                      "its healing adds a module).\n\n" + frontier_markdown(rows) + "\n## Every row\n\n"
                      + comparison_markdown(rows), out / "comparison.md")
    atomic_write_text(json.dumps([dataclasses.asdict(row) for row in rows], indent=2) + "\n", out / "comparison.json")
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["method", "fraction", "healing", "removed_layers", "removed_attention", "set", "metric", "value",
                     "decoder_params", "decode_ms_per_token", "decode_speedup", "kv_cache_bytes", "chosen"])
    for row in rows:
        for set_name, metrics in sorted(row.scores.items()):
            for metric, value in sorted(metrics.items()):
                writer.writerow([row.method, row.fraction, row.healing, " ".join(map(str, row.removed_layers)),
                                 " ".join(map(str, row.removed_attention)), set_name, metric, value,
                                 row.decoder_params, row.decode_ms_per_token, row.decode_speedup, row.kv_cache_bytes,
                                 row.chosen])
    atomic_write_text(buffer.getvalue(), out / "comparison.csv")
    plot_comparison(rows, out / "comparison.png")
    plot_frontier(rows, out / "frontier.png")
