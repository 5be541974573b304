"""Caption images, or answer a question about them, from the command line or from Python.

    python -m vlmoe.caption --checkpoint runs/tiny/final photo.jpg more_photos/
    python -m vlmoe.caption --checkpoint runs/tiny/final --question "what color is the circle?" img.png
    python -m vlmoe.caption --checkpoint runs/tiny/final --json imgs/ > captions.jsonl

Prints one line per image (``path<TAB>text``, or a JSON object with ``--json``), batched with the
KV cache, in the order of the paths; a progress bar on stderr when there is more than one batch. A
file that cannot be read as an image is reported on stderr with the reason in words (and, with
``--json``, as ``{"path", "question", "error"}`` in its place) and skipped; the exit code is 1
when any failed. From Python::

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
from PIL import Image, UnidentifiedImageError
from tqdm.auto import tqdm

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


def read_failure(err: Exception) -> str:
    """Why a file could not be read as an image, in words."""
    if isinstance(err, UnidentifiedImageError):
        return "not an image file (PIL cannot identify it)"
    if isinstance(err, FileNotFoundError):
        return "no such file"
    if isinstance(err, IsADirectoryError):
        return "a folder, not a file"
    if isinstance(err, PermissionError):
        return "permission denied"
    if isinstance(err, Image.DecompressionBombError):
        return "too many pixels to decode safely (PIL's decompression-bomb limit)"
    return f"damaged image data ({err})"


def _load(paths: list[str]) -> list[tuple[str, Image.Image | None, str | None]]:
    """``(path, image, None)``, or ``(path, None, reason)`` for a file that is not a readable image."""
    loaded = []
    for path in paths:
        try:
            loaded.append((path, open_image(path), None))
        except (OSError, ValueError, Image.DecompressionBombError) as err:
            loaded.append((path, None, read_failure(err)))
    return loaded


def _print(path: str, question: str | None, text: str | None, error: str | None, as_json: bool) -> None:
    if error is not None:
        print(f"error: {path}: {error}", file=sys.stderr)
        if as_json:
            print(json.dumps({"path": path, "question": question, "error": error}))
    elif as_json:
        print(json.dumps({"path": path, "question": question, "text": text}))
    else:
        print(f"{path}\t{text}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a save_pretrained folder (e.g. runs/NAME/final)")
    parser.add_argument("images", nargs="+", help="image files or folders")
    parser.add_argument("--question", default=None, help="ask this question instead of captioning")
    parser.add_argument("--json", action="store_true", help="print JSON lines (failed files too, with an error)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--num-beams", type=int, default=1)
    args = parser.parse_args(argv)
    captioner = Captioner.from_pretrained(args.checkpoint)
    paths = list(expand_paths(args.images))
    failed = 0
    bar = tqdm(total=len(paths), unit="image", file=sys.stderr, disable=len(paths) <= args.batch_size)
    for chunk in _batches(paths, args.batch_size):
        loaded = _load(chunk)
        good = [image for _, image, error in loaded if error is None]
        texts = iter(captioner(good, args.question, max_new_tokens=args.max_new_tokens, num_beams=args.num_beams)
                     if good else [])
        for path, _, error in loaded:
            failed += error is not None
            _print(path, args.question, None if error else next(texts), error, args.json)
        bar.update(len(chunk))
    bar.close()
    if failed:
        print(f"{failed} image(s) could not be read", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
