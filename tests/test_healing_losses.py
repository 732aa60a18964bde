"""Healing losses against hand-computed float64 references (temperature, masking, layer maps), and loss loading."""
from __future__ import annotations

import math

import pytest
import torch

from lightning_speechllm.healing.losses import (
    HealingInputs,
    HiddenStateCosine,
    HiddenStateMSE,
    KLDivergence,
    LossSpec,
    TaskCrossEntropy,
    build_losses,
    layer_map_for,
    load_loss,
    prediction_mask,
)
from tests.healing_custom_loss import LogitL2

B, T, V, D = 2, 6, 7, 5
TOL = dict(atol=1e-6, rtol=0.0)


def make_inputs(seed: int = 0) -> HealingInputs:
    """Left-padded rows: row 0 = 2 pad + 2 prompt + 2 target tokens, row 1 = 2 prompt + 4 target tokens."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.full((B, T), -100)
    labels[0, 4:] = torch.tensor([3, 5])
    labels[1, 2:] = torch.tensor([1, 6, 2, 4])
    attention = torch.ones(B, T, dtype=torch.long)
    attention[0, :2] = 0
    student_hidden = [torch.randn(B, T, D, generator=gen, dtype=torch.float64) for _ in range(3)]
    teacher_hidden = [torch.randn(B, T, D, generator=gen, dtype=torch.float64) for _ in range(5)]
    return HealingInputs(
        student_logits=torch.randn(B, T, V, generator=gen, dtype=torch.float64),
        teacher_logits=3 * torch.randn(B, T, V, generator=gen, dtype=torch.float64),
        labels=labels, target_mask=prediction_mask(labels), attention_mask=attention,
        student_hidden=student_hidden, teacher_hidden=teacher_hidden, layer_map=layer_map_for([0, 3]),
    )


def target_positions(inputs: HealingInputs) -> list[tuple[int, int]]:
    """(row, t) whose logits predict a target, computed directly from the labels."""
    return [(b, t) for b in range(B) for t in range(T - 1) if inputs.labels[b, t + 1] != -100]


def softmax(values: list[float], temperature: float = 1.0) -> list[float]:
    exps = [math.exp(v / temperature) for v in values]
    return [e / sum(exps) for e in exps]


def kl(p: list[float], q: list[float]) -> float:
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))


def test_prediction_mask_and_layer_map():
    inputs = make_inputs()
    expected = torch.zeros(B, T, dtype=torch.bool)
    expected[0, 3:5] = True
    expected[1, 1:5] = True
    assert torch.equal(inputs.target_mask, expected)
    assert target_positions(inputs) == [tuple(x) for x in expected.nonzero().tolist()]
    assert layer_map_for([0, 3]) == {0: 0, 1: 1, 2: 4}
    assert layer_map_for([2, 3, 5]) == {0: 0, 1: 3, 2: 4, 3: 6}
    with pytest.raises(ValueError, match="sorted"):
        layer_map_for([3, 1])


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_task_cross_entropy_matches_hand_computation(smoothing):
    """Label smoothing ε: (1 - ε) of the target's -log p plus ε times the mean -log p over the V tokens."""
    inputs = make_inputs()
    terms = []
    for b, t in target_positions(inputs):
        probs = softmax(inputs.student_logits[b, t].tolist())
        nll = -math.log(probs[int(inputs.labels[b, t + 1])])
        terms.append((1 - smoothing) * nll + smoothing * sum(-math.log(p) for p in probs) / V)
    loss, extras = TaskCrossEntropy(label_smoothing=smoothing)(inputs)
    assert extras == {}
    torch.testing.assert_close(loss, torch.tensor(sum(terms) / len(terms), dtype=torch.float64), **TOL)


def test_label_smoothing_on_a_two_token_vocabulary():
    """Logits (0, ln 3): p = (1/4, 3/4), target token 1. Unsmoothed -ln(3/4) = 0.2877; with ε = 0.2:
    0.8 · -ln(3/4) + 0.2 · ½ (-ln(1/4) - ln(3/4)) = 0.2301 + 0.1674 = 0.3975."""
    labels = torch.tensor([[-100, 1]])
    logits = torch.tensor([[[0.0, math.log(3.0)], [0.0, 0.0]]], dtype=torch.float64)
    inputs = HealingInputs(student_logits=logits, labels=labels, target_mask=prediction_mask(labels),
                           attention_mask=torch.ones(1, 2, dtype=torch.long))
    plain = TaskCrossEntropy()(inputs)[0].item()
    smoothed = TaskCrossEntropy(label_smoothing=0.2)(inputs)[0].item()
    assert plain == pytest.approx(-math.log(0.75), abs=1e-12)
    assert smoothed == pytest.approx(0.8 * -math.log(0.75) + 0.1 * (-math.log(0.25) - math.log(0.75)), abs=1e-12)
    assert smoothed == pytest.approx(0.397544, abs=1e-6)


@pytest.mark.parametrize("direction", ["forward", "reverse", "symmetric", "skew"])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_kl_divergence_matches_hand_computation(direction, temperature):
    inputs = make_inputs(1)
    alpha = 0.3
    terms = []
    for b, t in target_positions(inputs):
        p = softmax(inputs.teacher_logits[b, t].tolist(), temperature)
        q = softmax(inputs.student_logits[b, t].tolist(), temperature)
        if direction == "forward":
            terms.append(kl(p, q))
        elif direction == "reverse":
            terms.append(kl(q, p))
        elif direction == "symmetric":
            m = [(pi + qi) / 2 for pi, qi in zip(p, q)]
            terms.append(0.5 * kl(p, m) + 0.5 * kl(q, m))
        else:
            terms.append(kl(p, [alpha * pi + (1 - alpha) * qi for pi, qi in zip(p, q)]))
    expected = temperature ** 2 * sum(terms) / len(terms)
    loss, _ = KLDivergence(direction, temperature=temperature, skew_alpha=alpha)(inputs)
    torch.testing.assert_close(loss, torch.tensor(expected, dtype=torch.float64), **TOL)


def test_kl_ignores_non_target_positions_and_needs_a_teacher():
    inputs = make_inputs(2)
    loss, _ = KLDivergence()(inputs)
    outside = ~inputs.target_mask
    inputs.student_logits[outside] = 1e3 * torch.randn(int(outside.sum()), V, dtype=torch.float64)
    torch.testing.assert_close(KLDivergence()(inputs)[0], loss, **TOL)
    inputs.teacher_logits = None
    with pytest.raises(ValueError, match="KLDivergence needs teacher logits"):
        KLDivergence()(inputs)
    with pytest.raises(ValueError, match="direction"):
        KLDivergence("sideways")


@pytest.mark.parametrize("tokens", ["target", "all"])
def test_hidden_state_losses_match_hand_computation(tokens):
    inputs = make_inputs(3)
    if tokens == "target":
        positions = target_positions(inputs)
    else:
        positions = [(b, t) for b in range(B) for t in range(T) if inputs.attention_mask[b, t]]
    pairs = [(1, 1), (2, 4)]  # student x^1 (after layer 0) -> teacher x^1, x^2 (after layer 3) -> teacher x^4
    mse, cos = {}, {}
    for s, t_state in pairs:
        sq, cs = [], []
        for b, t in positions:
            x, y = inputs.student_hidden[s][b, t].tolist(), inputs.teacher_hidden[t_state][b, t].tolist()
            sq.append(sum((xi - yi) ** 2 for xi, yi in zip(x, y)) / D)
            dot = sum(xi * yi for xi, yi in zip(x, y))
            cs.append(1 - dot / (math.sqrt(sum(v * v for v in x)) * math.sqrt(sum(v * v for v in y))))
        mse[s], cos[s] = sum(sq) / len(sq), sum(cs) / len(cs)
    for cls, ref in ((HiddenStateMSE, mse), (HiddenStateCosine, cos)):
        loss, extras = cls(tokens=tokens)(inputs)
        torch.testing.assert_close(loss, torch.tensor((ref[1] + ref[2]) / 2, dtype=torch.float64), **TOL)
        torch.testing.assert_close(extras["state2"], torch.tensor(ref[2], dtype=torch.float64), **TOL)
        last_only, _ = cls(states=[-1], tokens=tokens)(inputs)
        torch.testing.assert_close(last_only, torch.tensor(ref[2], dtype=torch.float64), **TOL)


def test_hidden_state_loss_names_an_unmapped_state():
    with pytest.raises(ValueError, match="student state 7 is not in the layer map"):
        HiddenStateMSE(states=[7])(make_inputs())


def test_weighted_sum_names_parts_and_loads_a_user_loss():
    inputs = make_inputs(4)
    combined = build_losses([
        LossSpec("TaskCrossEntropy"),
        {"class_path": "KLDivergence", "init_args": {"temperature": 2.0}, "weight": 0.5},
        LossSpec("tests.healing_custom_loss.LogitL2", {"scale": 0.1}, weight=2.0),
        LossSpec("KLDivergence", {"direction": "reverse"}, weight=0.25),
    ])
    assert list(combined.parts) == ["task_cross_entropy", "kl_divergence", "logit_l2", "kl_divergence_2"]
    assert combined.needs_teacher and not combined.needs_hidden_states
    total, parts = combined(inputs)
    expected = (TaskCrossEntropy()(inputs)[0] + 0.5 * KLDivergence(temperature=2.0)(inputs)[0]
                + 2.0 * LogitL2(0.1)(inputs)[0] + 0.25 * KLDivergence("reverse")(inputs)[0])
    torch.testing.assert_close(total, expected, **TOL)
    torch.testing.assert_close(parts["logit_l2"], LogitL2(0.1)(inputs)[0], **TOL)
    assert isinstance(load_loss("tests.healing_custom_loss.LogitL2"), LogitL2)


def test_load_loss_errors_name_the_class_path():
    with pytest.raises(ImportError, match="'no_such_pkg.Loss' does not import"):
        load_loss("no_such_pkg.Loss")
    with pytest.raises(ImportError, match="'NoSuchLoss' does not import"):
        load_loss("NoSuchLoss")
    with pytest.raises(TypeError, match="'tests.healing_custom_loss.NotALoss' .* not a subclass of HealingLoss"):
        load_loss("tests.healing_custom_loss.NotALoss")
    with pytest.raises(TypeError, match="cannot build 'KLDivergence'"):
        load_loss("KLDivergence", {"tmp": 2})
    with pytest.raises(KeyError, match=r"losses\[1\]"):
        build_losses([LossSpec(), {"class_path": "KLDivergence", "wieght": 1.0}])


def test_kl_is_finite_when_the_teacher_rules_tokens_out():
    """-inf teacher logits (a masked vocabulary) give 0 · log 0 = 0, not NaN: the KL is the hand-computed sum over
    the tokens the teacher allows."""
    gen = torch.Generator().manual_seed(5)
    student = torch.randn(1, 3, 5, generator=gen, dtype=torch.float64)
    teacher = torch.randn(1, 3, 5, generator=gen, dtype=torch.float64)
    teacher[..., 0] = float("-inf")
    labels = torch.tensor([[-100, 1, 2]])
    inputs = HealingInputs(student_logits=student, teacher_logits=teacher, labels=labels,
                           target_mask=prediction_mask(labels), attention_mask=torch.ones(1, 3, dtype=torch.long))
    terms = []
    for t in (0, 1):  # the positions that predict labels 1 and 2
        p = [0.0] + softmax(teacher[0, t, 1:].tolist())  # token 0 has probability 0 under the teacher
        q = softmax(student[0, t].tolist())
        terms.append(sum(pi * math.log(pi / qi) for pi, qi in zip(p, q) if pi > 0))
    loss, _ = KLDivergence(direction="forward")(inputs)
    assert torch.isfinite(loss) and loss.item() > 0
    torch.testing.assert_close(loss, torch.tensor(sum(terms) / 2, dtype=torch.float64), **TOL)
    # the same in float32 (the healing dtype): 0 · log 0 must not become NaN there either
    inputs.student_logits, inputs.teacher_logits = student.float(), teacher.float()
    loss32, _ = KLDivergence(direction="forward")(inputs)
    assert loss32.item() == pytest.approx(sum(terms) / 2, abs=1e-5)


# ------------------------------------------------------------------------------------------ text-teacher distillation
def _text_teacher_module(response: str, extra=()):
    from lightning_speechllm.healing.module import HealingConfig, HealingModule
    from lightning_speechllm.model.module import DecodingConfig, OptimConfig
    from tests.tiny_speechllm import tiny_speechllm

    losses = [LossSpec("TextTeacherKL", {"response": response, "max_response_tokens": 6}), *extra]
    return HealingModule(healing=HealingConfig(removed_layers=[1, 2], lora=None, losses=losses),
                         speechllm=tiny_speechllm(seed=0),
                         optim=OptimConfig(lr=1e-2, warmup_steps=0, schedule="constant"),
                         decoding=DecodingConfig(max_new_tokens=4, generate_in_validation=False))


def test_text_teacher_reads_the_transcript_as_text_at_the_students_response_positions():
    from dataclasses import replace as swap

    from tests.test_speechllm import make_batch
    from tests.tiny_speechllm import tiny_speechllm

    module = _text_teacher_module("target").eval()
    batch = make_batch()
    with torch.no_grad():
        inputs = module.healing_inputs(batch)
        unpruned = tiny_speechllm(seed=0).eval()
        text = unpruned.build_inputs(batch.as_text_only())
        reference = unpruned.llm(inputs_embeds=text.inputs_embeds, attention_mask=text.attention_mask,
                                 position_ids=text.position_ids).logits[:, -inputs.window:]
    torch.testing.assert_close(inputs.teacher_logits, reference, rtol=0, atol=1e-5)
    assert inputs.student_logits.shape == inputs.teacher_logits.shape
    # The response tokens are the batch's targets; another target moves the loss.
    loss = module.loss_fn(inputs)[0]
    with torch.no_grad():
        other = module.loss_fn(module.healing_inputs(swap(batch, texts=["hello world"] * len(batch))))[0]
    assert torch.isfinite(loss) and float(loss) != pytest.approx(float(other))


def test_label_free_text_teacher_ignores_the_targets_and_heals(tmp_path):
    from dataclasses import replace as swap

    from torch.utils.data import DataLoader

    from tests.test_module import trainer
    from tests.test_speechllm import make_batch
    from tests.tiny_speechllm import tiny_speechllm

    module = _text_teacher_module("teacher")
    batch = make_batch(seed=0)
    module.eval()
    with torch.no_grad():
        before = module.loss_fn(module.healing_inputs(batch))[0]
        garbage = module.loss_fn(module.healing_inputs(swap(batch, texts=["zz qq"] * len(batch))))[0]
        answers = tiny_speechllm(seed=0).eval().generate(batch.as_text_only(), max_new_tokens=6)
        labels = module.healing_inputs(batch).labels
    assert float(garbage) == float(before)  # the ground-truth response is never read
    expected = module.speechllm.build_inputs(swap(batch, texts=answers)).labels
    assert torch.equal(labels, expected[:, -labels.shape[1]:])  # teacher-forced on the teacher's own answers
    module.train()
    trainer(tmp_path, max_steps=15, limit_val_batches=0).fit(
        module, train_dataloaders=DataLoader([batch] * 15, batch_size=None))
    module.eval()
    with torch.no_grad():
        after = module.loss_fn(module.healing_inputs(batch))[0]
    assert float(after) < 0.8 * float(before), (before, after)  # 1.58 -> 0.99 when written


def test_a_text_teacher_does_not_mix_with_a_speech_teacher():
    with pytest.raises(ValueError, match="hears the transcript as text"):
        build_losses([LossSpec("TextTeacherKL"), LossSpec("KLDivergence")])
    with pytest.raises(ValueError, match="response must be one of"):
        build_losses([LossSpec("TextTeacherKL", {"response": "gold"})])
