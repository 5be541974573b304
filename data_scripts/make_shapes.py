"""Make the synthetic shapes set: captioning and VQA shards with their eval references.

    python data_scripts/make_shapes.py --output data/shapes
    python data_scripts/make_shapes.py --output /tmp/shapes --num-train 200 --num-val 50 --num-test 50

Writes (``--output DIR``)::

    DIR/caption/{train,val,test}-%06d.tar   one sample per image: KEY.png, KEY.txt, KEY.json
    DIR/vqa/{train,val,test}-%06d.tar       one sample per question: KEY.png, KEY.json
    DIR/refs/caption_{split}.json           COCO-style caption references
    DIR/refs/vqa_{split}_{questions,annotations}.json   VQAv2-style references
    DIR/index.json                          shard patterns and counts per split
    DIR/images/test-%06d.png                the first --export-images test images as files

Notable choices:
- Each image holds 1-3 shapes (circle, square, triangle; 6 colours; small or large) drawn
  without anti-aliasing on white, so every shape pixel has exactly its colour. No two shapes
  of an image share (size, shape) or (size, colour): each shape has a short unique description.
  Shapes do not touch and their centres are apart horizontally (a lone shape sits off the
  middle), so "left of" is always clear.
- ``captions[0]`` (also ``KEY.txt``) is canonical: the shapes from left to right, each as
  "size colour shape", in one fixed template per count; it is a function of the image alone.
  Four more phrasings follow as extra references.
- Questions: ``QUESTION_TYPES`` (colour, shape, count, position, yes/no); each image gets
  ``--questions-per-image`` distinct types drawn uniformly (20% each in expectation). Answers
  are one word or number; VQA references hold the answer 10 times.
- Image ``index`` of a split gets ``random.Random(f"{seed}/{split}/{index}")``: the output does
  not depend on ``--workers``, and the same arguments give the same bytes (PNG, fixed tar
  headers, sorted JSON). Caption and VQA shards of a split hold the same images (same image ids).
"""

from __future__ import annotations

import argparse
import io
import multiprocessing
import os
import random
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

from PIL import Image, ImageDraw
from tqdm import tqdm

from vlmoe.data.prepare import update_index, write_json
from vlmoe.data.references import VQAReference, caption_references, vqa_references
from vlmoe.data.shards import ShardSet, ShardWriter, caption_sample, vqa_sample

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 60),
    "blue": (30, 70, 220),
    "yellow": (235, 200, 20),
    "purple": (140, 50, 190),
    "orange": (245, 130, 20),
}
SHAPES = ("circle", "square", "triangle")
SIZES = ("small", "large")
BACKGROUND = (255, 255, 255)
SPLITS = ("train", "val", "test")
QUESTION_TYPES = ("color", "shape", "count", "position", "yes/no")
ANSWER_TYPES = {"color": "other", "shape": "other", "count": "number", "position": "other", "yes/no": "yes/no"}
NUM_REFERENCE_ANSWERS = 10

# Radius ranges in pixels at image size 64 (scaled with the image): areas never overlap.
_RADIUS = {"small": (4, 6), "large": (10, 12)}


@dataclass(frozen=True)
class Shape:
    """One drawn shape: centre ``(x, y)`` and half-extent ``r`` in pixels."""

    shape: str
    color: str
    size: str
    x: int
    y: int
    r: int

    def describe(self, attrs: Sequence[str] = ("size", "color", "shape")) -> str:
        """``attrs`` in the order size, colour, shape; "shape" is the noun when the kind is left out."""
        words = [getattr(self, a) for a in ("size", "color", "shape") if a in attrs]
        return " ".join(words if "shape" in attrs else [*words, "shape"])


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


# ------------------------------------------------------------------------------ scenes


def _pick_attributes(rng: random.Random, count: int) -> list[tuple[str, str, str]]:
    """``count`` (shape, colour, size) triples, no two sharing (size, shape) or (size, colour)."""
    picked: list[tuple[str, str, str]] = []
    while len(picked) < count:
        shape, color, size = rng.choice(SHAPES), rng.choice(list(COLORS)), rng.choice(SIZES)
        if all((size, shape) != (s, k) and (size, color) != (s, c) for k, c, s in picked):
            picked.append((shape, color, size))
    return picked


def _fits(x: int, y: int, r: int, placed: list[Shape], image_size: int, gap: int) -> bool:
    if len(placed) == 0 and abs(2 * x - (image_size - 1)) < 2 * gap:
        return False  # may end up alone: keep it off the vertical midline
    for other in placed:
        apart = max(abs(x - other.x), abs(y - other.y)) >= r + other.r + gap
        if not apart or abs(x - other.x) < gap:
            return False
    return True


def sample_scene(rng: random.Random, image_size: int) -> list[Shape]:
    """1-3 shapes at random places, sorted left to right."""
    scale = image_size / 64
    gap = max(2, round(4 * scale))
    while True:
        shapes: list[Shape] = []
        for shape, color, size in _pick_attributes(rng, rng.randint(1, 3)):
            low, high = _RADIUS[size]
            r = rng.randint(max(1, round(low * scale)), max(1, round(high * scale)))
            for _ in range(50):
                x = rng.randint(r + 1, image_size - 2 - r)
                y = rng.randint(r + 1, image_size - 2 - r)
                if _fits(x, y, r, shapes, image_size, gap):
                    shapes.append(Shape(shape, color, size, x, y, r))
                    break
            else:
                break  # no room: draw a new scene
        else:
            return sorted(shapes, key=lambda s: s.x)


def draw_scene(shapes: Sequence[Shape], image_size: int) -> Image.Image:
    image = Image.new("RGB", (image_size, image_size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for s in shapes:
        box = (s.x - s.r, s.y - s.r, s.x + s.r, s.y + s.r)
        fill = COLORS[s.color]
        if s.shape == "circle":
            draw.ellipse(box, fill=fill)
        elif s.shape == "square":
            draw.rectangle(box, fill=fill)
        else:
            draw.polygon([(s.x, s.y - s.r), (s.x - s.r, s.y + s.r), (s.x + s.r, s.y + s.r)], fill=fill)
    return image


# ------------------------------------------------------------------------------ text


def side_of(shape: Shape, image_size: int) -> str:
    return "left" if 2 * shape.x < image_size - 1 else "right"


def make_captions(shapes: Sequence[Shape], image_size: int) -> list[str]:
    """The canonical caption first, then four other phrasings. ``shapes`` are left to right."""
    d = [s.describe() for s in shapes]
    if len(shapes) == 1:
        s = shapes[0]
        return [
            f"a {d[0]}",
            f"one {d[0]}",
            f"{_article(s.color)} {s.color} {s.shape} that is {s.size}",
            f"a {s.size} {s.shape} colored {s.color}",
            f"a {d[0]} on the {side_of(s, image_size)}",
        ]
    if len(shapes) == 2:
        return [
            f"a {d[0]} left of a {d[1]}",
            f"a {d[1]} right of a {d[0]}",
            f"a {d[0]} to the left of a {d[1]}",
            f"a {d[1]} to the right of a {d[0]}",
            f"two shapes: a {d[0]} and a {d[1]}",
        ]
    return [
        f"a {d[0]}, a {d[1]} and a {d[2]} from left to right",
        f"from left to right: a {d[0]}, a {d[1]} and a {d[2]}",
        f"a {d[0]} left of a {d[1]} left of a {d[2]}",
        f"a {d[2]}, a {d[1]} and a {d[0]} from right to left",
        f"three shapes: a {d[0]}, a {d[1]} and a {d[2]}",
    ]


_FULL_REFS = (("shape",), ("color", "shape"), ("size", "shape"), ("size", "color", "shape"))


def refer(target: Shape, shapes: Sequence[Shape], options: Sequence[Sequence[str]]) -> str:
    """The first description in ``options`` that fits ``target`` and no other shape."""
    for attrs in options:
        if not any(o is not target and all(getattr(o, a) == getattr(target, a) for a in attrs) for o in shapes):
            return target.describe(attrs)
    raise ValueError(f"no unique description of {target} among {list(shapes)}")


def _ask_color(shapes: Sequence[Shape], rng: random.Random, image_size: int) -> tuple[str, str]:
    target = rng.choice(shapes)
    return f"what color is the {refer(target, shapes, (('shape',), ('size', 'shape')))}?", target.color


def _ask_shape(shapes: Sequence[Shape], rng: random.Random, image_size: int) -> tuple[str, str]:
    target = rng.choice(shapes)
    return f"what shape is the {refer(target, shapes, (('color',), ('size', 'color')))}?", target.shape


def _ask_count(shapes: Sequence[Shape], rng: random.Random, image_size: int) -> tuple[str, str]:
    kind = rng.choice(("all", "color", "shape"))
    if kind == "all":
        return "how many shapes are there?", str(len(shapes))
    if kind == "color":
        color = rng.choice(shapes).color if rng.random() < 0.5 else rng.choice(list(COLORS))
        return f"how many {color} shapes are there?", str(sum(s.color == color for s in shapes))
    shape = rng.choice(SHAPES)
    return f"how many {shape}s are there?", str(sum(s.shape == shape for s in shapes))


def _ask_position(shapes: Sequence[Shape], rng: random.Random, image_size: int) -> tuple[str, str]:
    if len(shapes) == 1:
        ref = refer(shapes[0], shapes, _FULL_REFS)
        return f"is the {ref} on the left or the right?", side_of(shapes[0], image_size)
    a, b = rng.sample(list(shapes), 2)
    answer = "left" if a.x < b.x else "right"
    return f"is the {refer(a, shapes, _FULL_REFS)} left or right of the {refer(b, shapes, _FULL_REFS)}?", answer


def _ask_yes_no(shapes: Sequence[Shape], rng: random.Random, image_size: int) -> tuple[str, str]:
    present = {(s.color, s.shape) for s in shapes}
    if rng.random() < 0.5:
        color, shape = sorted(present)[rng.randrange(len(present))]
    else:
        absent = [(c, k) for c in COLORS for k in SHAPES if (c, k) not in present]
        color, shape = absent[rng.randrange(len(absent))]
    answer = "yes" if (color, shape) in present else "no"
    return f"is there {_article(color)} {color} {shape}?", answer


_ASK = {"color": _ask_color, "shape": _ask_shape, "count": _ask_count, "position": _ask_position, "yes/no": _ask_yes_no}


def make_questions(
    shapes: Sequence[Shape], rng: random.Random, image_size: int, count: int
) -> list[tuple[str, str, str]]:
    """``count`` ``(question_type, question, answer)`` of distinct types."""
    return [(qtype, *_ASK[qtype](shapes, rng, image_size)) for qtype in rng.sample(QUESTION_TYPES, count)]


# ------------------------------------------------------------------------------ writing


@dataclass(frozen=True)
class Job:
    seed: int
    split: str
    index: int
    image_size: int
    questions_per_image: int


def render(job: Job) -> dict[str, Any]:
    """Everything about one image: PNG bytes, shapes, captions, questions (pure in ``job``)."""
    rng = random.Random(f"{job.seed}/{job.split}/{job.index}")
    shapes = sample_scene(rng, job.image_size)
    return {
        "index": job.index,
        "png": _png_bytes(draw_scene(shapes, job.image_size)),
        "shapes": [asdict(s) for s in shapes],
        "captions": make_captions(shapes, job.image_size),
        "questions": make_questions(shapes, rng, job.image_size, job.questions_per_image),
    }


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _rendered(jobs: list[Job], workers: int) -> Iterator[dict[str, Any]]:
    if workers <= 1:
        yield from map(render, jobs)
        return
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        yield from pool.imap(render, jobs, chunksize=128)


def write_split(output: Path, split: str, count: int, args: argparse.Namespace) -> dict[str, Any]:
    """Render ``count`` images of ``split`` and write their shards and references; return index entries."""
    jobs = [Job(args.seed, split, i, args.image_size, args.questions_per_image) for i in range(count)]
    caption_refs: list[tuple[int, list[str]]] = []
    vqa_refs: list[VQAReference] = []
    with ShardWriter(str(output / "caption" / f"{split}-%06d.tar"), args.shard_size) as cap_writer, \
            ShardWriter(str(output / "vqa" / f"{split}-%06d.tar"), args.shard_size) as vqa_writer:
        for item in tqdm(_rendered(jobs, args.workers), total=count, desc=f"shapes {split}", unit="img"):
            index, image = item["index"], ("png", item["png"])
            key = f"{split}-{index:06d}"
            meta = {"image_id": index, "shapes": item["shapes"]}
            if split == "test" and index < args.export_images:  # plain files to try the caption script on
                (output / "images").mkdir(parents=True, exist_ok=True)
                (output / "images" / f"{key}.png").write_bytes(item["png"])
            cap_writer.write(caption_sample(key, image, item["captions"], meta))
            caption_refs.append((index, item["captions"]))
            for j, (qtype, question, answer) in enumerate(item["questions"]):
                ref = VQAReference(index * 10 + j, index, question, [answer] * NUM_REFERENCE_ANSWERS, qtype,
                                   ANSWER_TYPES[qtype], answer)
                meta = {"image_id": index, "question_type": qtype, "answer_type": ref.answer_type,
                        "shapes": item["shapes"]}
                vqa_writer.write(vqa_sample(f"{key}-q{j}", image, question, ref.answers, ref.question_id, meta))
                vqa_refs.append(ref)
    refs = output / "refs"
    write_json(refs / f"caption_{split}.json", caption_references(caption_refs))
    questions, annotations = vqa_references(vqa_refs)
    write_json(refs / f"vqa_{split}_questions.json", questions)
    write_json(refs / f"vqa_{split}_annotations.json", annotations)
    caption = ShardSet("caption", tuple(cap_writer.shards)).to_json(output)
    vqa = ShardSet("vqa", tuple(vqa_writer.shards)).to_json(output)
    caption["references"] = {"captions": f"refs/caption_{split}.json"}
    vqa["references"] = {"questions": f"refs/vqa_{split}_questions.json",
                         "annotations": f"refs/vqa_{split}_annotations.json"}
    return {f"caption/{split}": caption, f"vqa/{split}": vqa}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", required=True, type=Path, help="output folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-train", type=int, default=20000, help="training images")
    parser.add_argument("--num-val", type=int, default=1000, help="validation images")
    parser.add_argument("--num-test", type=int, default=1000, help="test images")
    parser.add_argument("--image-size", type=int, default=64, help="image width and height in pixels (>= 32)")
    parser.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    parser.add_argument("--questions-per-image", type=int, default=3,
                        help=f"questions of distinct types per image (1-{len(QUESTION_TYPES)})")
    parser.add_argument("--export-images", type=int, default=8,
                        help="also write the first N test images as PNG files to OUTPUT/images/")
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="rendering processes")
    args = parser.parse_args(argv)
    if args.image_size < 32:
        parser.error(f"--image-size={args.image_size} must be at least 32")
    if not 1 <= args.questions_per_image <= len(QUESTION_TYPES):
        parser.error(f"--questions-per-image={args.questions_per_image} must be in 1..{len(QUESTION_TYPES)}")
    if args.shard_size < 1:
        parser.error(f"--shard-size={args.shard_size} must be at least 1")
    for split in SPLITS:
        if getattr(args, f"num_{split}") < 0:
            parser.error(f"--num-{split} must be >= 0")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    index: dict[str, Any] = {}
    for split in SPLITS:
        count = getattr(args, f"num_{split}")
        if count:
            index.update(write_split(args.output, split, count, args))
    update_index(args.output / "index.json", index)
    for name, entry in index.items():
        print(f"{name}: {entry['num_samples']} samples in {args.output / entry['pattern']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
