"""`python -m lightning_speechllm fit` end to end on tiny on-disk models: train, validate, report, resume."""
from __future__ import annotations

import json

import jiwer
import pytest
import torch
import yaml

from lightning_speechllm import cli
from lightning_speechllm.evaluation import normalize_english
from lightning_speechllm.precision import choose_precision
from tests.tiny_speechllm import save_tiny_assets

TEXTS = ["the cat sat on the mat", "one two three", "hello world", "a quick brown fox"]


def fit_args(assets: dict, root, max_steps: int) -> list[str]:
    """Options of a tiny run; its own --config replaces the embedded default."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "fit.yaml").write_text("seed_everything: 0\n")
    return ["--config", str(root / "fit.yaml"), "--model.model.llm_path", str(assets["llm"]), "--model.model.encoder_path", str(assets["whisper"]),
            "--model.model.projector.hidden_dim", "16", "--model.model.projector.downsample", "2",
            "--model.decoding.max_new_tokens", "3", "--data.train", str(assets["manifest"]),
            "--data.val_sets", f"{{dev: {assets['manifest']}}}", "--data.max_duration", "2",
            "--trainer.accelerator", "cpu", "--trainer.max_steps", str(max_steps), "--trainer.limit_val_batches", "1",
            "--trainer.default_root_dir", str(root), "--trainer.enable_progress_bar", "false",
            "--trainer.callbacks+=lightning_speechllm.redundancy.callback.RedundancyCallback",
            "--trainer.callbacks.n_boot", "10"]


def test_fit_writes_checkpoints_maps_and_report_then_resumes_from_last(tmp_path, capsys):
    assets = save_tiny_assets(tmp_path / "assets", TEXTS, [8000, 6000, 4000, 7000])
    test_args = ["--data.test_sets", f"{{heldout: {assets['manifest']}}}", "--test_after_fit", "true",
                 "--data.encoder_cache", str(tmp_path / "encoder_cache")]
    assert cli.fit([*fit_args(assets, tmp_path / "run", max_steps=2), *test_args]) == 0
    assert len(list((tmp_path / "encoder_cache").glob("*/frames/*.npy"))) == len(TEXTS)  # the train set's frames
    out = capsys.readouterr().out
    assert f"{choose_precision('cpu').line()}\n" in out  # unset: the hardware chose, and the line says why
    assert "last validation:" in out and '"val/dev/wer"' in out and '"test/heldout/wer"' in out
    progress = [line for line in out.splitlines() if line.startswith("step 2/2 | loss ")]  # stdout is no terminal
    assert len(progress) == 1 and " utt/s | " in progress[0] and " tok/s | " in progress[0], out
    assert "python -m lightning_speechllm sweep --config configs/sweep/default.yaml --ckpt_path" in out
    assert "redundancy/dev/speech/epoch=0.json" in out
    run = tmp_path / "run" / "lightning_logs" / "version_0"
    scores = json.loads((run / "scores.json").read_text())
    assert scores["global_step"] == 2 and scores["test_checkpoint"].endswith(".ckpt")
    assert list(scores["seconds"]) == ["startup", "fit (encoder cache, training, validation)", "test"]
    assert all(value >= 0 for value in scores["seconds"].values()) and sum(scores["seconds"].values()) > 0
    assert len(scores["test_examples"]) == len(TEXTS)
    # the reported test WER is the corpus WER of the test hypotheses it lists (jiwer on Whisper-normalised text)
    pairs = [(normalize_english(e["reference"]), normalize_english(e["hypothesis"])) for e in scores["test_examples"]]
    errors = [jiwer.process_words(ref, hyp) for ref, hyp in pairs]
    expected = 100 * sum(e.substitutions + e.deletions + e.insertions for e in errors) / sum(
        len(ref.split()) for ref, _ in pairs)
    assert scores["test"]["test/heldout/wer"] == pytest.approx(expected, abs=2e-4)
    assert {e["reference"] for e in scores["test_examples"]} == set(TEXTS)
    report = (run / "report.md").read_text()
    assert "## Scores" in report and "`test/heldout/wer`" in report and "| heldout | hello world |" in report
    assert "Wall time: startup 0 min" in report
    assert "### dev — speech (epoch 0)" in report and "redundancy/dev/text/epoch=0.png" in report
    assert (run / "report.html").read_text().count("data:image/png;base64") >= 2
    checkpoint = next((run / "checkpoints").glob("*.ckpt"))
    assert torch.load(checkpoint, weights_only=True)["global_step"] == 2
    assert cli.fit([*fit_args(assets, tmp_path / "run", max_steps=4), "--ckpt_path", str(checkpoint)]) == 0
    resumed = next((tmp_path / "run" / "lightning_logs" / "version_1" / "checkpoints").glob("*.ckpt"))
    assert torch.load(resumed, weights_only=True)["global_step"] == 4


def test_options_override_the_embedded_default_and_a_config_replaces_it(monkeypatch):
    assert cli.with_embedded_default("fit", ["--trainer.max_steps", "1000"]) == [
        "--config", str(cli.DEFAULT_CONFIG), "--trainer.max_steps", "1000"]
    assert cli.with_embedded_default("fit", ["--config=my.yaml"]) == ["--config=my.yaml"]
    assert cli.with_embedded_default("test", ["--ckpt_path", "x.ckpt"]) == ["--ckpt_path", "x.ckpt"]
    parsed = {}

    class ParseOnly(cli.SpeechLLMCLI):
        def before_instantiate_classes(self) -> None:
            super().before_instantiate_classes()
            parsed["fit"] = self.config.fit
            raise SystemExit(0)

    monkeypatch.setattr(cli, "SpeechLLMCLI", ParseOnly)
    monkeypatch.setattr(cli, "prepare_default_corpora", lambda data: None)
    with pytest.raises(SystemExit):
        cli.fit(["--trainer.max_steps", "1000"])
    config, default = parsed["fit"], yaml.safe_load(cli.DEFAULT_CONFIG.read_text())
    # the default leaves the precision to the hardware: bf16-mixed where the CPU computes bf16 natively, else fp32
    assert "precision" not in default["trainer"] or default["trainer"]["precision"] is None
    assert config.trainer.max_steps == 1000 and config.trainer.precision == choose_precision("cpu").precision
    assert default["trainer"]["val_check_interval"] is None
    assert config.trainer.val_check_interval == 1000  # validation (and the best checkpoint) follows max_steps
    assert config.data.train == default["data"]["train"] and len(default["data"]["train"]) == 2
    assert config.model.model.llm_path == default["model"]["model"]["llm_path"]


def test_real_speech_sets_are_skipped_with_a_note_without_the_asterisk_packages(tmp_path, monkeypatch, capsys):
    from types import SimpleNamespace

    from lightning_speechllm.data import prepare

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(prepare, "ASTERISK_TRANSCRIPTS", tmp_path / "missing.txt.gz")
    data = SimpleNamespace(train=["mine.jsonl", "data_cache/asterisk/train.jsonl"], val_sets={},
                           test_sets={"test": "mine.jsonl", "real": "data_cache/asterisk/heldout.jsonl"})
    cli.prepare_default_corpora(data)
    assert data.test_sets == {"test": "mine.jsonl"} and data.train == ["mine.jsonl"]
    out = capsys.readouterr().out
    assert "data.test_sets.real (real recorded speech) is skipped" in out and "missing.txt.gz" in out
    assert "the real recordings in data.train (['data_cache/asterisk/train.jsonl']) are skipped" in out


def test_progress_is_plain_lines_without_a_terminal_and_lightnings_bar_on_one():
    from lightning_speechllm.progress import PlainProgressLog, progress_defaults

    class Stream:
        def __init__(self, tty: bool) -> None:
            self.tty = tty

        def isatty(self) -> bool:
            return self.tty

    assert progress_defaults(Stream(True)) == {}
    plain = progress_defaults(Stream(False))
    assert plain["enable_progress_bar"] is False and isinstance(plain["callbacks"][0], PlainProgressLog)
