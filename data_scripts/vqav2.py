"""Convert VQAv2 questions + annotations files and their COCO image folder into VQA shards.

    python data_scripts/vqav2.py --questions vqav2/v2_OpenEnded_mscoco_val2014_questions.json \\
        --annotations vqav2/v2_mscoco_val2014_annotations.json --images coco/val2014 \\
        --output data/vqav2 --split val

Writes ``DIR/{split}-%06d.tar`` with one sample per question (``KEY.json`` has ``question``,
all 10 ``answers`` in ``answer_id`` order, ``question_id``, ``image_id``, ``question_type``,
``answer_type``, ``multiple_choice_answer``), the references ``DIR/{split}_questions.json`` and
``DIR/{split}_annotations.json`` (VQAv2 format, restricted to the questions written) and an
entry ``{split}`` in ``DIR/index.json``.

Images are found by id: every file in ``--images`` whose name ends in ``<digits>.<ext>``
(``COCO_val2014_000000000042.jpg``, ``000000000042.jpg``) is image ``int(digits)``. Questions
without an annotation, whose image is missing or unreadable, are reported and skipped; the exit
status is non-zero only when nothing was written. Test splits without annotations are not
supported (answers are required).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any, Sequence

from tqdm import tqdm

from vlmoe.data.prepare import SkipReport, read_image_file, update_index, write_json
from vlmoe.data.references import VQAReference, vqa_references
from vlmoe.data.sample import IMAGE_EXTENSIONS
from vlmoe.data.shards import ShardSet, ShardWriter, sample_key, vqa_sample

_IMAGE_NAME = re.compile(r"(\d+)\.(" + "|".join(IMAGE_EXTENSIONS) + r")$", re.IGNORECASE)


def _load(path: Path, field: str) -> list[dict[str, Any]]:
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict) or not isinstance(data.get(field), list):
        raise ValueError(f"{path} has no {field!r} list: is it a VQAv2 {field} file?")
    return data[field]


def index_images(folder: Path) -> dict[int, Path]:
    """``image_id -> path`` for files named ``...<digits>.<image ext>``.

    Raises:
        ValueError: two files give the same id (both are named).
    """
    images: dict[int, Path] = {}
    for path in sorted(folder.iterdir()):
        match = _IMAGE_NAME.search(path.name)
        if match is None:
            continue
        image_id = int(match.group(1))
        if image_id in images:
            raise ValueError(f"{images[image_id]} and {path} are both image {image_id}")
        images[image_id] = path
    return images


def reference(question: dict[str, Any], annotation: dict[str, Any]) -> VQAReference:
    answers = sorted(annotation["answers"], key=lambda a: a.get("answer_id", 0))
    return VQAReference(
        question_id=question["question_id"],
        image_id=question["image_id"],
        question=question["question"],
        answers=[a["answer"] for a in answers],
        question_type=annotation.get("question_type"),
        answer_type=annotation.get("answer_type"),
        multiple_choice_answer=annotation.get("multiple_choice_answer"),
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--questions", required=True, type=Path, help="v2_OpenEnded_mscoco_*_questions.json")
    parser.add_argument("--annotations", required=True, type=Path, help="v2_mscoco_*_annotations.json")
    parser.add_argument("--images", required=True, type=Path, help="the COCO image folder of the split")
    parser.add_argument("--output", required=True, type=Path, help="output folder")
    parser.add_argument("--split", default="train", help="name of the split: shard prefix and index entry")
    parser.add_argument("--shard-size", type=int, default=1000, help="samples (questions) per shard")
    args = parser.parse_args(argv)
    if args.shard_size < 1:
        parser.error(f"--shard-size={args.shard_size} must be at least 1")
    if not args.images.is_dir():
        parser.error(f"--images {args.images} is not a folder")
    for name in ("questions", "annotations"):
        if not getattr(args, name).is_file():
            parser.error(f"--{name} {getattr(args, name)} is not a file")
    questions = sorted(_load(args.questions, "questions"), key=lambda q: (q["image_id"], q["question_id"]))
    annotations = {a["question_id"]: a for a in _load(args.annotations, "annotations")}
    images = index_images(args.images)

    report = SkipReport(str(args.questions))
    written: list[VQAReference] = []
    cached: tuple[Any, tuple[str, bytes]] | None = None  # questions are sorted by image
    with ShardWriter(str(args.output / f"{args.split}-%06d.tar"), args.shard_size) as writer:
        for question in tqdm(questions, desc=f"vqav2 {args.split}", unit="q"):
            where = f"question_id {question['question_id']}"
            annotation = annotations.get(question["question_id"])
            if annotation is None or not annotation.get("answers"):
                report.add(where, "no annotation with answers")
                continue
            path = images.get(question["image_id"])
            if path is None:
                report.add(where, f"no image {question['image_id']} in {args.images}")
                continue
            try:
                if cached is None or cached[0] != path:
                    cached = (path, read_image_file(path))
            except ValueError as exn:
                report.add(where, str(exn))
                continue
            ref = reference(question, annotation)
            meta = {"image_id": ref.image_id, "question_type": ref.question_type, "answer_type": ref.answer_type,
                    "multiple_choice_answer": ref.multiple_choice_answer}
            writer.write(vqa_sample(sample_key(ref.question_id), cached[1], ref.question, ref.answers, ref.question_id,
                                    meta))
            written.append(ref)

    print(report.summary(len(written), f"questions to {args.output}"), file=sys.stderr)
    if not written:
        return 1
    questions_json, annotations_json = vqa_references(written)
    names = {"questions": f"{args.split}_questions.json", "annotations": f"{args.split}_annotations.json"}
    write_json(args.output / names["questions"], questions_json)
    write_json(args.output / names["annotations"], annotations_json)
    entry = ShardSet("vqa", tuple(writer.shards)).to_json(args.output)
    update_index(args.output / "index.json", {args.split: {**entry, "references": names}})
    return 0


if __name__ == "__main__":
    sys.exit(main())
