"""Precision chosen by the hardware: bf16 autocast only where it is native (and measured faster), a set one wins."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from lightning_speechllm import precision
from lightning_speechllm.precision import PrecisionChoice, choose_precision, resolve_precision


@pytest.fixture(autouse=True)
def fresh_choice(monkeypatch):
    """Each test chooses anew: no cached choice, no choice inherited from a launching process."""
    choose_precision.cache_clear()
    monkeypatch.delenv("LIGHTNING_SPEECHLLM_AUTO_PRECISION", raising=False)
    yield
    choose_precision.cache_clear()


def test_a_cpu_without_native_bf16_trains_in_fp32_and_says_why(monkeypatch):
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: (False, "AVX2"))
    monkeypatch.setattr(precision, "cpu_bf16_probe", lambda: pytest.fail("no probe without native bf16"))
    assert choose_precision("cpu").line() == "precision: 32-true (this CPU has no native bf16: AVX2)"


@pytest.mark.parametrize("speedup, expected", [(2.3, "bf16-mixed"), (1.05, "32-true"), (0.02, "32-true")])
def test_native_bf16_is_used_only_where_the_probe_measures_it_faster(monkeypatch, speedup, expected):
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: (True, "AVX512, AVX512-BF16"))
    monkeypatch.setattr(precision, "cpu_bf16_probe", lambda: speedup)
    choice = choose_precision("cpu")
    assert choice.precision == expected
    assert f"{speedup:.2f}x as fast as fp32" in choice.reason and "AVX512-BF16" in choice.reason


def test_the_users_precision_wins_and_is_announced(monkeypatch, capsys):
    monkeypatch.setattr(precision, "choose_precision", lambda accelerator: pytest.fail("the user's choice wins"))
    assert resolve_precision("bf16-mixed", "cpu") == "bf16-mixed"
    assert resolve_precision(32, "cpu", source="--precision") == 32
    assert capsys.readouterr().out.splitlines() == ["precision: bf16-mixed (set by --trainer.precision)",
                                                    "precision: 32 (set by --precision)"]


def test_ranks_started_by_the_launching_process_inherit_its_choice(monkeypatch, capsys):
    monkeypatch.setattr(precision, "choose_precision", lambda accelerator: PrecisionChoice("32-true", "why"))
    assert resolve_precision(None, "cpu") == "32-true"
    assert os.environ["LIGHTNING_SPEECHLLM_AUTO_PRECISION"] == "32-true"
    monkeypatch.setattr(precision, "choose_precision", lambda accelerator: pytest.fail("a rank does not re-probe"))
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert resolve_precision(None, "cpu") == "32-true"
    assert capsys.readouterr().out == "precision: 32-true (why)\n"  # rank 1 prints nothing
    monkeypatch.setenv("LOCAL_RANK", "0")  # the launching process itself chooses (and says why) every time
    monkeypatch.setattr(precision, "choose_precision", lambda accelerator: PrecisionChoice("32-true", "why"))
    resolve_precision(None, "cpu")
    assert capsys.readouterr().out == "precision: 32-true (why)\n"


def test_no_cuda_device_means_fp32(monkeypatch):
    monkeypatch.setattr(precision.torch.cuda, "is_available", lambda: False)
    assert choose_precision("gpu") == PrecisionChoice("32-true", "no CUDA device visible")


def test_the_probe_times_a_real_workload():
    precision.cpu_bf16_probe.cache_clear()
    assert 0 < precision.cpu_bf16_probe(tokens=64, repeats=2) < 1000


def test_an_avx2_only_cpu_is_detected_as_such():
    """ATEN_CPU_CAPABILITY=avx2 caps torch's kernels at AVX2 (what an AVX2-only CPU gives): no bf16 autocast."""
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
    env.pop("LIGHTNING_SPEECHLLM_AUTO_PRECISION", None)
    code = "from lightning_speechllm.precision import choose_precision; print(choose_precision('cpu').line())"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "precision: 32-true (this CPU has no native bf16: AVX2)"
