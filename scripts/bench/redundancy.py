"""Cost of measuring layer redundancy on SmolLM2-135M (30 layers), printed side by side in one run.

(a) Full d(l, n) map: our one pass (one forward recording x^0..x^L + ``AngularDistanceMetric``) versus the
    PruneMe-style loop (for each block size n, a fresh forward with ``output_hidden_states`` and the d(., n) row).
    Goal: >= 10x. The two maps are also compared (cells with l + n < L; PruneMe's last hidden state is post-norm).
(b) ``Trainer.validate`` on a few text batches (decode off) without and with ``RedundancyCallback``.
    Goal: <= 5% overhead per batch (figures off); the fixed epoch-end cost of figures + bootstrap is shown apart.

All timings use ``torch.set_num_threads(1)`` and are the median process CPU time of ``--repeats`` runs (wall time
on a shared machine is too noisy for a 5% comparison).

    python scripts/bench/redundancy.py
    python scripts/bench/redundancy.py --batch-size 8 --val-batches 8 --repeats 3
"""
from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader
from transformers import AutoModelForCausalLM, AutoTokenizer

from lightning_speechllm.data.batch import SpeechBatch
from lightning_speechllm.model.layer_mask import DecoderLayerMask
from lightning_speechllm.model.module import DecodingConfig, SpeechLLMModule
from lightning_speechllm.model.speechllm import SpeechLLM, SpeechLLMConfig
from lightning_speechllm.redundancy.callback import RedundancyCallback
from lightning_speechllm.redundancy.metrics import AngularDistanceMetric

REPO = Path(__file__).resolve().parents[2]
SENTENCES = [
    "It is windy in Dublin on Friday.", "My order number is three zero eight.", "These phones are red.",
    "The meeting starts at nine in the morning.", "Please leave a message after the tone.",
    "The train to Cambridge leaves from platform four.", "She bought two loaves of bread and a litre of milk.",
    "Our office is closed on public holidays.", "The weather will be cloudy with a chance of rain.",
    "He has been learning the piano for eleven years.", "Turn left at the second set of traffic lights.",
    "The museum opens at ten and closes at half past five.", "I would like to book a table for three people.",
    "The parcel should arrive within two working days.", "Can you repeat the last sentence more slowly?",
    "Twenty seven students passed the final examination.",
]


def median_seconds(function: Callable[[], object], repeats: int) -> float:
    """Median CPU time of this process over ``repeats`` calls (after one untimed warm-up call)."""
    return interleaved_medians({"only": function}, repeats)["only"]


def interleaved_medians(functions: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median process CPU time of each function, timed round-robin.

    CPU time of this process (one torch thread) rather than wall time: the bench machine is shared, and other
    processes' load inflates wall time by tens of percent at random. Round-robin spreads any drift evenly.
    """
    for function in functions.values():
        function()  # warm-up
    times: dict[str, list[float]] = {name: [] for name in functions}
    for _ in range(repeats):
        for name, function in functions.items():
            start = time.process_time()
            function()
            times[name].append(time.process_time() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def text_batch(tokenizer, batch_size: int, offset: int = 0) -> dict[str, torch.Tensor]:
    """Left-padded token batch of the bench sentences."""
    texts = [SENTENCES[(offset + i) % len(SENTENCES)] for i in range(batch_size)]
    tokenizer.padding_side = "left"
    return tokenizer(texts, return_tensors="pt", padding=True)


@torch.no_grad()
def one_pass_map(model, mask: DecoderLayerMask, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Our measurement: one forward recording the pre-norm residual stream, then the whole d(l, n) table."""
    with mask.record_residual_stream() as stream:
        model(**batch, use_cache=False, logits_to_keep=1)
    token_mask = torch.zeros_like(batch["attention_mask"], dtype=torch.bool)
    token_mask[:, -1] = True  # left padding: the last position is every sequence's last token
    metric = AngularDistanceMetric(mask.num_layers)
    metric.update(stream.states, token_mask)
    return metric.compute()


@torch.no_grad()
def per_block_size_map(model, batch: dict[str, torch.Tensor], num_layers: int) -> torch.Tensor:
    """PruneMe-style: for each block size n, one forward with ``output_hidden_states`` and the d(., n) row."""
    table = torch.full((num_layers, num_layers), float("nan"), dtype=torch.float64)
    for block in range(1, num_layers + 1):
        hidden = model(**batch, use_cache=False, output_hidden_states=True).hidden_states
        for first in range(num_layers - block + 1):
            a, b = hidden[first][:, -1].double(), hidden[first + block][:, -1].double()
            cosine = torch.nn.functional.cosine_similarity(a, b, dim=-1).clamp(-1.0, 1.0)
            table[block - 1, first] = (torch.arccos(cosine) / torch.pi).mean()
    return table


def bench_full_map(model, tokenizer, batch_size: int, repeats: int) -> None:
    mask = DecoderLayerMask(model)
    num_layers = mask.num_layers
    batch = text_batch(tokenizer, batch_size)
    ours = median_seconds(lambda: one_pass_map(model, mask, batch), repeats)
    loop = median_seconds(lambda: per_block_size_map(model, batch, num_layers), repeats)
    ours_table, loop_table = one_pass_map(model, mask, batch), per_block_size_map(model, batch, num_layers)
    pre_norm_cells = torch.ones(num_layers, num_layers, dtype=torch.bool)
    for block in range(1, num_layers + 1):
        pre_norm_cells[block - 1, num_layers - block:] = False  # PruneMe's x^L is post-norm
    diff = (ours_table - loop_table).abs()[pre_norm_cells].max().item()
    print(f"(a) full d(l, n) map, {num_layers} layers, batch {batch_size} x {batch['input_ids'].shape[1]} tokens")
    print(f"    one pass (1 forward + metric)     {ours:8.3f} s")
    print(f"    PruneMe loop ({num_layers} forwards)        {loop:8.3f} s")
    print(f"    speed-up                          {loop / ours:8.1f} x   (goal >= 10x)")
    print(f"    max |d_ours - d_loop| (l+n < L)   {diff:8.1e}")


class TextSets(L.LightningDataModule):
    """One named validation set of ready-made text-only SpeechBatches."""

    val_set_names = ["dev"]

    def __init__(self, batches: list[SpeechBatch]) -> None:
        super().__init__()
        self.batches = batches

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.batches, batch_size=None)


def speech_batches(count: int, batch_size: int) -> list[SpeechBatch]:
    batches = []
    for index in range(count):
        texts = [SENTENCES[(index * batch_size + i) % len(SENTENCES)] for i in range(batch_size)]
        batches.append(SpeechBatch(ids=[f"b{index}-{i}" for i in range(batch_size)], audio=torch.zeros(batch_size, 0),
                                   audio_lens=torch.zeros(batch_size, dtype=torch.long), texts=texts,
                                   tasks=["asr"] * batch_size, transcripts=texts, text_only=True))
    return batches


class TimedRedundancyCallback(RedundancyCallback):
    """RedundancyCallback that adds up the CPU time spent in its own hooks (the recorder hooks inside the forward
    only append references to a list and are not counted)."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.seconds = 0.0

    def _timed(self, hook: Callable, *args, **kwargs) -> None:
        start = time.process_time()
        hook(*args, **kwargs)
        self.seconds += time.process_time() - start

    def on_validation_batch_start(self, *args, **kwargs) -> None:
        self._timed(super().on_validation_batch_start, *args, **kwargs)

    def on_validation_batch_end(self, *args, **kwargs) -> None:
        self._timed(super().on_validation_batch_end, *args, **kwargs)

    def on_validation_epoch_end(self, *args, **kwargs) -> None:
        self._timed(super().on_validation_epoch_end, *args, **kwargs)


def bench_validation(model, tokenizer, llm_dir: Path, batch_size: int, num_batches: int, repeats: int) -> None:
    speechllm = SpeechLLM(model, tokenizer, None, SpeechLLMConfig(llm_path=str(llm_dir), encoder_path=None))
    module = SpeechLLMModule(speechllm=speechllm, decoding=DecodingConfig(generate_in_validation=False))
    data = TextSets(speech_batches(num_batches, batch_size))
    root = Path(tempfile.mkdtemp(prefix="bench_redundancy_"))

    def validate(callbacks: list[L.Callback]) -> None:
        trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                            enable_model_summary=False, enable_checkpointing=False, default_root_dir=root,
                            callbacks=callbacks)
        trainer.validate(module, datamodule=data, verbose=False)

    light_callbacks: list[TimedRedundancyCallback] = []
    full_callbacks: list[TimedRedundancyCallback] = []

    def with_callback(kept: list[TimedRedundancyCallback], **kwargs) -> None:
        kept.append(TimedRedundancyCallback(**kwargs))
        validate([kept[-1]])

    runs = {
        "plain": lambda: validate([]),
        "light": lambda: with_callback(light_callbacks, n_boot=0, write_figures=False, output_dir=root / "light"),
        "full": lambda: with_callback(full_callbacks, output_dir=root / "full"),
    }
    plain, light, full = interleaved_medians(runs, repeats).values()
    light_own = statistics.median(c.seconds for c in light_callbacks[1:])
    full_own = statistics.median(c.seconds for c in full_callbacks[1:])
    print(f"(b) Trainer.validate, {num_batches} text batches of {batch_size}, decode off")
    print(f"    without callback                  {plain:8.3f} s")
    print(f"    with callback (maps, JSON, CSV)   {light:8.3f} s   overhead {100 * (light / plain - 1):+6.1f}%"
          f"   ratio {light / plain:.3f}  (goal <= 5%)")
    print(f"    + figures and 1000-boot CIs       {full:8.3f} s   overhead {100 * (full / plain - 1):+6.1f}%")
    print(f"    time inside the callback's hooks: {light_own:.3f} s = {100 * light_own / plain:.1f}% of the plain pass"
          f" (maps, JSON, CSV); {full_own:.3f} s = {100 * full_own / plain:.1f}% with figures and CIs")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--llm", default=str(REPO / "checkpoints" / "pretrained" / "smollm2-135m"))
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--val-batches", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip", choices=["a", "b"], help="skip one of the two benchmarks")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    model = AutoModelForCausalLM.from_pretrained(args.llm).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.llm)
    if args.skip != "a":
        bench_full_map(model, tokenizer, args.batch_size, args.repeats)
    if args.skip != "b":
        bench_validation(model, tokenizer, Path(args.llm), args.batch_size, args.val_batches, args.repeats)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
