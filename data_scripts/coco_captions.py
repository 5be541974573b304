"""Convert a COCO captions annotation file and its image folder into caption shards.

    python data_scripts/coco_captions.py --annotations coco/annotations/captions_train2017.json \\
        --images coco/train2017 --output data/coco --split train
    python data_scripts/coco_captions.py --annotations coco/annotations/captions_val2017.json \\
        --images coco/val2017 --output data/coco --split val

Writes ``DIR/{split}-%06d.tar`` with one sample per image holding all its captions (the first
by annotation id is the canonical ``KEY.txt``; ``KEY.json`` has ``captions``, ``image_id``,
``file_name``, ``width``, ``height``), the references ``DIR/{split}_captions.json`` (COCO
format, restricted to the images written) and an entry ``{split}`` in ``DIR/index.json``.
Images that are missing, unreadable or without captions are reported and skipped; the exit
status is non-zero only when nothing was written.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

from tqdm import tqdm

from vlmoe.data.prepare import SkipReport, read_image_file, update_index, write_json
from vlmoe.data.references import caption_references
from vlmoe.data.shards import ShardSet, ShardWriter, caption_sample, sample_key

_IMAGE_FIELDS = ("file_name", "width", "height")


def load_coco(path: Path) -> tuple[list[dict[str, Any]], dict[Any, list[str]]]:
    """``(images sorted by id, image_id -> captions sorted by annotation id)``.

    Raises:
        ValueError: the file is not a COCO captions file (the message names it).
    """
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) or not isinstance(
            data.get("annotations"), list):
        raise ValueError(f"{path} is not a COCO captions file (needs 'images' and 'annotations' lists)")
    by_image: dict[Any, list[tuple[Any, str]]] = defaultdict(list)
    for ann in data["annotations"]:
        by_image[ann["image_id"]].append((ann.get("id", 0), ann["caption"].strip()))
    captions = {image_id: [c for _, c in sorted(anns, key=lambda a: a[0]) if c] for image_id, anns in by_image.items()}
    return sorted(data["images"], key=lambda image: image["id"]), captions


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--annotations", required=True, type=Path, help="COCO captions json (captions_*.json)")
    parser.add_argument("--images", required=True, type=Path, help="folder holding the images' file_name")
    parser.add_argument("--output", required=True, type=Path, help="output folder")
    parser.add_argument("--split", default="train", help="name of the split: shard prefix and index entry")
    parser.add_argument("--shard-size", type=int, default=1000, help="samples (images) per shard")
    args = parser.parse_args(argv)
    if args.shard_size < 1:
        parser.error(f"--shard-size={args.shard_size} must be at least 1")
    if not args.images.is_dir():
        parser.error(f"--images {args.images} is not a folder")
    if not args.annotations.is_file():
        parser.error(f"--annotations {args.annotations} is not a file")
    images, captions = load_coco(args.annotations)

    report = SkipReport(str(args.annotations))
    written: list[tuple[Any, list[str]]] = []
    with ShardWriter(str(args.output / f"{args.split}-%06d.tar"), args.shard_size) as writer:
        for image in tqdm(images, desc=f"coco {args.split}", unit="img"):
            image_id = image["id"]
            if not captions.get(image_id):
                report.add(f"image_id {image_id}", "no captions")
                continue
            try:
                data = read_image_file(args.images / image["file_name"])
            except ValueError as exn:
                report.add(f"image_id {image_id}", str(exn))
                continue
            meta = {"image_id": image_id, **{k: image[k] for k in _IMAGE_FIELDS if k in image}}
            writer.write(caption_sample(sample_key(image_id), data, captions[image_id], meta))
            written.append((image_id, captions[image_id]))

    print(report.summary(len(written), f"images to {args.output}"), file=sys.stderr)
    if not written:
        return 1
    refs = f"{args.split}_captions.json"
    write_json(args.output / refs, caption_references(written))
    entry = ShardSet("caption", tuple(writer.shards)).to_json(args.output)
    update_index(args.output / "index.json", {args.split: {**entry, "references": {"captions": refs}}})
    return 0


if __name__ == "__main__":
    sys.exit(main())
