"""Healing benchmark on SmolLM2-135M (issue 5): (a) peak memory of KD healing with the shared-weight teacher vs a
separate teacher copy vs student-only training (goal: shared <= +15% over student-only); (b) step time of the
Lightning healing step vs a plain PyTorch loop doing the same work (same model, batches, losses, optimizer;
goal: <= 10% overhead).

The model is the real SmolLM2-135M decoder (checkpoints/pretrained/smollm2-135m) in a text-only SpeechLLM (no
encoder: text-only batches read the transcript as text), with ``--removed_layers`` masked and LoRA (r 64) on the
receiving layer. Every variant runs in a fresh subprocess; memory is the peak RSS (``ru_maxrss``) on CPU and
``torch.cuda.max_memory_allocated`` on CUDA. Step times are the median interval between successive step starts
(data fetch, forward, backward, optimizer, logging), warm-up steps excluded. Every option is a YAML key.

    python scripts/bench/healing.py
    python scripts/bench/healing.py --device cuda --dtype bfloat16 --batch_size 8 --steps 20
    python scripts/bench/healing.py --json_out healing_bench.json
"""
from __future__ import annotations

import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
from jsonargparse import ActionConfigFile, ArgumentParser  # noqa: E402

MEMORY_VARIANTS = ("student", "shared", "copy")
TIMING_VARIANTS = ("plain", "lightning")
SENTENCES = [
    "the committee will meet again next week to discuss the budget for the coming year and the new rules",
    "she walked along the river at dawn listening to the birds and thinking about the long journey ahead",
    "a small village at the foot of the mountains grows apples pears and plums for the markets of the city",
    "the engineers measured how much each layer of the network changed the hidden representation of speech",
    "please remember to close the windows before you leave because the forecast says heavy rain tonight",
    "after the concert the musicians packed their instruments and drove through the night to the next town",
    "reading a good book on a quiet evening is one of the simplest pleasures that many people still enjoy",
    "the old lighthouse keeper wrote in his journal every night describing the ships that passed the coast",
]


@dataclass
class BenchArgs:
    """Options of the healing benchmark."""

    llm_path: str = "smollm2-135m"
    """Decoder directory or offline asset name."""
    removed_layers: list[int] = field(default_factory=lambda: list(range(18, 26)))
    """Layers masked in the student (original numbering)."""
    lora_r: int = 64
    """LoRA rank on the receiving layer (all attention and MLP projections)."""
    batch_size: int = 4
    """Utterances per batch (text-only)."""
    steps: int = 5
    """Measured steps per timing variant (memory variants run warmup_steps + steps too)."""
    warmup_steps: int = 2
    """Steps excluded from the timing."""
    temperature: float = 2.0
    """KL temperature of the distillation loss."""
    device: str = "cpu"
    """cpu or cuda."""
    dtype: str = "float32"
    """Decoder weight dtype: float32 or bfloat16 (GPU)."""
    threads: int | None = None
    """torch CPU threads (default: torch's choice)."""
    json_out: str | None = None
    """Also write all numbers to this JSON file."""


# -------------------------------------------------------------------------------------------- worker side
def _module(args: BenchArgs, kd: bool) -> Any:
    from lightning_speechllm.healing.module import HealingConfig, HealingModule
    from lightning_speechllm.model.module import DecodingConfig, OptimConfig
    from lightning_speechllm.model.speechllm import LoraConfig, SpeechLLMConfig

    losses = [{"class_path": "TaskCrossEntropy"}]
    if kd:
        losses.append({"class_path": "KLDivergence", "init_args": {"temperature": args.temperature}})
    model = SpeechLLMConfig(llm_path=args.llm_path, encoder_path=None, llm_dtype=args.dtype)
    healing = HealingConfig(removed_layers=list(args.removed_layers), losses=losses,
                            lora=LoraConfig(r=args.lora_r, alpha=args.lora_r, dropout=0.05))
    optim = OptimConfig(lr=5e-4, warmup_steps=1, schedule="linear")
    return HealingModule(model=model, healing=healing, optim=optim,
                         decoding=DecodingConfig(generate_in_validation=False)).to(args.device)


def _batches(args: BenchArgs, count: int) -> list[Any]:
    from lightning_speechllm.data.batch import SpeechBatch

    batches = []
    for step in range(count):
        rows = [SENTENCES[(step * args.batch_size + i) % len(SENTENCES)] for i in range(args.batch_size)]
        batches.append(SpeechBatch(ids=[f"s{step}_{i}" for i in range(len(rows))], audio=torch.zeros(len(rows), 0),
                                   audio_lens=torch.zeros(len(rows), dtype=torch.long), texts=rows,
                                   tasks=["asr"] * len(rows), transcripts=rows, tgt_langs=[None] * len(rows),
                                   text_only=True))
    return batches


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _optimizer(module: Any, total: int) -> tuple[torch.optim.Optimizer, Any]:
    from lightning_speechllm.model.module import lr_lambda

    cfg = module.optim_config
    mask = module.speechllm.layer_mask
    with mask.active(range(mask.num_layers)):
        params = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_lambda(step, cfg.warmup_steps, total, cfg.schedule, cfg.min_lr_ratio))
    return optimizer, scheduler


def _separate_teacher(args: BenchArgs, module: Any) -> None:
    """Replace the shared-weight teacher pass by a second, full copy of the decoder (the memory baseline)."""
    from transformers import AutoModelForCausalLM

    from lightning_speechllm.assets import resolve
    from lightning_speechllm.model.speechllm import DTYPES

    teacher = AutoModelForCausalLM.from_pretrained(resolve(args.llm_path), dtype=DTYPES[args.dtype])
    teacher = teacher.to(args.device).eval().requires_grad_(False)

    def teacher_pass(inputs: Any, hidden: bool = False,
                     logits_to_keep: int = 0) -> tuple[torch.Tensor, list[torch.Tensor]]:
        with torch.no_grad():
            output = teacher(inputs_embeds=inputs.inputs_embeds.detach(), attention_mask=inputs.attention_mask,
                             position_ids=inputs.position_ids, use_cache=False, logits_to_keep=logits_to_keep)
        return output.logits, []

    module.teacher_pass = teacher_pass


def plain_loop(module: Any, batches: list[Any], device: str) -> list[float]:
    """The healing work without Lightning: healing_step, backward, AdamW + LR schedule; step-start times."""
    optimizer, scheduler = _optimizer(module, len(batches))
    module.train()
    starts = []
    loader = torch.utils.data.DataLoader(batches, batch_size=None)
    for batch in loader:
        _sync(device)
        starts.append(time.perf_counter())
        batch = batch.to(device)
        total, _ = module.healing_step(batch)
        total.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    _sync(device)
    starts.append(time.perf_counter())
    return starts


def lightning_loop(module: Any, batches: list[Any], device: str) -> list[float]:
    """The same work through Trainer.fit (logging of every loss part included); step-start times."""
    import lightning as L

    class StepClock(L.Callback):
        def __init__(self) -> None:
            self.starts: list[float] = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            _sync(device)
            self.starts.append(time.perf_counter())

        def on_train_end(self, trainer, pl_module) -> None:
            _sync(device)
            self.starts.append(time.perf_counter())

    clock = StepClock()
    trainer = L.Trainer(accelerator="gpu" if device.startswith("cuda") else "cpu", devices=1, max_steps=len(batches),
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
                        use_distributed_sampler=False, callbacks=[clock])
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))
    return clock.starts


def _peak_bytes(device: str) -> int:
    if device.startswith("cuda"):
        return int(torch.cuda.max_memory_allocated())
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # KiB on Linux


def _current_bytes(device: str) -> int:
    if device.startswith("cuda"):
        return int(torch.cuda.memory_allocated())
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def worker(args: BenchArgs, variant: str) -> dict[str, Any]:
    """Run one variant in this (fresh) process and return its numbers."""
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    kd = variant != "student"
    module = _module(args, kd)
    if variant == "copy":
        _separate_teacher(args, module)
    gc.collect()
    loaded = _current_bytes(args.device)
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    batches = _batches(args, args.warmup_steps + args.steps)
    loop = lightning_loop if variant == "lightning" else plain_loop
    starts = loop(module, batches, args.device)
    intervals = [b - a for a, b in zip(starts, starts[1:])][args.warmup_steps:]
    return {"variant": variant, "peak_bytes": _peak_bytes(args.device), "loaded_bytes": loaded,
            "step_s_median": statistics.median(intervals) if intervals else None, "step_s": intervals,
            "trainable_params": sum(p.numel() for p in module.parameters() if p.requires_grad),
            "active_layers": len(module.speechllm.layer_mask.active_layers)}


# -------------------------------------------------------------------------------------------- driver side
def run_variant(args: BenchArgs, variant: str) -> dict[str, Any]:
    """Run `variant` in a fresh Python process (so peak memory is its own)."""
    command = [sys.executable, __file__, "--worker", variant, "--args_json", json.dumps(asdict(args))]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"variant {variant!r} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _gib(n: int) -> str:
    return f"{n / 2**30:.3f} GiB"


def report(results: dict[str, dict[str, Any]], args: BenchArgs) -> dict[str, float]:
    """Print the side-by-side tables and return the ratios."""
    where = "peak RSS (ru_maxrss)" if args.device == "cpu" else "torch.cuda.max_memory_allocated"
    student = results["student"]
    print(f"\n(a) memory, {where}; removed {len(args.removed_layers)} layers, batch {args.batch_size}, "
          f"{args.device}/{args.dtype}")
    print(f"{'variant':<10}{'peak':>14}{'peak/student':>14}{'after load':>14}{'train delta':>14}")
    ratios: dict[str, float] = {}
    for name in MEMORY_VARIANTS:
        r = results[name]
        ratio = r["peak_bytes"] / student["peak_bytes"]
        ratios[f"memory_{name}_over_student"] = ratio
        delta = r["peak_bytes"] - r["loaded_bytes"]
        print(f"{name:<10}{_gib(r['peak_bytes']):>14}{ratio:>14.3f}{_gib(r['loaded_bytes']):>14}{_gib(delta):>14}")
    shared = ratios["memory_shared_over_student"]
    print(f"shared teacher: +{100 * (shared - 1):.1f}% over student-only (goal <= +15%): "
          f"{'OK' if shared <= 1.15 else 'MISSED'}")
    plain, lit = results["plain"]["step_s_median"], results["lightning"]["step_s_median"]
    ratios["lightning_over_plain_step_time"] = lit / plain
    print(f"\n(b) step time (median of {args.steps} steps after {args.warmup_steps} warm-up; KD: CE + KL, "
          f"shared teacher)")
    print(f"{'plain PyTorch':<16}{plain:>10.3f} s\n{'Lightning':<16}{lit:>10.3f} s")
    print(f"Lightning / plain = {lit / plain:.3f} (goal <= 1.10): {'OK' if lit / plain <= 1.10 else 'MISSED'}")
    return ratios


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="scripts/bench/healing.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", action=ActionConfigFile)
    parser.add_class_arguments(BenchArgs, as_positional=False, nested_key=None)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        variant, args = argv[1], BenchArgs(**json.loads(argv[3]))
        print(json.dumps(worker(args, variant)))
        return 0
    parser = build_parser()
    namespace = parser.parse_args(argv)
    args = BenchArgs(**{k: v for k, v in vars(namespace).items() if k in BenchArgs.__dataclass_fields__})
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("error: --device cuda but CUDA is not available", file=sys.stderr)
        return 2
    results = {}
    for variant in (*MEMORY_VARIANTS, *TIMING_VARIANTS):
        started = time.perf_counter()
        results[variant] = run_variant(args, variant)
        print(f"ran {variant:<10} in {time.perf_counter() - started:6.1f} s", flush=True)
    ratios = report(results, args)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"args": asdict(args), "results": results, "ratios": ratios,
                                                   "cpu_count": os.cpu_count()}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
