"""Healing keeps what the fit run learned (issue 12, item 3): a LoRA-tuned fit checkpoint's LoRA is merged into the
student (and reloads with the healed checkpoint), and the distillation teacher reads a frozen projector snapshot."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lightning_speechllm.healing.module import HealingConfig, HealingModule, PlanMismatchError
from lightning_speechllm.model.checkpoint import load_checkpoint_file
from lightning_speechllm.model.module import DecodingConfig, OptimConfig, SpeechLLMModule
from lightning_speechllm.model.speechllm import LoraConfig
from tests.test_healing_module import KL_CE, SMALL_LORA, fitted_lora_teacher, loader, randomise_lora_b
from tests.test_module import trainer
from tests.test_speechllm import make_batch
from tests.tiny_speechllm import tiny_speechllm

FIT_LORA = LoraConfig(layers=[0, 1, 2, 3], r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"])


@pytest.fixture(scope="module")
def fit_checkpoint(tmp_path_factory) -> tuple[Path, SpeechLLMModule]:
    """A LoRA-tuned fit run (2 steps at a high LR, so LoRA B and the projector moved) and its checkpoint."""
    path, tuned = fitted_lora_teacher(tmp_path_factory.mktemp("fit_lora"), FIT_LORA)
    lora_b = [v for k, v in tuned.speechllm.trainable_state_dict().items() if "lora_B" in k]
    assert max(float(v.abs().max()) for v in lora_b) > 1e-3  # the fit LoRA is not a no-op
    return path, tuned


def healing(teacher: Path | None, removed=(), losses=KL_CE, seed: int = 0) -> HealingModule:
    config = HealingConfig(removed_layers=list(removed), lora=SMALL_LORA, losses=list(losses),
                           teacher_checkpoint=str(teacher) if teacher else None)
    return HealingModule(healing=config, speechllm=tiny_speechllm(seed=seed),
                         optim=OptimConfig(lr=1e-2, warmup_steps=0, schedule="constant"),
                         decoding=DecodingConfig(generate_in_validation=False))


def logits(module: HealingModule, student: bool = True) -> torch.Tensor:
    batch = make_batch(seed=7)
    with torch.no_grad():
        inputs = module.speechllm.build_inputs(batch)
        if student:
            return module.student_pass(inputs)[0]
        return module.teacher_pass(module.teacher_inputs(batch, inputs))[0]


def test_student_at_step_zero_is_the_fit_model(fit_checkpoint):
    """Fails on the old code: the student was the bare base + a new LoRA, without the fit run's LoRA."""
    path, tuned = fit_checkpoint
    with torch.no_grad():
        reference = tuned.speechllm(make_batch(seed=7))[1].logits
    module = healing(path).eval()
    # merged vs unmerged LoRA through 4 layers: float32 logits (|x| <= 6) ~1e-5 apart (7.6e-6 here, 1.03e-5 on an AMD
    # AVX2 CPU); 1e-4 (~200 ulps) covers any kernel, while the fit LoRA left out moves them by >= 0.28
    torch.testing.assert_close(logits(module)[:, -reference.shape[1]:], reference, atol=1e-4, rtol=0)
    torch.testing.assert_close(logits(module, student=False)[:, -reference.shape[1]:], reference, atol=1e-4, rtol=0)
    assert module.merged_lora["source"] == str(path)
    assert not any("lora_" in n and ".default." not in n for n, _ in module.named_parameters())  # no 2nd adapter


def test_healed_checkpoint_reloads_with_the_merged_fit_lora(fit_checkpoint, tmp_path):
    """A healed checkpoint rebuilt as ``load_module`` does (teacher_checkpoint=None, fresh base weights) equals the
    in-memory model; without the merged LoRA in the checkpoint it would silently lack the fit LoRA."""
    path, _ = fit_checkpoint
    module = healing(path, removed=[1, 2])
    randomise_lora_b(module)
    heal = trainer(tmp_path, max_steps=1, limit_val_batches=0)
    heal.fit(module, train_dataloaders=loader(1))
    heal.save_checkpoint(tmp_path / "healed.ckpt")
    module.eval()
    expected = logits(module)

    checkpoint = load_checkpoint_file(tmp_path / "healed.ckpt")
    assert checkpoint["healing"]["merged_lora"]["source"] == str(path)
    reloaded = healing(None, removed=[1, 2], losses=[{"class_path": "TaskCrossEntropy"}])  # as load_module builds it
    reloaded.on_load_checkpoint(checkpoint)
    reloaded.load_state_dict(checkpoint["state_dict"])
    torch.testing.assert_close(logits(reloaded.eval()), expected, atol=1e-6, rtol=0)

    again = healing(path, removed=[1, 2])  # a resumed run merges from the file, then checks the checkpoint's copy
    again.on_load_checkpoint(checkpoint)
    again.load_state_dict(checkpoint["state_dict"])
    torch.testing.assert_close(logits(again.eval()), expected, atol=1e-6, rtol=0)
    with pytest.raises(PlanMismatchError, match="healed without it"):
        healing(path, removed=[1, 2]).on_load_checkpoint({**checkpoint, "healing": {
            k: v for k, v in checkpoint["healing"].items() if k != "merged_lora"}})


def test_teacher_projector_is_a_frozen_snapshot_without_teacher_checkpoint():
    """Fails on the old code: the teacher read the student's trainable projector, so the KD target drifted."""
    module = healing(None, removed=[1, 2]).eval()
    before = logits(module, student=False)
    assert module.teacher_projector is not None and not any(p.requires_grad for p in module.teacher_projector.parameters())
    with torch.no_grad():  # what an optimizer step does to the student's projector
        for param in module.speechllm.projector.parameters():
            param.add_(0.5 * torch.randn_like(param))
    assert not torch.allclose(logits(module), logits(healing(None, removed=[1, 2]).eval()))  # the student moved
    torch.testing.assert_close(logits(module, student=False), before, atol=0, rtol=0)

    checkpoint: dict = {}
    module.on_save_checkpoint(checkpoint)  # a resumed run distils from the first start's snapshot
    resumed = healing(None, removed=[1, 2], seed=5)
    resumed.on_load_checkpoint(checkpoint)
    for key, value in module.teacher_projector.state_dict().items():
        assert torch.equal(resumed.teacher_projector.state_dict()[key], value), key


def test_no_snapshot_when_no_loss_needs_the_teacher():
    assert healing(None, removed=[1, 2], losses=[{"class_path": "TaskCrossEntropy"}]).teacher_projector is None
