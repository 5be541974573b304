"""Caption images, or answer a question about them, from the command line or from Python.

    python -m vlmoe.caption --checkpoint runs/tiny/final photo.jpg more_photos/
    python -m vlmoe.caption --checkpoint runs/tiny/final --question "what color is the circle?" img.png
    python -m vlmoe.caption --checkpoint runs/tiny/final --json imgs/ > captions.jsonl

Prints one line per image (``path<TAB>text``, or a JSON object with ``--json``), batched with the
KV cache. A file that cannot be read as an image is reported on stderr and skipped; the exit
code is 1 when any failed. From Python::

    captioner = Captioner.from_pretrained("runs/tiny/final")
    captioner(["a.jpg", PIL.Image.open("b.png")], question=None)  # -> list of texts
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Iterable, Iterator, Sequence

import torch
from PIL import Image

from .data.sample import IMAGE_EXTENSIONS, open_image
from .model.modeling import VLMoEForConditionalGeneration
from .processing import VLMoEProcessor
from .tasks import generate_texts


class Captioner:
    """A model and its processor, ready to caption PIL images or image paths."""

    def __init__(self, model: VLMoEForConditionalGeneration, processor: VLMoEProcessor):
        self.model = model.eval()
        self.processor = processor

    @classmethod
    def from_pretrained(cls, directory: str, device: str | None = None) -> "Captioner":
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        model = VLMoEForConditionalGeneration.from_pretrained(directory).to(device)
        return cls(model, VLMoEProcessor.from_pretrained(directory))

    def __call__(self, images: Sequence[Image.Image | str], question: str | None = None, **generate_kwargs) -> list[str]:
        images = [open_image(i) if isinstance(i, (str, os.PathLike)) else i for i in images]
        return generate_texts(self.model, self.processor, images, [question] * len(images), **generate_kwargs)


def expand_paths(paths: Iterable[str]) -> Iterator[str]:
    """Files as given; folders as their image files, sorted."""
    for path in paths:
        if os.path.isdir(path):
            for name in sorted(os.listdir(path)):
                if name.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS:
                    yield os.path.join(path, name)
        else:
            yield path


def _batches(paths: list[str], size: int) -> Iterator[list[str]]:
    for start in range(0, len(paths), size):
        yield paths[start : start + size]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a save_pretrained folder (e.g. runs/NAME/final)")
    parser.add_argument("images", nargs="+", help="image files or folders")
    parser.add_argument("--question", default=None, help="ask this question instead of captioning")
    parser.add_argument("--json", action="store_true", help="print JSON lines")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--num-beams", type=int, default=1)
    args = parser.parse_args(argv)
    captioner = Captioner.from_pretrained(args.checkpoint)
    failed = 0
    for chunk in _batches(list(expand_paths(args.images)), args.batch_size):
        loaded = []
        for path in chunk:
            try:
                loaded.append((path, open_image(path)))
            except (OSError, ValueError, Image.DecompressionBombError) as err:
                failed += 1
                print(f"error: {path}: cannot read image ({err})", file=sys.stderr)
        if not loaded:
            continue
        texts = captioner([image for _, image in loaded], args.question,
                          max_new_tokens=args.max_new_tokens, num_beams=args.num_beams)
        for (path, _), text in zip(loaded, texts):
            if args.json:
                print(json.dumps({"path": path, "question": args.question, "text": text}))
            else:
                print(f"{path}\t{text}")
    if failed:
        print(f"{failed} image(s) could not be read", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
