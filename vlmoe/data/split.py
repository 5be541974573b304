"""Who reads what: a source's shards (or, with too few shards, its samples) dealt over the
consumers, ranks x DataLoader workers."""

from __future__ import annotations

from dataclasses import dataclass

import torch.utils.data


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


def current_worker(first_worker: int = 0) -> tuple[int, int]:
    """(this worker's role, number of workers); (0, 1) outside DataLoader workers. DataLoader
    worker ``i`` plays role ``i + first_worker`` (a resumed stream, ``resumable``)."""
    info = torch.utils.data.get_worker_info()
    if info is None:
        return 0, 1
    return (info.id + first_worker) % info.num_workers, info.num_workers
