"""data_scripts/make_shapes.py: determinism, and text that agrees with the pixels.

The checks re-read every image independently of the generator: connected components of
non-white pixels give each shape's colour (exact RGB), kind (fill ratio of its bounding box:
square 1, circle ~0.79, triangle ~0.5), size (area) and horizontal order.
"""

from __future__ import annotations

import importlib.util
import io
import json
import re
import sys
import tarfile
from collections import Counter
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
from PIL import Image

from vlmoe.data import DataSource, build_dataset, load_caption_references, load_vqa_references

ROOT = Path(__file__).resolve().parents[1]


def load_script(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, ROOT / "data_scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and pickling (worker pools) look modules up by name
    spec.loader.exec_module(module)
    return module


make_shapes = load_script("make_shapes")
SIZE = 64


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("shapes")
    args = ["--output", str(out), "--num-train", "200", "--num-val", "20", "--num-test", "10", "--shard-size", "64",
            "--workers", "1"]
    assert make_shapes.main(args) == 0
    return out


def _samples(pattern: str, task: str) -> list:
    return [s for batch in build_dataset(DataSource(pattern, task), train=False, batch_size=100) for s in batch.data]


def _components(image: Image.Image) -> list[dict]:
    """Connected components (4-neighbour) of non-white pixels: colour, kind, size, centre x."""
    pixels = np.asarray(image)
    foreground = (pixels != 255).any(-1)
    seen = np.zeros_like(foreground)
    rgb_to_name = {rgb: name for name, rgb in make_shapes.COLORS.items()}
    found = []
    for y0, x0 in zip(*np.nonzero(foreground)):
        if seen[y0, x0]:
            continue
        stack, points = [(y0, x0)], []
        seen[y0, x0] = True
        while stack:
            y, x = stack.pop()
            points.append((y, x))
            for ny, nx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                if 0 <= ny < SIZE and 0 <= nx < SIZE and foreground[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
        ys, xs = np.array(points).T
        colours = {tuple(int(v) for v in pixels[y, x]) for y, x in points}
        assert len(colours) == 1, f"a shape with several colours {colours}"
        fill = len(points) / ((np.ptp(ys) + 1) * (np.ptp(xs) + 1))
        kind = "square" if fill > 0.9 else "circle" if fill > 0.65 else "triangle"
        size = "large" if len(points) > 195 else "small"  # small <= 169 px, large >= 221 px
        found.append({"color": rgb_to_name[colours.pop()], "shape": kind, "size": size, "x": (xs.min() + xs.max()) / 2})
    return sorted(found, key=lambda c: c["x"])


def _describe(c: dict) -> str:
    return f"{c['size']} {c['color']} {c['shape']}"


def _canonical(components: list[dict]) -> str:
    d = [_describe(c) for c in components]
    return {1: lambda: f"a {d[0]}", 2: lambda: f"a {d[0]} left of a {d[1]}",
            3: lambda: f"a {d[0]}, a {d[1]} and a {d[2]} from left to right"}[len(d)]()


def _match(components: list[dict], phrase: str) -> dict:
    """The one component a phrase like "small red circle" / "red shape" / "triangle" names."""
    words = phrase.split()
    wanted = {"shape": words[-1]} if words[-1] != "shape" else {}
    for w in words[:-1]:
        wanted["size" if w in ("small", "large") else "color"] = w
    matches = [c for c in components if all(c[k] == v for k, v in wanted.items())]
    assert len(matches) == 1, f"{phrase!r} names {len(matches)} shapes"
    return matches[0]


def _oracle(components: list[dict], question: str) -> str:
    """The answer to a question, computed from the pixels alone."""
    if m := re.fullmatch(r"what color is the (.+)\?", question):
        return _match(components, m[1])["color"]
    if m := re.fullmatch(r"what shape is the (.+)\?", question):
        return _match(components, m[1])["shape"]
    if question == "how many shapes are there?":
        return str(len(components))
    if m := re.fullmatch(r"how many (\w+) shapes are there\?", question):
        return str(sum(c["color"] == m[1] for c in components))
    if m := re.fullmatch(r"how many (\w+)s are there\?", question):
        return str(sum(c["shape"] == m[1] for c in components))
    if m := re.fullmatch(r"is the (.+) left or right of the (.+)\?", question):
        return "left" if _match(components, m[1])["x"] < _match(components, m[2])["x"] else "right"
    if m := re.fullmatch(r"is the (.+) on the left or the right\?", question):
        return "left" if _match(components, m[1])["x"] < (SIZE - 1) / 2 else "right"
    if m := re.fullmatch(r"is there an? (\w+) (\w+)\?", question):
        return "yes" if any(c["color"] == m[1] and c["shape"] == m[2] for c in components) else "no"
    raise AssertionError(f"unknown question {question!r}")


def test_same_seed_same_bytes_whatever_the_workers(tmp_path: Path) -> None:
    common = ["--num-train", "40", "--num-val", "8", "--num-test", "8", "--shard-size", "16"]
    assert make_shapes.main(["--output", str(tmp_path / "a"), *common, "--workers", "1"]) == 0
    assert make_shapes.main(["--output", str(tmp_path / "b"), *common, "--workers", "2"]) == 0
    assert make_shapes.main(["--output", str(tmp_path / "c"), *common, "--workers", "1", "--seed", "1"]) == 0
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    # caption shards 3+1+1 (16 images each), VQA shards 8+2+2 (3 questions per image), 9 references, index,
    # and the 8 test images exported as PNG files
    assert len(files) == 5 + 12 + 9 + 1 + 8
    for name in files:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    first = "caption/train-000000.tar"
    assert (tmp_path / "a" / first).read_bytes() != (tmp_path / "c" / first).read_bytes()  # another seed


def test_captions_match_the_pixels(shapes_dir: Path) -> None:
    samples = _samples(str(shapes_dir / "caption/train-*.tar"), "caption")
    assert len(samples) == 200
    counts = Counter()
    for sample in samples:
        components = _components(sample.image)
        counts[len(components)] += 1
        assert sample.captions[0] == _canonical(components), sample.key
        assert len(sample.captions) == 5 and len(set(sample.captions)) == 5
        for caption in sample.captions:  # every phrasing names every shape
            for c in components:
                assert c["color"] in caption and c["shape"] in caption and c["size"] in caption
        # the recorded geometry is where the pixels are
        for shape in sample.meta["shapes"]:
            assert sample.image.getpixel((shape["x"], shape["y"])) == make_shapes.COLORS[shape["color"]]
        assert [s["color"] for s in sample.meta["shapes"]] == [c["color"] for c in components]
    assert set(counts) == {1, 2, 3}
    assert {c["color"] for s in samples for c in s.meta["shapes"]} == set(make_shapes.COLORS)


def test_answers_match_the_pixels(shapes_dir: Path) -> None:
    samples = _samples(str(shapes_dir / "vqa/train-*.tar"), "vqa")
    assert len(samples) == 600
    types = Counter(s.question_type for s in samples)
    assert set(types) == set(make_shapes.QUESTION_TYPES)
    assert min(types.values()) >= 0.15 * len(samples), types
    components = {}
    for sample in samples:
        components.setdefault(sample.image_id, _components(sample.image))
        assert sample.answers == [_oracle(components[sample.image_id], sample.question)] * 10, sample.question
        assert len(sample.answers[0].split()) == 1
    assert {"yes", "no", "left", "right", "0", "1", "2", "3"} <= {s.answers[0] for s in samples}


def test_caption_and_vqa_shards_share_images(shapes_dir: Path) -> None:
    captions = {s.image_id: s for s in _samples(str(shapes_dir / "caption/val-*.tar"), "caption")}
    questions = _samples(str(shapes_dir / "vqa/val-*.tar"), "vqa")
    assert sorted(captions) == list(range(20))
    assert {q.image_id for q in questions} == set(captions)
    for q in questions:
        assert q.image.tobytes() == captions[q.image_id].image.tobytes()
    assert len({q.question_id for q in questions}) == len(questions) == 60


def test_references_agree_with_the_shards(shapes_dir: Path) -> None:
    index = json.loads((shapes_dir / "index.json").read_text())
    entry = index["caption/test"]
    assert entry["num_samples"] == 10 and entry["pattern"] == "caption/test-000000.tar"
    refs = load_caption_references(shapes_dir / entry["references"]["captions"])
    samples = _samples(str(shapes_dir / entry["pattern"]), "caption")
    assert refs == {s.image_id: s.captions for s in samples}

    entry = index["vqa/test"]
    qrefs = load_vqa_references(*(shapes_dir / entry["references"][k] for k in ("questions", "annotations")))
    samples = _samples(str(shapes_dir / entry["pattern"]), "vqa")
    assert set(qrefs) == {s.question_id for s in samples}
    for s in samples:
        ref = qrefs[s.question_id]
        assert (ref.question, list(ref.answers), ref.question_type, ref.image_id) == (
            s.question, s.answers, s.question_type, s.image_id)
    raw = json.loads((shapes_dir / entry["references"]["annotations"]).read_text())["annotations"][0]
    assert len(raw["answers"]) == 10 and raw["question_type"] in make_shapes.QUESTION_TYPES


def test_shards_hold_png_txt_json(shapes_dir: Path) -> None:
    with tarfile.open(shapes_dir / "caption/val-000000.tar") as tar:
        names = tar.getnames()[:3]
        assert names == ["val-000000.json", "val-000000.png", "val-000000.txt"]
        png = tar.extractfile(names[1]).read()
        txt = tar.extractfile(names[2]).read().decode()
        meta = json.loads(tar.extractfile(names[0]).read())
    assert Image.open(io.BytesIO(png)).format == "PNG"
    assert txt == meta["captions"][0]
