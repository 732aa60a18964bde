"""CTC warm-up of the projector (OptimConfig.ctc_warmup_steps): the loss, the phase switch, the LR, the refusals."""
from __future__ import annotations

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from lightning_speechllm.model.module import DecodingConfig, OptimConfig, SpeechLLMModule, phased_lr_lambda
from tests.test_speechllm import make_batch
from tests.tiny_speechllm import tiny_speechllm


def reference_ctc(model, batch, rows: list[int]) -> torch.Tensor:
    """CTC recomputed by hand: projector output . embedding table, log-softmax, torch's ctc_loss, blank = pad."""
    frames, frame_lens = model.encoder(batch.audio, batch.audio_lens)
    speech, lens = model.projector(frames, frame_lens)
    table = model.llm.model.embed_tokens.weight
    tokens = [model.tokenizer(batch.transcripts[r], add_special_tokens=False).input_ids for r in rows]
    log_probs = torch.einsum("btd,vd->btv", speech[rows].double(), table.double()).log_softmax(-1)
    return torch.nn.functional.ctc_loss(log_probs.transpose(0, 1), torch.tensor(sum(tokens, [])), lens[rows],
                                        torch.tensor([len(t) for t in tokens]), blank=model.tokenizer.pad_token_id,
                                        zero_infinity=True)


def test_alignment_loss_is_ctc_of_the_transcript_against_the_embedding_table():
    model = tiny_speechllm()
    batch = make_batch()
    loss, positions = model.alignment_loss(batch)
    torch.testing.assert_close(loss.double(), reference_ctc(model, batch, [0, 1, 2]), rtol=1e-5, atol=0)
    assert positions == int(model.projector.output_lengths(model.encoder(batch.audio, batch.audio_lens)[1]).sum())
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.projector.parameters())
    assert model.llm.model.embed_tokens.weight.grad is None  # the decoder stays frozen


def test_utterances_ctc_cannot_align_are_left_out():
    """An AST row without a transcript has nothing to align; a row with more tokens than speech positions cannot."""
    model = tiny_speechllm()
    long_text = " ".join(["hello world this is a test of the speech model"] * 3)
    batch = make_batch(seconds=(1.0, 0.2, 1.0), texts=["the cat sat on the mat", long_text, "le chat"],
                       tasks=["asr", "asr", "ast"], tgt_langs=[None, None, "fr"])
    batch.transcripts[2] = None
    loss, _ = model.alignment_loss(batch)
    torch.testing.assert_close(loss.double(), reference_ctc(model, batch, [0]), rtol=1e-5, atol=0)


def trainer(tmp_path, **kwargs) -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                     enable_checkpointing=False, default_root_dir=tmp_path, limit_val_batches=0, **kwargs)


def test_warmup_steps_run_no_decoder_then_cross_entropy_starts_with_a_fresh_optimizer(tmp_path):
    model = SpeechLLMModule(optim=OptimConfig(lr=3e-3, warmup_steps=1, ctc_warmup_steps=3),
                            decoding=DecodingConfig(max_new_tokens=2), speechllm=tiny_speechllm())
    decoder_calls = []
    model.speechllm.llm.model.layers[0].register_forward_hook(
        lambda *_: decoder_calls.append(model.global_step))
    batches = [make_batch(seed=i) for i in range(5)]
    trainer(tmp_path, max_steps=5).fit(model, train_dataloaders=DataLoader(batches, batch_size=None))
    assert sorted(set(decoder_calls)) == [3, 4]  # the decoder ran in the cross-entropy steps only
    optimizer = model.trainer.optimizers[0]
    assert {int(state["step"]) for state in optimizer.state.values()} == {2}  # Adam's state restarted at step 3


def test_ctc_loss_falls_on_a_fixed_batch():
    model = tiny_speechllm()
    batch = make_batch()
    optimizer = torch.optim.AdamW(model.projector.parameters(), lr=1e-2)
    before = model.alignment_loss(batch)[0].item()
    for _ in range(30):
        loss, _ = model.alignment_loss(batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert model.alignment_loss(batch)[0].item() < 0.5 * before


def test_phased_lr_warms_up_twice_and_decays_over_the_cross_entropy_steps():
    cfg = OptimConfig(warmup_steps=2, ctc_warmup_steps=4, decay_fraction=0.5)
    multipliers = [phased_lr_lambda(step, cfg, 14) for step in range(15)]
    # CTC: warm-up, peak | cross-entropy: warm-up again, peak, then linear to 0 over the last half of 8 steps
    assert multipliers == [0.5, 1.0, 1.0, 1.0, 0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.75, 0.5, 0.25, 0.0]


def test_a_warmup_as_long_as_training_is_refused(tmp_path):
    model = SpeechLLMModule(optim=OptimConfig(ctc_warmup_steps=3), speechllm=tiny_speechllm())
    with pytest.raises(ValueError, match=r"optim.ctc_warmup_steps must be in \[0, 3\).*got 3"):
        trainer(tmp_path, max_steps=3).fit(model, train_dataloaders=DataLoader([make_batch()] * 3, batch_size=None))


def test_ctc_weight_adds_the_alignment_loss_to_the_cross_entropy_of_each_step():
    weight = 0.3
    model = SpeechLLMModule(optim=OptimConfig(ctc_weight=weight), speechllm=tiny_speechllm())
    batch = make_batch()
    expected = model.speechllm(batch)[0] + weight * model.speechllm.alignment_loss(batch)[0]
    model.log = lambda *args, **kwargs: None  # no trainer attached
    torch.testing.assert_close(model.training_step(batch, 0), expected)


def test_a_negative_ctc_weight_is_refused(tmp_path):
    model = SpeechLLMModule(optim=OptimConfig(ctc_weight=-0.1), speechllm=tiny_speechllm())
    with pytest.raises(ValueError, match=r"optim.ctc_weight must be >= 0, got -0.1"):
        trainer(tmp_path, max_steps=1).fit(model, train_dataloaders=DataLoader([make_batch()], batch_size=None))
