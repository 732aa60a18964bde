"""The commands users type, on 2 gloo ranks: `fit` (with --test_after_fit), `validate`, `test` and `heal` exit 0,
write scores.json, maps and the report, and `validate` / `test` score and map exactly what 1 rank does."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.test_fit_cli import TEXTS, fit_args
from tests.test_heal_cli import heal_yaml
from tests.tiny_speechllm import save_tiny_assets

REPO = Path(__file__).resolve().parents[1]
# Lightning's advice to pass sync_dist=True (a log call of ours whose value is not synced), its start-of-training
# warning about the modules our frozen parts keep in eval mode, and its product tips.
OUR_LOGGING_WARNINGS = ("sync_dist=True", "module(s) in eval mode", "Tip:")


def run_cli(command: str, args: list[str], devices: int) -> subprocess.CompletedProcess:
    """`python -m lightning_speechllm <command>` on `devices` gloo ranks (Lightning launches rank 1 itself)."""
    ranks = ["--trainer.devices", str(devices), "--trainer.strategy", "ddp"] if devices > 1 else []
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "lightning_speechllm", command, *args, *ranks], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, f"{command} on {devices} rank(s) exited {proc.returncode}:\n{proc.stderr[-4000:]}"
    noise = [line for line in (proc.stdout + proc.stderr).splitlines() if any(w in line for w in OUR_LOGGING_WARNINGS)]
    assert not noise, noise
    return proc


def last_run(root: Path) -> Path:
    return max((root / "lightning_logs").glob("version_*"), key=lambda p: int(p.name.split("_")[1]))


def assert_same_numbers(one, two, where: str = "") -> None:
    """Equal structure; floats at most one unit of the 4th decimal apart: scores are rounded to 4 decimals and the runs
    batch and reduce in another order (fp32: ~1e-6 apart), so two values a hair apart can round to 1e-4 apart, which
    float subtraction can give as 1.00000000000003e-4 (> 1e-4); 1.5e-4 allows that one unit and no more."""
    if isinstance(one, dict):
        assert one.keys() == two.keys(), where
        for key in one:
            assert_same_numbers(one[key], two[key], f"{where}/{key}")
    elif isinstance(one, list):
        assert len(one) == len(two), where
        for i, (a, b) in enumerate(zip(one, two)):
            assert_same_numbers(a, b, f"{where}[{i}]")
    elif isinstance(one, float) and isinstance(two, float):
        assert (math.isnan(one) and math.isnan(two)) or abs(one - two) <= 1.5e-4, (where, one, two)
    else:
        assert one == two, (where, one, two)


def maps_of(run: Path) -> dict[str, dict]:
    """Every map JSON of a run, without the SHA-256 of its per-sample file: 2 ranks reduce in another order, so the
    file's bytes differ in the last bits while its numbers (compared within tolerance) agree."""
    maps = {str(p.relative_to(run)): json.loads(p.read_text()) for p in sorted(run.glob("redundancy/**/*.json"))}
    for values in maps.values():
        values.pop("per_sample_sha256", None)
    return maps


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, Path]:
    # 6 utterances: 2 ranks get 3 each, so the last eval step of one rank is Lhotse padding (`_dup` copies).
    return save_tiny_assets(tmp_path_factory.mktemp("ddp_cli"), [*TEXTS, "seven eight", "red green blue"],
                            [8000, 6000, 4000, 7000, 5000, 6500])


def test_fit_validate_test_on_two_ranks_equal_one_rank(assets, tmp_path):
    root = tmp_path / "runs"
    common = [*fit_args(assets, root, max_steps=2), "--trainer.limit_val_batches", "1.0", "--data.max_duration", "1",
              "--data.test_sets", f"{{heldout: {assets['manifest']}}}",
              "--trainer.precision", "32-true"]  # rank equality is checked in fp32, not within bf16's rounding
    fit = run_cli("fit", [*common, "--test_after_fit", "true"], devices=2)
    assert "last validation:" in fit.stdout and "test (best checkpoint):" in fit.stdout
    fitted = last_run(root)
    scores = json.loads((fitted / "scores.json").read_text())
    assert scores["global_step"] == 2 and scores["test"]["test/heldout/wer"] > 0
    assert len(scores["test_examples"]) == len(TEXTS) + 2  # gathered from both ranks, padding copies excluded
    assert (fitted / "report.md").is_file() and maps_of(fitted)
    checkpoint = scores["test_checkpoint"]

    evaluated = {}
    for devices in (1, 2):
        for command in ("validate", "test"):
            proc = run_cli(command, [*common, "--ckpt_path", checkpoint], devices)
            run = last_run(root)
            evaluated[command, devices] = (json.loads((run / "scores.json").read_text()), maps_of(run))
            assert (run / "report.md").is_file() and str(run) in proc.stdout
    for command in ("validate", "test"):
        (one, one_maps), (two, two_maps) = evaluated[command, 1], evaluated[command, 2]
        for part in ("validation", "test", "test_examples"):
            assert_same_numbers(one[part], two[part], f"{command}/{part}")
    validation, maps = evaluated["validate", 1][0]["validation"], evaluated["validate", 1][1]
    assert validation["val/dev/wer"] > 0 and set(maps) == set(evaluated["validate", 2][1])
    assert {m["num_samples"] for name, m in maps.items() if "/speech/" in name} == {len(TEXTS) + 2}
    assert_same_numbers(maps, evaluated["validate", 2][1], "maps")
    assert len(evaluated["test", 2][0]["test_examples"]) == len(TEXTS) + 2


def test_heal_on_two_ranks(tmp_path):
    assets = save_tiny_assets(tmp_path / "assets", [*TEXTS, "seven eight"], [4000, 5000, 6000, 4500, 5500])
    config = heal_yaml(assets, tmp_path / "heal", max_steps=2, logger=True)
    proc = run_cli("heal", ["--config", str(config)], devices=2)
    checkpoint = next((last_run(tmp_path / "heal") / "checkpoints").glob("*.ckpt"))
    assert checkpoint.name.endswith("step=2.ckpt"), proc.stdout[-2000:]
    assert str(yaml.safe_load((last_run(tmp_path / "heal") / "config.yaml").read_text())["trainer"]["devices"]) == "2"
