"""Reading raw samples out of tar shards, tolerating damaged files.

Notable choices:
- This is webdataset's ``tarfile_to_samples`` (open with ``webdataset.gopen``, stream the
  members, group them by key with ``webdataset.tariterators.base_plus_ext``) with the error
  handling rewritten, because the stock handler cannot say *which* sample a truncated member
  belonged to, and a cut inside a member header ends Python's ``tarfile`` stream silently.
- Problems do not raise and are not counted here: they travel down the stream as ``Skipped``
  records, in the position of the sample they replace. Whichever stage owns that position
  (after splitting samples across ranks and workers) counts it, so every problem is counted
  exactly once across processes, and the counts need no shared state.
- A damaged archive drops the sample being read when the damage is met (it may be missing
  members) and yields one ``truncated`` record; the samples before it are kept. An archive that
  ends without tar's end-of-archive block is truncated too (compressed or not). The record (and
  an ``unreadable_shard`` one) counts every sample lost: the shard's sample count, as the
  ``index.json`` of a prepare script (``data_scripts/``) or img2dataset's ``NAME_stats.json``
  records it, less the samples read; 1 when nothing records how many the shard held.
"""

from __future__ import annotations

import json
import os
import tarfile
import zlib
from typing import Any, BinaryIO, Iterator, NamedTuple

import webdataset as wds
from webdataset.tariterators import base_plus_ext

_TAR_ERRORS = (tarfile.TarError, OSError, EOFError, zlib.error)


class Skipped(NamedTuple):
    """A sample (or shard) that was dropped, travelling in the stream in its place; ``count``
    samples were lost with it (a truncated shard's rest)."""

    reason: str
    url: str
    key: str | None
    detail: str
    count: int = 1

    def describe(self) -> str:
        where = f"sample {self.key!r} of shard {self.url}" if self.key else f"shard {self.url}"
        lost = f", {self.count} samples lost" if self.count > 1 else ""
        return f"skipped {where}: {self.reason} ({self.detail}{lost})"


def recorded_sample_count(url: str) -> int | None:
    """The shard's sample count as its writer recorded it: a prepare script's ``index.json`` (in
    the shard's folder or the one above), or img2dataset's ``NAME_stats.json``; None if neither."""
    if not os.path.isfile(url):
        return None
    path = os.path.abspath(url)
    stats = _read_json(os.path.splitext(path)[0] + "_stats.json")
    if isinstance(stats, dict) and isinstance(stats.get("successes"), int):
        return stats["successes"]
    for folder in (os.path.dirname(path), os.path.dirname(os.path.dirname(path))):
        index = _read_json(os.path.join(folder, "index.json"))
        for entry in index.values() if isinstance(index, dict) else ():
            count = entry.get("shards", {}).get(os.path.relpath(path, folder)) if isinstance(entry, dict) else None
            if isinstance(count, int):
                return count
    return None


def lost_samples(url: str, done: int) -> int:
    """Samples a damaged shard lost after ``done`` good ones: all the rest of its recorded count,
    or 1 (the sample being read) when nothing records how many it held."""
    recorded = recorded_sample_count(url)
    return 1 if recorded is None else max(recorded - done, 1)


def _read_json(path: str) -> Any:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def read_shard(url: str, fields: dict[str, Any] | None = None) -> Iterator[dict[str, Any] | Skipped]:
    """Raw samples ``{"__key__", "__url__", **fields, ext: bytes}`` of one shard, or ``Skipped``."""
    try:
        stream = wds.gopen(url)
    except OSError as exn:
        yield Skipped("unreadable_shard", url, None, f"{type(exn).__name__}: {exn}", lost_samples(url, 0))
        return
    try:
        yield from _read_tar(stream, url, fields or {})
    finally:
        stream.close()


def _read_tar(stream: BinaryIO, url: str, fields: dict[str, Any]) -> Iterator[dict[str, Any] | Skipped]:
    try:
        tar = tarfile.open(fileobj=stream, mode="r|*")  # type: ignore[call-overload]
    except _TAR_ERRORS as exn:
        yield Skipped("unreadable_shard", url, None, f"not a tar archive: {exn}", lost_samples(url, 0))
        return
    current: dict[str, Any] | None = None  # the sample being assembled
    key: str | None = None  # the key of the last member met
    dropped: str | None = None  # a key whose sample was dropped for a duplicate member
    done = 0  # samples yielded (or skipped for a duplicate member) before any damage
    try:
        for info in tar:
            name_key, ext = base_plus_ext(info.name)
            if not info.isreg() or name_key is None or info.name.startswith("__"):
                continue
            key = name_key
            data = tar.extractfile(info).read()  # type: ignore[union-attr]
            tar.members = []  # a long shard must not keep every header in memory
            if current is not None and current["__key__"] != key:
                yield current
                current, done = None, done + 1
            if key == dropped:
                continue
            if current is None:
                current = {"__key__": key, "__url__": url, **fields}
            ext = ext.lower()
            if ext in current:
                yield Skipped("duplicate_member", url, key, f"a second member {info.name}")
                current, dropped, done = None, key, done + 1
                continue
            current[ext] = data
        # A complete archive ends with a zero block, which tarfile has read (position in the
        # uncompressed stream); a cut inside or before a member header ends the loop silently.
        if tar.fileobj.pos < tar.offset + tarfile.BLOCKSIZE:  # type: ignore[union-attr]
            raise tarfile.ReadError("the archive ends inside a member header")
    except _TAR_ERRORS as exn:
        if current is not None and current["__key__"] != key:
            yield current  # complete: the damage is in the next sample
            done += 1
        yield Skipped("truncated", url, key, f"{exn}; anything after it in the shard is lost too", lost_samples(url, done))
        return
    if current is not None:
        yield current
