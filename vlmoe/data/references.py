"""Reference files for evaluation, in the formats the standard tools read.

- Captions: COCO style, ``{"images": [{"id"}], "annotations": [{"id", "image_id", "caption"}]}``
  (what ``pycocotools``/``pycocoevalcap`` load).
- VQA: the VQAv2 pair, a questions file ``{"questions": [{"question_id", "image_id",
  "question"}]}`` and an annotations file ``{"annotations": [{"question_id", "image_id",
  "question_type", "answer_type", "multiple_choice_answer", "answers": [{"answer",
  "answer_confidence", "answer_id"}]}]}`` (what the official VQA evaluation loads).

The prepare scripts write them next to the shards; ``load_*`` read them back into plain dicts.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

ImageId = int | str


@dataclass(frozen=True)
class VQAReference:
    """One question with its reference answers."""

    question_id: ImageId
    image_id: ImageId
    question: str
    answers: Sequence[str]
    question_type: str | None = None
    answer_type: str | None = None
    multiple_choice_answer: str | None = None


def caption_references(entries: Iterable[tuple[ImageId, Sequence[str]]]) -> dict[str, Any]:
    """COCO-style caption references from ``(image_id, captions)`` pairs."""
    images, annotations = [], []
    for image_id, captions in entries:
        images.append({"id": image_id})
        for caption in captions:
            annotations.append({"id": len(annotations), "image_id": image_id, "caption": caption})
    return {"info": {"description": "vlmoe caption references"}, "type": "captions", "images": images,
            "annotations": annotations}


def vqa_references(entries: Iterable[VQAReference]) -> tuple[dict[str, Any], dict[str, Any]]:
    """VQAv2-style ``(questions, annotations)`` from ``VQAReference``s."""
    questions, annotations = [], []
    for ref in entries:
        questions.append({"question_id": ref.question_id, "image_id": ref.image_id, "question": ref.question})
        majority = ref.multiple_choice_answer or Counter(ref.answers).most_common(1)[0][0]
        annotations.append({
            "question_id": ref.question_id,
            "image_id": ref.image_id,
            "question_type": ref.question_type or "",
            "answer_type": ref.answer_type or "",
            "multiple_choice_answer": majority,
            "answers": [
                {"answer": a, "answer_confidence": "yes", "answer_id": i + 1} for i, a in enumerate(ref.answers)
            ],
        })
    info = {"description": "vlmoe VQA references"}
    return {"info": info, "questions": questions}, {"info": info, "annotations": annotations}


def _read(path: str | os.PathLike[str], field: str) -> list[dict[str, Any]]:
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(data, dict) or not isinstance(data.get(field), list):
        raise ValueError(f"{os.fspath(path)!r} has no {field!r} list")
    return data[field]


def load_caption_references(path: str | os.PathLike[str]) -> dict[ImageId, list[str]]:
    """``image_id -> captions`` from a COCO-style caption file (images without captions kept, empty), or from
    ``{image_id: [captions]}`` (JSON keys are strings: all-digit keys become int ids)."""
    refs: dict[ImageId, list[str]] = {}
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    if isinstance(data, dict) and "annotations" not in data:
        if not all(isinstance(v, list) and all(isinstance(c, str) for c in v) for v in data.values()):
            raise ValueError(f"{os.fspath(path)!r} is neither COCO captions nor {{image_id: [captions]}}")
        return {(int(k) if k.isascii() and k.isdigit() else k): list(v) for k, v in data.items()}
    for image in data.get("images", []):
        refs.setdefault(image["id"], [])
    for ann in _read(path, "annotations"):
        refs.setdefault(ann["image_id"], []).append(ann["caption"])
    return refs


def load_vqa_references(
    questions_path: str | os.PathLike[str], annotations_path: str | os.PathLike[str]
) -> dict[ImageId, VQAReference]:
    """``question_id -> VQAReference`` from a VQAv2-style questions/annotations pair."""
    questions = {q["question_id"]: q for q in _read(questions_path, "questions")}
    refs: dict[ImageId, VQAReference] = {}
    for ann in _read(annotations_path, "annotations"):
        question = questions.get(ann["question_id"])
        if question is None:
            raise ValueError(f"{os.fspath(annotations_path)!r}: question_id {ann['question_id']!r} is not in "
                             f"{os.fspath(questions_path)!r}")
        refs[ann["question_id"]] = VQAReference(
            question_id=ann["question_id"],
            image_id=ann["image_id"],
            question=question["question"],
            answers=[a["answer"] for a in ann["answers"]],
            question_type=ann.get("question_type") or None,
            answer_type=ann.get("answer_type") or None,
            multiple_choice_answer=ann.get("multiple_choice_answer"),
        )
    return refs
