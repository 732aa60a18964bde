"""Resume keys of the sweep and the method comparison: a rerun after a change that moves the scores (manifest content,
prompt, dtype, attention kernel, encoder window, precision, healing data) must not reuse the stored points."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from lightning_speechllm.evaluation import method_comparison
from lightning_speechllm.evaluation.sweep import run as sweep_mod
from lightning_speechllm.evaluation.sweep import SweepConfig, SweepError, run_sweep
from tests.test_module import NamedSets
from tests.test_sweep import CountingEvaluator
from tests.tiny_speechllm import tiny_speechllm

TRAINER = {"accelerator": "cpu", "devices": 1, "precision": "32-true"}


class ManifestSets(NamedSets):
    """NamedSets that declare the manifests they were read from, as SpeechDataModule does."""

    def __init__(self, root: Path) -> None:
        super().__init__()
        self.val_sets = {"clean": root / "clean.jsonl", "ast-fr": root / "ast.jsonl"}
        self.test_sets: dict[str, Path] = {}
        self.train_paths = [root / "train.jsonl"]
        self.eval_max_duration, self.max_cuts, self.max_audio_seconds = 30.0, None, 30.0
        self.on_bad_sample, self.text_only = "error", False
        self.max_duration, self.seed = 30.0, 0


def _write_manifests(root: Path) -> None:
    for name in ("clean", "ast", "train"):
        (root / f"{name}.jsonl").write_text(f'{{"id": "{name}-0", "audio": "a.wav", "text": "one two"}}\n')


def _edit_manifest(name: str) -> Callable:
    def edit(model, data, trainer) -> None:
        path = data.root / f"{name}.jsonl"
        path.write_text(path.read_text().replace("one two", "one too"))  # same set name, same length, new reference
    return edit


def _set_model(**changes) -> Callable:
    def edit(model, data, trainer) -> None:
        for key, value in changes.items():
            setattr(model.config, key, value)
    return edit


def _set_prompt(model, data, trainer) -> None:
    model.config.prompt.asr_instruction = "Write down what is said."


def _set_precision(model, data, trainer) -> None:
    trainer["precision"] = "bf16-mixed"


CHANGES = {
    "validation manifest content": _edit_manifest("clean"),
    "prompt": _set_prompt,
    "llm_dtype": _set_model(llm_dtype="bfloat16"),
    "attn_implementation": _set_model(attn_implementation="eager"),
    "encoder window": _set_model(encoder_window_seconds=10.0),
    "trainer precision": _set_precision,
}


def _setup(tmp_path: Path):
    _write_manifests(tmp_path)
    data = ManifestSets(tmp_path)
    data.root = tmp_path
    return tiny_speechllm(), data, dict(TRAINER)


@pytest.mark.parametrize("change", list(CHANGES))
def test_a_sweep_rerun_after_a_change_that_moves_the_scores_refuses_the_stale_points(tmp_path, change):
    model, data, trainer = _setup(tmp_path)
    config = SweepConfig(method="last", ns=[1], output_dir=str(tmp_path / "sweep"))
    run_sweep(model, data, config, trainer_kwargs=trainer, evaluate_fn=CountingEvaluator())
    again = CountingEvaluator()
    run_sweep(model, data, config, trainer_kwargs=trainer, evaluate_fn=again)
    assert again.calls == []  # nothing changed: every point is reused
    CHANGES[change](model, data, trainer)
    with pytest.raises(SweepError, match="another sweep"):
        run_sweep(model, data, config, trainer_kwargs=trainer, evaluate_fn=CountingEvaluator())


def _sweep_key(model, data, trainer, heal: bool) -> dict:
    config = SweepConfig(method="last", ns=[1], heal=heal, output_dir="unused")
    return sweep_mod.resume_signature(config, model, data, None, trainer)


def _comparison_key(model, data, trainer) -> dict:
    config = SweepConfig(method="last", fractions=[0.25], compare_methods=["last"], compare_healing=["lora"])
    return method_comparison.resume_signature(config, model, data, None, trainer)


@pytest.mark.parametrize("change", [*CHANGES, "healing manifest content", "healing sampler seed"])
def test_every_change_moves_the_keys_of_a_healed_sweep_and_of_a_method_comparison(tmp_path, change):
    model, data, trainer = _setup(tmp_path)
    before = (_sweep_key(model, data, trainer, heal=True), _comparison_key(model, data, trainer))
    unhealed = _sweep_key(model, data, trainer, heal=False)
    if change == "healing manifest content":
        _edit_manifest("train")(model, data, trainer)
    elif change == "healing sampler seed":
        data.seed = 1
    else:
        CHANGES[change](model, data, trainer)
    after = (_sweep_key(model, data, trainer, heal=True), _comparison_key(model, data, trainer))
    assert after[0] != before[0] and after[1] != before[1]
    if change.startswith("healing"):  # an unhealed sweep never reads the training data: its points stay reusable
        assert _sweep_key(model, data, trainer, heal=False) == unhealed


def test_a_missing_manifest_is_named(tmp_path):
    model, data, trainer = _setup(tmp_path)
    (tmp_path / "ast.jsonl").unlink()
    with pytest.raises(SweepError, match=r"manifest .*ast\.jsonl does not exist"):
        _sweep_key(model, data, trainer, heal=False)
