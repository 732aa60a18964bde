"""Memory of the scale-up settings (issue 10, item 6), old vs new side by side, every variant in a fresh subprocess:

(a) loading a SpeechLLM: `SpeechLLM.from_config` now against the loader before issue 10 (a randomly initialised
    fp32 Whisper encoder filled by copying, every tensor of the checkpoint opened, the decoder's included). The
    models are random-weight stand-ins written with ``save_pretrained`` to a temp dir: a Qwen2.5-0.5B-shaped decoder
    (494M parameters, 152k vocabulary, bf16 on disk as Qwen ships it, llm_dtype bfloat16) and whisper-medium-shaped
    ``WhisperForConditionalGeneration`` checkpoints (307M-parameter encoder + 457M-parameter decoder) in the three
    situations that occur: fp32 on disk (whisper-small/medium as published) loaded in fp32, fp16 on disk
    (whisper-large-v3 as published) kept in fp16 (``encoder_dtype``; the old loader then casts its fp32 copy), and
    fp16 on disk loaded in fp32. Rows: peak RSS while loading; the peak of anonymous (private, not file-backed)
    memory, sampled every 2 ms, which is what each DDP rank pays on its own (memory-mapped checkpoint pages are
    the node's shared page cache); and the peak after every weight has been read once, as ``.to("cuda")`` does.
(b) one healing step (student + teacher, CE + KL, forward + backward) at a 152k vocabulary with a speech prompt
    (~300 speech tokens, ~30 target tokens): logits at every position (the losses as they were) against logits on
    the target window (``logits_to_keep``). After a warm-up step, the measured step's peak is VmHWM once reset
    (``clear_refs``) on CPU, with glibc returning freed blocks (``MALLOC_MMAP_THRESHOLD_``), and
    ``torch.cuda.max_memory_allocated`` on CUDA. The step time is printed too, but on a shared CPU it is indicative
    only.

    python scripts/bench/memory.py --threads 2
    python scripts/bench/memory.py --parts [step] --device cuda --dtype bfloat16 --batch_size 8
"""
from __future__ import annotations

import gc
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
from jsonargparse import ActionConfigFile, ArgumentParser  # noqa: E402

from safetensors.torch import load_file  # noqa: E402
from torch import nn  # noqa: E402
from transformers import (  # noqa: E402
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    Qwen2Config,
    WhisperConfig,
    WhisperForConditionalGeneration,
)

from lightning_speechllm.assets import resolve  # noqa: E402
from lightning_speechllm.data.batch import SpeechBatch  # noqa: E402
from lightning_speechllm.healing.losses import (  # noqa: E402
    HealingInputs,
    KLDivergence,
    TaskCrossEntropy,
    WeightedHealingLoss,
    upcast,
)
from lightning_speechllm.healing.module import HealingConfig, HealingModule  # noqa: E402
from lightning_speechllm.model.encoders import WhisperSpeechEncoder  # noqa: E402
from lightning_speechllm.model.projector import ProjectorConfig  # noqa: E402
from lightning_speechllm.model.speechllm import (  # noqa: E402
    DTYPES,
    IGNORE_INDEX,
    LoraConfig,
    SpeechLLM,
    SpeechLLMConfig,
    target_window,
)

LOAD_VARIANTS = ("load_old", "load_new")
STEP_VARIANTS = ("step_full", "step_window")
TARGETS = [  # ~30 tokens each
    "the committee will meet again next week to discuss the budget for the coming year and the new rules for "
    "the old harbour",
    "she walked along the river at dawn listening to the birds and thinking about the long journey ahead of "
    "her and her brother",
    "a small village at the foot of the mountains grows apples pears and plums for the markets of the city "
    "every single autumn",
    "the engineers measured how much each layer of the network changed the hidden representation of speech "
    "in every test we ran",
]


@dataclass
class BenchArgs:
    """Options of the memory benchmark."""

    parts: list[str] = field(default_factory=lambda: ["load", "step"])
    """Which benchmarks: 'load' (a), 'step' (b)."""
    work_dir: str | None = None
    """Where the random-weight checkpoints of (a) are saved (reused when present); default: a temp dir, removed."""
    tokenizer_path: str = "smollm2-135m"
    """Asset name or directory of the tokenizer (the stand-in decoders are random; any tokenizer fits)."""
    vocab_size: int = 151_936
    """Decoder vocabulary (Qwen2.5's)."""
    batch_size: int = 4
    """(b) utterances per batch."""
    speech_seconds: float = 12.0
    """(b) audio per utterance: 25 speech tokens per second (Whisper frames / downsample 2)."""
    dtype: str = "float32"
    """(b) decoder weight dtype."""
    device: str = "cpu"
    """(b) cpu or cuda."""
    threads: int | None = None
    """torch CPU threads (default: torch's choice)."""
    json_out: str | None = None
    """Also write all numbers to this JSON file."""


# -------------------------------------------------------------------------------------------- memory probes
def vm_hwm_bytes() -> int:
    """Peak resident set (VmHWM) of this process."""
    with open("/proc/self/status") as status:
        return int(re.search(r"VmHWM:\s+(\d+) kB", status.read()).group(1)) * 1024


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where the kernel refuses."""
    try:
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")
        return True
    except OSError:
        return False


# -------------------------------------------------------------------------------------------- (a) loading
LOAD_SCENARIOS = {  # name -> (Whisper stand-in stored in, encoder_dtype)
    "fp32 disk -> fp32": ("float32", "float32"),
    "fp16 disk -> fp16": ("float16", "float16"),
    "fp16 disk -> fp32": ("float16", "float32"),
}


def save_stand_ins(root: Path, args: BenchArgs) -> dict[str, Path]:
    """A Qwen2.5-0.5B-shaped decoder (bf16) with a tokenizer; whisper-medium-shaped checkpoints in fp32 and fp16."""
    paths = {"llm": root / "qwen2.5-0.5b-shaped"}
    if not (paths["llm"] / "config.json").is_file():
        config = Qwen2Config(vocab_size=args.vocab_size, hidden_size=896, intermediate_size=4864,
                             num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                             max_position_embeddings=4096, tie_word_embeddings=True)
        save_random(AutoModelForCausalLM.from_config, config, torch.bfloat16, paths["llm"])
        AutoTokenizer.from_pretrained(resolve(args.tokenizer_path)).save_pretrained(paths["llm"])
    for stored in ("float32", "float16"):
        paths[stored] = root / f"whisper-medium-shaped-{stored}"
        if not (paths[stored] / "config.json").is_file():
            config = WhisperConfig(d_model=1024, encoder_layers=24, decoder_layers=24, encoder_attention_heads=16,
                                   decoder_attention_heads=16, encoder_ffn_dim=4096, decoder_ffn_dim=4096,
                                   num_mel_bins=80, vocab_size=51865)
            save_random(WhisperForConditionalGeneration, config, getattr(torch, stored), paths[stored])
    return paths


def save_random(build: Any, config: Any, dtype: torch.dtype, out: Path) -> None:
    """Random N(0, 0.02) weights without a slow init pass: built on meta, materialised, filled, saved."""
    with torch.device("meta"):
        model = build(config)
    model = model.to_empty(device="cpu").to(dtype)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.02, generator=generator)
    model.tie_weights()
    model.save_pretrained(out)


class AnonPeak:
    """Samples RssAnon (private memory) in a background thread; `.peak` is the largest value seen."""

    def __init__(self, interval_s: float = 0.002) -> None:
        self.interval_s, self.peak, self._stop = interval_s, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            with open("/proc/self/status") as status:
                self.peak = max(self.peak, int(re.search(r"RssAnon:\s+(\d+) kB", status.read()).group(1)) * 1024)
            time.sleep(self.interval_s)

    def __enter__(self) -> "AnonPeak":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()


def old_from_config(config: Any) -> Any:
    """`SpeechLLM.from_config` as it was before issue 10: a random fp32 Whisper encoder (init pass included), then
    every tensor of the checkpoint (decoder included) read with `load_file` and copied in."""
    llm = AutoModelForCausalLM.from_pretrained(config.llm_path, dtype=DTYPES[config.llm_dtype])
    tokenizer = AutoTokenizer.from_pretrained(config.llm_path)
    path = Path(config.encoder_path)
    encoder = WhisperSpeechEncoder(AutoConfig.from_pretrained(path))
    full: dict[str, torch.Tensor] = {}
    for file in sorted(path.glob("*.safetensors")):
        full.update(load_file(str(file)))
    for prefix in ("model.encoder.", "encoder."):
        state = {k[len(prefix):]: v for k, v in full.items() if k.startswith(prefix)}
        if state:
            break
    encoder.encoder.load_state_dict(state, strict=False)
    del full, state
    return SpeechLLM(llm, tokenizer, encoder, config)


def load_worker(args: BenchArgs, variant: str, paths: dict[str, str]) -> dict[str, Any]:
    """One load (old or new loader) in this fresh process."""
    config = SpeechLLMConfig(llm_path=paths["llm"], encoder_path=paths["whisper"], llm_dtype="bfloat16",
                             encoder_dtype=paths["encoder_dtype"])
    gc.collect()
    before = rss_bytes()
    started = time.perf_counter()
    with AnonPeak() as anon:
        model = old_from_config(config) if variant == "load_old" else SpeechLLM.from_config(config)
        seconds = time.perf_counter() - started
        gc.collect()
    loading_peak, loaded = vm_hwm_bytes(), rss_bytes()
    with torch.no_grad():  # read every weight once, as a move to the GPU does (the projector is random: left out)
        checksum = sum(float(p.double().sum()) for part in (model.llm, model.encoder) for p in part.parameters())
    return {"variant": variant, "before_bytes": before, "loading_peak_bytes": loading_peak, "loaded_bytes": loaded,
            "anon_peak_bytes": anon.peak, "touched_peak_bytes": vm_hwm_bytes(), "load_s": seconds,
            "checksum": checksum, "llm_params": sum(p.numel() for p in model.llm.parameters()),
            "encoder_params": sum(p.numel() for p in model.encoder.parameters()),
            "encoder_dtype": str(next(model.encoder.parameters()).dtype)}


# -------------------------------------------------------------------------------------------- (b) healing step
def step_module(args: BenchArgs, full_logits: bool) -> Any:
    """A HealingModule on a 152k-vocabulary Qwen2 decoder (4 layers, layer 2 pruned, LoRA r 16 on layer 3) with a
    small Whisper-shaped encoder; `full_logits` swaps in the losses as they were (logits at every position)."""
    torch.manual_seed(0)
    llm = AutoModelForCausalLM.from_config(Qwen2Config(
        vocab_size=args.vocab_size, hidden_size=512, intermediate_size=1024, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=False,
    ), dtype=DTYPES[args.dtype])
    encoder = WhisperSpeechEncoder(WhisperConfig(d_model=64, encoder_layers=2, encoder_attention_heads=2,
                                                 encoder_ffn_dim=128, num_mel_bins=80, max_source_positions=1500))
    config = SpeechLLMConfig(llm_path="<memory>", encoder_path="<memory>", llm_dtype=args.dtype,
                             encoder_window_seconds=args.speech_seconds,
                             projector=ProjectorConfig(downsample=2, hidden_dim=1024))
    tokenizer = AutoTokenizer.from_pretrained(resolve(args.tokenizer_path))
    speechllm = SpeechLLM(llm, tokenizer, encoder, config)
    healing = HealingConfig(removed_layers=[2], lora=LoraConfig(r=16, alpha=16, dropout=0.0),
                            losses=[{"class_path": "TaskCrossEntropy"},
                                    {"class_path": "KLDivergence", "init_args": {"temperature": 2.0}}])
    module = HealingModule(healing=healing, speechllm=speechllm).to(args.device).train()
    if full_logits:
        module.loss_fn = WeightedHealingLoss({"task_cross_entropy": FullLogitCrossEntropy(),
                                              "kl_divergence": FullLogitKL(temperature=2.0)},
                                             {"task_cross_entropy": 1.0, "kl_divergence": 1.0})
    return module


class FullLogitCrossEntropy(TaskCrossEntropy):
    """TaskCrossEntropy as it was: logits at every position, all of them upcast."""

    needs_full_logits = True

    def forward(self, inputs: HealingInputs) -> tuple[torch.Tensor, dict]:
        logits = upcast(inputs.student_logits[:, :-1])
        loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), inputs.labels[:, 1:].reshape(-1),
                                           ignore_index=IGNORE_INDEX, label_smoothing=self.label_smoothing)
        return loss, {}


class FullLogitKL(KLDivergence):
    """KLDivergence as it was: on logits at every position (it picked the target rows itself)."""

    needs_full_logits = True


def step_batch(args: BenchArgs) -> Any:
    samples = int(args.speech_seconds * 16_000)
    generator = torch.Generator().manual_seed(0)
    texts = [TARGETS[i % len(TARGETS)] for i in range(args.batch_size)]
    return SpeechBatch(ids=[f"u{i}" for i in range(len(texts))],
                       audio=0.1 * torch.randn(len(texts), samples, generator=generator),
                       audio_lens=torch.full((len(texts),), samples), texts=texts, tasks=["asr"] * len(texts),
                       transcripts=texts, tgt_langs=[None] * len(texts))


def step_worker(args: BenchArgs, variant: str) -> dict[str, Any]:
    """One measured healing step (after a warm-up step) in this fresh process."""
    module = step_module(args, full_logits=variant == "step_full")
    batch = step_batch(args).to(args.device)
    with torch.no_grad():
        inputs = module.speechllm.build_inputs(batch)
    length, window = inputs.labels.shape[1], target_window(inputs.labels)
    del inputs
    # A warm-up step first: the first backward pages in kernels and workspaces that belong to neither variant.
    module.healing_step(batch)[0].backward()
    module.zero_grad(set_to_none=True)
    gc.collect()
    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = rss_bytes()
        if not reset_peak_rss():
            raise RuntimeError("cannot reset the peak RSS (/proc/self/clear_refs); run on Linux >= 4.0")
    started = time.perf_counter()
    total, parts = module.healing_step(batch)
    total.backward()
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    peak = torch.cuda.max_memory_allocated() if cuda else vm_hwm_bytes()
    return {"variant": variant, "before_bytes": before, "peak_bytes": peak, "step_bytes": peak - before,
            "step_s": seconds, "loss": float(total.detach()), "parts": {k: float(v) for k, v in parts.items()},
            "sequence_length": length, "target_window": window}


# -------------------------------------------------------------------------------------------- driver
def run_variant(args: BenchArgs, variant: str, paths: dict[str, str] | None = None) -> dict[str, Any]:
    """`variant` in a fresh Python process (its peak memory is its own)."""
    command = [sys.executable, __file__, "--worker", variant, "--args_json", json.dumps(asdict(args)),
               "--paths_json", json.dumps(paths or {})]
    # glibc hands freed blocks of >= 64 KiB back to the kernel, so RSS follows what torch holds.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    done = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"variant {variant!r} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def report_load(results: dict[str, dict[str, Any]]) -> dict[str, float]:
    first = next(iter(results.values()))
    print(f"\n(a) loading a SpeechLLM: {first['llm_params'] / 1e6:.0f}M-param decoder (bf16 on disk, llm_dtype "
          f"bfloat16) + a whisper-medium-shaped checkpoint ({first['encoder_params'] / 1e6:.0f}M-param encoder); "
          "each load in a fresh process")
    rows = [("peak RSS while loading", "loading_peak_bytes"), ("peak anonymous memory", "anon_peak_bytes"),
            ("peak RSS, every weight read", "touched_peak_bytes")]
    ratios: dict[str, float] = {}
    for scenario in LOAD_SCENARIOS:
        old, new = results[f"load_old {scenario}"], results[f"load_new {scenario}"]
        print(f"\nWhisper {scenario} ({new['encoder_dtype']})\n{'':<32}{'old':>12}{'new':>12}{'new/old':>10}")
        for label, key in rows:
            ratio = ratios[f"{scenario}: {key}"] = new[key] / old[key]
            print(f"{label:<32}{_gib(old[key]):>12}{_gib(new[key]):>12}{ratio:>10.3f}")
        ratio = ratios[f"{scenario}: load_s"] = new["load_s"] / old["load_s"]
        print(f"{'load time':<32}{old['load_s']:>10.1f} s{new['load_s']:>10.1f} s{ratio:>10.3f}")
        same = old["checksum"] == new["checksum"]
        print(f"{'same weights':<32}{'yes' if same else 'NO':>12}  (sum of every decoder and encoder weight, "
              f"{new['checksum']:.9g})")
    return ratios


def report_step(full: dict[str, Any], window: dict[str, Any], args: BenchArgs) -> dict[str, float]:
    where = "torch.cuda.max_memory_allocated" if args.device.startswith("cuda") else "VmHWM after a reset"
    print(f"\n(b) one healing step (student + teacher, CE + KL, forward + backward), vocabulary {args.vocab_size}, "
          f"batch {args.batch_size} x {full['sequence_length']} positions ({full['target_window']} in the target "
          f"window), {args.device}/{args.dtype}; {where}")
    print(f"{'':<32}{'full logits':>14}{'window':>14}{'new/old':>10}")
    ratios = {"step_bytes": window["step_bytes"] / full["step_bytes"],
              "peak_bytes": window["peak_bytes"] / full["peak_bytes"],
              "step_s": window["step_s"] / full["step_s"]}
    print(f"{'step memory (peak - before)':<32}{_gib(full['step_bytes']):>14}{_gib(window['step_bytes']):>14}"
          f"{ratios['step_bytes']:>10.3f}")
    print(f"{'process peak':<32}{_gib(full['peak_bytes']):>14}{_gib(window['peak_bytes']):>14}"
          f"{ratios['peak_bytes']:>10.3f}")
    print(f"{'step time':<32}{full['step_s']:>12.2f} s{window['step_s']:>12.2f} s{ratios['step_s']:>10.3f}")
    print(f"{'loss':<32}{full['loss']:>14.6f}{window['loss']:>14.6f}  (|diff| "
          f"{abs(full['loss'] - window['loss']):.1e})")
    return ratios


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="scripts/bench/memory.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", action=ActionConfigFile)
    parser.add_class_arguments(BenchArgs, as_positional=False, nested_key=None)
    return parser


def worker_main(argv: list[str]) -> int:
    variant, args, paths = argv[1], BenchArgs(**json.loads(argv[3])), json.loads(argv[5])
    if args.threads:
        torch.set_num_threads(args.threads)
    result = load_worker(args, variant, paths) if variant in LOAD_VARIANTS else step_worker(args, variant)
    print(json.dumps(result))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        return worker_main(argv)
    namespace = build_parser().parse_args(argv)
    args = BenchArgs(**{k: v for k, v in vars(namespace).items() if k in BenchArgs.__dataclass_fields__})
    unknown = sorted(set(args.parts) - {"load", "step"})
    if unknown:
        print(f"error: --parts {unknown}: expected 'load' and/or 'step'", file=sys.stderr)
        return 2
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("error: --device cuda but CUDA is not available", file=sys.stderr)
        return 2
    results: dict[str, Any] = {}
    ratios: dict[str, float] = {}
    if "load" in args.parts:
        root = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="bench_memory_"))
        try:
            started = time.perf_counter()
            stand_ins = save_stand_ins(root, args)
            print(f"random-weight checkpoints in {root} ({time.perf_counter() - started:.0f} s)", flush=True)
            for scenario, (stored, encoder_dtype) in LOAD_SCENARIOS.items():
                paths = {"llm": str(stand_ins["llm"]), "whisper": str(stand_ins[stored]),
                         "encoder_dtype": encoder_dtype}
                for variant in LOAD_VARIANTS:
                    started = time.perf_counter()
                    results[f"{variant} {scenario}"] = run_variant(args, variant, paths)
                    print(f"ran {variant} {scenario:<20} in {time.perf_counter() - started:6.1f} s", flush=True)
        finally:
            if not args.work_dir:
                shutil.rmtree(root, ignore_errors=True)
        ratios.update({f"load {k}": v for k, v in report_load(results).items()})
    if "step" in args.parts:
        for variant in STEP_VARIANTS:
            started = time.perf_counter()
            results[variant] = run_variant(args, variant)
            print(f"ran {variant:<12} in {time.perf_counter() - started:6.1f} s", flush=True)
        ratios.update({f"healing_{k}": v
                       for k, v in report_step(results["step_full"], results["step_window"], args).items()})
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"args": asdict(args), "results": results, "ratios": ratios,
                                                   "cpu_count": os.cpu_count()}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
