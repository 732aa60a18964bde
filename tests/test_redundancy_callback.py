"""RedundancyCallback under Trainer.validate / fit on a tiny SpeechLLM: files, scalars, exactness, epoch skipping."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from matplotlib.image import imread
from scipy.stats import spearmanr

from lightning_speechllm.model.module import DecodingConfig, SpeechLLMModule
from lightning_speechllm.model.speechllm import SpeechLLM
from lightning_speechllm.redundancy.analysis import RedundancyResult
from lightning_speechllm.redundancy.callback import RedundancyCallback
from lightning_speechllm.redundancy.measure import RedundancyAccumulator
from tests.redundancy_sim import map_pair
from tests.test_module import NamedSets, trainer
from tests.test_speechllm import make_batch
from tests.tiny_speechllm import tiny_llama, tiny_speechllm, tiny_tokenizer

LAYERS = 4


def _module(speechllm: SpeechLLM | None = None, decode: bool = False) -> SpeechLLMModule:
    return SpeechLLMModule(decoding=DecodingConfig(max_new_tokens=3, generate_in_validation=decode),
                           speechllm=speechllm or tiny_speechllm(layers=LAYERS))


@pytest.fixture(scope="module")
def validated(tmp_path_factory):
    """One validation pass over the two named sets (with decoding on, so generate runs inside the step)."""
    root = tmp_path_factory.mktemp("validate")
    module, data = _module(decode=True), NamedSets()
    callback = RedundancyCallback(n_boot=50, log_block_sizes=(1, 2, 3))
    trainer(root, callbacks=[callback]).validate(module, datamodule=data)
    return module, data, callback, root / "redundancy"


def test_writes_result_files_per_set_and_modality(validated):
    _, data, _, out = validated
    for set_name, batches in zip(data.val_set_names, data.val):
        for modality in ("speech", "text"):
            folder = out / set_name / modality
            result = RedundancyResult.from_json(folder / "epoch=0.json")
            assert (result.set_name, result.modality, result.num_layers) == (set_name, modality, LAYERS)
            assert result.num_samples == sum(len(b) for b in batches)
            assert result.model_id == "<memory>" and result.epoch == 0 and result.ci_low is not None
            assert (folder / "epoch=0.csv").read_text().splitlines()[0].startswith("l,n,d")
            for png in ("epoch=0.png", "epoch=0_bi.png"):
                image = imread(folder / png)
                assert image.ndim == 3 and min(image.shape[:2]) > 100
        agreement = json.loads((out / set_name / "agreement_epoch=0.json").read_text())
        # headline: the modality-clean last_prompt maps (written under <modality>/last_prompt/); `last` (the maps'
        # own selection) beside it
        assert (agreement["token_selection"], agreement["map_token_selection"]) == ("last_prompt", "last")
        assert list(agreement["by_token_selection"]) == ["last_prompt", "last"]
        for selection, folder in (("last_prompt", "last_prompt/"), ("last", "")):
            values = agreement["by_token_selection"][selection]
            # the agreement of the two maps written beside it, recomputed here without the package's helpers
            speech, text = (RedundancyResult.from_json(out / set_name / m / f"{folder}epoch=0.json")
                            for m in ("speech", "text"))
            assert speech.token_selection == text.token_selection == selection
            cells = ~np.isnan(speech.table)
            assert values["spearman_rho"] == pytest.approx(
                spearmanr(speech.table[cells], text.table[cells]).statistic, abs=1e-12)
            assert values["path_exact"] == pytest.approx(np.mean([a == b for a, b in zip(speech.path, text.path)]))
            assert values["path_overlap"] == pytest.approx(  # blocks [a, a+n) and [b, b+n) share a layer
                np.mean([abs(a - b) < n for n, (a, b) in enumerate(zip(speech.path, text.path), start=1)]))
            assert speech.path == [int(np.nanargmin(row)) for row in speech.table]
            null = values["null"]["spearman_rho"]
            assert null["observed"] == values["spearman_rho"] and null["n_perm"] == 1000
            assert np.load(out / set_name / "speech" / f"{folder}epoch=0_per_sample.npy").shape == (
                len(batches[0]), LAYERS, LAYERS)
            # speech and text rows are the same utterances in the same order, so compare can pair them
            assert speech.per_sample_keys is not None and len(speech.per_sample_keys) == len(batches[0])
            np.testing.assert_array_equal(speech.per_sample_keys, text.per_sample_keys)
        assert {k: agreement[k] for k in ("spearman_rho", "path_exact", "null")} == {
            k: agreement["by_token_selection"]["last_prompt"][k] for k in ("spearman_rho", "path_exact", "null")}
        assert agreement["num_samples"] == {"speech": len(batches[0]), "text": len(batches[0])}
        assert imread(out / set_name / "speech_vs_text_epoch=0.png").ndim == 3


def test_logs_scalars(validated):
    module, _, callback, _ = validated
    metrics = module.trainer.callback_metrics
    for set_name in ("clean", "ast-fr"):
        rho = callback.agreements[set_name]["spearman_rho"]
        assert float(metrics[f"redundancy/{set_name}/rho"]) == pytest.approx(rho)
        for name in ("path_overlap", "path_exact"):
            assert float(metrics[f"redundancy/{set_name}/{name}"]) == pytest.approx(callback.agreements[set_name][name])
        for modality in ("speech", "text"):
            result = callback.results[(set_name, modality)]
            assert float(metrics[f"redundancy/{set_name}/{modality}/best_block_n2"]) == result.path[1]
            assert f"redundancy/{set_name}/{modality}/best_d_n3" in metrics
    assert "val/clean/wer" in metrics  # the module's own metrics still run alongside


def test_agreement_of_maps_whose_paths_differ():
    """Hand-made maps: speech path [0, 1, 0], text path [1, 0, 0]: the same block for n=3 only (1/3), overlapping
    blocks for n=2 and n=3 (2/3); Spearman's rho over the 6 defined cells by hand: 1 - 6 * 8 / (6 * 35)."""
    nan = np.nan
    speech = np.array([[0.1, 0.2, 0.3], [0.4, 0.35, nan], [0.6, nan, nan]])
    text = np.array([[0.2, 0.1, 0.4], [0.3, 0.5, nan], [0.7, nan, nan]])
    callback = RedundancyCallback(n_boot=0)
    for modality, table in (("speech", speech), ("text", text)):
        callback.results[("dev", modality)] = RedundancyResult.from_tables(
            table, [0.1, 0.2, 0.3], model_id="m", token_selection="last", set_name="dev", modality=modality,
            num_samples=5, n_boot=0)
    agreement = callback._agreement("dev", epoch=0)
    assert (agreement["path_speech"], agreement["path_text"]) == ([0, 1, 0], [1, 0, 0])
    assert agreement["path_exact"] == pytest.approx(1 / 3) and agreement["path_overlap"] == pytest.approx(2 / 3)
    # defined cells in row-major order: speech ranks 1, 2, 3, 5, 4, 6; text ranks 2, 1, 4, 3, 5, 6 (sum d^2 = 8)
    d = np.array([1, 2, 3, 5, 4, 6]) - np.array([2, 1, 4, 3, 5, 6])
    assert np.sum(d ** 2) == 8 and agreement["spearman_rho"] == pytest.approx(1 - 6 * 8 / (6 * 35))


def test_agreement_null_says_different_for_unrelated_maps():
    """The surrogate null in the agreement: a map vs a related one (same layer strengths, other utterances) is
    significant; unrelated maps (both with the generic shape of a pre-norm stream, so their raw rho is high) are
    typically not (their false-positive rate is measured in test_agreement_calibration.py)."""
    layers = 16

    def agreement_of(speech: np.ndarray, text: np.ndarray) -> dict:
        callback = RedundancyCallback(n_boot=0, n_perm=500)
        for modality, table in (("speech", speech), ("text", text)):
            callback.results[("dev", modality)] = RedundancyResult.from_tables(
                table, np.zeros(layers), model_id="m", token_selection="last",
                set_name="dev", modality=modality, num_samples=5, n_boot=0)
        return callback._agreement("dev", epoch=0)

    unrelated = [agreement_of(*(maps.mean(0) for maps in map_pair(seed, related=False))) for seed in range(5)]
    related = agreement_of(*(maps.mean(0) for maps in map_pair(0, related=True)))
    assert min(agreement["spearman_rho"] for agreement in unrelated) > 0.6
    for statistic in ("spearman_rho", "path_exact"):
        assert np.median([agreement["null"][statistic]["p_value"] for agreement in unrelated]) > 0.1
        assert related["null"][statistic]["p_value"] < 0.01


class MixedTaskSets(NamedSets):
    """One validation set mixing ASR and AST utterances, declared as such (like SpeechDataModule.eval_set_tasks)."""

    val_set_names = ["mixed"]

    def __init__(self):
        super().__init__()
        self.val = [[make_batch(seconds=(0.6, 0.5, 0.7), texts=["the cat", "le chat", "bonjour"],
                                tasks=["asr", "ast", "ast"], tgt_langs=[None, "fr", "fr"])]]

    def eval_set_tasks(self, split):
        return {"mixed": ("asr", "ast")}


def test_mixed_task_set_gets_one_map_per_task(tmp_path):
    module, data = _module(), MixedTaskSets()
    callback = RedundancyCallback(n_boot=0, write_figures=False, output_dir=tmp_path / "maps")
    trainer(tmp_path, callbacks=[callback]).validate(module, datamodule=data)
    counts = {key: result.num_samples for key, result in callback.results.items()}
    assert counts == {("mixed", "speech"): 3, ("mixed", "text"): 3, ("mixed/asr", "speech"): 1,
                      ("mixed/asr", "text"): 1, ("mixed/ast", "speech"): 2, ("mixed/ast", "text"): 2}
    assert sorted(callback.agreements) == ["mixed", "mixed/asr", "mixed/ast"]
    batch = data.val[0][0]
    for task, rows in (("asr", [0]), ("ast", [1, 2])):
        direct = RedundancyAccumulator(LAYERS, token_selection="last")
        direct.update(module.speechllm, batch.subset(rows))
        written = RedundancyResult.from_json(tmp_path / "maps" / "mixed" / task / "speech" / "epoch=0.json")
        np.testing.assert_allclose(written.table, direct.angular.compute().numpy(), atol=1e-6, equal_nan=True)
    assert (tmp_path / "maps" / "mixed" / "speech" / "epoch=0.json").is_file()  # the whole set keeps its layout


def test_map_equals_a_direct_accumulator_run(validated):
    module, data, _, out = validated
    for set_name, batches in zip(data.val_set_names, data.val):
        for modality in ("speech", "text"):
            direct = RedundancyAccumulator(LAYERS, token_selection="last")
            for batch in batches:
                direct.update(module.speechllm, batch if modality == "speech" else batch.as_text_only())
            expected = direct.angular.compute().numpy()
            written = RedundancyResult.from_json(out / set_name / modality / "epoch=0.json")
            np.testing.assert_allclose(written.table, expected, atol=1e-6, equal_nan=True)
            np.testing.assert_allclose(written.block_influence, direct.influence.compute().numpy(), atol=1e-6)


def test_modality_order_does_not_change_the_maps(validated, tmp_path):
    """With text listed first, the speech map must still come from the speech forward, not the text one."""
    module, data, _, out = validated
    callback = RedundancyCallback(n_boot=0, modalities=["text", "speech"], sets=["clean"],
                                  output_dir=str(tmp_path / "maps"))
    trainer(tmp_path, callbacks=[callback]).validate(module, datamodule=data)
    for modality in ("speech", "text"):
        ours = RedundancyResult.from_json(tmp_path / "maps" / "clean" / modality / "epoch=0.json")
        reference = RedundancyResult.from_json(out / "clean" / modality / "epoch=0.json")
        np.testing.assert_allclose(ours.table, reference.table, atol=1e-6, equal_nan=True)


def test_every_n_epochs_sets_filter_and_no_sanity_check(tmp_path):
    callback = RedundancyCallback(every_n_epochs=2, sets=["clean"], modalities=["text"], n_boot=0,
                                  output_dir=tmp_path / "maps")
    trainer(tmp_path, max_epochs=3, callbacks=[callback], num_sanity_val_steps=1).fit(
        _module(), datamodule=NamedSets(n_train=1))
    written = sorted(p.relative_to(tmp_path / "maps").as_posix() for p in (tmp_path / "maps").rglob("*.json"))
    assert written == ["clean/text/epoch=1.json"]
    assert RedundancyResult.from_json(tmp_path / "maps/clean/text/epoch=1.json").ci_low is None


def test_text_only_model_measures_text_with_max_batches_and_tensorboard(tmp_path):
    text_model = SpeechLLM(tiny_llama(layers=LAYERS), tiny_tokenizer(), None, tiny_speechllm().config)
    data = NamedSets()
    data.val = [[batch.as_text_only() for batch in batches] * 2 for batches in data.val]
    logger = TensorBoardLogger(tmp_path, name="tb")
    callback = RedundancyCallback(max_batches=1, n_boot=0)
    trainer(tmp_path, logger=logger, callbacks=[callback]).validate(_module(text_model), datamodule=data)
    assert sorted(callback.results) == [("ast-fr", "text"), ("clean", "text")] and not callback.agreements
    assert callback.results[("clean", "text")].num_samples == len(data.val[0][0])  # max_batches=1 of 2
    assert callback.output_dir == tmp_path / "tb" / "version_0" / "redundancy"
    assert (callback.output_dir / "clean" / "text" / "epoch=0.png").is_file()
    assert any((tmp_path / "tb" / "version_0").glob("events.out.tfevents.*"))


def test_speech_batches_with_a_text_only_dataset_skip_speech(tmp_path):
    data = NamedSets()
    data.val = [[make_batch(seed=100, text_only=True)], data.val[1]]
    callback = RedundancyCallback(n_boot=0, write_figures=False)
    trainer(tmp_path, callbacks=[callback]).validate(_module(), datamodule=data)
    assert sorted(callback.results) == [("ast-fr", "speech"), ("ast-fr", "text"), ("clean", "text")]
    assert sorted(callback.agreements) == ["ast-fr"]


@pytest.mark.parametrize("kwargs, message", [
    ({"modalities": ["video"]}, "modalities"),
    ({"token_selection": "speech"}, "selects no token"),
    ({"every_n_epochs": 0}, "every_n_epochs"),
    ({"max_batches": 0}, "max_batches"),
])
def test_bad_arguments_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RedundancyCallback(**kwargs)


def test_text_only_copy_keeps_transcripts():
    batch = make_batch()
    copy = batch.as_text_only()
    assert copy.text_only and copy.audio.shape == (3, 0) and copy.audio_lens.tolist() == [0, 0, 0]
    assert copy.transcripts == batch.transcripts and not batch.text_only and batch.audio.numel() > 0
    assert torch.equal(batch.audio_lens, make_batch().audio_lens)
