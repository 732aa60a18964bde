"""GPU check (issue 10, item 9): one call on a lent GPU machine runs the whole training path at scale and prints
the numbers a closing note needs.

A random-weight SpeechLLM at real size, built from configs (no download): a Whisper large-v3-shaped speech encoder
(d_model 1280, 32 layers, 20 heads, ffn 5120, 128 mel bins, 1500 positions; its decoder, never read, cut to one
layer) and a Qwen2.5-1.5B-shaped decoder (hidden 1536, 28 layers, 12 heads, 2 KV heads, ffn 8960, vocabulary
151,936, tied embeddings), saved with ``save_pretrained`` into a work directory and loaded by path as users load
theirs; a byte-level BPE tokenizer trained on the project's sentence generator (about 1k tokens, far fewer than the
decoder's 152k-row embedding table and LM head: fine for speed and memory, which the table sizes set); synthetic
WAVs (noise + a tone) in JSONL manifests read by the real ``SpeechDataModule``. Everything runs in ``bf16-mixed``
with the frozen decoder and encoder in bfloat16.

Phases (each timed, guarded: a failing phase records its error and the others still run; a phase that would start
after ``--budget_s`` seconds is skipped; on CUDA the peak memory is ``torch.cuda.max_memory_allocated``, reset at
every phase start; on the CPU it is the process's peak RSS, VmHWM, reset the same way, or null where the kernel
refuses the reset):

  environment  versions, the GPU, a bf16 8192^3 matmul's TFLOP/s (what this card reaches at best)
  assets       tokenizer, random decoder and encoder saved to disk, train/val manifests of WAVs
  fit          ``SpeechLLMModule`` + ``SpeechDataModule`` through ``Trainer.fit`` (frozen encoder and decoder, the
               projector trains): tokens/s, MFU, peak memory
  validate     ``Trainer.validate`` with generation (greedy, a few utterances): loss, WER, seconds
  checkpoint   ``trainer.save_checkpoint`` then ``lightning_speechllm.checkpoints.load_module``: the trainable
               weights equal, the same loss on one batch
  heal         ``HealingModule`` on the reloaded model with a pruning plan removing 25% of the layers (a block ending
               before the last layer), LoRA on the receiving layer, losses TaskCrossEntropy + KLDivergence (the
               shared-weight teacher): tokens/s, MFU, peak memory
  heal_memory  ``scripts/bench/healing.py``'s worker, in this process: peak memory of a healing step (text-only
               batches) student-only (TaskCrossEntropy: no teacher) vs shared teacher (+ KL) vs a teacher copy
  fsdp         ``fit`` under ``lightning_speechllm.model.sharding.FSDP2Strategy`` at world size 1 (nccl on the GPU,
               gloo on the CPU), then its single-file checkpoint read back
  released     a released SpeechLLM (issue 21) at full size, built in memory: Qwen2-Audio-7B's shapes (a Whisper
               large-v3-shaped tower, a Qwen2-7B decoder of 32 layers), random bfloat16 weights, through
               ``model.released.parts_from_model``: the speech-input map over two batches, one healing step
               (LoRA on the receiving layer + projector, CE) with its peak memory, and the pruned, merged model
               written in its own class by ``save_released`` (seconds, GiB; then deleted)

Throughput is measured between successive step starts (data loading, forward, backward, optimizer; the first
``warmup`` steps left out). tokens = the LLM's input tokens without padding (speech + prompt + target). MFU is
reported two ways, both against ``--peak_tflops`` (H100 SXM dense bf16: 989):

  mfu_6n      model FLOPs per step = 6 * N_dec * tokens [+ 2 * N_full * tokens: the teacher's forward, when healing
              with KD] + 2 * N_enc * frames + 4 * L_enc * d_enc * sum(window_frames^2)
              N_dec = parameters of the active decoder layers + the LM head (the input embedding is a lookup) + the
              trainable ones (projector, LoRA); N_full the same with every layer; N_enc = the Whisper encoder's
              weights (forward only: frozen, no gradient reaches it) over every frame of its 30 s window (1500 per
              utterance), and the last term its attention. 6N counts a full backward (4N: input and weight gradients)
              even for frozen weights, whose backward computes input gradients only (2N), so mfu_6n is the
              conventional, optimistic figure.
  mfu_counted the FLOPs torch's FlopCounterMode counts in one training step (forward + backward as executed: matmuls,
              convolutions, attention), per token, times the measured tokens/s.

How a lent device runs it (no network there; only the git working tree travels, 64 MiB; its image has torch,
torchaudio, lightning, transformers, peft, torchmetrics, sacrebleu, tokenizers and safetensors, so the rest of this
project's dependencies travel as ~10 MB of wheels). Here, once, from the repo root::

    echo /.whl/ >> .git/info/exclude
    .venv/bin/python scripts/gpu_check.py --download_wheels .whl

then the device call, with ``carry: [".whl"]`` and ``timeout_s: 560`` (expected to take 3 to 5 minutes, not yet
measured on a GPU; phases that would start after 450 s are skipped)::

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl &&
        PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 python3 scripts/gpu_check.py

The JSON lands in ``$OUT/gpu_check.json`` (it comes back with the call; written after every phase, so a cut-off run
still returns what it measured) and on stdout, followed by a short summary. Where the machine has network,
``pip install -e . && python scripts/gpu_check.py`` does the same. On this machine::

    .venv/bin/python scripts/gpu_check.py --tiny --device cpu     # the smoke test (tests/test_gpu_check.py)
"""
from __future__ import annotations

from .context import (
    Context,
    datamodule,
    decoding_config,
    model_config,
    optim_config,
    trainable_params,
    trainer,
)
from .helpers import PeakMemory, autocast, bench, finite_float, free, gib, sync
from .main import build_parser, json_path, main, write_json
from .options import CHATML, FULL, H100_BF16_DENSE_TFLOPS, REPO, SAMPLE_RATE, TINY, Options, Sizes
from .phases import (
    PHASES,
    phase_assets,
    phase_checkpoint,
    phase_environment,
    phase_fit,
    phase_fsdp,
    phase_heal,
    phase_heal_memory,
    phase_validate,
)
from .phases.assets import train_tokenizer, write_manifest
from .runner import run_phases
from .summary import summary_lines
from .timing import Counts, add_counted_mfu, counted_flops, make_step_timer, model_flops, throughput
from .wheels import DEVICE_WHEELS, REQUIRED_MODULES, WHEEL_PLATFORMS, download_wheels, missing_modules

__all__ = [
    "CHATML", "DEVICE_WHEELS", "FULL", "H100_BF16_DENSE_TFLOPS", "PHASES", "REPO", "REQUIRED_MODULES", "SAMPLE_RATE",
    "TINY", "WHEEL_PLATFORMS", "Context", "Counts", "Options", "PeakMemory", "Sizes", "add_counted_mfu", "autocast",
    "bench", "build_parser", "counted_flops", "datamodule", "decoding_config", "download_wheels", "finite_float",
    "free", "gib", "json_path", "main", "make_step_timer", "missing_modules", "model_config", "model_flops",
    "optim_config", "phase_assets", "phase_checkpoint", "phase_environment", "phase_fit", "phase_fsdp", "phase_heal",
    "phase_heal_memory", "phase_validate", "run_phases", "summary_lines", "sync", "throughput", "trainable_params",
    "trainer", "train_tokenizer", "write_json", "write_manifest",
]
