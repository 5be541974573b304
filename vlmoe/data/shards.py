"""Shard files: finding them from a pattern, and writing them (shared by ``data_scripts/``).

Notable choices:
- A shard pattern is a brace-expandable spec (``data/train-{000000..000009}.tar``), a glob
  (``data/train-*.tar``), a folder (its ``*.tar`` files), or a list of these. Local files that
  are missing make ``expand_shards`` raise ``ValueError`` naming the pattern before any data is
  read; remote URLs (``pipe:``, ``http://``, ...) are passed through unchecked.
- ``ShardWriter`` wraps ``webdataset.TarWriter`` with everything fixed that would make bytes
  differ between runs (member mtime, owner, mode), so the same samples give the same shard
  bytes. A shard file is opened only when its first sample arrives: no empty trailing shard.
- Samples follow DESIGN.md's shard sample format: ``KEY.<image ext>``, ``KEY.txt`` (the
  canonical caption, caption samples only) and ``KEY.json`` (sorted keys).
"""

from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import braceexpand
import webdataset as wds

_REMOTE_PREFIXES = ("pipe:", "http://", "https://", "gs://", "s3://", "ais://", "file://")


def expand_shards(pattern: str | Sequence[str]) -> list[str]:
    """The shard files a pattern names, in order.

    Raises:
        ValueError: a local file, glob or folder of the pattern matches no file.
    """
    patterns = [pattern] if isinstance(pattern, (str, os.PathLike)) else list(pattern)
    if not patterns:
        raise ValueError("shard pattern is an empty list")
    urls: list[str] = []
    missing: list[str] = []
    for item in patterns:
        for spec in braceexpand.braceexpand(os.fspath(item)):
            if spec.startswith(_REMOTE_PREFIXES):
                urls.append(spec)
                continue
            path = os.path.expanduser(spec)
            if glob.has_magic(path):
                found = sorted(glob.glob(path))
            elif os.path.isdir(path):
                found = sorted(glob.glob(os.path.join(path, "*.tar")))
            else:
                found = [path] if os.path.isfile(path) else []
            urls.extend(found)
            if not found:
                missing.append(spec)
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise ValueError(f"shard pattern {pattern!r} matches no file for: {shown}")
    return urls


class ShardWriter:
    """Writes samples into ``pattern % shard_index`` tar files, ``shard_size`` samples each.

    Use as a context manager; ``shards`` lists ``(path, num_samples)`` of every file written.
    """

    def __init__(self, pattern: str, shard_size: int) -> None:
        if shard_size < 1:
            raise ValueError(f"shard_size={shard_size} must be at least 1")
        try:
            pattern % 0
        except TypeError:
            raise ValueError(f"shard pattern {pattern!r} needs one %-format field, e.g. train-%06d.tar") from None
        self.pattern = pattern
        self.shard_size = shard_size
        self.shards: list[tuple[str, int]] = []
        self._tar: wds.TarWriter | None = None

    def write(self, sample: dict[str, Any]) -> None:
        """Write one sample: ``{"__key__": KEY, ext: bytes | str, ...}``."""
        if self._tar is None or self.shards[-1][1] >= self.shard_size:
            self._tar = self._open_next()
        encoded = {k: v.encode("utf-8") if isinstance(v, str) and k != "__key__" else v for k, v in sample.items()}
        self._tar.write(encoded)
        path, count = self.shards[-1]
        self.shards[-1] = (path, count + 1)

    @property
    def num_samples(self) -> int:
        return sum(count for _, count in self.shards)

    def _open_next(self) -> wds.TarWriter:
        self.close()
        path = self.pattern % len(self.shards)
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.shards.append((path, 0))
        return wds.TarWriter(path, encoder=False, mtime=0, user="vlmoe", group="vlmoe", mode=0o644)

    def close(self) -> None:
        if self._tar is not None:
            self._tar.close()
            self._tar = None

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def dumps_json(obj: Any) -> str:
    """Deterministic JSON text (sorted keys)."""
    return json.dumps(obj, sort_keys=True, ensure_ascii=False)


def sample_key(value: int | str) -> str:
    """A shard key from an id: ints zero-padded to 12 digits, strings with ``.`` and ``/`` replaced."""
    if isinstance(value, int):
        return f"{value:012d}"
    return str(value).replace(".", "_").replace("/", "_")


def caption_sample(
    key: str, image: tuple[str, bytes], captions: Sequence[str], meta: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """A caption sample: the image, ``txt`` = the canonical (first) caption, json = meta + all captions."""
    if not captions:
        raise ValueError(f"sample {key!r}: no captions")
    ext, data = image
    body = {**(meta or {}), "captions": list(captions)}
    return {"__key__": key, ext: data, "txt": captions[0], "json": dumps_json(body)}


def vqa_sample(
    key: str,
    image: tuple[str, bytes],
    question: str,
    answers: Sequence[str],
    question_id: int | str,
    meta: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """A VQA sample: the image, json = meta + ``question``, ``answers``, ``question_id``."""
    if not answers:
        raise ValueError(f"sample {key!r}: no answers")
    ext, data = image
    body = {**(meta or {}), "question": question, "answers": list(answers), "question_id": question_id}
    return {"__key__": key, ext: data, "json": dumps_json(body)}


@dataclass(frozen=True)
class ShardSet:
    """What a prepare script wrote for one split: shard files and their sample counts."""

    task: str
    shards: tuple[tuple[str, int], ...]

    @property
    def num_samples(self) -> int:
        return sum(count for _, count in self.shards)

    def pattern(self, relative_to: str | os.PathLike[str] | None = None) -> str:
        """A brace pattern naming every shard (``train-{000000..000003}.tar``)."""
        paths = [p if relative_to is None else os.path.relpath(p, relative_to) for p, _ in self.shards]
        return brace_pattern(paths)

    def to_json(self, relative_to: str | os.PathLike[str]) -> dict[str, Any]:
        return {
            "task": self.task,
            "pattern": self.pattern(relative_to),
            "num_samples": self.num_samples,
            "shards": {os.path.relpath(p, relative_to): n for p, n in self.shards},
        }


def brace_pattern(paths: Sequence[str]) -> str:
    """Compress ``x-000000.tar .. x-000003.tar`` into ``x-{000000..000003}.tar``.

    Paths that do not form one numbered run are joined as ``{a,b,c}`` instead.
    """
    if not paths:
        return ""
    if len(paths) == 1:
        return paths[0]
    numbered = [_split_number(p) for p in paths]
    heads = {(h, t, len(n)) for h, n, t in numbered if n}
    if len(heads) == 1 and all(n for _, n, _ in numbered):
        numbers = [int(n) for _, n, _ in numbered]
        if numbers == list(range(numbers[0], numbers[0] + len(numbers))):
            head, first, tail = numbered[0]
            return f"{head}{{{first}..{numbered[-1][1]}}}{tail}"
    return "{" + ",".join(paths) + "}"


def _split_number(path: str) -> tuple[str, str, str]:
    """``data/train-000012.tar`` -> (``data/train-``, ``000012``, ``.tar``); no number -> ``""``."""
    stem_end = len(path) - len(Path(path).suffix)
    end = stem_end
    start = end
    while start > 0 and path[start - 1].isdigit():
        start -= 1
    return path[:start], path[start:end], path[end:]
