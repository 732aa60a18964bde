"""Training-free healing by a closed-form linear patch folded into the layer before each removed block (ReplaceMe)."""
from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader
from transformers import AutoModelForCausalLM

from lightning_speechllm.healing.linear_patch import (
    LinearPatchConfig,
    LinearPatchError,
    block_runs,
    fit_linear_patch,
    fold_linear_patch,
    restore_weights,
)
from lightning_speechllm.healing.losses import LossSpec
from lightning_speechllm.healing.module import HealingConfig, HealingModule, PlanMismatchError
from lightning_speechllm.model.layer_mask import get_layer_mask_state
from lightning_speechllm.model.module import DecodingConfig, OptimConfig
from lightning_speechllm.redundancy.metrics import select_tokens
from tests.test_module import trainer
from tests.test_speechllm import make_batch
from tests.tiny_speechllm import tiny_speechllm

BATCHES = [make_batch(seed=s) for s in range(4)]


def _unpruned_states(speechllm, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Over the non-pad tokens of BATCHES, from hooks on the unpruned model: the stream before layer start-1's MLP
    (y), that MLP's output (m) and the stream entering layer `end` (x_b), in float64."""
    layers = get_layer_mask_state(speechllm.layer_mask.model).layer_list
    seen: dict[str, list[torch.Tensor]] = {"y": [], "m": [], "x": []}
    tokens: list[torch.Tensor] = []
    hooks = [layers[start - 1].post_attention_layernorm.register_forward_pre_hook(
                 lambda _m, a: seen["y"].append(a[0])),
             layers[start - 1].mlp.register_forward_hook(lambda _m, _a, out: seen["m"].append(out)),
             layers[end].register_forward_pre_hook(lambda _m, a, k: seen["x"].append(a[0] if a else k["hidden_states"]),
                                                   with_kwargs=True)]
    try:
        with torch.no_grad():
            for batch in BATCHES:
                inputs = speechllm.build_inputs(batch)
                speechllm.llm(inputs_embeds=inputs.inputs_embeds, attention_mask=inputs.attention_mask,
                              position_ids=inputs.position_ids, use_cache=False)
                tokens.append(select_tokens(inputs.segment_ids, "all"))
    finally:
        for hook in hooks:
            hook.remove()
    return tuple(torch.cat([s[t] for s, t in zip(seen[k], tokens)]).double() for k in ("y", "m", "x"))


def test_block_runs_are_the_maximal_contiguous_blocks():
    assert block_runs([7, 2, 3, 5, 8]) == [(2, 4), (5, 6), (7, 9)]
    assert block_runs([]) == []


def test_patch_is_the_least_squares_solution_and_the_pruned_model_computes_it():
    speechllm = tiny_speechllm(seed=0, layers=6).eval()
    y, m, x_b = _unpruned_states(speechllm, 2, 4)
    fitted = fit_linear_patch(speechllm, [2, 3], BATCHES, LinearPatchConfig(ridge=0.0), progress=False)
    reference = torch.linalg.lstsq(m, x_b - y).solution
    torch.testing.assert_close(fitted.patches[2].double(), reference, rtol=1e-4, atol=1e-5)
    fit = fitted.fits[0]
    assert (fit.start, fit.end, fit.tokens) == (2, 4, len(y))
    norm = x_b.pow(2).sum()
    assert fit.removal_error == pytest.approx(float((y + m - x_b).pow(2).sum() / norm), rel=1e-6)
    assert fit.patched_error == pytest.approx(float((y + m @ reference - x_b).pow(2).sum() / norm), rel=1e-4)
    assert fit.patched_error < 0.5 * fit.removal_error
    # The folded model, layers 2-3 masked, feeds layer 4 exactly y + m T.
    assert speechllm.layer_mask.removed_layers == (2, 3)
    _, _, patched_input = _unpruned_states(speechllm, 2, 4)
    torch.testing.assert_close(patched_input, y + m @ fitted.patches[2].double(), rtol=0, atol=1e-4)


def test_two_blocks_fit_in_order_and_restore_exactly():
    speechllm = tiny_speechllm(seed=1, layers=8).eval()
    layers = get_layer_mask_state(speechllm.layer_mask.model).layer_list
    before = {i: layers[i].mlp.down_proj.weight.clone() for i in (1, 4)}
    fitted = fit_linear_patch(speechllm, [5, 2, 6], BATCHES, progress=False)
    assert sorted(fitted.patches) == [2, 5] and [(f.start, f.end) for f in fitted.fits] == [(2, 3), (5, 7)]
    assert speechllm.layer_mask.removed_layers == (2, 5, 6)
    assert not torch.equal(layers[4].mlp.down_proj.weight, before[4])
    restore_weights(speechllm, fitted.originals)
    assert all(torch.equal(layers[i].mlp.down_proj.weight, before[i]) for i in (1, 4))


@pytest.mark.parametrize(("removed", "masked", "message"), [
    ([0, 1], [], "starts at layer 0"),
    ([2], [2], "already masked"),
    ([], [], "removes no whole decoder layer"),
])
def test_refusals_name_the_reason(removed, masked, message):
    speechllm = tiny_speechllm(seed=0, layers=4).eval()
    if masked:
        speechllm.layer_mask.remove_layers(masked)
    with pytest.raises(LinearPatchError, match=message):
        fit_linear_patch(speechllm, removed, BATCHES, progress=False)


def test_a_patch_of_the_wrong_width_is_refused():
    speechllm = tiny_speechllm(seed=0, layers=4)
    with pytest.raises(LinearPatchError, match=r"shape \(3, 3\).*width is 48"):
        fold_linear_patch(speechllm, {2: torch.eye(3)})


def _patch_module(losses=(LossSpec("TaskCrossEntropy"),), **healing) -> HealingModule:
    config = HealingConfig(removed_layers=[2, 3], lora=None, losses=list(losses),
                           linear_patch=LinearPatchConfig(batches=4), **healing)
    return HealingModule(healing=config, speechllm=tiny_speechllm(seed=0, layers=6),
                         optim=OptimConfig(lr=1e-3, warmup_steps=0, schedule="constant"),
                         decoding=DecodingConfig(max_new_tokens=4, generate_in_validation=False))


def test_healing_fits_the_patch_before_step_one_checkpoints_it_and_reloads(tmp_path):
    module = _patch_module()
    expected = fit_linear_patch(tiny_speechllm(seed=0, layers=6).eval(), [2, 3], BATCHES, LinearPatchConfig(batches=4),
                                progress=False)
    t = trainer(tmp_path, max_steps=1, limit_val_batches=0)
    t.fit(module, train_dataloaders=DataLoader(BATCHES, batch_size=None))
    torch.testing.assert_close(module.linear_patch[2], expected.patches[2], rtol=0, atol=0)
    path = tmp_path / "patched.ckpt"
    t.save_checkpoint(path)
    reloaded = HealingModule.load_from_checkpoint(path, speechllm=tiny_speechllm(seed=0, layers=6)).eval()
    batch = make_batch(seed=9)
    with torch.no_grad():
        torch.testing.assert_close(reloaded.speechllm(batch)[1].logits, module.eval().speechllm(batch)[1].logits,
                                   rtol=0, atol=0)
    # The export is a stock decoder whose layer 1 carries the patch: the same logits from the same embeddings.
    from lightning_speechllm.model.export import save_pruned_decoder

    inputs = reloaded.speechllm.build_inputs(batch)
    out = save_pruned_decoder(reloaded.speechllm.llm, tmp_path / "decoder")
    stock = AutoModelForCausalLM.from_pretrained(
        out, attn_implementation=reloaded.speechllm.llm.config._attn_implementation).eval()
    assert stock.config.num_hidden_layers == 4
    with torch.no_grad():
        theirs = stock(inputs_embeds=inputs.inputs_embeds, attention_mask=inputs.attention_mask,
                       position_ids=inputs.position_ids).logits
        ours = reloaded.speechllm.run_decoder(inputs).logits
    real = inputs.attention_mask.bool()
    torch.testing.assert_close(theirs[real], ours[real], rtol=0, atol=1e-5)


def test_healing_refuses_a_patch_with_a_teacher_loss_or_a_replacement():
    with pytest.raises(PlanMismatchError, match="teacher shares"):
        _patch_module(losses=[LossSpec("TaskCrossEntropy"), LossSpec("KLDivergence")])
    with pytest.raises(PlanMismatchError, match="choose one"):
        _patch_module(replacement={"kind": "ffn"})


class FailingSecondPass:
    """Calibration batches whose second pass (the second block's) fails."""

    def __init__(self) -> None:
        self.passes = 0

    def __iter__(self):
        self.passes += 1
        if self.passes == 2:
            raise RuntimeError("calibration batch failed")
        return iter(BATCHES)

    def __len__(self) -> int:
        return len(BATCHES)


def test_a_failed_block_leaves_the_model_as_it_was():
    speechllm = tiny_speechllm(seed=1, layers=8).eval()
    layers = get_layer_mask_state(speechllm.layer_mask.model).layer_list
    before = [layer.mlp.down_proj.weight.clone() for layer in layers]
    with pytest.raises(RuntimeError, match="calibration batch failed"):
        fit_linear_patch(speechllm, [2, 5, 6], FailingSecondPass(), progress=False)
    assert speechllm.layer_mask.removed_layers == ()
    assert all(torch.equal(layer.mlp.down_proj.weight, weight) for layer, weight in zip(layers, before))
