"""The training stream, resumable from a small position instead of replayed from its start.

Each consumer (rank x DataLoader worker) reads every source as an endless stream and mixes them::

    per source:  epoch's seeded shard order -> this consumer's shards (or, with fewer shards than
                 consumers, every shard and this consumer's samples of it) -> read the shard
                 -> shuffle buffer, emptied at the end of each shard
    mix the sources by weight, one sample at a time (seeded)

Notable choices:
- A position is small: per source the epoch, the shard, how many of its items were read and which
  of them still wait in the shuffle buffer, and the shuffle RNG's state; the mix RNG's state.
  Resuming re-reads one shard per source (the buffer's samples come from it alone), however far
  into the run the position is. webdataset's shuffle buffer spans shards and cannot report or
  restore its contents, hence this stage.
- The position travels in the stream: the mix first yields its ``StreamPosition``, which
  ``pipeline.Batcher`` snapshots into every ``Batch``; that snapshot is exact, because the stages
  before the batcher are generators suspended just after the batch's last sample.
  ``SampleLoader.position`` keeps the latest snapshot of each worker, ready for a checkpoint.
- DataLoader workers are taken in turn, from worker 0, on every new iterator. A resumed stream
  hands worker 0 the role of the worker whose batch comes next (``first_worker``), so the
  batches come in the order of the uninterrupted stream.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

from .reader import Skipped, read_shard
from .sample import group_by_image
from .split import current_worker, split_for


def _rng(state: list | None, seed: str) -> random.Random:
    rng = random.Random(seed)
    if state is not None:  # JSON turned getstate()'s tuples into lists
        rng.setstate((state[0], tuple(state[1]), state[2]))
    return rng


@dataclass
class SourceCursor:
    """Where a consumer is in one source; ``snapshot`` is what a checkpoint keeps."""

    rng: random.Random
    epoch: int = 0
    shard: int = 0  # index into this consumer's shards of the epoch
    read: int = 0  # items of that shard read (those of other consumers and skip records included)
    done: bool = False  # the shard is read to its end; the buffer is emptying
    buffer: list[tuple[int, Any]] = field(default_factory=list)  # (index in the shard, item), waiting

    def snapshot(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "shard": self.shard, "read": self.read, "done": self.done,
                "buffer": [index for index, _ in self.buffer], "rng": self.rng.getstate()}


@dataclass
class StreamPosition:
    """A consumer's place in the training stream: the mix RNG and a cursor per source."""

    worker: int
    mix: random.Random
    sources: list[SourceCursor]

    def snapshot(self) -> dict[str, Any]:
        return {"worker": self.worker, "mix": self.mix.getstate(), "sources": [s.snapshot() for s in self.sources]}


@dataclass(frozen=True)
class TrainSource:
    """One source of the training stream, read from a cursor."""

    urls: tuple[str, ...]
    task: str
    seed: str
    pattern: str | Sequence[str]
    shuffle_buffer: int
    conversations: bool = False  # items are a shard's runs of samples with one image (``group_by_image``)

    def cursor(self, saved: dict[str, Any] | None, rank: int, worker: int) -> SourceCursor:
        rng = _rng(saved and saved["rng"], f"{self.seed}/samples/{rank}/{worker}")
        if saved is None:
            return SourceCursor(rng)
        cursor = SourceCursor(rng, saved["epoch"], saved["shard"], saved["read"], saved["done"])
        cursor.buffer = [(index, None) for index in saved["buffer"]]  # items re-read by ``_shard``
        return cursor

    def stream(self, cursor: SourceCursor, rank: int, world_size: int, worker: int, num_workers: int) -> Iterator[Any]:
        """Raw samples and ``Skipped`` records from ``cursor`` on, forever. A whole epoch of this
        consumer's shards without a readable sample raises, naming the pattern."""
        split = split_for(len(self.urls), rank, world_size, worker, num_workers)
        start = (cursor.epoch, cursor.shard)
        resumed = cursor.shard > 0 or cursor.read > 0  # then this epoch had data before the position
        for epoch in itertools.count(start[0]):
            urls = list(self.urls)
            random.Random(f"{self.seed}/shards/{epoch}").shuffle(urls)  # same order on every consumer
            mine = urls[split.shard_offset :: split.shard_stride]
            found = epoch == start[0] and resumed
            for shard in range(start[1] if epoch == start[0] else 0, len(mine)):
                cursor.epoch, cursor.shard = epoch, shard
                for item in self._shard(mine[shard], cursor, split.sample_offset, split.sample_stride):
                    found = found or not isinstance(item, Skipped)
                    yield item
                cursor.read, cursor.done = 0, False
            if not found:
                raise RuntimeError(f"shard pattern {self.pattern!r}: a whole pass over this process's shards "
                                   f"({mine[0] if mine else 'none'}, ...) gave no readable sample")

    def _shard(self, url: str, cursor: SourceCursor, offset: int, stride: int) -> Iterator[Any]:
        """This consumer's items of one shard through the shuffle buffer, from ``cursor.read`` on."""
        buffer, rng = cursor.buffer, cursor.rng
        if cursor.done and not buffer:  # resuming just after this shard's last item
            return
        raws = read_shard(url, {"__task__": self.task, "__epoch__": cursor.epoch})
        items = enumerate(group_by_image(raws) if self.conversations else raws)
        if cursor.read:  # resuming inside this shard: refill the buffer, pass over what was delivered
            waiting = {index: slot for slot, (index, _) in enumerate(buffer)}
            for index, item in itertools.islice(items, cursor.read):
                if index in waiting:
                    buffer[waiting[index]] = (index, item)
        for index, item in items:
            cursor.read = index + 1
            if index % stride != offset:
                continue
            buffer.append((index, item))
            if len(buffer) >= self.shuffle_buffer:
                yield _take(buffer, rng)
        cursor.done = True
        while buffer:
            yield _take(buffer, rng)


def _take(buffer: list[tuple[int, Any]], rng: random.Random) -> Any:
    """A random item out of the buffer (swapped with the last, then popped)."""
    i = rng.randrange(len(buffer))
    buffer[i], buffer[-1] = buffer[-1], buffer[i]
    return buffer.pop()[1]


@dataclass(frozen=True)
class ResumableMix:
    """Training head: the ``StreamPosition`` handle, then each next item from a source chosen
    with probability ~ weight, from ``start`` (a ``SampleLoader.position``) or the beginning."""

    sources: tuple[TrainSource, ...]
    weights: tuple[float, ...]
    seed: int
    rank: int
    world_size: int
    start: dict[str, Any] | None = None

    def __call__(self) -> Iterator[Any]:
        first_worker = self.start["batches"] % max(self.start["num_workers"], 1) if self.start else 0
        worker, num_workers = current_worker(first_worker)
        saved = (self.start or {}).get("workers", {}).get(str(worker))
        position = StreamPosition(
            worker, _rng(saved and saved["mix"], f"{self.seed}/mix/{self.rank}/{worker}"),
            [s.cursor(saved and saved["sources"][i], self.rank, worker) for i, s in enumerate(self.sources)],
        )
        yield position
        streams = [s.stream(c, self.rank, self.world_size, worker, num_workers)
                   for s, c in zip(self.sources, position.sources)]
        choices = range(len(streams))
        while True:
            yield next(streams[position.mix.choices(choices, self.weights)[0]])
