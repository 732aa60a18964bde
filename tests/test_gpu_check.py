"""scripts/gpu_check.py, the one-call GPU check of issue 10 (item 9): its CPU smoke run (`--tiny --device cpu`) goes
through every phase (fit, validate with generation, checkpoint reload, KD healing, healing memory, FSDP2 at world
size 1) and reports sane numbers; the phase runner records failures, skips phases past the time budget or after a
failed prerequisite, and writes the JSON after every phase."""
from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "gpu_check.py"
PHASES = ["environment", "assets", "fit", "validate", "checkpoint", "heal", "heal_memory", "fsdp", "released"]


def load_script():
    spec = importlib.util.spec_from_file_location("gpu_check_under_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> tuple[dict, str, float]:
    tmp = tmp_path_factory.mktemp("gpu_check")
    out = tmp / "result.json"
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    env["PYTHONPATH"] = str(REPO)
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--device", "cpu", "--json_out", str(out)],
                          cwd=tmp, env=env, capture_output=True, text=True, timeout=300, check=False)
    seconds = time.perf_counter() - started
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert not list(tmp.glob("gpu_check_*")), "the work dir is removed"
    return json.loads(out.read_text()), proc.stdout, seconds


def positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_tiny_cpu_run_goes_through_every_phase(tiny_run):
    result, stdout, seconds = tiny_run
    assert list(result["phases"]) == PHASES
    assert result["failed"] == [] and result["skipped"] == []
    assert result["options"]["tiny"] and result["options"]["device"] == "cpu"
    assert result["options"]["precision"] == "bf16-mixed"
    for name, phase in result["phases"].items():
        assert phase["status"] == "ok", (name, phase.get("error"), phase.get("traceback"))
        assert positive(phase["seconds"]), name
        assert phase["peak_memory_bytes"] is None or positive(phase["peak_memory_bytes"]), name
    assert 0 < result["total_seconds"] < seconds
    # The human-readable summary closes stdout; the same JSON was printed before it.
    assert stdout.rstrip().splitlines()[-1] == f"JSON: {result['json']}"
    assert result["summary"][0].startswith("gpu_check (tiny): cpu")
    assert all(any(line.startswith(name) for line in result["summary"]) for name in PHASES)
    assert '"schema": 1' in stdout


def test_tiny_cpu_run_numbers_are_sane(tiny_run):
    phases = tiny_run[0]["phases"]
    assert positive(phases["environment"]["matmul_bf16_tflops"])
    assets = phases["assets"]
    assert assets["decoder_layers"] == 4 and assets["removed_layers"] == [2]  # 25% of 4, ending before the last
    assert positive(assets["decoder_params"]) and positive(assets["encoder_params"])
    assert assets["tokenizer_vocab"] <= assets["decoder_vocab"]

    for name, steps in (("fit", 4), ("heal", 4), ("fsdp", 2)):
        phase = phases[name]
        assert phase["steps"] == steps, name
        assert 1 <= phase["measured_steps"] <= steps
        for key in ("tokens_per_s", "utterances_per_s", "step_s_median", "model_flops_per_step_6n", "mfu_6n"):
            assert positive(phase[key]), (name, key)
        assert phase["mfu_6n"] < 1
    for name in ("fit", "heal"):
        assert positive(phases[name]["counted_flops_per_token"]) and 0 < phases[name]["mfu_counted"] < 1
    assert 0 < phases["fit"]["final_train_loss"] < 20  # ~ln(1024) for a random decoder

    validate = phases["validate"]
    assert validate["utterances"] == 2 and "val/loss" in validate["metrics"]
    assert validate["metrics"]["val/val/wer"] is not None

    checkpoint = phases["checkpoint"]
    assert checkpoint["same_keys"] and checkpoint["max_abs_diff"] == 0.0 and checkpoint["loss_abs_diff"] < 1e-6
    assert positive(checkpoint["checkpoint_bytes"])

    heal = phases["heal"]
    assert heal["from_checkpoint"] and heal["removed_layers"] == [2] and heal["receiving_layers"] == [3]
    assert heal["active_layers"] == 3
    assert {"loss/task_cross_entropy", "loss/kl_divergence"} <= set(heal["final_losses"])
    # The teacher's forward is counted: more model FLOPs per token than fit, with fewer student layers.
    per_token = {n: phases[n]["model_flops_per_step_6n"] / phases[n]["tokens_per_step_mean"] for n in ("fit", "heal")}
    assert per_token["heal"] > per_token["fit"]

    memory = phases["heal_memory"]
    assert set(memory["variants"]) == {"student", "shared", "copy"}
    for variant in memory["variants"].values():
        assert variant["peak_bytes"] is None or positive(variant["peak_bytes"])
        assert variant["active_layers"] == 3
    assert memory["shared_over_student"] is None or positive(memory["shared_over_student"])

    fsdp = phases["fsdp"]
    assert fsdp["world_size"] == 1 and fsdp["strategy"] == "FSDP2Strategy" and fsdp["decoder_sharded"]
    assert fsdp["checkpoint_keys_match"]


def test_phase_runner_guards_each_phase_and_keeps_to_the_budget(tmp_path):
    gpu_check = load_script()
    now = [0.0]

    def clock() -> float:
        return now[0]

    def ok(seconds: float):
        def phase(ctx):
            now[0] += seconds
            return {"value": seconds}
        return phase

    def broken(ctx):
        now[0] += 1
        raise ValueError("boom")

    phases = {"a": (ok(2), ()), "b": (broken, ()), "c": (ok(1), ("b",)), "d": (ok(5), ("a",)),
              "e": (ok(1), ()), "f": (ok(1), ())}
    opts = gpu_check.Options(tiny=True, device="cpu", budget_s=7.5, phases=["a", "b", "c", "d", "e"])
    ctx = gpu_check.Context(opts=opts, work_dir=tmp_path)
    results = {"phases": {}}
    writes = []
    gpu_check.run_phases(ctx, results, phases, write=lambda: writes.append(json.dumps(results)), clock=clock)
    got = results["phases"]
    assert list(got) == ["a", "b", "c", "d", "e"]  # f was not asked for
    assert got["a"] == {"status": "ok", "value": 2, "seconds": 2}
    assert got["b"]["status"] == "failed" and got["b"]["error"] == "ValueError: boom"
    assert "boom" in got["b"]["traceback"]
    assert got["c"] == {"status": "skipped", "reason": "needs b"}
    assert got["d"]["status"] == "ok"  # started at 3 s, within the 7.5 s budget
    assert got["e"]["status"] == "skipped" and got["e"]["reason"].startswith("time budget: 8 s used")
    assert len(writes) == 5 and results["total_seconds"] == 8  # the JSON is rewritten after every phase
    lines = gpu_check.summary_lines({"options": {"tiny": True, "device": "cpu", "precision": "bf16-mixed",
                                                 "budget_s": 7.5}, **results})
    assert any(line.startswith("b ") and "ValueError: boom" in line for line in lines)


def test_device_wheels_cover_what_the_device_image_lacks():
    """Every required module outside the device image's packages (KINDS.md) travels as a wheel."""
    gpu_check = load_script()
    on_device_image = {"torch", "torchaudio", "lightning", "transformers", "peft", "tokenizers", "safetensors",
                       "torchmetrics", "sacrebleu", "numpy", "yaml"}
    assert set(gpu_check.REQUIRED_MODULES) - on_device_image <= set(gpu_check.DEVICE_WHEELS)
    assert gpu_check.missing_modules() == []  # this venv has them all
