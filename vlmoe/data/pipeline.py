"""The webdataset pipeline: shard patterns in, batches of samples (or of tensors) out.

``build_dataset`` assembles one list of stages, as open_clip's ``get_wds_dataset`` does::

    train:  ``resumable.ResumableMix`` (per source: shuffled shards -> split by rank and worker
            -> read -> shuffle buffer; sources mixed by weight)
    eval:   per source: shards -> split by rank and worker -> read tar samples
            -> split samples (only when there are fewer shards than ranks x workers); chained
    -> decode + to Sample -> transform (optional) -> batch + collate

Notable choices:
- Training repeats every source forever (an "epoch" re-shuffles that source's shards with a
  seed shared by all ranks, so in one epoch each shard is read by one consumer), shuffles each
  shard's samples through a buffer, and mixes the sources sample by sample with probabilities
  proportional to ``DataSource.weight``. Its batches carry the stream's position, which
  ``SampleLoader.position`` keeps and ``build_loader(position=...)`` resumes from (``resumable``).
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
  ``loader.stats`` in the main process. A training stream in which a whole pass over every source
  gives no sample (all corrupt, all too long) raises instead of repeating forever.
"""

from __future__ import annotations

import copy
import itertools
import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, NamedTuple, Sequence

import torch.utils.data
import webdataset as wds

from .reader import Skipped, read_shard
from .resumable import ResumableMix, StreamPosition, TrainSource
from .sample import TASKS, BadSample, Sample, parse_question, parse_sample
from .shards import expand_shards
from .split import current_worker, split_for

logger = logging.getLogger(__name__)

Collate = Callable[[list[Sample]], Any]
# What replaces a sample in the stream: the sample (changed or not) and ``Skipped`` records for
# anything the transform drops, so that it is counted like any other skip.
Transform = Callable[[Sample], Iterable[Sample | Skipped]]


@dataclass(frozen=True)
class DataSource:
    """Shards of one task.

    Attributes:
        pattern: a brace-expandable spec, a glob, a folder, or a list of these.
        task: ``caption`` or ``vqa``.
        weight: relative share of this source's samples in the training mix.
        conversations: (vqa, training) the consecutive questions about one image train as one
            multi-turn sequence (``sample.group_by_image``); evaluation reads them one by one.
    """

    pattern: str | Sequence[str]
    task: str
    weight: float = 1.0
    conversations: bool = False

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"DataSource.task={self.task!r} is not one of {list(TASKS)} (pattern {self.pattern!r})")
        if not self.weight > 0:
            raise ValueError(f"DataSource.weight={self.weight} must be positive (pattern {self.pattern!r})")
        if self.conversations and self.task != "vqa":
            raise ValueError(f"DataSource.conversations groups the questions of a vqa source, not a {self.task} one "
                             f"(pattern {self.pattern!r})")


class Batch(NamedTuple):
    """What the pipeline yields.

    Attributes:
        data: ``collate(samples)``, or the list of samples when there is no collate; None when
            ``size`` is 0 (a batch that only carries skip counts).
        size: number of samples in the batch.
        skipped: skip counts by reason (``sample.SKIP_REASONS``) met since the previous batch.
        position: the training stream's position just after this batch (``StreamPosition.snapshot``);
            None when evaluating.
    """

    data: Any
    size: int
    skipped: dict[str, int]
    position: dict[str, Any] | None = None


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


# ---------------------------------------------------------------------------------------------
# Stages. Small callables (not closures) so that the pipeline pickles into worker processes.


@dataclass(frozen=True)
class ShardList:
    """First stage of an evaluation source: its shards for this consumer."""

    urls: tuple[str, ...]
    task: str
    rank: int
    world_size: int

    def __call__(self) -> Iterator[dict[str, Any]]:
        split = split_for(len(self.urls), self.rank, self.world_size, *current_worker())
        for url in self.urls[split.shard_offset :: split.shard_stride]:
            yield {"url": url, "__task__": self.task}


@dataclass(frozen=True)
class SplitSamples:
    """Keep this consumer's samples when the source has fewer shards than consumers."""

    num_shards: int
    rank: int
    world_size: int

    def __call__(self, src: Iterable[Any]) -> Iterator[Any]:
        split = split_for(self.num_shards, self.rank, self.world_size, *current_worker())
        if split.sample_stride == 1:
            yield from src
            return
        # every consumer reads the same shards in the same order, so positions agree
        yield from itertools.islice(src, split.sample_offset, None, split.sample_stride)


def read_shards(shards: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any] | Skipped]:
    """Shard descriptions -> raw samples and ``Skipped`` records (``reader.read_shard``)."""
    for shard in shards:
        yield from read_shard(shard["url"], {"__task__": shard["__task__"]})


@dataclass(frozen=True)
class Chain:
    """Evaluation head: every source in turn."""

    sources: tuple[wds.DataPipeline, ...]

    def __call__(self) -> Iterator[Any]:
        for source in self.sources:
            yield from source


def to_samples(src: Iterable[dict[str, Any] | Skipped]) -> Iterator[Sample | Skipped]:
    """Decode raw samples into ``Sample``; one that fails becomes a ``Skipped`` in its place
    (skip records and the stream's position pass through). A conversation's later turns become the
    sample's ``followups``, each counted as skipped on its own if it cannot be read."""
    for raw in src:
        if not isinstance(raw, dict):
            yield raw
            continue
        turns = raw.get("__turns__", [])
        try:
            sample = parse_sample(raw, raw["__task__"])
        except BadSample as bad:
            yield Skipped(bad.reason, raw["__url__"], raw["__key__"], bad.detail)
            if turns:  # the next turn opens the conversation
                yield from to_samples([{**turns[0], "__turns__": turns[1:]}])
            continue
        sample.epoch = raw.get("__epoch__", 0)
        for turn in turns:
            try:
                sample.followups.append(parse_question(turn))
            except BadSample as bad:
                yield Skipped(bad.reason, turn["__url__"], turn["__key__"], bad.detail)
        yield sample


@dataclass(frozen=True)
class MapSamples:
    """Apply a per-sample transform (skip records and the stream's position pass through)."""

    transform: Transform

    def __call__(self, src: Iterable[Sample | Skipped]) -> Iterator[Sample | Skipped]:
        for item in src:
            if isinstance(item, Sample):
                yield from self.transform(item)
            else:
                yield item


@dataclass(frozen=True)
class Batcher:
    """Group samples into ``Batch``es, counting and logging the ``Skipped`` records in between,
    with the training stream's position after each batch."""

    batch_size: int
    collate: Collate | None
    drop_last: bool

    def __call__(self, src: Iterable[Sample | Skipped]) -> Iterator[Batch]:
        samples: list[Sample] = []
        skipped: Counter[str] = Counter()
        position: StreamPosition | None = None
        run: SkipRun | None = None  # the skips since the last sample (training streams only)
        for item in src:
            if isinstance(item, StreamPosition):
                position = item
                continue
            if isinstance(item, Skipped):
                logger.warning(item.describe())
                skipped[item.reason] += item.count
                if position is not None:
                    run = run or SkipRun([cursor.epoch for cursor in position.sources])
                    run.add(item, position)
                continue
            samples.append(item)
            run = None
            if len(samples) == self.batch_size:
                yield self._batch(samples, skipped, position)
                samples, skipped = [], Counter()
        if samples and not self.drop_last:
            yield self._batch(samples, skipped, None)
            skipped = Counter()
        if skipped:
            yield Batch(None, 0, dict(skipped))

    def _batch(self, samples: list[Sample], skipped: Counter[str], position: StreamPosition | None) -> Batch:
        data = samples if self.collate is None else self.collate(samples)
        return Batch(data, len(samples), dict(skipped), position.snapshot() if position else None)


@dataclass
class SkipRun:
    """Skips in a row in the training stream, which repeats forever: once every source has gone
    through a whole pass since the first of them without a sample, every sample is being
    skipped, and the stream would wait forever."""

    epochs: list[int]  # each source's epoch at the first skip
    counts: Counter[str] = field(default_factory=Counter)

    def add(self, item: Skipped, position: StreamPosition) -> None:
        self.counts[item.reason] += item.count
        if all(cursor.epoch >= epoch + 2 for cursor, epoch in zip(position.sources, self.epochs)):
            counts = ", ".join(f"{reason}: {n}" for reason, n in self.counts.most_common())
            raise RuntimeError(f"every training sample is skipped: a whole pass over every source gave none "
                               f"({counts}); the last one: {item.describe()}")


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
    position: dict[str, Any] | None = None,
) -> wds.DataPipeline:
    """The pipeline of ``Batch``es over ``sources`` (see the module docstring).

    Args:
        sources: shards and their tasks; several are mixed by weight when training and read one
            after the other when evaluating.
        train: shuffle, repeat forever and mix (True), or read each sample once in order (False).
        batch_size: samples per batch.
        collate: turns a list of samples into the batch's ``data`` (e.g. the model's processor);
            None keeps the list.
        transform: applied to each sample before batching; yields the sample and ``Skipped``
            records for what it drops (``Transform``).
        rank, world_size: this process and the number of processes (Accelerate's
            ``process_index`` and ``num_processes``).
        seed: seeds shard order, sample shuffling and mixing.
        shuffle_buffer: samples held in each source's shuffle buffer (training only).
        drop_last: drop a last incomplete batch; defaults to ``train``.
        position: where a training stream resumes: a ``SampleLoader.position`` of the same
            sources, seed, rank and world size; None starts at the beginning.

    Raises:
        ValueError: a bad argument, or a pattern that matches no file (named), before any read.
    """
    sources = [sources] if isinstance(sources, DataSource) else list(sources)
    _check_args(sources, batch_size, rank, world_size, shuffle_buffer)
    shards = [tuple(expand_shards(source.pattern)) for source in sources]
    if train:
        head: ResumableMix | Chain = ResumableMix(
            tuple(TrainSource(urls, s.task, f"{seed}/{i}", s.pattern, shuffle_buffer, s.conversations)
                  for i, (s, urls) in enumerate(zip(sources, shards))),
            tuple(s.weight for s in sources), seed, rank, world_size, position,
        )
    else:
        head = Chain(tuple(
            wds.DataPipeline(ShardList(urls, s.task, rank, world_size), read_shards, SplitSamples(len(urls), rank, world_size))
            for s, urls in zip(sources, shards)
        ))
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
    which is reset when a new pass (``iter(loader)``) starts. A training stream's ``position``
    after the batches delivered so far (each worker's latest) is what a checkpoint keeps.
    """

    def __init__(self, dataset: wds.DataPipeline, start: dict[str, Any] | None = None, **kwargs: Any) -> None:
        super().__init__(dataset, batch_size=None, collate_fn=_keep, **kwargs)
        self.stats = LoaderStats()
        self.start = start or {"batches": 0, "num_workers": self.num_workers, "workers": {}}
        self.position = copy.deepcopy(self.start)

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        self.stats = LoaderStats()
        self.position = copy.deepcopy(self.start)
        for batch in super().__iter__():
            self.stats.add(batch)
            if batch.position is not None:
                self.position["batches"] += 1
                self.position["workers"][str(batch.position["worker"])] = batch.position
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
    position: dict[str, Any] | None = None,
) -> SampleLoader:
    """A ``SampleLoader`` (a torch DataLoader) over ``build_dataset(...)``; same arguments, plus
    the DataLoader's ``num_workers``, ``pin_memory`` and ``persistent_workers``.

    Do not pass it to ``accelerator.prepare``: the pipeline already splits the data across ranks.
    """
    if num_workers < 0:
        raise ValueError(f"num_workers={num_workers} must be >= 0")
    if position is not None and position["num_workers"] != num_workers:
        raise ValueError(f"the stream position was saved with num_workers={position['num_workers']}, "
                         f"not {num_workers}: resume with the same number of loader workers")
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
        position=position,
    )
    return SampleLoader(
        dataset,
        position,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=persistent_workers and num_workers > 0,
        # A DataLoader draws a seed when an iterator starts; from the global RNG that draw would
        # shift every later random op (router jitter, dropout), and differently after a resume.
        generator=torch.Generator().manual_seed(seed),
    )
