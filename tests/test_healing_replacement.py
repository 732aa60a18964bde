"""Healing by replacement (a trainable module in the removed block's place) and healing of attention-only plans."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from lightning_speechllm.healing.losses import LossSpec
from lightning_speechllm.healing.module import HealingConfig, HealingModule, PlanMismatchError, ReplacementConfig
from lightning_speechllm.model.module import DecodingConfig, OptimConfig
from lightning_speechllm.model.replacement import ReplacementLayer
from lightning_speechllm.pruning.plan import PruningPlan
from tests.test_healing_module import loader
from tests.test_module import trainer
from tests.test_speechllm import make_batch
from tests.tiny_speechllm import tiny_speechllm

REPLACE = [LossSpec("ReplacementMSE"), LossSpec("TaskCrossEntropy")]


def replacement_module(kind: str = "ffn", removed=(1, 2), seed: int = 0, lr: float = 1e-2,
                       losses=REPLACE) -> HealingModule:
    config = HealingConfig(removed_layers=list(removed), lora=None, losses=list(losses),
                           replacement=ReplacementConfig(kind=kind, width=32 if kind == "ffn" else None))
    return HealingModule(healing=config, speechllm=tiny_speechllm(seed=seed),
                         optim=OptimConfig(lr=lr, warmup_steps=0, schedule="constant"),
                         decoding=DecodingConfig(max_new_tokens=4, generate_in_validation=False))


@pytest.mark.parametrize("kind", ["ffn", "linear"])
def test_replacement_is_the_identity_at_step_0_and_maps_to_the_state_after_the_block(kind):
    module = replacement_module(kind).eval()
    plain = tiny_speechllm(seed=0, removed_layers=[1, 2]).eval()
    batch = make_batch()
    with torch.no_grad():
        ours = module.speechllm(batch)[1].logits
        theirs = plain(batch)[1].logits
        inputs = module.healing_inputs(batch)
    assert torch.equal(ours, theirs)  # exact: x + 0
    assert inputs.replacement_states == [2]  # x^1 (layer 0), x^2 (the replacement), x^3 (layer 3)
    assert inputs.layer_map == {0: 0, 1: 1, 2: 3, 3: 4}  # the replacement stands for x^3, the input of layer 3
    assert isinstance(module.speechllm.replacements["1"], ReplacementLayer)
    trainable = module.speechllm.trainable_state_dict()
    assert any(key.startswith("replacements.1.") for key in trainable) and not any("lora_" in k for k in trainable)


def test_replacement_healing_lowers_its_mse_checkpoints_and_reloads(tmp_path):
    module = replacement_module(losses=[LossSpec("ReplacementMSE")])
    batch = make_batch(seed=0)
    module.eval()
    with torch.no_grad():
        _, before = module.healing_step(batch)
    assert before["replacement_mse"].item() == pytest.approx(
        _relative_gap(module, batch), rel=1e-5)  # at init the module outputs x^1: the gap to the teacher's x^3
    module.train()
    t = trainer(tmp_path, max_steps=15, limit_val_batches=0)
    t.fit(module, train_dataloaders=loader(1, repeat=15))
    module.eval()
    with torch.no_grad():
        _, after = module.healing_step(batch)
    assert after["replacement_mse"] < 0.8 * before["replacement_mse"], (before, after)
    path = tmp_path / "healed.ckpt"
    t.save_checkpoint(path)
    fresh = HealingModule.load_from_checkpoint(path, speechllm=tiny_speechllm(seed=0)).eval()
    assert any(key.startswith("speechllm.replacements.1.") for key in torch.load(path, weights_only=True)["state_dict"])
    with torch.no_grad():
        torch.testing.assert_close(fresh.speechllm(batch)[1].logits, module.speechllm(batch)[1].logits,
                                   rtol=0, atol=0)


def _relative_gap(module: HealingModule, batch) -> float:
    """Mean over non-pad tokens of |x^1 - x^3|^2 / |x^3|^2 (teacher states), the ReplacementMSE at init."""
    inputs = module.speechllm.build_inputs(batch)
    _, states = module.teacher_pass(inputs, hidden=True)
    mask = inputs.attention_mask.bool()
    x1, x3 = states[1][mask].double(), states[3][mask].double()
    return float(((x1 - x3).pow(2).mean(-1) / x3.pow(2).mean(-1)).mean())


def test_healed_replacement_exports_to_stock_transformers(tmp_path):
    from lightning_speechllm.model.export import save_pruned_decoder

    module = replacement_module()
    with torch.no_grad():
        for param in module.speechllm.replacements.parameters():
            param.add_(0.05 * torch.randn_like(param))
    module.eval()
    inputs = module.speechllm.build_inputs(make_batch())
    with torch.no_grad():
        live = module.speechllm.run_decoder(inputs).logits
    out = save_pruned_decoder(module.speechllm.llm, tmp_path / "decoder")
    stock = AutoModelForCausalLM.from_pretrained(
        out, attn_implementation=module.speechllm.llm.config._attn_implementation).eval()
    assert stock.config.num_hidden_layers == 3  # layer 0, the replacement as a stock layer, layer 3
    with torch.no_grad():
        reloaded = stock(inputs_embeds=inputs.inputs_embeds, attention_mask=inputs.attention_mask,
                         position_ids=inputs.position_ids).logits
    real = inputs.attention_mask.bool()
    torch.testing.assert_close(reloaded[real], live[real], rtol=0, atol=1e-6)


def test_replacement_needs_removed_layers_and_refuses_iterative_rounds():
    with pytest.raises(PlanMismatchError, match="needs removed layers"):
        replacement_module(removed=())
    module = replacement_module()
    with pytest.raises(PlanMismatchError, match="iterative rounds with replacement"):
        module.remove_more_layers([3])


def test_attention_only_plan_heals_with_the_teacher_running_every_attention(tmp_path):
    plan = PruningPlan(removed_layers=[], num_layers=4, method="attention", removed_attention=[1, 2])
    path = plan.to_json(tmp_path / "plan.json")
    config = HealingConfig(plan_path=str(path), losses=[LossSpec("TaskCrossEntropy"), LossSpec("KLDivergence")])
    module = HealingModule(healing=config, speechllm=tiny_speechllm(), optim=OptimConfig(lr=1e-2, warmup_steps=0),
                           decoding=DecodingConfig(max_new_tokens=4, generate_in_validation=False))
    assert module.speechllm.sublayer_mask.dropped_attention == (1, 2)
    assert module.speechllm.config.lora.layers == [3]  # the layer after the dropped attentions receives the cut
    plain = tiny_speechllm().eval()
    batch = make_batch()
    module.eval()
    with torch.no_grad():
        inputs = module.speechllm.build_inputs(batch)
        teacher, _ = module.teacher_pass(inputs)
        reference = plain(batch)[1].logits
        student, _ = module.student_pass(inputs)
    # the LM head on all positions vs on the target window (another GEMM shape, K = 48): float32 logits (|x| <= 6) ~1e-6
    # apart, bounded by K eps sum|w h| ~ 5e-5 per side on any kernel; a teacher without the dropped attentions is 5 off
    torch.testing.assert_close(teacher[:, -reference.shape[1]:], reference, rtol=0, atol=1e-4)
    assert (student[:, -reference.shape[1]:] - reference).abs().max() > 1e-3
    assert module.speechllm.sublayer_mask.dropped_attention == (1, 2)  # back after the teacher pass
    trainer(tmp_path, max_steps=2, limit_val_batches=0).fit(module, train_dataloaders=loader(1, repeat=2))
    assert torch.isfinite(module.trainer.callback_metrics["train/loss"])


def test_resume_refuses_another_replacement_or_sublayer_plan(tmp_path):
    module = replacement_module()
    t = trainer(tmp_path, max_steps=1, limit_val_batches=0)
    t.fit(module, train_dataloaders=loader(1))
    path = tmp_path / "healed.ckpt"
    t.save_checkpoint(path)
    other = HealingConfig(removed_layers=[1, 2], lora=None, losses=list(REPLACE),
                          replacement=ReplacementConfig(kind="linear"))
    with pytest.raises(PlanMismatchError, match=r"healed with replacement \{'kind': 'ffn', 'width': 32\}"):
        HealingModule.load_from_checkpoint(path, healing=other, speechllm=tiny_speechllm())
    sublayer = HealingConfig(removed_layers=[1, 2], removed_attention=[3], lora=None, losses=list(REPLACE),
                             replacement=ReplacementConfig(kind="ffn", width=32))
    with pytest.raises(PlanMismatchError, match=r"removed_attention \[\], this module has \[3\]"):
        HealingModule.load_from_checkpoint(path, healing=sublayer, speechllm=tiny_speechllm())
    with pytest.raises(PlanMismatchError, match=r"kind must be one of \('ffn', 'linear'\), got 'fnn'"):
        HealingModule(healing=HealingConfig(removed_layers=[1], replacement={"kind": "fnn"}),
                      speechllm=tiny_speechllm())
    with pytest.raises(ValueError, match="replacement modules are not sharded under FSDP"):
        module.speechllm.shard(mesh=None)


def test_a_sweep_refuses_a_model_with_dropped_sublayers(tmp_path):
    from lightning_speechllm.evaluation.sweep import SweepConfig, SweepError, run_sweep
    from tests.test_module import NamedSets

    model = tiny_speechllm(removed_attention=[2])
    with pytest.raises(SweepError, match=r"starts from the unpruned model; this one masks attention of layers \[2\]"):
        run_sweep(model, NamedSets(), SweepConfig(method="last", ns=[1], output_dir=str(tmp_path)))
