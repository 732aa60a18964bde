"""Greedy, re-measured pruning plans (SLEB-style): one round = one map of the active layers, then one block removed."""
from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from lightning_speechllm.data.batch import SpeechBatch
from lightning_speechllm.data.datamodule import SpeechDataModule
from lightning_speechllm.model.projector import ProjectorConfig
from lightning_speechllm.model.speechllm import SpeechLLM, SpeechLLMConfig
from lightning_speechllm.pruning import PLAN_METHODS, PlanError, PruningPlan, apply_plan, plan_angular
from lightning_speechllm.pruning.cli import PLAN_IN_EXPORT, main
from lightning_speechllm.pruning.greedy import greedy_schedule, plan_greedy
from lightning_speechllm.redundancy.measure import RedundancyAccumulator
from tests.test_speechllm import make_batch
from tests.tiny_speechllm import save_tiny_assets, tiny_llama, tiny_speechllm, tiny_tokenizer

LAYERS = 6


class CountingBatches:
    """Re-iterable calibration batches that count the batches handed out and can fail at the k-th one."""

    def __init__(self, batches: list[SpeechBatch], fail_at: int | None = None) -> None:
        self.batches, self.fail_at, self.served = batches, fail_at, 0

    def __iter__(self) -> Iterator[SpeechBatch]:
        for batch in self.batches:
            if self.served == self.fail_at:
                raise RuntimeError("calibration batch failed")
            self.served += 1
            yield batch


@pytest.fixture(scope="module")
def model() -> SpeechLLM:
    return tiny_speechllm(layers=LAYERS).eval()


@pytest.fixture(scope="module")
def batches() -> list[SpeechBatch]:
    return [make_batch(), make_batch(seconds=(0.8, 1.2), texts=["a quick brown fox", "le chat"], seed=1)]


def one_shot_map(model: SpeechLLM, batches: list[SpeechBatch], selection: str = "last"):
    """RedundancyAccumulator map of the model's active layers (the measure command's code path)."""
    accumulator = RedundancyAccumulator(len(model.layer_mask.active_layers), selection, keep_per_sample=False)
    for batch in batches:
        accumulator.update(model, batch)
    return accumulator.result(model_id="<memory>", set_name="calib", modality="speech", n_boot=0)


# ------------------------------------------------------------------------------------------------- one round
@pytest.mark.parametrize(("size", "selection"), [(2, "last"), (3, "last_prompt")])
def test_a_single_round_is_plan_angular_on_a_map_of_the_same_batches(model, batches, size, selection) -> None:
    plan = plan_greedy(model, batches, n=size, step=size, token_selection=selection, progress=False)
    angular = plan_angular(one_shot_map(model, batches, selection), n=size)
    assert plan.removed_layers == angular.removed_layers and plan.method == "greedy"
    assert len(plan.params["rounds"]) == 1
    assert plan.params["rounds"][0]["distance"] == pytest.approx(angular.params["distance"], rel=1e-9)
    assert plan.params | {"rounds": None} == {"n": size, "step": size, "token_selection": selection,
                                             "calibration_batches": 2, "rounds": None}


# ------------------------------------------------------------------------------------------------- re-measuring
def test_every_round_is_the_best_block_of_the_model_with_the_earlier_rounds_masked(model, batches) -> None:
    plan = plan_greedy(model, batches, n=5, step=2, progress=False)
    rounds = plan.params["rounds"]
    assert [len(r["removed"]) for r in rounds] == greedy_schedule(5, 2) == [2, 2, 1]
    removed: list[int] = []
    for done in rounds:
        kept = [i for i in range(LAYERS) if i not in removed]
        with model.layer_mask.active(kept):
            table = one_shot_map(model, batches).table
        size, first = len(done["removed"]), kept.index(done["removed"][0])
        assert done["removed"] == kept[first:first + size]  # consecutive among the active layers
        assert done["distance"] == pytest.approx(table[size - 1, first], rel=1e-9)
        assert done["distance"] == pytest.approx(min(table[size - 1, : len(kept) - size + 1]), rel=1e-9)
        removed += done["removed"]
    assert plan.removed_layers == sorted(removed) and len(plan.kept_layers) == 1


class Shift(nn.Module):
    """A stand-in decoder layer that adds a fixed vector to the residual stream."""

    def __init__(self, vector: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("vector", vector)

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return hidden_states + self.vector


class Reflect(nn.Module):
    """A stand-in decoder layer that mirrors the residual stream across the hyperplane orthogonal to ``direction``."""

    def __init__(self, direction: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("direction", direction / direction.norm())

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return hidden_states - 2 * (hidden_states @ self.direction).unsqueeze(-1) * self.direction


def reflecting_model() -> SpeechLLM:
    """Text-only SpeechLLM whose layer 2 adds a small ``e2`` component that layer 3 mirrors: in the one-shot map,
    d(2, 1) ~ 0.05 < d(1, 1) ~ 0.07 < d(3, 1) ~ 0.1, but once layer 2 is gone layer 3 barely moves the stream."""
    llm = tiny_llama(layers=LAYERS, seed=1)
    basis = torch.eye(llm.config.hidden_size)
    stand_ins = [Shift(50 * basis[0]), Shift(11.2 * basis[1]), Shift(8.1 * basis[2]), Reflect(basis[2]),
                 Shift(40 * basis[3]), Shift(40 * basis[4])]
    for index, layer in enumerate(stand_ins):
        llm.model.layers[index] = layer
    return SpeechLLM(llm, tiny_tokenizer(), None, SpeechLLMConfig(llm_path="<memory>", encoder_path=None)).eval()


def test_re_measuring_changes_the_choice_of_the_one_shot_map() -> None:
    model = reflecting_model()
    text = [make_batch(text_only=True), make_batch(texts=["le chat", "hello world", "one two"], text_only=True)]
    distances = one_shot_map(model, text).table[0]
    assert sorted(range(LAYERS), key=lambda i: distances[i])[:2] == [2, 1]  # one shot: the two lowest d(l, 1)
    assert distances[3] > distances[1]
    plan = plan_greedy(model, text, n=2, step=1, progress=False)
    assert [r["removed"] for r in plan.params["rounds"]] == [[2], [3]]
    assert plan.params["rounds"][1]["distance"] < 0.01 < distances[1]


# ------------------------------------------------------------------------------------------------- the mask
def test_the_entry_selection_and_mode_are_restored_and_do_not_change_the_plan(model, batches) -> None:
    reference = plan_greedy(model, batches, n=3, step=1, progress=False)
    mask = model.layer_mask
    mask.remove_layers([1])
    model.train()
    model.projector.eval()  # an arbitrary mix of modes comes back as it was
    modes = [module.training for module in model.modules()]
    assert any(modes) and not all(modes)
    try:
        plan = plan_greedy(model, batches, n=3, step=1, progress=False)
        assert mask.active_layers == (0, 2, 3, 4, 5) and model.llm.config.num_hidden_layers == 5
        assert [module.training for module in model.modules()] == modes
        assert plan.removed_layers == reference.removed_layers  # measured from all layers, in eval mode
        assert plan.params["rounds"] == reference.params["rounds"]
    finally:
        mask.reset()
        model.eval()


def test_the_mask_is_restored_after_an_error_in_a_batch(model, batches) -> None:
    mask = model.layer_mask
    mask.remove_layers([0])
    failing = CountingBatches(batches, fail_at=len(batches) + 1)  # the second batch of the second round
    try:
        with pytest.raises(RuntimeError, match="calibration batch failed"):
            plan_greedy(model, failing, n=3, step=1, progress=False)
        assert failing.served == len(batches) + 1
        assert mask.active_layers == (1, 2, 3, 4, 5) and model.llm.config.num_hidden_layers == 5
        assert len(model.llm.model.layers) == 5
    finally:
        mask.reset()
    assert model.llm.config.num_hidden_layers == LAYERS


def test_a_one_pass_iterator_and_bad_arguments_are_refused(model, batches) -> None:
    with pytest.raises(PlanError, match="yielded no batch"):
        plan_greedy(model, iter(batches), n=2, step=1, progress=False)
    assert model.layer_mask.active_layers == tuple(range(LAYERS))
    with pytest.raises(PlanError, match="step must be a positive int"):
        plan_greedy(model, batches, n=2, step=0, progress=False)
    with pytest.raises(PlanError, match="cannot remove 6 of 6"):
        plan_greedy(model, batches, n=6, progress=False)
    with pytest.raises(PlanError, match="token_selection must be one of"):
        plan_greedy(model, batches, n=2, token_selection="middle", progress=False)


# ------------------------------------------------------------------------------------------------- start_from
def test_start_from_reuses_the_rounds_a_fresh_run_would_repeat(model, batches) -> None:
    counting = CountingBatches(batches)
    fresh = plan_greedy(model, batches, n=4, step=1, progress=False)
    first = plan_greedy(model, counting, n=2, step=1, progress=False)
    grown = plan_greedy(model, counting, n=4, step=1, start_from=first, progress=False)
    assert counting.served == 4 * len(batches)  # 2 rounds, then only the 2 new ones
    assert grown.removed_layers == fresh.removed_layers and grown.params["rounds"] == fresh.params["rounds"]

    shrunk = plan_greedy(model, counting, n=1, step=1, start_from=grown, progress=False)
    assert counting.served == 4 * len(batches)  # nothing measured
    assert shrunk.params["rounds"] == fresh.params["rounds"][:1]

    partial = plan_greedy(model, batches, n=3, step=2, progress=False)  # rounds of 2 and 1 layers
    counting.served = 0
    larger = plan_greedy(model, counting, n=5, step=2, start_from=partial, progress=False)
    assert counting.served == 2 * len(batches)  # the 1-layer round is not a round of a 5-layer run: re-measured
    reference = plan_greedy(model, batches, n=5, step=2, progress=False)
    assert (larger.removed_layers, larger.params) == (reference.removed_layers, reference.params)
    with pytest.raises(PlanError, match="step=2, not 1"):
        plan_greedy(model, batches, n=4, step=1, start_from=partial, progress=False)
    with pytest.raises(PlanError, match="start_from must be a greedy plan"):
        plan_greedy(model, batches, n=4, start_from=plan_angular(one_shot_map(model, batches), n=2), progress=False)


# ------------------------------------------------------------------------------------------------- JSON
def test_a_greedy_plan_round_trips_through_json_and_applies(model, batches, tmp_path: Path) -> None:
    assert "greedy" in PLAN_METHODS
    plan = plan_greedy(model, batches, fraction=0.5, step=2, progress=False)
    path = plan.to_json(tmp_path / "greedy.json")
    data = json.loads(path.read_text())
    assert data["method"] == "greedy" and data["params"]["fraction"] == 0.5 and data["params"]["n"] == 3
    loaded = PruningPlan.from_json(path)
    assert loaded == plan and loaded.params["rounds"] == plan.params["rounds"]
    continued = plan_greedy(model, batches, n=4, step=2, start_from=loaded, progress=False)
    assert continued.params["rounds"][0] == plan.params["rounds"][0]
    try:
        assert apply_plan(model, loaded).removed_layers == tuple(plan.removed_layers)
    finally:
        model.layer_mask.reset()


# ------------------------------------------------------------------------------------------------- CLI
TEXTS = ["the cat sat on the mat", "one two three", "hello world", "a quick brown fox"]


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory) -> dict[str, Path]:
    samples = [16000 * (1 + i % 2) // 2 for i in range(len(TEXTS))]
    return save_tiny_assets(tmp_path_factory.mktemp("greedy"), TEXTS, samples, layers=4, manifest="dev.jsonl")


def cli_model(dirs: dict[str, Path]) -> list[str]:
    return ["--model.llm_path", str(dirs["llm"]), "--model.encoder_path", str(dirs["whisper"]),
            "--model.projector.hidden_dim", "32"]


def test_prune_greedy_command_end_to_end(tiny_dirs, tmp_path: Path, capsys) -> None:
    data = {"val_sets": {"dev": str(tiny_dirs["manifest"])}, "max_cuts": 2, "max_audio_seconds": 4.0}
    out, export = tmp_path / "plan.json", tmp_path / "pruned"
    argv = ["--method", "greedy", "--n", "2", "--step", "1", "--calibration_batches", "2",
            "--calibration_modality", "text", "--token_selection", "last_prompt", "--data.val_sets",
            json.dumps(data["val_sets"]), "--data.max_cuts", "2", "--data.max_audio_seconds", "4",
            *cli_model(tiny_dirs), "--out", str(out), "--export", str(export)]
    assert main(argv) == 0, capsys.readouterr().err
    assert "greedy plan: remove 2/4 layers" in capsys.readouterr().out
    plan = PruningPlan.from_json(out)
    assert plan.model_id == str(tiny_dirs["llm"]) and plan.params["calibration_batches"] == 2
    assert plan.params["calibration_set"] == "dev" and plan.params["calibration_modality"] == "text"
    assert PruningPlan.from_json(export / PLAN_IN_EXPORT) == plan

    # the same plan from the library call on the same model and text batches
    config = SpeechLLMConfig(llm_path=str(tiny_dirs["llm"]), encoder_path=str(tiny_dirs["whisper"]),
                             projector=ProjectorConfig(hidden_dim=32))
    datamodule = SpeechDataModule(**data, text_only=True)
    datamodule.setup("validate")
    text = list(datamodule.val_dataloader()[0])
    assert len(text) == 2
    expected = plan_greedy(SpeechLLM.from_config(config).eval(), text, n=2, step=1, token_selection="last_prompt",
                           progress=False)
    assert plan.removed_layers == expected.removed_layers
    assert [r["distance"] for r in plan.params["rounds"]] == pytest.approx(
        [r["distance"] for r in expected.params["rounds"]], rel=1e-6)
    reloaded = AutoModelForCausalLM.from_pretrained(export)
    assert reloaded.config.num_hidden_layers == 2


def test_prune_greedy_errors_name_the_missing_option(tiny_dirs, tmp_path: Path, capsys) -> None:
    sets = json.dumps({"dev": str(tiny_dirs["manifest"])})
    other_llm = shutil.copytree(tiny_dirs["llm"], tmp_path / "other-llm")  # same layer count, another model
    base = ["--method", "greedy", "--out", str(tmp_path / "p.json"), "--calibration_modality", "text",
            *cli_model(tiny_dirs)]
    cases = [
        (["--n", "2"], "--method greedy needs calibration data: give --data.val_sets"),
        (["--data.val_sets", sets], "--method greedy needs --n or --fraction"),
        (["--n", "2", "--data.val_sets", sets, "--calibration_set", "test"],
         "--calibration_set 'test' is not one of --data.val_sets ['dev']"),
        (["--n", "2", "--data.val_sets", sets, "--map", "m.json"], "--map is not used by --method greedy"),
        (["--n", "2", "--data.val_sets", sets, "--num_layers", "6"],
         "the layer counts disagree (the model: 4, --num_layers: 6)"),
        (["--n", "2", "--data.val_sets", sets, "--llm_path", str(other_llm)], "model mismatch"),
    ]
    for extra, message in cases:
        assert main(base + extra) == 2, extra
        assert message in capsys.readouterr().err
    assert main(["--method", "last", "--n", "1", "--num_layers", "4", "--ckpt_path", "x.ckpt", "--out", "p.json"]) == 2
    assert "--ckpt_path is only for --method greedy" in capsys.readouterr().err
