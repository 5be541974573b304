"""Convert a JSONL file of image-text records into caption and VQA shards.

    python data_scripts/jsonl_to_shards.py --input data/mine.jsonl --output data/mine_shards
    python data_scripts/jsonl_to_shards.py --input data/mine.jsonl --output data/mine_shards --shard-size 5000

One record per line (DESIGN.md "JSONL input schema"); image paths are absolute or relative to
the JSONL file's folder:

    {"image": "imgs/1.jpg", "caption": "a red circle"}                 (or "captions": [...])
    {"image": "imgs/1.jpg", "question": "what color is the circle?", "answers": ["red", ...],
     "question_id": 17}
    optional on both: "image_id" (int or str); any other field is kept in the sample's metadata.

Writes ``DIR/caption-%06d.tar`` (records with a caption), ``DIR/vqa-%06d.tar`` (records with
a question), their references (``DIR/refs/``) and ``DIR/index.json`` (patterns and counts).
A sample's key is its line number; a VQA record without ``question_id`` gets its line number,
and a record without ``image_id`` gets its ``image`` string. Bad records (bad JSON, missing or
unreadable image, missing text, repeated question_id) are reported by line number and skipped;
the exit status is non-zero only when nothing was written.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from tqdm import tqdm

from vlmoe.data.prepare import SkipReport, read_image_file, update_index, write_json
from vlmoe.data.references import VQAReference, caption_references, vqa_references
from vlmoe.data.shards import ShardSet, ShardWriter, caption_sample, vqa_sample


@dataclass
class Record:
    """One valid JSONL record."""

    image: Path
    image_id: Any
    captions: list[str] = field(default_factory=list)
    question: str | None = None
    answers: list[str] = field(default_factory=list)
    question_id: Any = None
    meta: dict[str, Any] = field(default_factory=dict)


def _strings(value: Any, name: str) -> list[str]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items or not all(isinstance(v, str) and v.strip() for v in items):
        raise ValueError(f"{name!r} must be a non-empty string or list of non-empty strings, got {value!r}")
    return [v.strip() for v in items]


def _id(value: Any, name: str) -> Any:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"{name!r} must be an int or a string, got {value!r}")
    return value


def parse_record(line: str, line_number: int, base: Path) -> Record:
    """Validate one JSONL line (the image is checked separately).

    Raises:
        ValueError: the line is not a JSON object or misses a field (the message names it).
    """
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exn:
        raise ValueError(f"bad JSON ({exn})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"a record must be a JSON object, got {type(obj).__name__}")
    meta = dict(obj)
    image = meta.pop("image", None)
    if not isinstance(image, str) or not image:
        raise ValueError("missing 'image' (a path string)")
    path = Path(image) if Path(image).is_absolute() else base / image
    image_id = _id(meta.pop("image_id", image), "image_id")
    if "question" in meta:
        question = _strings(meta.pop("question"), "question")
        if len(question) != 1:
            raise ValueError("'question' must be one string")
        if "answers" not in meta:
            raise ValueError("a record with a 'question' needs 'answers'")
        answers = _strings(meta.pop("answers"), "answers")
        question_id = _id(meta.pop("question_id", line_number), "question_id")
        return Record(path, image_id, question=question[0], answers=answers, question_id=question_id, meta=meta)
    if "captions" in meta:
        captions = _strings(meta.pop("captions"), "captions")
    elif "caption" in meta:
        captions = _strings(meta.pop("caption"), "caption")
    else:
        raise ValueError("missing text: a record needs 'caption', 'captions' or 'question' + 'answers'")
    return Record(path, image_id, captions=captions, meta=meta)


class Converter:
    """Writes records to the caption and VQA shard sets of one output folder."""

    def __init__(self, output: Path, shard_size: int) -> None:
        self.output = output
        self.captions = ShardWriter(str(output / "caption-%06d.tar"), shard_size)
        self.vqa = ShardWriter(str(output / "vqa-%06d.tar"), shard_size)
        self.caption_refs: list[tuple[Any, list[str]]] = []
        self.vqa_refs: list[VQAReference] = []
        self.question_ids: set[Any] = set()
        self._image_cache: tuple[Path, tuple[str, bytes]] | None = None

    def image(self, path: Path) -> tuple[str, bytes]:
        if self._image_cache is None or self._image_cache[0] != path:  # consecutive questions share images
            self._image_cache = (path, read_image_file(path))
        return self._image_cache[1]

    def add(self, record: Record, key: str) -> None:
        """Write one record. Raises ValueError (image unreadable, question_id repeated)."""
        if record.question is not None and record.question_id in self.question_ids:
            raise ValueError(f"question_id {record.question_id!r} was used by an earlier record")
        image = self.image(record.image)
        if record.question is None:
            meta = {**record.meta, "image_id": record.image_id}
            self.captions.write(caption_sample(key, image, record.captions, meta))
            self.caption_refs.append((record.image_id, record.captions))
            return
        self.question_ids.add(record.question_id)
        meta = {**record.meta, "image_id": record.image_id}
        self.vqa.write(vqa_sample(key, image, record.question, record.answers, record.question_id, meta))
        self.vqa_refs.append(VQAReference(record.question_id, record.image_id, record.question, record.answers,
                                          record.meta.get("question_type"), record.meta.get("answer_type")))

    def finish(self) -> dict[str, Any]:
        """Close the shards, write references; return the index entries."""
        self.captions.close()
        self.vqa.close()
        entries: dict[str, Any] = {}
        if self.caption_refs:
            write_json(self.output / "refs" / "caption.json", caption_references(self.caption_refs))
            entries["caption"] = ShardSet("caption", tuple(self.captions.shards)).to_json(self.output)
            entries["caption"]["references"] = {"captions": "refs/caption.json"}
        if self.vqa_refs:
            questions, annotations = vqa_references(self.vqa_refs)
            write_json(self.output / "refs" / "vqa_questions.json", questions)
            write_json(self.output / "refs" / "vqa_annotations.json", annotations)
            entries["vqa"] = ShardSet("vqa", tuple(self.vqa.shards)).to_json(self.output)
            entries["vqa"]["references"] = {"questions": "refs/vqa_questions.json",
                                            "annotations": "refs/vqa_annotations.json"}
        return entries


def convert(input_path: Path, output: Path, shard_size: int) -> tuple[int, SkipReport]:
    """Convert the file; return the number of samples written and the skip report."""
    report = SkipReport(str(input_path))
    converter = Converter(output, shard_size)
    base = input_path.resolve().parent
    with open(input_path, encoding="utf-8") as lines:
        for line_number, line in enumerate(tqdm(lines, desc="jsonl", unit="rec"), start=1):
            if not line.strip():
                continue
            try:
                converter.add(parse_record(line, line_number, base), key=f"{line_number:09d}")
            except ValueError as exn:
                report.add(f"line {line_number}", str(exn))
    entries = converter.finish()
    written = converter.captions.num_samples + converter.vqa.num_samples
    if written:
        update_index(output / "index.json", entries)
    return written, report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, type=Path, help="the JSONL file")
    parser.add_argument("--output", required=True, type=Path, help="folder for shards, references and index.json")
    parser.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    args = parser.parse_args(argv)
    if args.shard_size < 1:
        parser.error(f"--shard-size={args.shard_size} must be at least 1")
    if not args.input.is_file():
        parser.error(f"--input {args.input} is not a file")
    written, report = convert(args.input, args.output, args.shard_size)
    print(report.summary(written, f"samples to {args.output}"), file=sys.stderr)
    return 0 if written else 1


if __name__ == "__main__":
    sys.exit(main())
