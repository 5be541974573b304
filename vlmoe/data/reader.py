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
  ends without tar's end-of-archive block is truncated too (compressed or not).
"""

from __future__ import annotations

import tarfile
import zlib
from typing import Any, BinaryIO, Iterator, NamedTuple

import webdataset as wds
from webdataset.tariterators import base_plus_ext

_TAR_ERRORS = (tarfile.TarError, OSError, EOFError, zlib.error)


class Skipped(NamedTuple):
    """A sample (or shard) that was dropped, travelling in the stream in its place."""

    reason: str
    url: str
    key: str | None
    detail: str

    def describe(self) -> str:
        where = f"sample {self.key!r} of shard {self.url}" if self.key else f"shard {self.url}"
        return f"skipped {where}: {self.reason} ({self.detail})"


def read_shard(url: str, fields: dict[str, Any] | None = None) -> Iterator[dict[str, Any] | Skipped]:
    """Raw samples ``{"__key__", "__url__", **fields, ext: bytes}`` of one shard, or ``Skipped``."""
    try:
        stream = wds.gopen(url)
    except OSError as exn:
        yield Skipped("unreadable_shard", url, None, f"{type(exn).__name__}: {exn}")
        return
    try:
        yield from _read_tar(stream, url, fields or {})
    finally:
        stream.close()


def _read_tar(stream: BinaryIO, url: str, fields: dict[str, Any]) -> Iterator[dict[str, Any] | Skipped]:
    try:
        tar = tarfile.open(fileobj=stream, mode="r|*")  # type: ignore[call-overload]
    except _TAR_ERRORS as exn:
        yield Skipped("unreadable_shard", url, None, f"not a tar archive: {exn}")
        return
    current: dict[str, Any] | None = None  # the sample being assembled
    key: str | None = None  # the key of the last member met
    dropped: str | None = None  # a key whose sample was dropped for a duplicate member
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
                current = None
            if key == dropped:
                continue
            if current is None:
                current = {"__key__": key, "__url__": url, **fields}
            ext = ext.lower()
            if ext in current:
                yield Skipped("duplicate_member", url, key, f"a second member {info.name}")
                current, dropped = None, key
                continue
            current[ext] = data
        # A complete archive ends with a zero block, which tarfile has read (position in the
        # uncompressed stream); a cut inside or before a member header ends the loop silently.
        if tar.fileobj.pos < tar.offset + tarfile.BLOCKSIZE:  # type: ignore[union-attr]
            raise tarfile.ReadError("the archive ends inside a member header")
    except _TAR_ERRORS as exn:
        if current is not None and current["__key__"] != key:
            yield current  # complete: the damage is in the next sample
        yield Skipped("truncated", url, key, f"{exn}; anything after it in the shard is lost too")
        return
    if current is not None:
        yield current
