"""Helpers the prepare scripts in ``data_scripts/`` share: reading images, JSON, skip reports.

Notable choices:
- Source images keep their bytes when they are JPEG, PNG or WebP (no re-encoding, no quality
  loss); other formats PIL reads become PNG. Every image is decoded once while preparing, so a
  broken file is reported then, by name, instead of being skipped at training time.
- Bad input records are reported one line each on stderr as they are met, and summarised at
  the end; a script fails (non-zero exit) only when it wrote nothing.
"""

from __future__ import annotations

import io
import json
import os
import sys
from pathlib import Path
from typing import Any

from PIL import Image

from .shards import dumps_json

_PIL_FORMAT_TO_EXT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}


def read_image_file(path: str | os.PathLike[str]) -> tuple[str, bytes]:
    """An image file as ``(extension, bytes)`` for a shard, after checking that it decodes.

    Raises:
        ValueError: the file is missing or is not a readable image (the message names it).
    """
    try:
        data = Path(path).read_bytes()
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            ext = _PIL_FORMAT_TO_EXT.get(image.format or "")
            if ext is None:
                out = io.BytesIO()
                image.save(out, format="PNG")
                return "png", out.getvalue()
    except Exception as exn:  # OSError and PIL's errors of several types
        raise ValueError(f"image {os.fspath(path)!r} is not readable ({type(exn).__name__}: {exn})") from None
    return ext, data


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Write ``obj`` as deterministic JSON (sorted keys), creating the parent folder."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(dumps_json(obj) + "\n", encoding="utf-8")


def update_index(path: str | os.PathLike[str], entries: dict[str, Any]) -> None:
    """Merge ``entries`` into the index json at ``path`` (created if missing)."""
    index: dict[str, Any] = {}
    if Path(path).is_file():
        index = json.loads(Path(path).read_text(encoding="utf-8"))
    index.update(entries)
    write_json(path, index)


class SkipReport:
    """Collects the input records a script skipped, printing each one as it comes."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.skipped: list[tuple[str, str]] = []

    def add(self, where: str, reason: str) -> None:
        self.skipped.append((where, reason))
        print(f"{self.source}: {where}: skipped: {reason}", file=sys.stderr)

    def summary(self, written: int, what: str) -> str:
        text = f"wrote {written} {what}; skipped {len(self.skipped)} bad record(s)"
        if self.skipped:
            shown = ", ".join(where for where, _ in self.skipped[:10])
            text += f" ({shown}{', ...' if len(self.skipped) > 10 else ''})"
        return text
