"""The short, human-readable account of the JSON that closes the output."""
from __future__ import annotations

from typing import Any

from .helpers import gib


def summary_lines(results: dict[str, Any]) -> list[str]:
    """A short, human-readable account of the JSON."""
    env, opts = results["phases"].get("environment", {}), results["options"]
    head = (f"gpu_check ({'tiny' if opts['tiny'] else 'full'}): {env.get('gpu', opts['device'])}, "
            f"torch {env.get('torch', '?')}, {opts['precision']}; "
            f"{results.get('total_seconds', 0):.0f} s of the {opts['budget_s']:.0f} s budget")
    lines = [head, f"{'phase':<12}{'status':<9}{'time':>8}{'peak memory':>14}  numbers"]
    for name, record in results["phases"].items():
        numbers = ""
        if record.get("status") == "ok":
            numbers = _numbers(name, record)
        elif record.get("status") == "failed":
            numbers = record["error"].splitlines()[0][:100]
        else:
            numbers = record.get("reason", "")
        seconds = f"{record['seconds']:.1f} s" if "seconds" in record else "-"
        lines.append(f"{name:<12}{record.get('status', '?'):<9}{seconds:>8}{gib(record.get('peak_memory_bytes')):>14}"
                     f"  {numbers}")
    return lines


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _numbers(name: str, r: dict[str, Any]) -> str:
    if name == "environment":
        return f"bf16 matmul {r['matmul_bf16_tflops']:.0f} TFLOP/s ({r['matmul_bf16_size']}^3)"
    if name == "assets":
        return (f"decoder {r['decoder_params'] / 1e9:.3f} B ({r['decoder_layers']} layers, vocab "
                f"{r['decoder_vocab']}), encoder {r['encoder_params'] / 1e9:.3f} B, remove {r['removed_layers']}")
    if name in ("fit", "heal", "fsdp"):
        text = (f"{r['tokens_per_s'] or 0:,.0f} tok/s, {r['step_s_median'] or 0:.3f} s/step, "
                f"MFU 6N {_pct(r.get('mfu_6n'))}")
        if "mfu_counted" in r:
            text += f", counted {_pct(r['mfu_counted'])}"
        if "step_time_over_fit" in r:
            text += f", step time x{r['step_time_over_fit']:.2f} fit's"
        return text
    if name == "validate":
        wer = next((v for k, v in r["metrics"].items() if k.endswith("/wer")), None)
        return f"{r['utterances']} utterances in {r['validate_s']:.1f} s, WER {wer}"
    if name == "checkpoint":
        return (f"{r['checkpoint_bytes'] / 2**20:.1f} MiB, reload max|diff| {r['max_abs_diff']}, loss diff "
                f"{r['loss_abs_diff']:.2e}")
    if name == "heal_memory":
        peaks = ", ".join(f"{k} {gib(v['peak_bytes'])}" for k, v in r["variants"].items())
        shared, copy = r.get("shared_over_student"), r.get("copy_over_student")
        ratio = "-" if shared is None else f"{shared:.3f}"
        return f"{peaks}; shared/student {ratio}, copy/student {'-' if copy is None else f'{copy:.3f}'}"
    if name == "released":
        return (f"{r['parameters_b']:.2f} B, map {r['map']['seconds']:.1f} s, heal step "
                f"{gib(r['heal_step']['peak_memory_bytes'])} peak, export {r['export']['gib']:.2f} GiB in "
                f"{r['export']['seconds']:.1f} s, remove {r['map']['removed_layers']}")
    return ""
