"""Recipe probe for the embedded default (issue 11): train the projector of Whisper tiny.en + SmolLM2-135M outside
Lightning on cached encoder outputs, and print dev WER against training minutes, so that recipes (LR, prompt, batch,
bf16, a text-teacher KL term) can be compared two at a time on 2 cores (``--threads 1`` each).

    python scripts/probe_recipe.py --minutes 10 --threads 1 --lr 3e-3 --out probe_b.json

The encoded corpus is kept in ``--feature_cache`` between probes. The framework's own cache is ``data.encoder_cache``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import time

import numpy as np
import soundfile as sf
import torch

from lightning_speechllm.data.batch import SpeechBatch
from lightning_speechllm.evaluation.metrics import WordErrorCounts
from lightning_speechllm.model.projector import ProjectorConfig
from lightning_speechllm.model.prompts import PromptConfig
from lightning_speechllm.model.speechllm import SpeechLLM, SpeechLLMConfig, target_window, target_cross_entropy

p = argparse.ArgumentParser()
p.add_argument("--lr", type=float, default=1e-3)
p.add_argument("--batch", type=int, default=12)
p.add_argument("--minutes", type=float, default=10)
p.add_argument("--threads", type=int, default=1)
p.add_argument("--system", default=None)
p.add_argument("--instr", default="Transcribe the audio.")
p.add_argument("--down", type=int, default=5)
p.add_argument("--hidden", type=int, default=1024)
p.add_argument("--kd", type=float, default=0.0)
p.add_argument("--eval_every", type=float, default=2.0, help="minutes")
p.add_argument("--n_dev", type=int, default=50)
p.add_argument("--fp32", action="store_true")
p.add_argument("--warmup", type=int, default=20)
p.add_argument("--est_steps", type=int, default=800)
p.add_argument("--sched", default="const")
p.add_argument("--out", default="probe.json")
p.add_argument("--feature_cache", default="data_cache/probe_features.pt")
args = p.parse_args()
torch.set_num_threads(args.threads)
torch.manual_seed(0)
random.seed(0)

cfg = SpeechLLMConfig(encoder_window_seconds=6.0, projector=ProjectorConfig(downsample=args.down, hidden_dim=args.hidden),
                      prompt=PromptConfig(asr_instruction=args.instr, system_prompt=args.system))
m = SpeechLLM.from_config(cfg)
print("prompt pieces", [len(x) for x in (m.prompts.pieces("asr", None).prefix, m.prompts.pieces("asr", None).suffix)])


def load(path, n=None):
    rows = [json.loads(line) for line in open(path)]
    return rows[:n] if n else rows


def encode_all(rows, root="data_cache/synth/"):
    t0 = time.time()
    out = []
    with torch.no_grad():
        for i in range(0, len(rows), 16):
            chunk = rows[i:i + 16]
            wavs = [sf.read(root + r["audio"], dtype="float32")[0] for r in chunk]
            lens = torch.tensor([len(w) for w in wavs])
            audio = torch.zeros(len(wavs), int(lens.max()))
            for j, w in enumerate(wavs):
                audio[j, :len(w)] = torch.from_numpy(w)
            frames, flens = m.encoder(audio, lens)
            for j in range(len(chunk)):
                out.append(frames[j, :flens[j]].clone())
    return out, time.time() - t0


train = load("data_cache/synth/train.jsonl")
dev = load("data_cache/synth/dev.jsonl", args.n_dev)
if os.path.exists(args.feature_cache):
    train_f, dev_f, t_enc = torch.load(args.feature_cache, weights_only=True)
    dev_f = dev_f[:len(dev)]
else:
    train_f, t_enc = encode_all(train)
    dev_f, _ = encode_all(load("data_cache/synth/dev.jsonl"))
    torch.save((train_f, dev_f, t_enc), args.feature_cache)
    dev_f = dev_f[:len(dev)]
print(f"encoded {len(train)} train utts in {t_enc:.1f}s")


def make_batch(rows, frames):
    lens = torch.tensor([f.shape[0] for f in frames])
    x = torch.zeros(len(frames), int(lens.max()), frames[0].shape[1])
    for j, f in enumerate(frames):
        x[j, :f.shape[0]] = f
    m._cached = (x, lens)
    return SpeechBatch(ids=[r["id"] for r in rows], audio=torch.zeros(len(rows), 1), audio_lens=torch.ones(len(rows), dtype=torch.long),
                       texts=[r["text"] for r in rows], tasks=["asr"] * len(rows), transcripts=[r["text"] for r in rows])


m.encode_speech = lambda audio, lens: m.projector(*m._cached)
params = [q for q in m.parameters() if q.requires_grad]
opt = torch.optim.AdamW(params, lr=args.lr)


def lr_at(step):
    if step < args.warmup:
        return (step + 1) / args.warmup
    if args.sched == "const":
        return 1.0
    prog = min(1.0, (step - args.warmup) / max(1, args.est_steps - args.warmup))
    return 0.5 * (1 + math.cos(math.pi * prog)) if args.sched == "cos" else 1 - prog


ctx = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if not args.fp32 else (lambda: torch.autocast("cpu", enabled=False))


def evaluate():
    m.eval()
    metric = WordErrorCounts()
    t0 = time.time()
    hyps = []
    with torch.no_grad(), ctx():
        for i in range(0, len(dev), 16):
            b = make_batch(dev[i:i + 16], dev_f[i:i + 16])
            h = m.generate(b, max_new_tokens=40)
            metric.update(h, b.texts)
            hyps += h
    m.train()
    r = metric.compute()
    return float(r["wer"]) * 100, time.time() - t0, hyps[:3]


log = []
order = list(range(len(train)))
start = time.time()
step = 0
t_train = 0.0
t_eval_total = 0.0
next_eval = args.eval_every * 60
losses = []
m.train()
while True:
    random.shuffle(order)
    for i in range(0, len(order) - args.batch + 1, args.batch):
        idx = order[i:i + args.batch]
        t0 = time.time()
        for g in opt.param_groups:
            g["lr"] = args.lr * lr_at(step)
        b = make_batch([train[k] for k in idx], [train_f[k] for k in idx])
        with ctx():
            loss, out, inputs = m(b)
            if args.kd > 0:
                with torch.no_grad():
                    tb = b.as_text_only()
                    ti = m.build_inputs(tb)
                    w = target_window(inputs.labels)
                    tout = m.llm(inputs_embeds=ti.inputs_embeds, attention_mask=ti.attention_mask, position_ids=ti.position_ids,
                                 use_cache=False, logits_to_keep=w)
                lab = inputs.labels[:, -w:][:, 1:] != -100
                s = out.logits[:, :-1][lab].float().log_softmax(-1)
                t = tout.logits[:, :-1][lab].float().log_softmax(-1)
                kl = torch.nn.functional.kl_div(s, t, log_target=True, reduction="batchmean")
                loss = loss + args.kd * kl
        loss.backward()
        opt.step()
        opt.zero_grad()
        step += 1
        t_train += time.time() - t0
        losses.append(float(loss.detach()))
        elapsed = time.time() - start - t_eval_total
        if step % 25 == 0:
            print(f"step {step} loss {np.mean(losses[-25:]):.3f} {t_train / step:.2f}s/step train_min {elapsed / 60:.1f}", flush=True)
        if elapsed >= next_eval or elapsed >= args.minutes * 60:
            wer, te, ex = evaluate()
            t_eval_total += te
            log.append({"step": step, "train_min": elapsed / 60, "wer": wer, "loss": float(np.mean(losses[-25:])), "eval_s": te})
            print(json.dumps(log[-1]), ex, flush=True)
            json.dump({"args": vars(args), "log": log, "enc_s": t_enc}, open(args.out, "w"), indent=1)
            next_eval += args.eval_every * 60
            if elapsed >= args.minutes * 60:
                raise SystemExit(0)
