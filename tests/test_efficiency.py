"""Efficiency: parameter counts (full, masked, tied), FLOP formula vs hand computation, the SmolLM2 1.46 ratio,
latency measurement on a tiny SpeechLLM (full vs masked), compare() math, the benchmark entry point."""
from __future__ import annotations

import json
import math

import pytest
from transformers import AutoModelForCausalLM, LlamaConfig

from lightning_speechllm.evaluation.efficiency import (
    BenchArgs,
    EfficiencyReport,
    compare,
    decoder_parameter_count,
    format_markdown,
    ideal_speedup,
    kv_cache_bytes,
    main,
    measure_latency,
    median_report,
    per_token_flops,
    prefill_flops,
    run_benchmark,
)
from tests.test_speechllm import make_batch
from tests.tiny_speechllm import tiny_llama, tiny_speechllm


def smollm2_config() -> LlamaConfig:
    return LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                       num_attention_heads=9, num_key_value_heads=3, head_dim=64, tie_word_embeddings=True)


def manual_llama_count(vocab: int, d: int, ffn: int, heads: int, kv_heads: int, layers: int, tied: bool) -> int:
    head_dim = d // heads
    attention = d * heads * head_dim + 2 * d * kv_heads * head_dim + heads * head_dim * d
    layer = attention + 3 * d * ffn + 2 * d  # q k v o, gate up down, two RMSNorm weights
    return vocab * d + layers * layer + d + (0 if tied else vocab * d)  # embeddings, layers, final norm, head


def test_parameter_count_full_and_masked_matches_manual_count():
    llm = tiny_llama(layers=4)  # vocab 360, d 48, ffn 96, 4 heads, 2 kv heads, untied
    assert decoder_parameter_count(llm) == manual_llama_count(360, 48, 96, 4, 2, 4, tied=False)
    model = tiny_speechllm(layers=4)
    model.set_active_layers([0, 3])
    assert decoder_parameter_count(model.llm) == manual_llama_count(360, 48, 96, 4, 2, 2, tied=False)
    assert decoder_parameter_count(model) == decoder_parameter_count(model.llm)
    model.layer_mask.reset()
    assert decoder_parameter_count(model.llm) == manual_llama_count(360, 48, 96, 4, 2, 4, tied=False)


def test_parameter_count_counts_tied_embeddings_once():
    config = LlamaConfig(vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=True)
    llm = AutoModelForCausalLM.from_config(config)
    assert llm.lm_head.weight is llm.get_input_embeddings().weight
    assert decoder_parameter_count(llm) == manual_llama_count(100, 16, 32, 4, 1, 2, tied=True)


def test_per_token_flops_equals_hand_computation():
    # d=8, 4 heads of 2, 2 kv heads, ffn 12, vocab 10, context 5
    config = LlamaConfig(vocab_size=10, hidden_size=8, intermediate_size=12, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2)
    q, kv, o = 2 * 8 * 8, 2 * (2 * 8 * 4), 2 * 8 * 8  # q 8->8, k and v 8->4 each, o 8->8
    scores_values = 2 * (2 * 8 * 5)  # q.k over 5 keys and the weighted values, 4 heads x 2 dims = 8
    mlp = 3 * (2 * 8 * 12)
    head = 2 * 8 * 10
    layer = q + kv + o + scores_values + mlp
    assert per_token_flops(config, 3, 5) == 3 * layer + head
    assert per_token_flops(config, context_len=5) == 3 * layer + head  # default depth from the config
    assert per_token_flops(config, 0, 5) == head
    # prefill over 3 tokens: token t attends t keys; LM head on the last token only
    no_context = q + kv + o + mlp
    assert prefill_flops(config, 3, 3) == 3 * (3 * no_context + 2 * 2 * 8 * (1 + 2 + 3)) + head
    with pytest.raises(ValueError, match="context_len"):
        per_token_flops(config, 3, 0)
    # K and V: 2 kv heads x 2 dims per layer and position, 3 layers, 7 positions, batch 2, 2-byte values
    assert kv_cache_bytes(config, 3, context_len=7, batch_size=2, bytes_per_value=2) == 2 * 3 * 2 * 2 * 7 * 2 * 2


def test_smollm2_ratio_with_12_of_30_layers_removed_is_about_1_46():
    config = smollm2_config()
    assert ideal_speedup(config, 18, context_len=1) == pytest.approx(1.4616, abs=1e-4)
    assert ideal_speedup(config, 18, context_len=128) == pytest.approx(1.467, abs=1e-3)
    kept = [i for i in range(30) if not 14 <= i <= 25]
    assert ideal_speedup(config, kept, context_len=128) == ideal_speedup(config, 18, context_len=128)
    assert ideal_speedup(config, 30) == 1.0
    with pytest.raises(ValueError, match=r"\[30\] out of range"):
        ideal_speedup(config, [0, 30])


def test_flops_reject_non_llama_config():
    from transformers import WhisperConfig

    with pytest.raises(ValueError, match="WhisperConfig lacks"):
        per_token_flops(WhisperConfig())


def test_measure_latency_on_tiny_speechllm_full_and_masked():
    model = tiny_speechllm(layers=4)
    batch = make_batch(seconds=(0.5, 0.3))
    full = measure_latency(model, batch, max_new_tokens=4, repeats=2, warmup=1, label="full")
    with model.layer_mask.active([0, 1]):
        pruned = measure_latency(model, batch, max_new_tokens=4, repeats=2, warmup=0, label="pruned")
    for report in (full, pruned):
        assert report.prefill_ms > 0 and report.decode_ms_per_token > 0 and report.total_ms > report.prefill_ms
        assert 0 < report.speech_ms < report.prefill_ms
        assert report.rtf == pytest.approx(report.total_ms / 1e3 / 0.8, rel=1e-6)
        assert report.audio_seconds == pytest.approx(0.8)
        assert report.peak_memory_bytes > 0 and report.memory_kind == "process_peak_rss"
        assert report.prompt_tokens > 10 and report.batch_size == 2 and report.new_tokens == 4
    assert full.decoder_layers == 4 and pruned.decoder_layers == 2
    # tiny llama: 2 kv heads x 12 dims, float32; the padded prompt plus 4 new tokens for both rows
    # prompt + 4 new tokens - 1: the last new token is never fed back; the measured cache agrees
    assert full.kv_cache_bytes == 2 * 4 * 2 * 12 * (full.prompt_tokens + 4 - 1) * 2 * 4 == full.kv_cache_measured_bytes
    assert pruned.kv_cache_bytes == full.kv_cache_bytes // 2
    assert pruned.decoder_params < full.decoder_params
    assert pruned.active_weight_bytes < full.active_weight_bytes
    assert model.layer_mask.active_layers == (0, 1, 2, 3)
    assert json.loads(json.dumps(full.to_dict()))["label"] == "full"


def test_measure_latency_rejects_bad_arguments():
    model = tiny_speechllm(layers=2)
    with pytest.raises(ValueError, match="max_new_tokens >= 2"):
        measure_latency(model, make_batch(seconds=(0.3,)), max_new_tokens=1)
    with pytest.raises(ValueError, match="at least one batch"):
        measure_latency(model, [], max_new_tokens=4)


def report(label: str, layers: int, prefill: float, decode: float, total: float, rtf: float, params: int,
           peak: int, new_tokens: int = 8) -> EfficiencyReport:
    return EfficiencyReport(label=label, decoder_layers=layers, decoder_params=params, active_weight_bytes=4 * params,
                            batches=2, batch_size=1, prompt_tokens=50.0, new_tokens=new_tokens, audio_seconds=4.0,
                            speech_ms=5.0, prefill_ms=prefill, decode_ms_per_token=decode, total_ms=total, rtf=rtf,
                            peak_memory_bytes=peak, memory_kind="process_peak_rss", kv_cache_bytes=layers * 100,
                            device="cpu", repeats=3)


def test_compare_math():
    full = report("full", 30, prefill=40.0, decode=10.0, total=110.0, rtf=0.055, params=1000, peak=800)
    pruned = report("pruned", 18, prefill=32.0, decode=7.5, total=84.5, rtf=0.04225, params=700, peak=600)
    result = compare(full, pruned, ideal=1.5)
    assert result["layers_removed"] == 12 and result["removed_fraction"] == pytest.approx(0.4)
    assert result["prefill_speedup"] == pytest.approx(1.25)
    assert result["decode_speedup"] == pytest.approx(4 / 3)
    assert result["total_speedup"] == pytest.approx(110 / 84.5)
    assert result["rtf_ratio"] == pytest.approx(0.76818, rel=1e-4)
    assert result["decoder_param_ratio"] == pytest.approx(0.7) and result["weight_bytes_ratio"] == pytest.approx(0.7)
    assert result["peak_memory_ratio"] == pytest.approx(0.75) and result["kv_cache_ratio"] == pytest.approx(0.6)
    assert result["fraction_of_ideal"] == pytest.approx((4 / 3) / 1.5)
    assert result["meets_goal"] is False  # 0.889 < 0.9
    assert compare(full, pruned, ideal=1.45)["meets_goal"] is True
    assert "ideal_decode_speedup" not in compare(full, pruned)
    assert "| decode / token (ms) | 10.00 | 7.50 |" in format_markdown(full, pruned, result)
    with pytest.raises(ValueError, match="different work"):
        compare(full, report("other", 18, 1, 1, 1, 1, 1, 1, new_tokens=16))


def test_median_report_takes_field_medians_and_max_memory():
    reports = [report("full", 30, prefill=p, decode=d, total=t, rtf=r, params=1000, peak=m)
               for p, d, t, r, m in [(40, 10, 110, 0.05, 800), (90, 30, 300, 0.2, 900), (50, 11, 120, 0.06, 700)]]
    merged = median_report(reports)
    assert (merged.prefill_ms, merged.decode_ms_per_token, merged.total_ms, merged.rtf) == (50, 11, 120, 0.06)
    assert merged.peak_memory_bytes == 900 and merged.repeats == 9 and merged.speech_ms == 5.0
    with pytest.raises(ValueError, match="report 1 .* another setting"):
        median_report([reports[0], report("pruned", 18, 1, 1, 1, 1, 1, 1)])
    with pytest.raises(ValueError, match="at least one"):
        median_report([])


def test_run_benchmark_on_tiny_model_masks_the_same_object():
    model = tiny_speechllm(layers=4)
    batches = [make_batch(seconds=(0.4,)), make_batch(seconds=(0.3,), seed=1)]
    args = BenchArgs(remove=[1, 2], max_new_tokens=3, repeats=2, warmup=1, device="cpu", threads=1)
    full, pruned, comparison = run_benchmark(args, model.config, model=model, batches=batches)
    assert (full.decoder_layers, pruned.decoder_layers, full.batches, full.repeats) == (4, 2, 2, 2)
    assert comparison["removed_layers"] == [1, 2] and comparison["layers_removed"] == 2
    assert comparison["ideal_context_len"] == round(full.prompt_tokens + 1.5)
    expected = ideal_speedup(model.llm.config, 2, comparison["ideal_context_len"], num_layers=4)
    assert comparison["ideal_decode_speedup"] == pytest.approx(expected) and expected > 1
    assert math.isfinite(comparison["decode_speedup"])
    assert model.layer_mask.active_layers == (0, 1, 2, 3)
    with pytest.raises(ValueError, match=r"--remove \[9\] out of range"):
        run_benchmark(BenchArgs(remove=[9], device="cpu"), model.config, model=model, batches=batches)
    assert full.kv_cache_measured_bytes == full.kv_cache_bytes  # a float32 cache of every layer: as computed
    assert comparison["kv_cache_measured_ratio"] == pytest.approx(0.5)


def test_run_benchmark_with_an_attention_plan_measures_the_kv_cache_it_saves(tmp_path):
    from lightning_speechllm.pruning.plan import PruningPlan

    model = tiny_speechllm(layers=4)
    plan = PruningPlan(removed_layers=[3], num_layers=4, method="explicit", removed_attention=[0, 2])
    args = BenchArgs(plan=str(plan.to_json(tmp_path / "plan.json")), max_new_tokens=3, repeats=1, warmup=0,
                     device="cpu", threads=1)
    full, pruned, comparison = run_benchmark(args, model.config, model=model, batches=[make_batch(seconds=(0.4,))])
    assert comparison["removed_layers"] == [3] and comparison["removed_attention"] == [0, 2]
    assert comparison["kv_cache_measured_ratio"] == pytest.approx(0.25)  # 1 of 4 layers still holds keys/values
    assert pruned.kv_cache_bytes == full.kv_cache_bytes * 3 // 4  # the analytic count misses dropped attention
    dropped = sum(p.numel() for i in (0, 2) for p in model.llm.model.layers[i].self_attn.parameters())
    layer = sum(p.numel() for p in model.llm.model.layers[3].parameters())
    assert full.decoder_params - pruned.decoder_params == dropped + layer
    assert model.sublayer_mask.dropped_attention == () and model.layer_mask.active_layers == (0, 1, 2, 3)


def test_main_print_config_and_bad_option(capsys):
    assert main(["--print_config"]) == 0
    printed = capsys.readouterr().out
    assert "max_new_tokens: 32" in printed and "llm_path: smollm2-135m" in printed
    assert main(["--no_such_option", "1"]) == 2
