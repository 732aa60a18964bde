"""Data-parallel and fully sharded training on 2 gloo ranks (CPU), against one process with the same global batch:
{DDP, FSDP2} x {fit, heal with KL + hidden-state MSE, mid-epoch resume}, and the shipped trainer presets through
the `fit` command. Lightning refuses its `fsdp` strategy on the CPU and torch's FSDP1 needs an accelerator; FSDP2
(`fully_shard` on a CPU device mesh, through lightning_speechllm.model.sharding.FSDP2Strategy) runs here as on GPUs."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lightning_speechllm.checkpoints import load_module
from lightning_speechllm.model.checkpoint import load_checkpoint_file, read_checkpoint
from lightning_speechllm.precision import choose_precision
from tests.test_ddp_cli import last_run, run_cli
from tests.test_fit_cli import TEXTS, fit_args
from tests.tiny_speechllm import save_tiny_assets

REPO = Path(__file__).resolve().parents[1]
SCRIPT = Path(__file__).with_name("sharded_run.py")
TOLERANCE = 1e-6  # resumed vs uninterrupted: the same computation on the same kernels (measured: 0.0)
# 2 ranks vs 1 process: fp32 weights (|w| ~ 0.2) after 3 AdamW steps (lr 1e-2, eps 1e-4) on gradients reduced in
# another order: DDP 0.0, FSDP up to 1.2e-7 (~8 ulps, AVX2 kernels); 1e-5 covers any kernel, while a step on
# other data moves them by ~lr (the resume test's 2 steps: 0.02)
RANKS_TOLERANCE = 1e-5


def run(tmp_path: Path, kind: str, strategy: str, steps: int, *extra: str) -> dict:
    out = tmp_path / f"{kind}-{strategy}-{steps}-{len(extra)}.pt"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(SCRIPT), kind, strategy, str(steps), str(out), *extra], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return {**torch.load(out, weights_only=True), "path": out}


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> dict[str, dict]:
    root = tmp_path_factory.mktemp("one_process")
    return {kind: run(root, kind, "single", 3) for kind in ("fit", "heal")}


@pytest.mark.parametrize("kind", ["fit", "heal"])
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_ranks_train_like_one_process_with_the_same_global_batch(one_process, tmp_path, kind, strategy):
    """fit: projector + LoRA on every layer; heal: layers 1-2 masked out, LoRA on the receiving layer, the teacher is
    the same (sharded) model with every layer active; gradients clipped to norm 1 in both."""
    reference, result = one_process[kind], run(tmp_path, kind, strategy, 3)
    assert result["steps"] == reference["steps"] == 3
    assert max_difference(result["state"], reference["state"]) <= RANKS_TOLERANCE
    assert result["active"] == ([0, 3] if kind == "heal" else [0, 1, 2, 3])
    # FSDP: each rank holds half of every decoder weight; DDP: a full replica.
    assert result["local_rows"] == (result["rows"] // 2 if strategy == "fsdp" else result["rows"])


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_mid_epoch_resume_equals_the_uninterrupted_run(tmp_path, strategy):
    assets = save_tiny_assets(tmp_path / "assets", TEXTS * 2, [4000, 5000, 6000, 4500] * 2)
    data = ("--manifest", str(assets["manifest"]))
    uninterrupted = run(tmp_path, "heal", strategy, 4, *data)
    cut = run(tmp_path, "heal", strategy, 2, *data, "--checkpoint_every", "2")
    [checkpoint] = Path(f"{cut['path']}.ckpt").glob("*.ckpt")
    saved = load_checkpoint_file(checkpoint)
    assert saved["epoch"] == 0 and saved["global_step"] == 2  # mid-epoch: the loader's position is in the checkpoint
    assert saved["SpeechDataModule"]["train_sampler"]["epoch"] == 0
    trainable = set(uninterrupted["state"])
    assert {k.removeprefix("speechllm.") for k in saved["state_dict"]} == trainable  # no frozen weight
    resumed = run(tmp_path, "heal", strategy, 4, *data, "--resume", str(checkpoint))
    assert resumed["steps"] == 4 and max_difference(resumed["state"], uninterrupted["state"]) <= TOLERANCE
    assert max_difference(resumed["state"], cut["state"]) > 1e-3  # the resumed steps did train
    written = {k.removeprefix("speechllm."): v for k, v in read_checkpoint(checkpoint)["state_dict"].items()}
    assert max_difference(written, cut["state"]) == 0.0  # the gathered shards, as measure / sweep / export read them


@pytest.mark.parametrize("preset", ["fsdp.yaml", "ddp.yaml"])
def test_shipped_presets_run_fit_on_two_cpu_ranks(tmp_path, preset):
    """`fit --config <task> --config configs/trainer/<preset>` as users type it (GPU presets, on the CPU here), in the
    precision the hardware picks (the presets leave it unset): trains, validates with generation and redundancy maps,
    tests the best checkpoint."""
    assets = save_tiny_assets(tmp_path / "assets", TEXTS, [8000, 6000, 4000, 7000])
    args = fit_args(assets, tmp_path / "run", max_steps=2)
    args[2:2] = ["--config", str(REPO / "configs" / "trainer" / preset)]  # after the task config, before options
    args += ["--trainer.devices", "2", "--trainer.accelerator", "cpu", "--test_after_fit", "true",
             "--data.test_sets", f"{{heldout: {assets['manifest']}}}"]
    proc = run_cli("fit", args, devices=1)  # the preset brings the strategy and the 2 devices
    chosen = choose_precision("cpu")
    # one line names the choice (its reason holds that process's own probe timing)
    assert any(line.startswith(f"precision: {chosen.precision} (") for line in proc.stdout.splitlines()), proc.stdout
    assert ("Using bfloat16 Automatic Mixed Precision" in proc.stdout + proc.stderr) == (chosen.precision == "bf16-mixed")
    run_dir = last_run(tmp_path / "run")
    assert (run_dir / "scores.json").is_file() and list(run_dir.glob("redundancy/dev/speech/epoch=0.json"))
    [checkpoint] = (run_dir / "checkpoints").glob("*.ckpt")
    assert load_module(checkpoint).speechllm.trainable_state_dict().keys() == {
        k.removeprefix("speechllm.") for k in load_checkpoint_file(checkpoint)["state_dict"]}
