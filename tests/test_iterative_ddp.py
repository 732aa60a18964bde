"""IterativePruning under DDP with find_unused_parameters=False (configs/trainer/ddp.yaml): 2 gloo ranks remove the
same layers and end with the weights of one process that sees the same global batches."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from lightning_speechllm.healing.module import HealingModule

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tests" / "iterative_ddp_run.py"


def run(tmp_path: Path, devices: int, *extra: str, timeout: int = 120, ranks: int | None = None) -> list[dict]:
    """Run tests/iterative_ddp_run.py on `devices` processes; the saved results of the first `ranks` ranks."""
    out = tmp_path / f"devices{devices}"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(SCRIPT), str(devices), str(out), *extra], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [torch.load(f"{out}.rank{rank}.pt", weights_only=False) for rank in range(ranks or devices)]


def test_two_rank_ddp_iterative_pruning_equals_one_process(tmp_path):
    """Round 1 at step 0 removes a layer whose LoRA adapters are registered with DDP's reducer; without the fix the
    next step fails ("parameters that were not used in producing the loss returned by training_step")."""
    single, ddp = run(tmp_path, 1), run(tmp_path, 2)
    (one,), (rank0, rank1) = single, ddp
    assert one["error"] is rank0["error"] is rank1["error"] is None
    assert one["steps"] == rank0["steps"] == rank1["steps"] == 4
    assert rank0["rounds"] == rank1["rounds"] == one["rounds"] and one["rounds"][0] == [2] and len(one["rounds"]) == 2
    assert rank0["removed"] == rank1["removed"] == one["removed"] == sorted(sum(one["rounds"], []))
    assert one["state"].keys() == rank0["state"].keys()
    for key, value in one["state"].items():  # tolerance: gradient all-reduce vs accumulation order (float32)
        torch.testing.assert_close(rank0["state"][key], value, atol=2e-5, rtol=1e-4, msg=key)
        torch.testing.assert_close(rank1["state"][key], rank0["state"][key], atol=0, rtol=0, msg=key)
    # The round-2 layer's adapters trained for two steps, then froze in place: under DDP their zero gradients are
    # dropped before the step, else AdamW's momentum would keep moving them away from the one-process run.
    late = [k for k in one["state"] if f"layers.{one['rounds'][1][0]}." in k and "lora_B" in k]
    assert late and all(one["state"][k].abs().max() > 0 for k in late)


def test_a_rank_without_measurement_batches_fails_every_rank_instead_of_hanging(tmp_path):
    """Rank 1's validation loader is empty: every rank raises IterativePruningError at step 0. Without agreeing on
    the count first, rank 1 fails alone and rank 0 is left in the map's all-gather (gloo: a peer-closed error once
    rank 1's process is gone; NCCL: a hang until the collective timeout)."""
    rank0, = run(tmp_path, 2, "--val_batches_rank1", "0", timeout=90, ranks=1)  # rank 1 may be killed first
    assert rank0["steps"] == 0 and "no batches on some rank" in rank0["error"]


def test_masked_trainables_are_the_adapters_of_removed_layers():
    from tests.test_iterative import planted_module

    module: HealingModule = planted_module()
    assert module.masked_trainables() == []
    module.remove_more_layers([3])
    mask = module.speechllm.layer_mask
    with mask.active(range(mask.num_layers)):
        expected = [p for n, p in module.named_parameters() if ".layers.3." in n and p.requires_grad]
    registered = {id(p) for p in module.parameters()}
    masked = module.masked_trainables()
    assert len(expected) == 4 and [id(p) for p in masked] == [id(p) for p in expected]  # q/v lora_A/lora_B
    assert not registered & {id(p) for p in masked}  # gone from parameters(): DDP's reducer is not told
