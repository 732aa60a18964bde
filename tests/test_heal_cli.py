"""`heal` command (LightningCLI over HealingModule + SpeechDataModule) and exact mid-epoch resume of healing."""
from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_speechllm.data.datamodule import SpeechDataModule
from lightning_speechllm.healing.cli import main
from lightning_speechllm.healing.losses import HealingInputs, HealingLoss
from lightning_speechllm.healing.module import HealingConfig, HealingModule
from lightning_speechllm.model.module import DecodingConfig, OptimConfig
from lightning_speechllm.model.projector import ProjectorConfig
from lightning_speechllm.model.speechllm import LoraConfig, SpeechLLMConfig
from tests.tiny_speechllm import save_tiny_assets

TEXTS = ["the cat sat on the mat", "one two three", "hello world", "a quick brown fox", "le chat est sur le tapis",
         "transcribe the audio", "one two three four five", "this is a test"]
LORA = {"r": 4, "alpha": 4, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}


def tiny_assets(root: Path) -> dict[str, Path]:
    """A 4-layer tiny llama + tokenizer dir, a tiny Whisper dir, and an 8-utterance manifest of WAVs."""
    return save_tiny_assets(root, TEXTS, [4000 + 1000 * (i % 4) for i in range(len(TEXTS))])


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, Path]:
    return tiny_assets(tmp_path_factory.mktemp("heal_assets"))


def model_config(assets: dict[str, Path]) -> dict:
    return {"llm_path": str(assets["llm"]), "encoder_path": str(assets["whisper"]),
            "projector": {"downsample": 2, "hidden_dim": 32}}


def heal_yaml(assets: dict[str, Path], out: Path, **trainer) -> Path:
    config = {
        "trainer": {"accelerator": "cpu", "devices": 1, "logger": False, "enable_progress_bar": False,
                    "enable_model_summary": False, "limit_val_batches": 0, "default_root_dir": str(out),
                    "max_steps": 2, **trainer},
        "model": {"model": model_config(assets),
                  "healing": {"removed_layers": [1, 2], "lora": LORA,
                              "losses": [{"class_path": "TaskCrossEntropy"},
                                         {"class_path": "KLDivergence", "init_args": {"temperature": 2.0},
                                          "weight": 0.5}]},
                  "optim": {"lr": 1e-2, "warmup_steps": 0, "schedule": "constant"},
                  "decoding": {"generate_in_validation": False}},
        "data": {"train": str(assets["manifest"]), "max_duration": 1.2, "num_buckets": 2, "seed": 3},
    }
    path = out / "heal.yaml"
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config))
    return path


def test_print_config_shows_every_healing_key(assets, tmp_path, capsys):
    config = heal_yaml(assets, tmp_path)
    assert main(["--config", str(config), "--print_config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    healing = printed["model"]["healing"]
    assert healing["removed_layers"] == [1, 2] and healing["losses"][1]["init_args"] == {"temperature": 2.0}
    assert printed["trainer"]["use_distributed_sampler"] is False and printed["model"]["optim"]["lr"] == 0.01


def test_heal_from_yaml_then_resume_from_last(assets, tmp_path):
    config = heal_yaml(assets, tmp_path, callbacks=[{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                                                     "init_args": {"dirpath": str(tmp_path / "ck"),
                                                                   "save_last": True}}])
    assert main(["--config", str(config)]) == 0
    first = torch.load(tmp_path / "ck" / "last.ckpt", weights_only=True)
    assert first["global_step"] == 2 and first["healing"]["plan"]["removed_layers"] == [1, 2]
    lora_layers = {k.split(".layers.")[1].split(".")[0] for k in first["state_dict"] if "lora_" in k}
    assert lora_layers == {"3"}  # the receiving layer only
    assert main(["--config", str(config), "--trainer.max_steps", "3", "--ckpt_path", "last"]) == 0
    assert torch.load(tmp_path / "ck" / "last.ckpt", weights_only=True)["global_step"] == 3
    with pytest.raises(ValueError, match="on_nan must be one of"):
        main(["--config", str(config), "--model.healing.on_nan", "maybe"])
    assert main(["--config", str(config), "--trainer.max_steps", "many"]) == 2  # jsonargparse error: exit code 2


class TargetTokenMargin(HealingLoss):
    """A user's own healing loss, defined here and given to `heal` by class_path: the student's mean margin between
    the best wrong logit and the target logit on target tokens, plus the distance to the teacher's logits."""

    needs_teacher = True
    calls: list[float] = []

    def __init__(self, teacher_weight: float = 0.5) -> None:
        super().__init__()
        self.teacher_weight = teacher_weight

    def forward(self, inputs: HealingInputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits = inputs.student_logits[inputs.target_mask].float()
        targets = inputs.labels[:, 1:][inputs.target_mask[:, :-1]]
        target_logit = logits.gather(1, targets[:, None]).squeeze(1)
        margin = (logits.scatter(1, targets[:, None], float("-inf")).amax(1) - target_logit).mean()
        teacher = (logits - inputs.teacher_logits[inputs.target_mask].float()).pow(2).mean()
        TargetTokenMargin.calls.append(float(margin.detach()))
        return margin + self.teacher_weight * teacher, {"margin": margin.detach()}


def test_heal_takes_a_users_loss_class_by_class_path(assets, tmp_path):
    config = heal_yaml(assets, tmp_path)
    loss = {"class_path": f"{TargetTokenMargin.__module__}.TargetTokenMargin", "init_args": {"teacher_weight": 0.25},
            "weight": 0.5}
    data = yaml.safe_load(config.read_text())
    data["model"]["healing"]["losses"] = [{"class_path": "TaskCrossEntropy"}, loss]
    data["trainer"]["callbacks"] = [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                                     "init_args": {"dirpath": str(tmp_path / "ck"), "save_last": True}}]
    config.write_text(yaml.safe_dump(data))
    TargetTokenMargin.calls.clear()
    assert main(["--config", str(config), "--trainer.max_steps", "3"]) == 0
    assert len(TargetTokenMargin.calls) == 3 and all(np.isfinite(TargetTokenMargin.calls))
    checkpoint = torch.load(tmp_path / "ck" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 3
    assert checkpoint["hyper_parameters"]["healing"]["losses"][1]["class_path"].endswith(".TargetTokenMargin")


class LossRecorder(L.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []
        self.ids: list[list[str]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))
        self.ids.append(list(batch.ids))


class StopAt(L.Callback):
    """Interrupts training after `step` optimizer steps (same max_epochs, so the LR schedule's length is equal)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step >= self.step:
            trainer.should_stop = True


def healing_run(assets: dict[str, Path], root: Path, ckpt_path: str | None = None, **trainer_kw):
    torch.manual_seed(0)
    module = HealingModule(model=SpeechLLMConfig(llm_path=str(assets["llm"]), encoder_path=str(assets["whisper"]),
                                                 projector=ProjectorConfig(downsample=2, hidden_dim=32)),
                           healing=HealingConfig(removed_layers=[1, 2], lora=LoraConfig(**LORA)),
                           optim=OptimConfig(lr=1e-2, warmup_steps=2, schedule="linear"),
                           decoding=DecodingConfig(generate_in_validation=False))
    recorder = LossRecorder()
    callbacks = [recorder, *trainer_kw.pop("callbacks", [])]
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, use_distributed_sampler=False, limit_val_batches=0,
                        default_root_dir=root, callbacks=callbacks, **trainer_kw)
    data = SpeechDataModule(assets["manifest"], max_duration=1.2, num_buckets=2, seed=3)
    trainer.fit(module, data, ckpt_path=ckpt_path)
    return module, recorder


def test_mid_epoch_resume_equals_an_uninterrupted_run(assets, tmp_path):
    reference, ref_log = healing_run(assets, tmp_path / "ref", max_epochs=2)
    per_epoch = len(ref_log.losses) // 2
    assert per_epoch >= 3
    step = per_epoch + 2  # inside the second epoch
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ck", every_n_train_steps=step, save_top_k=-1)
    _, cut_log = healing_run(assets, tmp_path / "a", max_epochs=2, callbacks=[StopAt(step), checkpoint])
    [path] = list((tmp_path / "ck").iterdir())
    assert len(cut_log.losses) == step
    resumed, rest_log = healing_run(assets, tmp_path / "b", max_epochs=2, ckpt_path=str(path))
    assert cut_log.ids + rest_log.ids == ref_log.ids
    np.testing.assert_allclose(cut_log.losses + rest_log.losses, ref_log.losses, rtol=1e-5, atol=1e-6)
    ours, theirs = resumed.speechllm.trainable_state_dict(), reference.speechllm.trainable_state_dict()
    assert ours.keys() == theirs.keys()
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], rtol=1e-5, atol=1e-6, msg=key)


def test_heal_with_a_linear_patch_checkpoints_it_resumes_without_refitting_and_load_module_folds_it(assets, tmp_path):
    from transformers import AutoModelForCausalLM

    from lightning_speechllm.checkpoints import load_module
    from lightning_speechllm.model.layer_mask import get_layer_mask_state

    config = heal_yaml(assets, tmp_path, callbacks=[{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                                                     "init_args": {"dirpath": str(tmp_path / "ck"),
                                                                   "save_last": True}}])
    patch = ["--model.healing.linear_patch", "{batches: 2}", "--model.healing.losses",
             '[{"class_path": "TaskCrossEntropy"}]']
    assert main(["--config", str(config), *patch]) == 0
    first = torch.load(tmp_path / "ck" / "last.ckpt", weights_only=True)["healing"]["linear_patch"]
    assert list(first["patches"]) == ["1"] and first["patches"]["1"].shape == (48, 48)
    assert first["fits"][0]["patched_error"] < first["fits"][0]["removal_error"]
    assert main(["--config", str(config), *patch, "--trainer.max_steps", "3", "--ckpt_path", "last"]) == 0
    resumed = torch.load(tmp_path / "ck" / "last.ckpt", weights_only=True)
    assert resumed["global_step"] == 3
    assert torch.equal(resumed["healing"]["linear_patch"]["patches"]["1"], first["patches"]["1"])  # not refitted
    module = load_module(tmp_path / "ck" / "last.ckpt")
    base = AutoModelForCausalLM.from_pretrained(assets["llm"]).model.layers[0].mlp.down_proj.weight.double()
    folded = get_layer_mask_state(module.speechllm.layer_mask.model).layer_list[0].mlp.down_proj
    folded = getattr(folded, "base_layer", folded).weight.double()
    torch.testing.assert_close(folded, first["patches"]["1"].double().T @ base, rtol=0, atol=1e-5)
    assert module.speechllm.layer_mask.removed_layers == (1, 2)


def test_training_free_heal_saves_the_patched_model_without_a_step(assets, tmp_path):
    from lightning_speechllm.checkpoints import load_module

    config = heal_yaml(assets, tmp_path)
    argv = ["--config", str(config), "--config", "configs/heal/linear_patch.yaml", "--trainer.default_root_dir",
            str(tmp_path / "free")]
    assert main(argv) == 0
    saved = torch.load(tmp_path / "free" / "linear_patch.ckpt", weights_only=True)
    assert saved["global_step"] == 0 and list(saved["healing"]["linear_patch"]["patches"]) == ["1"]
    module = load_module(tmp_path / "free" / "linear_patch.ckpt")
    assert module.linear_patch is not None and module.speechllm.layer_mask.removed_layers == (1, 2)
