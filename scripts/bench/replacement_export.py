"""What a replacement module or a dropped attention costs once exported to stock transformers (issue 13), side by
side in one run.

In the framework a replacement (LLM-Streamline) runs as ``x + MLP(norm(x))``: no attention, no KV cache. Stock
transformers has no such layer, so ``export`` writes it as a full decoder layer whose attention output projection is
zero (the attention still runs and still caches keys/values) and whose MLP is the replacement's. This script builds
the default SpeechLLM (Whisper tiny.en + SmolLM2-135M; untrained projector, which does not matter for speed or for
logit equality), removes a block, inserts a trained-looking (perturbed) ffn replacement, exports it, reloads the
decoder with ``AutoModelForCausalLM`` and measures, in interleaved rounds on the same utterances:

* pruned: the block removed, nothing in its place;
* replacement (framework): the block replaced in the framework;
* replacement (stock export): the exported directory loaded by stock transformers.

It prints decoder parameters, decode ms/token, the measured KV cache and the largest logit difference between the
framework and the stock export. ``--scenario attention`` does the same for attention sublayers dropped at the same
layers (exported as a zero attention output projection: the attention still runs and caches).

    python scripts/bench/replacement_export.py                     # block 14..19 (6 of 30 layers)
    python scripts/bench/replacement_export.py --scenario attention --first 10 --size 12 --repeats 5
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from lightning_speechllm.evaluation.efficiency import (  # noqa: E402
    BenchArgs,
    decoder_parameter_count,
    measure_latency,
    synthetic_batches,
)
from lightning_speechllm.model.export import save_pruned_decoder  # noqa: E402
from lightning_speechllm.model.layer_mask import get_layer_mask_state  # noqa: E402
from lightning_speechllm.model.replacement import build_replacement  # noqa: E402
from lightning_speechllm.model.speechllm import SpeechLLM, SpeechLLMConfig  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--first", type=int, default=14, help="first removed layer")
    parser.add_argument("--size", type=int, default=6, help="removed layers")
    parser.add_argument("--sentences", type=int, default=4, help="espeak utterances (one batch each)")
    parser.add_argument("--max_new_tokens", type=int, default=32, help="forced new tokens per utterance")
    parser.add_argument("--repeats", type=int, default=3, help="timed interleaved rounds (median)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--scenario", choices=("replacement", "attention"), default="replacement",
                        help="a replaced block, or attention sublayers dropped at the same layers")
    return parser.parse_args(argv)


def build(args: argparse.Namespace) -> tuple[SpeechLLM, SpeechLLM, Path]:
    """(framework model with the replacement or dropped attention, the same parts around the stock-exported decoder,
    export dir)."""
    framework = SpeechLLM.from_config(SpeechLLMConfig()).eval()
    block = list(range(args.first, args.first + args.size))
    if args.scenario == "attention":
        framework.sublayer_mask.drop(attention=block)
    else:
        _replace_block(framework, args, block)
    out = Path(tempfile.mkdtemp(prefix=f"{args.scenario}-export-")) / "decoder"
    save_pruned_decoder(framework.llm, out, framework.tokenizer)
    stock_llm = AutoModelForCausalLM.from_pretrained(
        out, attn_implementation=framework.llm.config._attn_implementation).eval()
    stock = SpeechLLM(stock_llm, framework.tokenizer, framework.encoder, framework.config).eval()
    stock.projector.load_state_dict(framework.projector.state_dict())
    return framework, stock, out


def _replace_block(framework: SpeechLLM, args: argparse.Namespace, block: list[int]) -> None:
    mask = framework.layer_mask
    mask.remove_layers(block)
    replacement = build_replacement(get_layer_mask_state(framework.llm).layer_list[args.first], "ffn")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a trained replacement is not zero: give it weights of the same scale as the MLP's
        replacement.mlp.down_proj.weight.copy_(0.5 * torch.randn(replacement.mlp.down_proj.weight.shape,
                                                                 generator=generator) *
                                               framework.llm.model.layers[0].mlp.down_proj.weight.std())
    framework.replacements["block"] = replacement
    mask.set_replacements({args.first: replacement})


@torch.no_grad()
def max_logit_difference(framework: SpeechLLM, stock: SpeechLLM, batches) -> float:
    worst = 0.0
    for batch in batches:
        inputs = framework.build_inputs(batch, with_targets=False)
        real = inputs.attention_mask.bool()
        ours = framework.run_decoder(inputs).logits[real]
        theirs = stock.run_decoder(inputs).logits[real]
        worst = max(worst, float((ours - theirs).abs().max()))
    return worst


def _variants(args: argparse.Namespace, framework: SpeechLLM, stock: SpeechLLM, batches: list) -> tuple[dict, dict]:
    """{label: timed run} in measuring order (the first is the reference), and {label: decoder parameters}."""
    def timed(model: SpeechLLM):
        return lambda: measure_latency(model, batches, args.max_new_tokens, 1, 0)

    if args.scenario == "attention":
        return ({"attention dropped (framework)": timed(framework), "attention dropped (stock export)": timed(stock)},
                {"attention dropped (framework)": decoder_parameter_count(framework.llm),
                 "attention dropped (stock export)": decoder_parameter_count(stock.llm)})
    mask = framework.layer_mask
    replacement = mask.replacements[args.first]

    def pruned_only():
        mask.set_replacements({})
        try:
            return measure_latency(framework, batches, args.max_new_tokens, repeats=1, warmup=0)
        finally:
            mask.set_replacements({args.first: replacement})

    mask.set_replacements({})
    params = {"pruned (no replacement)": decoder_parameter_count(framework.llm)}
    mask.set_replacements({args.first: replacement})
    params["replacement (framework)"] = decoder_parameter_count(framework.llm)
    params["replacement (stock export)"] = decoder_parameter_count(stock.llm)
    return ({"pruned (no replacement)": pruned_only, "replacement (framework)": timed(framework),
             "replacement (stock export)": timed(stock)}, params)



def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    framework, stock, out = build(args)
    batches = synthetic_batches(BenchArgs(sentences=args.sentences, batch_size=1))
    difference = max_logit_difference(framework, stock, batches)
    variants, params = _variants(args, framework, stock, batches)
    for run in variants.values():
        run()  # warm-up
    reports: dict[str, list] = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, run in variants.items():
            reports[name].append(run())
    first = next(iter(variants))
    base = statistics.median(r.decode_ms_per_token for r in reports[first])
    print(f"{args.scenario}: layers {args.first}..{args.first + args.size - 1}; export in {out}")
    print(f"| model | decoder params (M) | decode ms/token | vs {first} | KV cache measured (KiB) |")
    print("|---|---:|---:|---:|---:|")
    for name, runs in reports.items():
        decode = statistics.median(r.decode_ms_per_token for r in runs)
        kv = runs[-1].kv_cache_measured_bytes / 2**10
        print(f"| {name} | {params[name] / 1e6:.2f} | {decode:.2f} | {decode / base:.3f} | {kv:.1f} |")
    print(f"max |logit difference| framework vs stock export: {difference:.3g}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
