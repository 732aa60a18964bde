"""One readable report of a run: redundancy maps, the pruning sweep and the efficiency benchmark.

:func:`write_report` collects what the commands wrote under a run directory::

    <run_dir>/redundancy/<set>/<modality>/epoch=E.png     heat maps (measure / RedundancyCallback)
    <run_dir>/redundancy/<set>/agreement_epoch=E.json      speech-vs-text agreement
    <run_dir>/sweep.json | <run_dir>/sweep/sweep.json      sweep table, thresholds, chosen fraction (+ sweep.png)
    <run_dir>/efficiency.json                               {"full", "pruned", "comparison"} (efficiency --json_out)

and writes ``report.md`` (images linked) and ``report.html`` (images inlined as base64 data URIs, readable on its
own). A missing part is reported as "not measured in this run"; only the latest epoch of each map is shown.
"""
from __future__ import annotations

import base64
import datetime as dt
import html
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lightning_speechllm.evaluation.sweep.table import FAILURE_METRICS
from lightning_speechllm.io_utils import atomic_write_text, read_json

__all__ = ["Block", "collect_blocks", "render_html", "render_markdown", "write_report"]

NOT_MEASURED = "not measured in this run"
_EPOCH = re.compile(r"epoch=(\d+)")


@dataclass
class Block:
    """One piece of the report: a heading (``level``), Markdown text (pipe tables allowed) or an image."""

    kind: str
    """'heading', 'markdown' or 'image'."""
    text: str = ""
    level: int = 2
    path: Path | None = None


def _epoch(path: Path) -> int:
    match = _EPOCH.search(path.name)
    return int(match.group(1)) if match else -1


def _latest(paths: list[Path]) -> Path | None:
    return max(paths, key=_epoch, default=None)


# ------------------------------------------------------------------------------------------------ sections
def _redundancy_blocks(redundancy_dir: Path) -> list[Block]:
    blocks = [Block("heading", "Decoder-layer redundancy")]
    if not redundancy_dir.is_dir():
        return blocks + [Block("markdown", f"Redundancy maps: {NOT_MEASURED} (no {redundancy_dir}).")]
    found = False
    for set_dir in sorted(p for p in redundancy_dir.iterdir() if p.is_dir()):
        for modality_dir in sorted(p for p in set_dir.iterdir() if p.is_dir()):
            heatmap = _latest([p for p in modality_dir.glob("epoch=*.png") if not p.stem.endswith("_bi")])
            if heatmap is None:
                continue
            found = True
            blocks.append(Block("heading", f"{set_dir.name} — {modality_dir.name} (epoch {_epoch(heatmap)})", 3))
            blocks.append(Block("image", f"angular distance d(l, n), {set_dir.name}, {modality_dir.name}",
                                path=heatmap))
            influence = modality_dir / f"{heatmap.stem}_bi.png"
            if influence.is_file():
                blocks.append(Block("image", f"Block Influence, {set_dir.name}, {modality_dir.name}", path=influence))
        versus = _latest(list(set_dir.glob("speech_vs_text_epoch=*.png")))
        if versus is not None:
            found = True
            blocks.append(Block("image", f"speech vs text, {set_dir.name}", path=versus))
    if not found:
        blocks.append(Block("markdown", f"Redundancy maps: {NOT_MEASURED} (no heat map under {redundancy_dir})."))
    blocks.extend(_agreement_blocks(redundancy_dir))
    return blocks


def _agreement_blocks(redundancy_dir: Path) -> list[Block]:
    rows = []
    for set_dir in sorted(p for p in redundancy_dir.iterdir() if p.is_dir()):
        latest = _latest(list(set_dir.glob("agreement_epoch=*.json")))
        if latest is None:
            continue
        data = read_json(latest)
        epoch = data.get("epoch", _epoch(latest))
        # one row per token selection, the headline (modality-clean) one first; older files have only the top level
        by_selection = data.get("by_token_selection") or {data.get("token_selection", "-"): data}
        for selection, values in by_selection.items():
            null = values.get("null") or {}
            rows.append(f"| {set_dir.name} | {epoch} | {_num(values.get('spearman_rho'))} | "
                        f"{_pct(values.get('path_exact'))} | {_pct(values.get('path_overlap'))} | {selection} | "
                        f"{_num((null.get('spearman_rho') or {}).get('null_q95'))} | "
                        f"{_num((null.get('spearman_rho') or {}).get('p_value'))} | "
                        f"{_num((null.get('path_overlap') or {}).get('p_value'))} |")
    if not rows:
        return [Block("markdown", f"Speech-vs-text agreement: {NOT_MEASURED}.")]
    header = ["| set | epoch | Spearman ρ (d tables) | same best block | overlapping best block | tokens | "
              "ρ null q95 | p(ρ) | p(overlap) |", "|---|---:|---:|---:|---:|---|---:|---:|---:|"]
    note = ("`last_prompt` compares the modalities where only the input differs; under `last` both read the same "
            "teacher-forced transcript, which inflates agreement. Null: the text map's first layers shuffled within "
            "each block size (p: share of shuffles agreeing at least as much).")
    return [Block("heading", "Speech vs text agreement", 3), Block("markdown", "\n".join(header + rows)),
            Block("markdown", note)]


def _num(value: Any) -> str:
    return "-" if not isinstance(value, (int, float)) else f"{value:.3f}"


def _pct(value: Any) -> str:
    return "-" if not isinstance(value, (int, float)) else f"{100 * value:.0f}%"


def _timing(seconds: dict[str, float]) -> str:
    """' Wall time: ...' from {phase: seconds} (empty without timings)."""
    parts = [f"{phase} {int(value // 60)} min {round(value % 60)} s" for phase, value in seconds.items()]
    return f" Wall time: {', '.join(parts)}." if parts else ""


def _scores_blocks(scores_json: Path) -> list[Block]:
    """WER/BLEU/loss per set from the `scores.json` that `fit` writes, the failure modes, a few test hypotheses."""
    if not scores_json.is_file():
        return []
    data = read_json(scores_json)
    rows = [(stage, key, value) for stage in ("validation", "test") for key, value in (data.get(stage) or {}).items()
            if key.rsplit("/", 1)[-1] not in FAILURE_METRICS]
    blocks = [Block("heading", "Scores")]
    if rows:
        table = ["| stage | metric | value |", "|---|---|---:|"]
        table += [f"| {stage} | `{key}` | {_num(value)} |" for stage, key, value in rows]
        where = f" Test scores are of `{data['test_checkpoint']}`." if data.get("test_checkpoint") else ""
        blocks.append(Block("markdown", f"After {data.get('global_step', '?')} training steps.{where}"
                                        f"{_timing(data.get('seconds') or {})}\n\n" + "\n".join(table)))
    blocks += anchor_blocks(data)
    blocks += _failure_blocks(data)
    examples = data.get("test_examples") or []
    if examples:
        table = ["| set | reference | hypothesis |", "|---|---|---|"]
        table += [f"| {e['set_name']} | {_cell(e['reference'])} | {_cell(e['hypothesis'])} |" for e in examples]
        blocks.append(Block("markdown", "Test examples:\n\n" + "\n".join(table)))
    return blocks


def anchor_blocks(data: dict[str, Any]) -> list[Block]:
    """Real-speech sets: the model's WER beside Whisper's own decoder on the same audio (scores.json's `anchor`)."""
    rows = []
    for stage, sets in (data.get("anchor") or {}).items():
        prefix = "val" if stage == "validation" else "test"
        for name, anchor in sets.items():
            model_wer = (data.get(stage) or {}).get(f"{prefix}/{name}/wer")
            ratio = model_wer / anchor["wer"] if isinstance(model_wer, (int, float)) and anchor.get("wer") else None
            rows.append(f"| {stage} | {name} | {anchor.get('utterances', '-')} | {_in_percent(model_wer)} | "
                        f"{_in_percent(anchor.get('wer'))} | {'-' if ratio is None else f'{ratio:.1f}x'} |")
    if not rows:
        return []
    model = next(iter(next(iter(data["anchor"].values())).values())).get("model", "Whisper")
    table = [f"| stage | set (real speech) | utterances | this model's WER | {model}'s own decoder | ratio |",
             "|---|---|---:|---:|---:|---:|", *rows]
    return [Block("markdown", f"Real speech, beside the anchor: {model}'s own decoder on the same audio (it reads "
                              "the same encoder outputs).\n\n" + "\n".join(table))]


def _percent(value: Any) -> str:
    return "-" if not isinstance(value, (int, float)) else f"{100 * value:.1f}%"


def _in_percent(value: Any) -> str:
    """A score already in percent (every `*/wer` of scores.json)."""
    return "-" if not isinstance(value, (int, float)) else f"{value:.1f}%"


def _failure_blocks(data: dict[str, Any]) -> list[Block]:
    """One row per (stage, set) with its FAILURE_METRICS (percent), from `<stage>/<set>/<rate>` keys."""
    sets: dict[tuple[str, str], dict[str, float]] = {}
    for stage in ("validation", "test"):
        for key, value in (data.get(stage) or {}).items():
            parts = key.split("/")
            if len(parts) == 3 and parts[2] in FAILURE_METRICS:
                sets.setdefault((stage, parts[1]), {})[parts[2]] = value
    if not sets:
        return []
    table = ["| stage | set | insertions (% ref. words) | loops | empty | hit max_new_tokens |",
             "|---|---|---:|---:|---:|---:|"]
    table += [f"| {stage} | {name} | " + " | ".join(_rate(rates.get(m)) for m in FAILURE_METRICS) + " |"
              for (stage, name), rates in sets.items()]
    note = ("Failure modes, % of hypotheses: a loop is a word n-gram (n <= 4) repeated 4+ times in a row; empty is "
            "blank (ASR: after the Whisper normaliser); hit max_new_tokens ended without a stop token.")
    return [Block("markdown", note + "\n\n" + "\n".join(table))]


def _rate(value: Any) -> str:
    return "-" if not isinstance(value, (int, float)) else f"{value:.1f}%"


def _cell(text: str) -> str:
    # The HTML table renderer splits rows on "|", so a pipe inside a hypothesis is shown as a broken bar.
    return " ".join(text.replace("|", "\u00a6").split()) or "(empty)"


def _find_sweep(run_dir: Path, sweep_dir: Path | None) -> Path | None:
    candidates = [sweep_dir] if sweep_dir is not None else [run_dir, run_dir / "sweep"]
    return next((d for d in candidates if (d / "sweep.json").is_file()), None)


def _sweep_blocks(sweep_dir: Path | None) -> list[Block]:
    from lightning_speechllm.evaluation.sweep import SweepTable, Thresholds, choose_point, format_markdown

    blocks = [Block("heading", "Pruning sweep")]
    if sweep_dir is None:
        return blocks + [Block("markdown", f"Pruning sweep: {NOT_MEASURED}.")]
    path = sweep_dir / "sweep.json"
    data = read_json(path)
    table = SweepTable.from_dict(data, str(path))
    thresholds = Thresholds(**data.get("thresholds", {}))
    chosen = choose_point(table, thresholds)
    if chosen is None:
        headline = "**Chosen fraction: none** — no sweep point meets the rule."
    else:
        headline = (f"**Chosen fraction: {chosen.removed_fraction:.1%}** ({chosen.n}/{chosen.num_layers} layers, "
                    f"layers {chosen.removed_layers}).")
    blocks.append(Block("markdown", headline))
    blocks.append(Block("markdown", format_markdown(table, thresholds, chosen).strip()))
    curve = sweep_dir / "sweep.png"
    if curve.is_file():
        blocks.append(Block("image", "metric vs fraction of decoder layers removed", path=curve))
    return blocks


def _efficiency_blocks(efficiency_json: Path) -> list[Block]:
    blocks = [Block("heading", "Efficiency")]
    if not efficiency_json.is_file():
        return blocks + [Block("markdown", f"Efficiency: {NOT_MEASURED} (no {efficiency_json}; write one with "
                                           "`python -m lightning_speechllm efficiency --json_out ...`).")]
    try:
        from lightning_speechllm.evaluation.efficiency import EfficiencyReport, format_markdown
    except ImportError:  # hook: the efficiency module is optional
        return blocks + [Block("markdown", "Efficiency: lightning_speechllm.evaluation.efficiency is not available; "
                                           f"raw results in {efficiency_json}.")]
    data = read_json(efficiency_json)
    try:
        full, pruned = EfficiencyReport(**data["full"]), EfficiencyReport(**data["pruned"])
        text = format_markdown(full, pruned, data["comparison"])
    except (KeyError, TypeError) as error:  # another version of the result format: show what is there
        text = f"Efficiency: {efficiency_json} does not match this version's format ({error}); raw values:\n\n"
        text += _raw_efficiency_table(data)
    return blocks + [Block("markdown", text)]


def _raw_efficiency_table(data: dict[str, Any]) -> str:
    """Every scalar of the ``full`` / ``pruned`` entries side by side (``-`` where absent)."""
    columns = [key for key in ("full", "pruned") if isinstance(data.get(key), dict)]
    keys = sorted({k for c in columns for k, v in data[c].items() if isinstance(v, (int, float, str))})
    if not columns or not keys:
        return "(no full/pruned values)"
    lines = ["| field | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    lines += [f"| {k} | " + " | ".join(str(data[c].get(k, "-")) for c in columns) + " |" for k in keys]
    return "\n".join(lines)


def collect_blocks(run_dir: str | Path, sweep_dir: str | Path | None = None, redundancy_dir: str | Path | None = None,
                   efficiency_json: str | Path | None = None, title: str | None = None) -> list[Block]:
    """The report's content, in order; paths default to the run-directory layout in the module docstring."""
    run = Path(run_dir)
    now = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    blocks = [Block("heading", title or f"Run report: {run.name}", 1),
              Block("markdown", f"Run directory `{run}`, generated {now}.")]
    blocks += _scores_blocks(run / "scores.json")
    blocks += _redundancy_blocks(Path(redundancy_dir) if redundancy_dir else run / "redundancy")
    blocks += _sweep_blocks(_find_sweep(run, Path(sweep_dir) if sweep_dir else None))
    blocks += _efficiency_blocks(Path(efficiency_json) if efficiency_json else run / "efficiency.json")
    return blocks


# ------------------------------------------------------------------------------------------------ rendering
def render_markdown(blocks: list[Block], base_dir: Path) -> str:
    """Markdown with images linked relative to ``base_dir`` (where report.md lives)."""
    parts = []
    for block in blocks:
        if block.kind == "heading":
            parts.append("#" * block.level + " " + block.text)
        elif block.kind == "image":
            assert block.path is not None
            relative = Path(os.path.relpath(block.path.resolve(), base_dir.resolve())).as_posix()
            parts.append(f"![{block.text}]({relative})")
        else:
            parts.append(block.text)
    return "\n\n".join(parts) + "\n"


def _inline(text: str) -> str:
    """Escape, then render **bold** and `code`."""
    escaped = html.escape(text)
    escaped = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", escaped)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", escaped)


def _table_html(lines: list[str]) -> str:
    rows = [[cell.strip() for cell in line.strip().strip("|").split("|")] for line in lines]
    body = [row for row in rows[1:] if not all(set(cell) <= set("-: ") for cell in row)]
    head = "".join(f"<th>{_inline(c)}</th>" for c in rows[0])
    cells = "".join("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in row) + "</tr>" for row in body)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{cells}</tbody></table>"


def _markdown_html(text: str) -> str:
    """Pipe tables become <table>, other paragraphs <p>."""
    out, table, paragraph = [], [], []

    def flush() -> None:
        if table:
            out.append(_table_html(table))
            table.clear()
        if paragraph:
            out.append(f"<p>{_inline(' '.join(paragraph))}</p>")
            paragraph.clear()

    for line in text.splitlines():
        if line.strip().startswith("|"):
            if paragraph:
                flush()
            table.append(line)
        elif not line.strip():
            flush()
        else:
            if table:
                flush()
            paragraph.append(line.strip())
    flush()
    return "\n".join(out)


_MIME = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".svg": "image/svg+xml"}
_STYLE = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
          "table{border-collapse:collapse;font-size:13px;margin:1em 0}th,td{border:1px solid #ccc;padding:3px 6px}"
          "th{background:#f3f3f3}img{max-width:100%}figure{margin:1em 0}figcaption{font-size:13px;color:#555}")


def render_html(blocks: list[Block], title: str) -> str:
    """A standalone HTML page; images are embedded as base64 data URIs."""
    body = []
    for block in blocks:
        if block.kind == "heading":
            body.append(f"<h{block.level}>{html.escape(block.text)}</h{block.level}>")
        elif block.kind == "image":
            assert block.path is not None
            mime = _MIME.get(block.path.suffix.lower(), "application/octet-stream")
            data = base64.b64encode(block.path.read_bytes()).decode("ascii")
            body.append(f'<figure><img src="data:{mime};base64,{data}" alt="{html.escape(block.text)}">'
                        f"<figcaption>{html.escape(block.text)}</figcaption></figure>")
        else:
            body.append(_markdown_html(block.text))
    return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{_STYLE}</style></head>\n<body>\n" + "\n".join(body) + "\n</body></html>\n")


def write_report(run_dir: str | Path, out_dir: str | Path | None = None, *, sweep_dir: str | Path | None = None,
                 redundancy_dir: str | Path | None = None, efficiency_json: str | Path | None = None,
                 title: str | None = None) -> tuple[Path, Path]:
    """Write ``report.md`` and ``report.html`` (default: into ``run_dir``) from what the run wrote; returns both
    paths. Parts that are absent are stated as "not measured in this run"."""
    run = Path(run_dir)
    if not run.is_dir():
        raise FileNotFoundError(f"run directory {run} does not exist")
    out = Path(out_dir) if out_dir is not None else run
    blocks = collect_blocks(run, sweep_dir, redundancy_dir, efficiency_json, title)
    page_title = blocks[0].text
    markdown = atomic_write_text(render_markdown(blocks, out), out / "report.md")
    page = atomic_write_text(render_html(blocks, page_title), out / "report.html")
    return markdown, page
