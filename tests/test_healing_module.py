"""HealingModule: plan + LoRA placement, shared-weight teacher, loss goes down, plan-checked checkpoints, NaN policy."""
from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader

from lightning_speechllm.healing.losses import LossSpec
from lightning_speechllm.healing.module import (
    HealingConfig,
    HealingModule,
    NonFiniteLossError,
    PlanMismatchError,
    receiving_layers,
)
from lightning_speechllm.model.module import DecodingConfig, OptimConfig
from lightning_speechllm.model.speechllm import LoraConfig
from lightning_speechllm.pruning.plan import plan_explicit
from tests.test_module import trainer
from tests.test_speechllm import make_batch
from tests.tiny_speechllm import tiny_speechllm

SMALL_LORA = LoraConfig(r=4, alpha=4, target_modules=["q_proj", "v_proj"])
KL_CE = [LossSpec("TaskCrossEntropy"), LossSpec("KLDivergence", {"temperature": 2.0})]


def healing_module(removed=(1, 2), losses=KL_CE, on_nan="raise", seed=0, lr=1e-2, **optim) -> HealingModule:
    config = HealingConfig(removed_layers=list(removed), lora=SMALL_LORA, losses=list(losses), on_nan=on_nan)
    return HealingModule(healing=config, speechllm=tiny_speechllm(seed=seed),
                         optim=OptimConfig(**{"lr": lr, "warmup_steps": 0, "schedule": "constant", **optim}),
                         decoding=DecodingConfig(max_new_tokens=4, generate_in_validation=False))


def loader(n: int = 1, repeat: int = 1) -> DataLoader:
    return DataLoader([make_batch(seed=i) for i in range(n)] * repeat, batch_size=None)


def randomise_lora_b(module: HealingModule, seed: int = 1) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.speechllm.llm.named_parameters():
            if "lora_B.default" in name:  # the healing adapter only
                param.copy_(0.5 * torch.randn(param.shape, generator=gen))


def test_receiving_layers():
    assert receiving_layers([1, 2], 4) == [3]
    assert receiving_layers([2, 3], 4) == [1]  # a cut at the end: the last kept layer receives it
    assert receiving_layers([0, 2, 3, 5], 7) == [1, 4, 6]


def test_default_lora_sits_on_the_receiving_layer_and_plan_masks_layers():
    module = HealingModule(healing=HealingConfig(removed_layers=[1, 2]), speechllm=tiny_speechllm())
    lora = module.speechllm.config.lora
    assert (lora.layers, lora.r, lora.alpha, lora.dropout) == ([3], 64, 64, 0.05)
    assert module.speechllm.layer_mask.active_layers == (0, 3)
    trainable = module.speechllm.trainable_state_dict()
    lora_layers = {k.split(".layers.")[1].split(".")[0] for k in trainable if "lora_" in k}
    assert lora_layers == {"3"} and any(k.startswith("projector.") for k in trainable)
    assert module.hparams["model"]["removed_layers"] == [1, 2]
    with pytest.raises(PlanMismatchError, match=r"removed_layers \[1, 9\]"):
        HealingModule(healing=HealingConfig(removed_layers=[1, 9]), speechllm=tiny_speechllm())


def test_a_model_already_carrying_the_plan_is_accepted_and_another_plan_refused():
    prebuilt = tiny_speechllm(lora=LoraConfig(layers=[3], r=4, alpha=4, target_modules=["q_proj"]),
                              removed_layers=[1, 2])
    lora_before = sorted(k for k in prebuilt.trainable_state_dict() if "lora_" in k)
    module = HealingModule(healing=HealingConfig(removed_layers=[1, 2]), speechllm=prebuilt)
    assert sorted(k for k in module.speechllm.trainable_state_dict() if "lora_" in k) == lora_before  # no 2nd LoRA
    assert module.speechllm.layer_mask.active_layers == (0, 3)
    with pytest.raises(PlanMismatchError, match=r"already masks layers \[1, 2\], the plan removes \[2\]"):
        HealingModule(healing=HealingConfig(removed_layers=[2]), speechllm=tiny_speechllm(removed_layers=[1, 2]))


def test_plan_file_from_pruning_plan(tmp_path):
    path = plan_explicit(4, [1, 2], model_id="<memory>").to_json(tmp_path / "plan.json")
    module = HealingModule(healing=HealingConfig(plan_path=str(path), lora=SMALL_LORA), speechllm=tiny_speechllm())
    assert module.plan["removed_layers"] == [1, 2] and module.plan["model_id"] == "<memory>"
    wrong = plan_explicit(6, [1, 2]).to_json(tmp_path / "wrong.json")
    with pytest.raises(PlanMismatchError, match="6 layers"):
        HealingModule(healing=HealingConfig(plan_path=str(wrong)), speechllm=tiny_speechllm())


def test_shared_teacher_equals_the_unpruned_model_without_adapters():
    module = healing_module()
    randomise_lora_b(module)
    module.train()  # LoRA dropout on: the teacher pass must still be deterministic (adapters off, eval mode)
    plain = tiny_speechllm(seed=0).eval()
    batch = make_batch()
    with torch.no_grad():
        inputs = module.speechllm.build_inputs(batch)
        teacher_logits, teacher_states = module.teacher_pass(inputs, hidden=True)
        student_logits, _ = module.student_pass(inputs)
        reference_inputs = plain.build_inputs(batch)
        torch.testing.assert_close(inputs.inputs_embeds, reference_inputs.inputs_embeds, atol=0, rtol=0)
        with plain.layer_mask.record_residual_stream() as stream:
            reference = plain.llm(inputs_embeds=reference_inputs.inputs_embeds,
                                  attention_mask=reference_inputs.attention_mask,
                                  position_ids=reference_inputs.position_ids, use_cache=False).logits
    torch.testing.assert_close(teacher_logits[:, -reference.shape[1]:], reference, atol=1e-6, rtol=0)
    assert len(teacher_states) == 5
    for ours, theirs in zip(teacher_states, stream.states):
        torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)
    assert (student_logits - reference).abs().max() > 1e-2  # the student is really pruned and adapted
    assert module.speechllm.layer_mask.active_layers == (0, 3)  # the mask is back after the teacher pass
    with torch.no_grad():
        again, _ = module.student_pass(inputs)
    assert module.speechllm.llm.training  # the training mode is back after the teacher pass
    module.eval()
    with torch.no_grad():
        student_logits, _ = module.student_pass(inputs)
        module.teacher_pass(inputs)
        again, _ = module.student_pass(inputs)
    torch.testing.assert_close(again, student_logits, atol=0, rtol=0)  # adapters are enabled again


def test_healing_with_kl_and_ce_lowers_the_loss(tmp_path):
    # The teacher is a fixed target (frozen projector snapshot); on this random tiny model CE and KL pull apart, so
    # KL gets the weight that makes its part the one that must fall.
    module = healing_module(losses=[LossSpec("TaskCrossEntropy"), LossSpec("KLDivergence", {"temperature": 2.0},
                                                                           weight=4.0)])
    batch = make_batch(seed=0)
    module.eval()
    with torch.no_grad():
        before, before_parts = module.healing_step(batch)
    module.train()
    trainer(tmp_path, max_steps=12, limit_val_batches=0).fit(module, train_dataloaders=loader(1, repeat=12))
    module.eval()
    with torch.no_grad():
        after, after_parts = module.healing_step(batch)
    assert after < 0.8 * before, (before, after)
    assert after_parts["kl_divergence"] < before_parts["kl_divergence"]
    logged = module.trainer.callback_metrics
    assert {"train/loss", "train/loss/task_cross_entropy", "train/loss/kl_divergence"} <= set(logged)


def test_hidden_state_losses_train_end_to_end(tmp_path):
    module = healing_module(losses=[LossSpec("HiddenStateMSE", weight=0.1), LossSpec("HiddenStateCosine")])
    trainer(tmp_path, max_steps=2, limit_val_batches=0).fit(module, train_dataloaders=loader(2))
    logged = module.trainer.callback_metrics
    assert {"train/loss/hidden_state_mse", "train/loss/hidden_state_mse/state2",
            "train/loss/hidden_state_cosine"} <= set(logged)
    assert torch.isfinite(logged["train/loss"])


def fitted_checkpoint(tmp_path) -> tuple[HealingModule, str]:
    module = healing_module()
    t = trainer(tmp_path, max_steps=1, limit_val_batches=0)
    t.fit(module, train_dataloaders=loader(1))
    path = str(tmp_path / "healed.ckpt")
    t.save_checkpoint(path)
    return module, path


def test_checkpoint_holds_trainables_and_plan_and_reloads(tmp_path):
    module, path = fitted_checkpoint(tmp_path)
    checkpoint = torch.load(path, weights_only=False)
    assert checkpoint["healing"]["plan"]["removed_layers"] == [1, 2]
    assert checkpoint["healing"]["base_model"] == {"llm_path": "<memory>", "encoder_path": "<memory>"}
    assert all(k.startswith("speechllm.projector.") or "lora_" in k for k in checkpoint["state_dict"])
    fresh = HealingModule.load_from_checkpoint(path, speechllm=tiny_speechllm(seed=5))
    assert fresh.speechllm.layer_mask.active_layers == (0, 3)
    for key, value in module.speechllm.trainable_state_dict().items():
        torch.testing.assert_close(fresh.speechllm.trainable_state_dict()[key], value, atol=0, rtol=0)


def test_checkpoint_with_another_plan_or_base_model_is_refused(tmp_path):
    _, path = fitted_checkpoint(tmp_path)
    other_plan = HealingConfig(removed_layers=[2], lora=SMALL_LORA, losses=KL_CE)
    with pytest.raises(PlanMismatchError, match=r"removed layers \[1, 2\], this module removes \[2\]"):
        HealingModule.load_from_checkpoint(path, healing=other_plan, speechllm=tiny_speechllm())
    other_llm = tiny_speechllm()
    other_llm.config.llm_path = "qwen2.5-7b"
    with pytest.raises(PlanMismatchError, match="'<memory>'.*differs.*'qwen2.5-7b'"):
        HealingModule.load_from_checkpoint(path, speechllm=other_llm)


def test_non_finite_loss_raises_naming_step_and_part(tmp_path):
    module = healing_module(losses=[LossSpec("TaskCrossEntropy"),
                                    LossSpec("tests.healing_custom_loss.NonFiniteLoss", {"from_call": 2})])
    before = module.speechllm.trainable_state_dict()
    t = trainer(tmp_path, max_steps=5, limit_val_batches=0)
    with pytest.raises(NonFiniteLossError, match=r"global step 2: loss part\(s\) \{'non_finite_loss': nan\}"):
        t.fit(module, train_dataloaders=loader(1, repeat=5))
    assert t.global_step == 2
    after = module.speechllm.trainable_state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the two finite steps trained
    assert all(torch.isfinite(v).all() for v in after.values())


def test_skip_mode_leaves_weights_unchanged(tmp_path):
    module = healing_module(losses=[LossSpec("TaskCrossEntropy"), LossSpec("tests.healing_custom_loss.NonFiniteLoss")],
                            on_nan="skip", weight_decay=0.1)
    before = module.speechllm.trainable_state_dict()
    trainer(tmp_path, max_epochs=1, limit_val_batches=0).fit(module, train_dataloaders=loader(3))
    assert module.skipped_steps == 3
    assert module.trainer.callback_metrics["train/skipped_nonfinite"] == 3
    for key, value in module.speechllm.trainable_state_dict().items():
        assert torch.equal(value, before[key]), key


DDP_SCRIPT = """
import sys
import lightning as L
import torch
from torch.utils.data import DataLoader
from lightning_speechllm.healing.losses import LossSpec
from lightning_speechllm.healing.module import HealingConfig, HealingModule
from lightning_speechllm.model.module import DecodingConfig, OptimConfig
from lightning_speechllm.model.speechllm import LoraConfig
from tests.test_speechllm import make_batch
from tests.tiny_speechllm import tiny_speechllm

torch.set_num_threads(1)
devices, out = int(sys.argv[1]), sys.argv[2]
lora = LoraConfig(r=4, alpha=4, dropout=0.0, target_modules=["q_proj", "v_proj"])
losses = [LossSpec("TaskCrossEntropy"), LossSpec("KLDivergence", {"temperature": 2.0})]
module = HealingModule(healing=HealingConfig(removed_layers=[1, 2], lora=lora, losses=losses),
                       optim=OptimConfig(lr=1e-2, warmup_steps=0, schedule="constant"),
                       decoding=DecodingConfig(generate_in_validation=False), speechllm=tiny_speechllm(seed=0))
trainer = L.Trainer(accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto",
                    accumulate_grad_batches=2 if devices == 1 else 1, max_epochs=1, limit_val_batches=0,
                    logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
trainer.fit(module, train_dataloaders=DataLoader([make_batch(seed=i) for i in range(4)], batch_size=None))
if trainer.global_rank == 0:
    torch.save({"state": module.speechllm.trainable_state_dict(), "steps": trainer.global_step}, out)
"""


@pytest.mark.slow
def test_two_rank_ddp_heals_like_one_rank_with_the_same_global_batch(tmp_path):
    """2 ranks x 1 batch per step == 1 rank accumulating 2 batches per step (LoRA dropout off)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = tmp_path / "heal_ddp.py"
    script.write_text(DDP_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}
    results = {}
    for devices in (1, 2):
        out = tmp_path / f"devices{devices}.pt"
        proc = subprocess.run([sys.executable, str(script), str(devices), str(out)], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        results[devices] = torch.load(out, weights_only=False)
    assert results[1]["steps"] == results[2]["steps"] == 2
    initial = tiny_speechllm(seed=0)
    assert results[1]["state"].keys() == results[2]["state"].keys()
    for key, value in results[1]["state"].items():
        torch.testing.assert_close(results[2]["state"][key], value, atol=2e-5, rtol=1e-4, msg=key)
    projector = {k: v for k, v in initial.trainable_state_dict().items() if k in results[1]["state"]}
    assert any(not torch.allclose(results[1]["state"][k], v) for k, v in projector.items())  # it did train


NAN_ON_ONE_RANK_SCRIPT = """
import json
import sys
import lightning as L
import torch
from torch.utils.data import DataLoader
from lightning_speechllm.healing.losses import LossSpec
from lightning_speechllm.healing.module import HealingConfig, HealingModule, NonFiniteLossError
from lightning_speechllm.model.module import DecodingConfig, OptimConfig
from lightning_speechllm.model.speechllm import LoraConfig
from tests.test_speechllm import make_batch
from tests.tiny_speechllm import tiny_speechllm

torch.set_num_threads(1)
on_nan, out = sys.argv[1], sys.argv[2]
lora = LoraConfig(r=4, alpha=4, dropout=0.0, target_modules=["q_proj", "v_proj"])
losses = [LossSpec("TaskCrossEntropy"), LossSpec("tests.healing_custom_loss.NonFiniteOnRank", {"rank": 1})]
module = HealingModule(healing=HealingConfig(removed_layers=[1, 2], lora=lora, losses=losses, on_nan=on_nan),
                       optim=OptimConfig(lr=1e-2, warmup_steps=0, schedule="constant"),
                       decoding=DecodingConfig(generate_in_validation=False), speechllm=tiny_speechllm(seed=0))
trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=1, limit_val_batches=0, logger=False,
                    enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
try:
    trainer.fit(module, train_dataloaders=DataLoader([make_batch(seed=i) for i in range(4)], batch_size=None))
    error = None
except NonFiniteLossError as caught:
    error = str(caught)
state = {k: v.tolist() for k, v in module.speechllm.trainable_state_dict().items() if "projector" in k}
with open(f"{out}.rank{trainer.global_rank}.json", "w") as handle:
    json.dump({"skipped": module.skipped_steps, "step": trainer.global_step, "error": error, "state": state}, handle)
"""


@pytest.mark.slow
@pytest.mark.parametrize("on_nan", ["skip", "raise"])
def test_a_nan_on_one_rank_only_is_decided_the_same_on_every_rank(tmp_path, on_nan):
    """Rank 1's loss is NaN at its first step, rank 0's is finite: both ranks skip that update (the step is counted,
    nothing moves) and then train in step, or both raise. Deciding on the local flag lets the ranks' weights diverge
    (skip) or leaves rank 0 alone in the gradient all-reduce (raise: a hang, caught by the timeout)."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = tmp_path / "nan_one_rank.py"
    script.write_text(NAN_ON_ONE_RANK_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}
    out = tmp_path / "result"
    proc = subprocess.run([sys.executable, str(script), on_nan, str(out)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads(Path(f"{out}.rank{rank}.json").read_text()) for rank in (0, 1)]
    if on_nan == "skip":
        assert [r["skipped"] for r in ranks] == [1, 1] and [r["step"] for r in ranks] == [2, 2]
        assert ranks[0]["state"] == ranks[1]["state"]  # the ranks stayed in step
    else:
        assert "a loss part on another rank" in ranks[0]["error"] and "non_finite_on_rank" in ranks[1]["error"]


def test_yaml_config_builds_the_weighted_losses(tmp_path):
    """`losses` is a YAML list of {class_path, init_args, weight} that jsonargparse keeps as plain dicts."""
    from jsonargparse import ArgumentParser

    (tmp_path / "heal.yaml").write_text(
        "healing:\n  removed_layers: [1, 2]\n  on_nan: skip\n  lora: {r: 4, alpha: 4, target_modules: [q_proj]}\n"
        "  losses:\n    - class_path: TaskCrossEntropy\n"
        "    - {class_path: KLDivergence, init_args: {direction: reverse, temperature: 2.0}, weight: 0.5}\n")
    parser = ArgumentParser()
    parser.add_argument("--config", action="config")
    parser.add_argument("--healing", type=HealingConfig)
    healing = parser.instantiate(parser.parse_args(["--config", str(tmp_path / "heal.yaml")])).healing
    module = HealingModule(healing=healing, speechllm=tiny_speechllm())
    assert list(module.loss_fn.parts) == ["task_cross_entropy", "kl_divergence"]
    assert module.loss_fn.weights["kl_divergence"] == 0.5 and module.loss_fn.parts["kl_divergence"].direction == "reverse"
    assert module.speechllm.config.lora.layers == [3] and module.healing.on_nan == "skip"


def fitted_lora_teacher(root, lora: LoraConfig):
    """A LoRA-tuned fit run (2 steps at a high LR, so LoRA B and the projector moved): (checkpoint path, the module
    in eval mode)."""
    from lightning_speechllm.model.module import SpeechLLMModule

    tuned = SpeechLLMModule(optim=OptimConfig(lr=3e-2, warmup_steps=0, schedule="constant"),
                            decoding=DecodingConfig(generate_in_validation=False),
                            speechllm=tiny_speechllm(seed=0, lora=lora))
    fit = trainer(root, max_steps=2, limit_val_batches=0)
    fit.fit(tuned, train_dataloaders=loader(2))
    fit.save_checkpoint(root / "fit.ckpt")
    return root / "fit.ckpt", tuned.eval()


def test_teacher_checkpoint_brings_its_projector_and_merges_its_lora(tmp_path):
    full_lora = LoraConfig(layers=[0, 1, 2, 3], r=4, alpha=4, dropout=0.0, target_modules=["q_proj", "v_proj"])
    teacher_path, tuned = fitted_lora_teacher(tmp_path, full_lora)
    batch = make_batch(seed=7)
    with torch.no_grad():
        reference = tuned.speechllm(batch)[1].logits

    config = HealingConfig(removed_layers=[1, 2], lora=SMALL_LORA, losses=KL_CE,
                           teacher_checkpoint=str(teacher_path))
    module = HealingModule(healing=config, speechllm=tiny_speechllm(seed=0),
                           optim=OptimConfig(lr=1e-2, warmup_steps=0))
    randomise_lora_b(module)
    for key, value in tuned.speechllm.trainable_state_dict().items():
        if key.startswith("projector."):
            torch.testing.assert_close(module.speechllm.projector.state_dict()[key[len("projector."):]], value)
    module.train()
    with torch.no_grad():
        inputs = module.speechllm.build_inputs(batch)
        teacher_logits, _ = module.teacher_pass(module.teacher_inputs(batch, inputs))
    # merged W + sBA vs W, sBA apart, through 4 layers: float32 logits (|x| <= 6) 1.03e-5 apart on an AMD AVX2 CPU;
    # 1e-4 (~200 ulps) leaves margin for any kernel, while a lost LoRA (one layer's) moves them by >= 0.1
    torch.testing.assert_close(teacher_logits[:, -reference.shape[1]:], reference, atol=1e-4, rtol=0)
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert trainable and not any(".teacher." in n or n.startswith("teacher_projector") for n in trainable)
    assert any(".default." in n for n in trainable)
    module.eval()
    with torch.no_grad():
        student = module.student_pass(inputs)[0]
        module.teacher_pass(inputs)
        torch.testing.assert_close(module.student_pass(inputs)[0], student, atol=0, rtol=0)  # back on 'default'
    teacher_before = {k: v.clone() for k, v in module.teacher_projector.state_dict().items()}
    module.train()
    heal = trainer(tmp_path / "heal", max_steps=2, limit_val_batches=0)
    heal.fit(module, train_dataloaders=loader(2))
    for key, value in module.teacher_projector.state_dict().items():
        assert torch.equal(value, teacher_before[key]), key
    healed = module.speechllm.trainable_state_dict()
    assert not any(".teacher." in k for k in healed)
    heal.save_checkpoint(tmp_path / "healed.ckpt")
    reloaded = HealingModule.load_from_checkpoint(tmp_path / "healed.ckpt", speechllm=tiny_speechllm(seed=3))
    for key, value in healed.items():
        torch.testing.assert_close(reloaded.speechllm.trainable_state_dict()[key], value, atol=0, rtol=0)
