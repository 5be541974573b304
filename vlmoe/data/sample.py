"""One decoded sample, and how raw shard members become one.

Notable choices:
- A sample is a small dataclass (``Sample``) holding a PIL RGB image and the text of one
  task: ``captions`` for ``caption`` samples (the first is the canonical one a model trains on
  by default), ``question`` and ``answers`` for ``vqa`` samples. Everything else in the
  sample's ``.json`` member stays in ``meta``.
- Where the text comes from (shard sample format in DESIGN.md): a caption sample takes
  ``json["captions"]`` when present, else the ``.txt`` member, else ``json["caption"]``, so
  img2dataset shards (``KEY.jpg`` / ``KEY.txt`` / ``KEY.json``) load unchanged; a VQA sample
  needs ``json["question"]`` and ``json["answers"]``.
- Images: the EXIF orientation is applied, then every mode becomes RGB; modes with alpha
  (RGBA, LA, PA, P with a transparency entry) are composited on white first. PIL's
  decompression-bomb guard (``Image.MAX_IMAGE_PIXELS``) is left as it is.
- A sample that cannot be built raises ``BadSample`` carrying a short ``reason`` (one of
  ``SKIP_REASONS``) that the pipeline counts.
- Conversations (a VQA training source with ``conversations``): ``group_by_image`` joins the
  consecutive raw samples of a shard that hold the same image (equal bytes) before the shuffle
  buffer, and the sample built from the first carries the others' questions as ``followups``,
  trained as the later turns of one sequence (LLaVA's multi-turn format). The image is decoded
  once; a follow-up that cannot be read is skipped and counted on its own.
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

from PIL import Image, ImageOps

TASKS = ("caption", "vqa")
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")

# Why a sample or a shard was skipped; the keys of every skip count.
SKIP_REASONS = (
    "unreadable_shard",  # the shard file could not be opened or is not a tar archive
    "truncated",  # the archive ends inside a member; the sample being read is dropped
    "duplicate_member",  # two members with the same key and extension in a row
    "bad_json",  # the .json member is not a JSON object
    "missing_image",  # no image member
    "bad_image",  # the image member cannot be decoded (or trips the decompression-bomb guard)
    "missing_text",  # no caption (caption task) or no question/answers (vqa task)
    "too_long",  # longer than model.max_text_length tokens: the sample, or one question of a conversation
)

# json fields a sample consumes into its own attributes (the rest goes to ``meta``).
_CAPTION_FIELDS = ("captions", "caption")
_VQA_FIELDS = ("question", "answers", "question_id", "question_type")


@dataclass
class Sample:
    """One image with the text of one task.

    Attributes:
        key: the sample's key inside its shard (``KEY`` of ``KEY.png``).
        url: the shard the sample came from.
        image: the decoded image, mode RGB, EXIF orientation applied.
        task: ``caption`` or ``vqa``.
        captions: every reference caption (caption task); ``captions[0]`` is the canonical one.
        question: the question (vqa task), else None.
        answers: the reference answers (vqa task; VQAv2 has 10), else empty.
        question_id: the question's id (vqa task), else None.
        image_id: ``json["image_id"]`` when present, else the key.
        question_type: ``json["question_type"]`` when present, else None.
        meta: the remaining fields of the sample's ``.json`` member.
        epoch: the passes over its source before this one (training streams; 0 elsewhere).
        followups: further questions about the same image, with their reference answers (a
            conversation: a VQA training source with ``conversations``); empty elsewhere.
    """

    key: str
    url: str
    image: Image.Image
    task: str
    captions: list[str] = field(default_factory=list)
    question: str | None = None
    answers: list[str] = field(default_factory=list)
    question_id: int | str | None = None
    image_id: int | str | None = None
    question_type: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    epoch: int = 0
    followups: list[tuple[str, list[str]]] = field(default_factory=list)


class BadSample(ValueError):
    """A raw shard sample that cannot become a ``Sample``; ``reason`` is in ``SKIP_REASONS``."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def to_rgb(image: Image.Image) -> Image.Image:
    """Apply the EXIF orientation and convert to RGB, compositing any alpha on white."""
    image = ImageOps.exif_transpose(image)
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info
    if has_alpha:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if image.mode != "RGB":
        return image.convert("RGB")
    return image


def decode_image(data: bytes) -> Image.Image:
    """Decode encoded image bytes into an RGB image (errors from PIL propagate)."""
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        return to_rgb(image)


def open_image(path: str | os.PathLike[str]) -> Image.Image:
    """Read an image file into an RGB image, as the pipeline would decode it."""
    with open(path, "rb") as stream:
        return decode_image(stream.read())


def _json_member(raw: dict[str, Any]) -> dict[str, Any]:
    if "json" not in raw:
        return {}
    try:
        meta = json.loads(raw["json"])
    except (UnicodeDecodeError, json.JSONDecodeError) as exn:
        raise BadSample("bad_json", f"the .json member does not parse ({exn})") from None
    if not isinstance(meta, dict):
        raise BadSample("bad_json", f"the .json member is a {type(meta).__name__}, not an object")
    return meta


def _text_list(value: Any) -> list[str]:
    """A list of non-empty stripped strings from a string or a list of strings, else []."""
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        return []
    texts = [v.strip() for v in value]
    return texts if all(texts) else []


def _captions(raw: dict[str, Any], meta: dict[str, Any]) -> list[str]:
    captions = _text_list(meta.get("captions"))
    if not captions and "txt" in raw:
        try:
            captions = _text_list(raw["txt"].decode("utf-8"))
        except UnicodeDecodeError:
            captions = []
    if not captions:
        captions = _text_list(meta.get("caption"))
    if not captions:
        raise BadSample("missing_text", "no caption (json 'captions', .txt member or json 'caption')")
    for name in _CAPTION_FIELDS:
        meta.pop(name, None)
    return captions


def _question_answers(meta: dict[str, Any]) -> tuple[str, list[str]]:
    question = _text_list(meta.get("question"))
    if len(question) != 1:
        raise BadSample("missing_text", "no json 'question' string")
    answers = _text_list(meta.get("answers"))
    if not answers:
        raise BadSample("missing_text", "no json 'answers' (a non-empty list of strings)")
    return question[0], answers


def _image_member(raw: dict[str, Any]) -> bytes:
    image = image_bytes(raw)
    if image is None:
        raise BadSample("missing_image", f"no image member (one of {', '.join(IMAGE_EXTENSIONS)})")
    return image


def image_bytes(raw: dict[str, Any]) -> bytes | None:
    """The raw sample's encoded image, or None when it has none."""
    return next((raw[ext] for ext in IMAGE_EXTENSIONS if ext in raw), None)


def group_by_image(items: Iterable[Any]) -> Iterator[Any]:
    """Consecutive raw samples with the same image (equal bytes) as one: the first, holding the
    others in ``"__turns__"``. Anything else (a skip record, a sample without an image) passes
    through and ends the group."""
    group: dict[str, Any] | None = None
    group_image: bytes | None = None
    for item in items:
        image = image_bytes(item) if isinstance(item, dict) else None
        if group is not None and image is not None and image == group_image:
            group["__turns__"].append(item)
            continue
        if group is not None:
            yield group
        group, group_image = ({**item, "__turns__": []}, image) if image is not None else (None, None)
        if group is None:
            yield item
    if group is not None:
        yield group


def parse_question(raw: dict[str, Any]) -> tuple[str, list[str]]:
    """The question and reference answers of a raw VQA sample (a conversation's later turn).

    Raises:
        BadSample: the json is unreadable, or has no question or answers.
    """
    return _question_answers(_json_member(raw))


def parse_sample(raw: dict[str, Any], task: str) -> Sample:
    """Build a ``Sample`` from a raw shard sample (``{"__key__", "__url__", ext: bytes}``).

    Raises:
        BadSample: the json, the text or the image is missing or unreadable.
    """
    if task not in TASKS:
        raise ValueError(f"task={task!r} is not one of {list(TASKS)}")
    meta = _json_member(raw)
    image_bytes = _image_member(raw)
    captions: list[str] = []
    question, answers, question_id, question_type = None, [], None, None
    if task == "caption":
        captions = _captions(raw, meta)
    else:
        question, answers = _question_answers(meta)
        question_id = meta.get("question_id")
        question_type = meta.get("question_type")
        for name in _VQA_FIELDS:
            meta.pop(name, None)
    try:
        image = decode_image(image_bytes)
    except Exception as exn:  # PIL raises many types (OSError, SyntaxError, DecompressionBombError, ...)
        raise BadSample("bad_image", f"{type(exn).__name__}: {exn}") from None
    image_id = meta.pop("image_id", None)
    return Sample(
        key=raw["__key__"],
        url=raw["__url__"],
        image=image,
        task=task,
        captions=captions,
        question=question,
        answers=answers,
        question_id=question_id,
        image_id=raw["__key__"] if image_id is None else image_id,
        question_type=question_type,
        meta=meta,
    )
