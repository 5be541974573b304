"""The webdataset pipeline: shard patterns in, batches of samples (or of tensors) out.

``build_dataset`` assembles one list of stages, as open_clip's ``get_wds_dataset`` does::

    per source:  shards -> shuffle shards (train) -> split by rank and worker -> read tar samples
                 -> split samples (only when there are fewer shards than ranks x workers)
                 -> shuffle samples (train)
    mix sources by weight (train) or chain them (eval)
    -> decode + to Sample -> transform (optional) -> batch + collate

Notable choices:
- Training repeats every source forever (an "epoch" re-shuffles that source's shards with a
  seed shared by all ranks, so in one epoch each shard is read by one consumer) and mixes the
  sources sample by sample with probabilities proportional to ``DataSource.weight``.
- Evaluation reads every sample exactly once across ranks (``rank``/``world_size`` are explicit:
  pass Accelerate's ``process_index``/``num_processes``) and DataLoader workers. With at least
  ranks x workers shards, shards are dealt round-robin; with fewer, every consumer reads every
  shard and keeps the samples whose position modulo ranks x workers is its own. Ranks may get
  different numbers of batches: gather results once at the end, not per batch.
- All randomness comes from ``random.Random`` objects seeded from ``seed``, the source, the
  rank and the worker, created when iteration starts; nothing reads or sets global RNG state
  (the DataLoader draws its workers' base seed from a generator of its own).
- Skips: bad samples and unreadable shards travel down the stream as ``reader.Skipped`` records
  and are counted by the batching stage, which logs a warning naming shard and key. Every
  ``Batch`` carries the skip counts met since the previous batch (a last ``Batch`` with
  ``size == 0`` flushes counts that came after the last full batch). This works unchanged inside
  DataLoader worker processes; ``SampleLoader`` unpacks the batches and sums the counts in
  ``loader.stats`` in the main process.
"""

from __future__ import annotations

import itertools
import logging
import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, NamedTuple, Sequence

import torch.utils.data
import webdataset as wds

from .reader import Skipped, read_shard
from .sample import TASKS, BadSample, Sample, parse_sample
from .shards import expand_shards

logger = logging.getLogger(__name__)

Collate = Callable[[list[Sample]], Any]
Transform = Callable[[Sample], Sample]


@dataclass(frozen=True)
class DataSource:
    """Shards of one task.

    Attributes:
        pattern: a brace-expandable spec, a glob, a folder, or a list of these.
        task: ``caption`` or ``vqa``.
        weight: relative share of this source's samples in the training mix.
    """

    pattern: str | Sequence[str]
    task: str
    weight: float = 1.0

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"DataSource.task={self.task!r} is not one of {list(TASKS)} (pattern {self.pattern!r})")
        if not self.weight > 0:
            raise ValueError(f"DataSource.weight={self.weight} must be positive (pattern {self.pattern!r})")


class Batch(NamedTuple):
    """What the pipeline yields.

    Attributes:
        data: ``collate(samples)``, or the list of samples when there is no collate; None when
            ``size`` is 0 (a batch that only carries skip counts).
        size: number of samples in the batch.
        skipped: skip counts by reason (``sample.SKIP_REASONS``) met since the previous batch.
    """

    data: Any
    size: int
    skipped: dict[str, int]


@dataclass
class LoaderStats:
    """What a ``SampleLoader`` has delivered in its current (or last) pass."""

    batches: int = 0
    samples: int = 0
    skipped: Counter[str] = field(default_factory=Counter)

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())

    def add(self, batch: Batch) -> None:
        self.batches += batch.size > 0
        self.samples += batch.size
        self.skipped.update(batch.skipped)


@dataclass(frozen=True)
class Split:
    """Which shards and which samples of a source one consumer (rank x worker) reads."""

    shard_offset: int
    shard_stride: int
    sample_offset: int
    sample_stride: int


def split_for(num_shards: int, rank: int, world_size: int, worker: int, num_workers: int) -> Split:
    """Deal shards round-robin over ranks x workers, or samples when shards are too few."""
    consumers = world_size * num_workers
    consumer = rank * num_workers + worker
    if num_shards >= consumers:
        return Split(consumer, consumers, 0, 1)
    return Split(0, 1, consumer, consumers)


def _worker() -> tuple[int, int]:
    info = torch.utils.data.get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


# ---------------------------------------------------------------------------------------------
# Stages. Small callables (not closures) so that the pipeline pickles into worker processes.


@dataclass(frozen=True)
class ShardList:
    """First stage of a source: its shards for this consumer, shuffled and repeated if training."""

    urls: tuple[str, ...]
    task: str
    rank: int
    world_size: int
    seed: str
    train: bool

    def __call__(self) -> Iterator[dict[str, Any]]:
        split = split_for(len(self.urls), self.rank, self.world_size, *_worker())
        for epoch in itertools.count() if self.train else (0,):
            urls = list(self.urls)
            if self.train:
                random.Random(f"{self.seed}/shards/{epoch}").shuffle(urls)  # same order on every consumer
            for url in urls[split.shard_offset :: split.shard_stride]:
                yield {"url": url, "__task__": self.task, "__epoch__": epoch}


@dataclass(frozen=True)
class SplitSamples:
    """Keep this consumer's samples when the source has fewer shards than consumers."""

    num_shards: int
    rank: int
    world_size: int

    def __call__(self, src: Iterable[Any]) -> Iterator[Any]:
        split = split_for(self.num_shards, self.rank, self.world_size, *_worker())
        if split.sample_stride == 1:
            yield from src
            return
        # every consumer reads the same shards in the same order, so positions agree
        yield from itertools.islice(src, split.sample_offset, None, split.sample_stride)


@dataclass(frozen=True)
class ReadShards:
    """Shard descriptions -> raw samples and ``Skipped`` records (``reader.read_shard``).

    With ``require_data`` (training, where the shard list repeats forever) a whole pass over this
    consumer's shards that gives no sample at all raises, naming the source's ``pattern``, instead
    of looping without end.
    """

    require_data: bool
    pattern: str | Sequence[str] = ""

    def __call__(self, shards: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any] | Skipped]:
        epoch, found, first = None, True, ""
        for shard in shards:
            if shard["__epoch__"] != epoch:
                if self.require_data and not found:
                    raise RuntimeError(f"shard pattern {self.pattern!r}: a whole pass over this process's shards "
                                       f"({first}, ...) gave no readable sample")
                epoch, found, first = shard["__epoch__"], False, shard["url"]
            for item in read_shard(shard["url"], {"__task__": shard["__task__"]}):
                found = found or not isinstance(item, Skipped)
                yield item


@dataclass(frozen=True)
class Shuffle:
    """A shuffle buffer whose RNG is seeded per consumer when iteration starts."""

    bufsize: int
    seed: str
    rank: int

    def __call__(self, src: Iterable[Any]) -> Iterator[Any]:
        worker, _ = _worker()
        rng = random.Random(f"{self.seed}/samples/{self.rank}/{worker}")
        return wds.shuffle(self.bufsize, initial=self.bufsize, rng=rng)(iter(src))


@dataclass(frozen=True)
class WeightedMix:
    """Training head: draw each next item from a source chosen with probability ~ weight."""

    sources: tuple[wds.DataPipeline, ...]
    weights: tuple[float, ...]
    seed: int
    rank: int

    def __call__(self) -> Iterator[Any]:
        worker, _ = _worker()
        rng = random.Random(f"{self.seed}/mix/{self.rank}/{worker}")
        streams = [iter(source) for source in self.sources]
        choices = range(len(streams))
        while True:
            stream = streams[rng.choices(choices, self.weights)[0]]
            try:
                yield next(stream)
            except StopIteration:
                return


@dataclass(frozen=True)
class Chain:
    """Evaluation head: every source in turn."""

    sources: tuple[wds.DataPipeline, ...]

    def __call__(self) -> Iterator[Any]:
        for source in self.sources:
            yield from source


def to_samples(src: Iterable[dict[str, Any] | Skipped]) -> Iterator[Sample | Skipped]:
    """Decode raw samples into ``Sample``; one that fails becomes a ``Skipped`` in its place."""
    for raw in src:
        if isinstance(raw, Skipped):
            yield raw
            continue
        try:
            yield parse_sample(raw, raw["__task__"])
        except BadSample as bad:
            yield Skipped(bad.reason, raw["__url__"], raw["__key__"], bad.detail)


@dataclass(frozen=True)
class MapSamples:
    """Apply a per-sample transform (skip records pass through)."""

    transform: Transform

    def __call__(self, src: Iterable[Sample | Skipped]) -> Iterator[Sample | Skipped]:
        for item in src:
            yield item if isinstance(item, Skipped) else self.transform(item)


@dataclass(frozen=True)
class Batcher:
    """Group samples into ``Batch``es, counting and logging the ``Skipped`` records in between."""

    batch_size: int
    collate: Collate | None
    drop_last: bool

    def __call__(self, src: Iterable[Sample | Skipped]) -> Iterator[Batch]:
        samples: list[Sample] = []
        skipped: Counter[str] = Counter()
        for item in src:
            if isinstance(item, Skipped):
                logger.warning(item.describe())
                skipped[item.reason] += item.count
                continue
            samples.append(item)
            if len(samples) == self.batch_size:
                yield self._batch(samples, skipped)
                samples, skipped = [], Counter()
        if samples and not self.drop_last:
            yield self._batch(samples, skipped)
            skipped = Counter()
        if skipped:
            yield Batch(None, 0, dict(skipped))

    def _batch(self, samples: list[Sample], skipped: Counter[str]) -> Batch:
        data = samples if self.collate is None else self.collate(samples)
        return Batch(data, len(samples), dict(skipped))


# ---------------------------------------------------------------------------------------------


def _check_args(
    sources: Sequence[DataSource], batch_size: int, rank: int, world_size: int, shuffle_buffer: int
) -> None:
    if not sources:
        raise ValueError("sources is empty: give at least one DataSource")
    for source in sources:
        if not isinstance(source, DataSource):
            raise ValueError(f"sources holds a {type(source).__name__}, not a DataSource: {source!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be at least 1")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
    if shuffle_buffer < 1:
        raise ValueError(f"shuffle_buffer={shuffle_buffer} must be at least 1")


def build_dataset(
    sources: Sequence[DataSource] | DataSource,
    *,
    train: bool,
    batch_size: int,
    collate: Collate | None = None,
    transform: Transform | None = None,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    shuffle_buffer: int = 1000,
    drop_last: bool | None = None,
) -> wds.DataPipeline:
    """The pipeline of ``Batch``es over ``sources`` (see the module docstring).

    Args:
        sources: shards and their tasks; several are mixed by weight when training and read one
            after the other when evaluating.
        train: shuffle, repeat forever and mix (True), or read each sample once in order (False).
        batch_size: samples per batch.
        collate: turns a list of samples into the batch's ``data`` (e.g. the model's processor);
            None keeps the list.
        transform: applied to each sample before batching.
        rank, world_size: this process and the number of processes (Accelerate's
            ``process_index`` and ``num_processes``).
        seed: seeds shard order, sample shuffling and mixing.
        shuffle_buffer: samples held in each source's shuffle buffer (training only).
        drop_last: drop a last incomplete batch; defaults to ``train``.

    Raises:
        ValueError: a bad argument, or a pattern that matches no file (named), before any read.
    """
    sources = [sources] if isinstance(sources, DataSource) else list(sources)
    _check_args(sources, batch_size, rank, world_size, shuffle_buffer)
    pipelines = []
    for index, source in enumerate(sources):
        urls = tuple(expand_shards(source.pattern))
        source_seed = f"{seed}/{index}"
        pipelines.append(
            wds.DataPipeline(
                ShardList(urls, source.task, rank, world_size, source_seed, train),
                ReadShards(require_data=train, pattern=source.pattern),
                SplitSamples(len(urls), rank, world_size),
                Shuffle(shuffle_buffer, source_seed, rank) if train else None,
            )
        )
    if train:
        head: WeightedMix | Chain = WeightedMix(tuple(pipelines), tuple(s.weight for s in sources), seed, rank)
    else:
        head = Chain(tuple(pipelines))
    return wds.DataPipeline(
        head,
        to_samples,
        MapSamples(transform) if transform is not None else None,
        Batcher(batch_size, collate, train if drop_last is None else drop_last),
    )


def _keep(batch: Batch) -> Batch:
    """DataLoader ``collate_fn`` for already-batched items (module level: it must pickle)."""
    return batch


class SampleLoader(torch.utils.data.DataLoader):
    """A DataLoader over a ``build_dataset`` pipeline that yields ``Batch.data`` only.

    The skip counts the batches carry (from any worker process) are summed in ``stats``,
    which is reset when a new pass (``iter(loader)``) starts.
    """

    def __init__(self, dataset: wds.DataPipeline, **kwargs: Any) -> None:
        super().__init__(dataset, batch_size=None, collate_fn=_keep, **kwargs)
        self.stats = LoaderStats()

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        self.stats = LoaderStats()
        for batch in super().__iter__():
            self.stats.add(batch)
            if batch.size:
                yield batch.data


def build_loader(
    sources: Sequence[DataSource] | DataSource,
    *,
    train: bool,
    batch_size: int,
    collate: Collate | None = None,
    transform: Transform | None = None,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    shuffle_buffer: int = 1000,
    drop_last: bool | None = None,
    num_workers: int = 0,
    pin_memory: bool = False,
    persistent_workers: bool = False,
) -> SampleLoader:
    """A ``SampleLoader`` (a torch DataLoader) over ``build_dataset(...)``; same arguments, plus
    the DataLoader's ``num_workers``, ``pin_memory`` and ``persistent_workers``.

    Do not pass it to ``accelerator.prepare``: the pipeline already splits the data across ranks.
    """
    if num_workers < 0:
        raise ValueError(f"num_workers={num_workers} must be >= 0")
    dataset = build_dataset(
        sources,
        train=train,
        batch_size=batch_size,
        collate=collate,
        transform=transform,
        rank=rank,
        world_size=world_size,
        seed=seed,
        shuffle_buffer=shuffle_buffer,
        drop_last=drop_last,
    )
    return SampleLoader(
        dataset,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=persistent_workers and num_workers > 0,
        # A DataLoader draws a seed when an iterator starts; from the global RNG that draw would
        # shift every later random op (router jitter, dropout), and differently after a resume.
        generator=torch.Generator().manual_seed(seed),
    )
