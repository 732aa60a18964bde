"""``SpeechDataModule``: Lhotse manifests → bucketed, DDP-sharded, resumable dataloaders of :class:`SpeechBatch`.

* Train: ``DynamicBucketingSampler`` (shuffled, seeded) over validated JSONL / Lhotse manifests; the sampler shards
  batches across DDP ranks itself, so the Trainer must run with ``use_distributed_sampler=False``. A Lhotse Shar
  directory is streamed instead, its shards split across ranks and dataloader workers by Lhotse.
* Eval: one dataloader per named set (``val_sets`` / ``test_sets``, name → path), in the dict's order;
  ``val_set_names[dataloader_idx]`` is the set's name. ``SimpleCutSampler`` without shuffling.
* Resume: ``state_dict()`` (stored by Lightning in checkpoints) holds the train sampler state with the number of
  batches the loop actually consumed (not the ones prefetched by workers), so a resumed run continues mid-epoch at
  exactly the next batch. Shar streams restart their epoch on resume.
* Bad inputs: ``on_bad_sample="error"`` raises :class:`BadSampleError`; ``"skip"`` drops, counts, writes
  ``rejected.jsonl`` into ``rejected_dir`` (default: the trainer's ``log_dir``) and warns per epoch.
"""
from __future__ import annotations

import copy
import tempfile
import warnings
from itertools import islice
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lhotse import CutSet
from lhotse.dataset import DynamicBucketingSampler, SimpleCutSampler
from lhotse.dataset.iterable_dataset import IterableDatasetWrapper
from lhotse.dataset.sampling.base import CutSampler
from torch.utils.data import DataLoader

from lightning_speechllm.data.bad_samples import (
    REJECTED_FILENAME,
    BadSampleHandler,
    BadSamplePolicy,
    BadSampleReport,
    check_policy,
    warn_rejected,
)
from lightning_speechllm.data.batch import SpeechBatch
from lightning_speechllm.data.dataset import SpeechDataset
from lightning_speechllm.data.encoder_cache import EncodeFn, cached_encoder_outputs
from lightning_speechllm.data.manifest import (
    DEFAULT_MAX_AUDIO_SECONDS,
    TASKS,
    cut_fields,
    detect_manifest_format,
    open_shar,
    read_manifests,
)

PathLike = str | Path


def build_train_sampler(
    cuts: CutSet,
    *,
    max_duration: float,
    num_buckets: int = 10,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    shuffle: bool = True,
    drop_last: bool = False,
    max_cuts: int | None = None,
    buffer_size: int = 20_000,
    quadratic_duration: float | None = None,
    num_cuts_for_bins_estimate: int = 10_000,
) -> DynamicBucketingSampler:
    """Duration-bucketed, seeded train sampler; with ``world_size > 1`` each rank gets every N-th batch.

    ``num_buckets`` is lowered to the number of cuts for tiny sets (Lhotse refuses more buckets than cuts).
    """
    num_buckets = max(1, min(num_buckets, sum(1 for _ in islice(cuts, num_buckets))))
    with warnings.catch_warnings():
        # An eager CutSet is intended here: manifests are validated up front and are small enough to hold.
        warnings.filterwarnings("ignore", message=".*eagerly read CutSet.*")
        return DynamicBucketingSampler(
            cuts, max_duration=max_duration, max_cuts=max_cuts, num_buckets=num_buckets, shuffle=shuffle,
            drop_last=drop_last, seed=seed, rank=rank, world_size=world_size, buffer_size=buffer_size,
            quadratic_duration=quadratic_duration, num_cuts_for_bins_estimate=num_cuts_for_bins_estimate,
        )


def build_eval_sampler(
    cuts: CutSet, *, max_duration: float, rank: int = 0, world_size: int = 1, max_cuts: int | None = None
) -> SimpleCutSampler:
    """Deterministic, unshuffled eval sampler (Lhotse pads the last step with duplicates when ranks > cuts)."""
    return SimpleCutSampler(
        cuts, max_duration=max_duration, max_cuts=max_cuts, shuffle=False, rank=rank, world_size=world_size
    )


class SpeechDataModule(L.LightningDataModule):
    """Speech/text data for SpeechLLM training, redundancy measurement and evaluation.

    Args:
        train: one or more JSONL / Lhotse CutSet manifests, or one Lhotse Shar directory.
        val_sets: validation sets, name → manifest path (dataloaders in this order).
        test_sets: test sets, name → manifest path.
        max_duration: seconds of audio per train batch (before DDP sharding, per rank).
        eval_max_duration: seconds per eval batch (default: ``max_duration``).
        max_cuts: optional cap on utterances per batch.
        num_buckets: duration buckets of the train sampler.
        seed: sampler / shard shuffling seed.
        num_workers: dataloader workers.
        max_audio_seconds: longest accepted utterance (30 s for Whisper encoders); longer ones are bad samples.
        on_bad_sample: ``"error"`` or ``"skip"``.
        rejected_dir: where ``rejected.jsonl`` goes (default: trainer ``log_dir``, else a temporary directory).
        text_only: all dataloaders yield text-only batches (``[B, 0]`` audio, transcripts).
        rank, world_size: override the DDP position (default: from the trainer, else 0 / 1).
        encoder_cache: a directory for the train set's frozen-encoder outputs, computed once (see
            :meth:`use_encoder_cache`, which the model calls) and read instead of the audio at every epoch; ``None``
            runs the encoder at every step. Validation and test always run the encoder.
    """

    def __init__(
        self,
        train: list[PathLike] | PathLike | None = None,
        val_sets: dict[str, PathLike] | None = None,
        test_sets: dict[str, PathLike] | None = None,
        *,
        max_duration: float = 120.0,
        eval_max_duration: float | None = None,
        max_cuts: int | None = None,
        num_buckets: int = 10,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = False,
        num_workers: int = 0,
        pin_memory: bool = False,
        max_audio_seconds: float | None = DEFAULT_MAX_AUDIO_SECONDS,
        on_bad_sample: BadSamplePolicy = "error",
        rejected_dir: PathLike | None = None,
        text_only: bool = False,
        buffer_size: int = 20_000,
        quadratic_duration: float | None = None,
        num_cuts_for_bins_estimate: int = 10_000,
        rank: int | None = None,
        world_size: int | None = None,
        encoder_cache: PathLike | None = None,
    ) -> None:
        super().__init__()
        self.train_paths = [train] if isinstance(train, (str, Path)) else list(train or [])
        self.val_sets = {str(k): v for k, v in (val_sets or {}).items()}
        self.test_sets = {str(k): v for k, v in (test_sets or {}).items()}
        if max_duration <= 0:
            raise ValueError(f"max_duration must be > 0, got {max_duration}")
        self.max_duration = max_duration
        self.eval_max_duration = eval_max_duration or max_duration
        self.max_cuts = max_cuts
        self.num_buckets = num_buckets
        self.seed = seed
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.max_audio_seconds = max_audio_seconds
        self.on_bad_sample = check_policy(on_bad_sample)
        self.rejected_dir = Path(rejected_dir) if rejected_dir is not None else None
        self.text_only = text_only
        self.buffer_size = buffer_size
        self.quadratic_duration = quadratic_duration
        self.num_cuts_for_bins_estimate = num_cuts_for_bins_estimate
        self._rank, self._world_size = rank, world_size
        self.encoder_cache = Path(encoder_cache) if encoder_cache is not None else None
        self._cached_train: CutSet | None = None
        self._cuts: dict[str, CutSet] = {}
        self._handler: BadSampleHandler | None = None
        self.train_sampler: DynamicBucketingSampler | None = None
        self._pending_sampler_state: dict[str, Any] | None = None
        self._consumed: tuple[int, int] | None = None  # (epoch, train batches consumed by the loop)

    # ------------------------------------------------------------------ names, rank, policy
    @property
    def val_set_names(self) -> list[str]:
        """Validation set names; index = ``dataloader_idx`` of :meth:`val_dataloader`."""
        return list(self.val_sets)

    @property
    def test_set_names(self) -> list[str]:
        """Test set names; index = ``dataloader_idx`` of :meth:`test_dataloader`."""
        return list(self.test_sets)

    @property
    def rank(self) -> int:
        if self._rank is not None:
            return self._rank
        return self.trainer.global_rank if self.trainer is not None else 0

    @property
    def world_size(self) -> int:
        if self._world_size is not None:
            return self._world_size
        return self.trainer.world_size if self.trainer is not None else 1

    @property
    def rejected_path(self) -> Path | None:
        """``rejected.jsonl`` (``None`` under the "error" policy)."""
        return self.handler.rejected_path

    @property
    def handler(self) -> BadSampleHandler:
        if self._handler is None:
            path = None
            if self.on_bad_sample == "skip":
                base = self.rejected_dir
                if base is None and self.trainer is not None and self.trainer.log_dir is not None:
                    base = Path(self.trainer.log_dir)
                if base is None:
                    base = Path(tempfile.mkdtemp(prefix="speechllm_rejected_"))
                path = base / REJECTED_FILENAME
            self._handler = BadSampleHandler(self.on_bad_sample, path)
        return self._handler

    def report_bad_samples(self, stage: str = "data") -> dict[str, int]:
        """Warn with the per-reason counts of skipped samples so far; return them (empty under "error")."""
        return warn_rejected(self.rejected_path, stage) if self.rejected_path is not None else {}

    # ------------------------------------------------------------------ setup
    def setup(self, stage: str | None = None) -> None:
        """Validate the Trainer configuration, read (and cache) the manifests, register the bad-sample report."""
        trainer = self.trainer
        if trainer is not None:
            if trainer.world_size > 1 and getattr(trainer._accelerator_connector, "use_distributed_sampler", False):
                raise ValueError(
                    "SpeechDataModule shards batches with Lhotse samplers: create the Trainer with "
                    "use_distributed_sampler=False"
                )
            if self.on_bad_sample == "skip" and not any(isinstance(c, BadSampleReport) for c in trainer.callbacks):
                trainer.callbacks.append(BadSampleReport(self.rejected_path))
        if stage in (None, "fit") and self.train_paths and not self._is_shar(self.train_paths):
            self.cuts("train")
        sets = {"fit": self.val_sets, "validate": self.val_sets, "test": self.test_sets}.get(
            stage or "", {**self.val_sets, **self.test_sets}
        )
        for path in sets.values():
            if detect_manifest_format(path) != "shar":
                self._read(path)

    @staticmethod
    def _is_shar(paths: list[PathLike]) -> bool:
        kinds = {detect_manifest_format(p) == "shar" for p in paths}
        if True in kinds and len(paths) > 1:
            raise ValueError(f"a Shar directory must be the only train source, got {[str(p) for p in paths]}")
        return True in kinds

    def _read(self, *paths: PathLike) -> CutSet:
        key = "\n".join(str(p) for p in paths)
        if key not in self._cuts:
            self._cuts[key] = read_manifests(list(paths), self.handler, self.max_audio_seconds)
        return self._cuts[key]

    def cuts(self, split: str, name: str | None = None) -> CutSet:
        """The validated CutSet of ``"train"`` or of the named ``"val"``/``"test"`` set (not for Shar)."""
        if split == "train":
            if not self.train_paths:
                raise ValueError("no train manifests were given")
            return self._cached_train if self._cached_train is not None else self._read(*self.train_paths)
        sets = {"val": self.val_sets, "test": self.test_sets}[split]
        if name not in sets:
            raise KeyError(f"unknown {split} set {name!r}; known: {list(sets)}")
        return self._read(sets[name])

    def eval_set_tasks(self, split: str) -> dict[str, tuple[str, ...]]:
        """The tasks (``"asr"``, ``"ast"``) of each named ``"val"``/``"test"`` set, in name order, from the whole set
        (not a rank's shard), so every DDP rank gets the same answer. JSONL / CutSet manifests are read (and cached)
        anyway; a streamed Shar set is not read here and is taken to hold every task."""
        sets = {"val": self.val_sets, "test": self.test_sets}.get(split)
        if sets is None:
            raise KeyError(f"unknown split {split!r}; expected 'val' or 'test'")
        tasks: dict[str, tuple[str, ...]] = {}
        for name, path in sets.items():
            if detect_manifest_format(path) == "shar":
                tasks[name] = TASKS
            else:
                tasks[name] = tuple(sorted({cut_fields(cut)["task"] for cut in self._read(path)}))
        return tasks

    def use_encoder_cache(self, encode: EncodeFn, key: str, description: dict | None = None) -> bool:
        """Train on cached frozen-encoder outputs: computed with ``encode`` into ``encoder_cache/<key>`` unless that
        cache is complete already, then read instead of the audio. False (nothing done) without ``encoder_cache`` or
        for a streamed Shar train set."""
        if self.encoder_cache is None or not self.train_paths:
            return False
        if self._is_shar(self.train_paths):
            warnings.warn("encoder_cache is not used for a streamed Shar train set; the encoder runs at every step",
                          stacklevel=2)
            return False
        cuts = self._read(*self.train_paths)
        self._cached_train = cached_encoder_outputs(cuts, encode, key, self.encoder_cache, description=description,
                                                    progress=self.rank == 0, handler=self.handler,
                                                    max_audio_seconds=self.max_audio_seconds,
                                                    source=str(self.train_paths[0]))
        return True

    # ------------------------------------------------------------------ dataloaders
    def _dataset(self, text_only: bool, source: PathLike, streamed: bool) -> SpeechDataset:
        return SpeechDataset(
            self.handler, self.max_audio_seconds, text_only=text_only, source=source, check_metadata=streamed
        )

    def _loader(self, dataset: torch.utils.data.Dataset, sampler: CutSampler | None) -> DataLoader:
        return DataLoader(
            dataset, sampler=sampler, batch_size=None, num_workers=self.num_workers, pin_memory=self.pin_memory,
            persistent_workers=sampler is None and self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        """Bucketed, shuffled train batches (restored mid-epoch if a state was loaded)."""
        if self._is_shar(self.train_paths):
            # Each (rank, worker) streams its own shards; the sampler must not shard again.
            cuts = open_shar(self.train_paths[0], shuffle_shards=self.shuffle, seed=self.seed)
            sampler = self._train_sampler(cuts, rank=0, world_size=1, num_cuts_for_bins_estimate=100)
            wrapper = IterableDatasetWrapper(
                self._dataset(self.text_only, self.train_paths[0], streamed=True), sampler, auto_increment_epoch=True
            )
            return self._loader(wrapper, None)
        sampler = self._train_sampler(self.cuts("train"), rank=self.rank, world_size=self.world_size)
        if self._pending_sampler_state is not None:
            sampler.load_state_dict(copy.deepcopy(self._pending_sampler_state))
            self._pending_sampler_state = None
        self.train_sampler = sampler
        return self._loader(self._dataset(self.text_only, self.train_paths[0], streamed=False), sampler)

    def _train_sampler(self, cuts: CutSet, **kw: Any) -> DynamicBucketingSampler:
        kw.setdefault("num_cuts_for_bins_estimate", self.num_cuts_for_bins_estimate)
        return build_train_sampler(
            cuts, max_duration=self.max_duration, num_buckets=self.num_buckets, seed=self.seed, shuffle=self.shuffle,
            drop_last=self.drop_last, max_cuts=self.max_cuts, buffer_size=self.buffer_size,
            quadratic_duration=self.quadratic_duration, **kw,
        )

    def _eval_loaders(self, sets: dict[str, PathLike], text_only: bool) -> list[DataLoader]:
        loaders = []
        for path in sets.values():
            if detect_manifest_format(path) == "shar":
                cuts = open_shar(path, shuffle_shards=False)
                sampler = build_eval_sampler(cuts, max_duration=self.eval_max_duration, max_cuts=self.max_cuts)
                loaders.append(self._loader(IterableDatasetWrapper(self._dataset(text_only, path, True), sampler), None))
            else:
                sampler = build_eval_sampler(
                    self._read(path), max_duration=self.eval_max_duration, rank=self.rank,
                    world_size=self.world_size, max_cuts=self.max_cuts,
                )
                loaders.append(self._loader(self._dataset(text_only, path, streamed=False), sampler))
        return loaders

    def val_dataloader(self) -> list[DataLoader]:
        """One dataloader per validation set, in ``val_set_names`` order."""
        return self._eval_loaders(self.val_sets, self.text_only)

    def test_dataloader(self) -> list[DataLoader]:
        """One dataloader per test set, in ``test_set_names`` order."""
        return self._eval_loaders(self.test_sets, self.text_only)

    def text_only_val_dataloaders(self) -> list[DataLoader]:
        """The validation sets as text-only batches (same utterances and order; ``[B, 0]`` audio)."""
        return self._eval_loaders(self.val_sets, text_only=True)

    # ------------------------------------------------------------------ resumable state
    def on_before_batch_transfer(self, batch: SpeechBatch, dataloader_idx: int) -> SpeechBatch:
        """Count the train batches the loop consumed (workers prefetch ahead of it)."""
        trainer = self.trainer
        if trainer is not None and trainer.training and self.train_sampler is not None:
            epoch = self.train_sampler.epoch
            done = self._consumed[1] if self._consumed is not None and self._consumed[0] == epoch else 0
            self._consumed = (epoch, done + 1)
        return batch

    def state_dict(self) -> dict[str, Any]:
        """Train sampler state (epoch, position) for mid-epoch resumption; ``{}`` before training starts."""
        if self.train_sampler is None:
            return {"train_sampler": self._pending_sampler_state} if self._pending_sampler_state else {}
        sd = self.train_sampler.state_dict()
        diag = sd["diagnostics"]
        epoch = diag["current_epoch"]
        if epoch not in diag["stats_per_epoch"]:
            return {}  # the sampler has not been iterated yet: a resumed run simply starts from scratch
        if self._consumed is not None and self._consumed[0] == epoch and epoch in diag["stats_per_epoch"]:
            # The sampler has run ahead by the prefetched batches: rewind its counters to what was consumed.
            stats = diag["stats_per_epoch"][epoch]
            stats["kept_batches"] = max(self._consumed[1] - stats["discarded_batches"], 0)
        return {"train_sampler": sd}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the train position; applied when the train dataloader is (re)built."""
        sd = state_dict.get("train_sampler")
        if not sd:
            return
        sd = copy.deepcopy(sd)
        diag = sd["diagnostics"]
        # JSON/YAML round trips turn the int epoch keys into strings; Lhotse looks them up as ints.
        diag["stats_per_epoch"] = {int(k): v for k, v in diag["stats_per_epoch"].items()}
        self._pending_sampler_state = sd
        epoch = int(diag["current_epoch"])
        stats = diag["stats_per_epoch"].get(epoch)
        self._consumed = (epoch, stats["kept_batches"] + stats["discarded_batches"]) if stats else None
        self.train_sampler = None
