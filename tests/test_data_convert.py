"""data_scripts converters (JSONL, COCO captions, VQAv2) on tiny files written in the test,
read back through the pipeline."""

from __future__ import annotations

import importlib.util
import json
import sys
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
    sys.modules[name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


jsonl_to_shards = load_script("jsonl_to_shards")
coco_captions = load_script("coco_captions")
vqav2 = load_script("vqav2")


def make_image(path: Path, colour: tuple[int, int, int], fmt: str = "PNG") -> Image.Image:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGB", (8, 6), colour)
    image.putpixel((0, 0), (0, 0, 0))
    image.save(path, format=fmt)
    return image


def read_all(pattern: str, task: str) -> dict[str, object]:
    batches = build_dataset(DataSource(pattern, task), train=False, batch_size=3)
    return {s.key: s for batch in batches for s in batch.data}


def write_jsonl(path: Path, records: list[object]) -> None:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in records) + "\n")


def test_jsonl_round_trip_caption_and_vqa(tmp_path: Path) -> None:
    data = tmp_path / "data"
    red = make_image(data / "imgs" / "red.png", (200, 0, 0))
    blue = make_image(tmp_path / "elsewhere" / "blue.jpg", (0, 0, 200), "JPEG")
    records = [
        {"image": "imgs/red.png", "caption": "a red square", "source": "hand"},
        {"image": str(tmp_path / "elsewhere" / "blue.jpg"), "captions": ["a blue square", "blue"], "image_id": 7},
        {"image": "imgs/red.png", "question": "what color?", "answers": ["red"] * 3 + ["dark red"],
         "question_id": 17, "question_type": "color"},
        {"image": str(tmp_path / "elsewhere" / "blue.jpg"), "question": "is it blue?", "answers": ["yes"],
         "image_id": "b"},
    ]
    write_jsonl(data / "records.jsonl", records)
    out = tmp_path / "shards"
    args = ["--input", str(data / "records.jsonl"), "--output", str(out), "--shard-size", "1"]
    assert jsonl_to_shards.main(args) == 0

    index = json.loads((out / "index.json").read_text())
    assert index["caption"]["num_samples"] == 2 and index["caption"]["pattern"] == "caption-{000000..000001}.tar"
    assert index["vqa"]["num_samples"] == 2
    captions = read_all(str(out / index["caption"]["pattern"]), "caption")
    assert sorted(captions) == ["000000001", "000000002"]
    first, second = captions["000000001"], captions["000000002"]
    assert (first.captions, first.image_id, first.meta) == (["a red square"], "imgs/red.png", {"source": "hand"})
    assert (second.captions, second.image_id, second.meta) == (["a blue square", "blue"], 7, {})
    assert np.array_equal(np.asarray(first.image), np.asarray(red))  # PNG kept losslessly
    assert second.image.size == blue.size and second.image.mode == "RGB"

    questions = read_all(str(out / index["vqa"]["pattern"]), "vqa")
    q3, q4 = questions["000000003"], questions["000000004"]
    assert (q3.question, q3.answers, q3.question_id, q3.question_type, q3.image_id) == (
        "what color?", ["red", "red", "red", "dark red"], 17, "color", "imgs/red.png")
    assert (q4.question, q4.answers, q4.question_id, q4.question_type, q4.image_id) == (
        "is it blue?", ["yes"], 4, None, "b")  # question_id defaults to the line number
    assert q3.task == "vqa" and q3.captions == [] and q3.url.endswith(".tar")

    refs = load_caption_references(out / index["caption"]["references"]["captions"])
    assert refs == {"imgs/red.png": ["a red square"], 7: ["a blue square", "blue"]}
    qrefs = load_vqa_references(out / "refs/vqa_questions.json", out / "refs/vqa_annotations.json")
    assert qrefs[17].multiple_choice_answer == "red" and list(qrefs[4].answers) == ["yes"]


def test_jsonl_bad_records_are_reported_and_skipped(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_image(tmp_path / "ok.png", (0, 100, 0))
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    write_jsonl(tmp_path / "in.jsonl", [
        {"image": "ok.png", "caption": "fine"},  # line 1
        "{not json",  # line 2
        {"image": "missing.png", "caption": "x"},  # line 3
        {"image": "broken.png", "caption": "x"},  # line 4
        {"image": "ok.png"},  # line 5: no text
        {"image": "ok.png", "question": "q?", "question_id": 1},  # line 6: no answers
        {"image": "ok.png", "question": "q?", "answers": ["a"], "question_id": 1},  # line 7
        {"image": "ok.png", "question": "q2?", "answers": ["a"], "question_id": 1},  # line 8: repeated id
        "",  # line 9: blank, ignored
        {"caption": "no image"},  # line 10
    ])
    code = jsonl_to_shards.main(["--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 0
    for line, words in [(2, "bad JSON"), (3, "missing.png"), (4, "broken.png"), (5, "missing text"),
                        (6, "answers"), (8, "question_id 1"), (10, "'image'")]:
        assert f"line {line}: skipped: " in err and words in err.split(f"line {line}: skipped: ")[1].splitlines()[0]
    assert "wrote 2 samples" in err and "skipped 7 bad record(s)" in err
    assert list(read_all(str(tmp_path / "out/caption-*.tar"), "caption")) == ["000000001"]
    assert list(read_all(str(tmp_path / "out/vqa-*.tar"), "vqa")) == ["000000007"]


def test_jsonl_with_nothing_valid_fails(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "in.jsonl", [{"image": "nope.png", "caption": "x"}])
    assert jsonl_to_shards.main(["--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "out")]) == 1
    assert not list((tmp_path / "out").glob("*.tar")) and not (tmp_path / "out/index.json").exists()


def test_coco_captions(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    images = tmp_path / "val2017"
    make_image(images / "000000000001.jpg", (10, 20, 30), "JPEG")
    make_image(images / "000000000002.jpg", (40, 50, 60), "JPEG")
    coco = {
        "images": [{"id": 2, "file_name": "000000000002.jpg", "width": 8, "height": 6},
                   {"id": 1, "file_name": "000000000001.jpg", "width": 8, "height": 6},
                   {"id": 3, "file_name": "000000000003.jpg"},  # no file
                   {"id": 4, "file_name": "000000000001.jpg"}],  # no captions
        "annotations": [{"id": 11, "image_id": 1, "caption": "second of one "},
                        {"id": 10, "image_id": 1, "caption": "A first of one.\n"},
                        {"id": 12, "image_id": 2, "caption": "only caption of two"},
                        {"id": 13, "image_id": 3, "caption": "image three is missing"}],
    }
    (tmp_path / "captions.json").write_text(json.dumps(coco))
    out = tmp_path / "coco"
    args = ["--annotations", str(tmp_path / "captions.json"), "--images", str(images), "--output", str(out),
            "--split", "val"]
    assert coco_captions.main(args) == 0
    err = capsys.readouterr().err
    assert "image_id 3: skipped" in err and "image_id 4: skipped: no captions" in err

    samples = read_all(str(out / "val-*.tar"), "caption")
    assert sorted(samples) == ["000000000001", "000000000002"]
    one = samples["000000000001"]
    assert one.captions == ["A first of one.", "second of one"]  # annotation-id order, stripped
    assert one.image_id == 1 and one.meta == {"file_name": "000000000001.jpg", "width": 8, "height": 6}
    assert load_caption_references(out / "val_captions.json") == {
        1: ["A first of one.", "second of one"], 2: ["only caption of two"]}
    index = json.loads((out / "index.json").read_text())
    assert index["val"]["num_samples"] == 2 and index["val"]["task"] == "caption"


def test_vqav2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    images = tmp_path / "val2014"
    make_image(images / "COCO_val2014_000000000042.jpg", (1, 2, 3), "JPEG")
    make_image(images / "COCO_val2014_000000000007.jpg", (4, 5, 6), "JPEG")
    (images / "README.txt").write_text("not an image")
    questions = {"data_subtype": "val2014", "questions": [
        {"image_id": 42, "question": "What is it?", "question_id": 42000},
        {"image_id": 42, "question": "Is it red?", "question_id": 42001},
        {"image_id": 7, "question": "How many?", "question_id": 7000},
        {"image_id": 99, "question": "No image?", "question_id": 99000},
        {"image_id": 7, "question": "Unannotated?", "question_id": 7001},
    ]}

    def ann(qid: int, image_id: int, answers: list[str], qtype: str, atype: str) -> dict:
        # stored out of answer_id order on purpose
        rows = [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1} for i, a in enumerate(answers)]
        return {"question_id": qid, "image_id": image_id, "question_type": qtype, "answer_type": atype,
                "multiple_choice_answer": answers[0], "answers": rows[::-1]}

    annotations = {"annotations": [
        ann(42000, 42, ["cat"] * 9 + ["dog"], "what is", "other"),
        ann(42001, 42, ["no"] * 10, "is it", "yes/no"),
        ann(7000, 7, ["2"] * 8 + ["3", "two"], "how many", "number"),
        ann(99000, 99, ["x"] * 10, "none", "other"),
    ]}
    (tmp_path / "q.json").write_text(json.dumps(questions))
    (tmp_path / "a.json").write_text(json.dumps(annotations))
    out = tmp_path / "vqa"
    args = ["--questions", str(tmp_path / "q.json"), "--annotations", str(tmp_path / "a.json"), "--images",
            str(images), "--output", str(out), "--split", "val", "--shard-size", "2"]
    assert vqav2.main(args) == 0
    err = capsys.readouterr().err
    assert "question_id 99000: skipped: no image 99" in err and "question_id 7001: skipped: no annotation" in err

    samples = {s.question_id: s for s in read_all(str(out / "val-{000000..000001}.tar"), "vqa").values()}
    assert sorted(samples) == [7000, 42000, 42001]
    cat = samples[42000]
    assert (cat.question, cat.answers, cat.image_id, cat.question_type) == ("What is it?", ["cat"] * 9 + ["dog"], 42,
                                                                             "what is")
    assert cat.meta == {"answer_type": "other", "multiple_choice_answer": "cat"}
    assert samples[7000].answers == ["2"] * 8 + ["3", "two"]
    assert np.asarray(samples[7000].image)[3, 3].tolist() != np.asarray(cat.image)[3, 3].tolist()

    refs = load_vqa_references(out / "val_questions.json", out / "val_annotations.json")
    assert sorted(refs) == [7000, 42000, 42001]
    assert (refs[7000].answer_type, len(refs[7000].answers), refs[7000].question) == ("number", 10, "How many?")
