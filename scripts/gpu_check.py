"""GPU check for a session that is lent a device (issue 5): bf16 healing on a ~1B-parameter decoder.

The device has no network and only 64 MiB of files travel with the tree, so the decoder is random-initialised from a
Llama config (random weights are enough for speed and memory) and the tokenizer is a byte-level BPE trained on the
project's sentence generator. Then `scripts/bench/healing.py` runs on it and its JSON is printed: peak memory of the
shared teacher vs a teacher copy vs student-only, and Lightning vs plain PyTorch step time, in bf16 on the GPU.

    python scripts/gpu_check.py                       # on the GPU machine: ~1.2B decoder, bf16
    python scripts/gpu_check.py --tiny --device cpu   # smoke test of this script here
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lightning_speechllm.data.sentences import unique_sentences  # noqa: E402

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def build_decoder(out: Path, tiny: bool, dtype: torch.dtype) -> int:
    """Save a random Llama decoder and a BPE tokenizer to `out`; returns the layer count."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=4000, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(unique_sentences(3000, seed=0), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tokenizer.chat_template = CHATML
    tokenizer.save_pretrained(out)
    size = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4,
                num_key_value_heads=2) if tiny else \
        dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
             num_key_value_heads=8)
    config = LlamaConfig(vocab_size=32000, max_position_embeddings=2048, tie_word_embeddings=True, **size)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    print(f"decoder: {sum(p.numel() for p in model.parameters()) / 1e9:.2f} B parameters, {dtype}")
    model.save_pretrained(out)
    return config.num_hidden_layers


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="a 6-layer toy decoder (CPU smoke test)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch_size", type=int, default=8)
    args = parser.parse_args()
    dtype = "float32" if args.device == "cpu" else "bfloat16"
    with tempfile.TemporaryDirectory() as tmp:
        layers = build_decoder(Path(tmp), args.tiny, getattr(torch, dtype))
        removed = list(range(layers // 2, layers // 2 + max(1, layers // 4)))
        json_out = Path(tmp) / "healing.json"
        command = [sys.executable, str(REPO / "scripts/bench/healing.py"), "--llm_path", tmp, "--device", args.device,
                   "--dtype", dtype, "--steps", str(args.steps), "--warmup_steps", "2", "--batch_size",
                   str(args.batch_size), "--removed_layers", json.dumps(removed), "--json_out", str(json_out)]
        print("running:", " ".join(command), flush=True)
        subprocess.run(command, check=True)
        results = json.loads(json_out.read_text())
    print(json.dumps(results, indent=2)[:4000])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
