"""``python -m vlmoe.evaluation.score``: scores of any results file, strict about ids like the official loaders."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from vlmoe.data.references import VQAReference, caption_references, vqa_references
from vlmoe.evaluation.caption_metrics import compute_caption_metrics
from vlmoe.evaluation.score import main
from vlmoe.evaluation.vqa_metrics import vqa_accuracy

REFS = {1: ["A grey cat on a couch.", "a cat on a sofa"], 2: ["A dog on a bed."], 3: ["two birds / a branch"]}
PREDS = {1: "a gray cat on a couch", 2: "a dog on a bed", 3: "two birds on a branch"}


def _write(path: Path, data) -> str:
    path.write_text(json.dumps(data))
    return str(path)


def _caption_files(tmp_path: Path, preds: list[dict], refs=None) -> list[str]:
    annotations = _write(tmp_path / "captions.json", caption_references((refs or REFS).items()))
    return ["caption", "--predictions", _write(tmp_path / "results.json", preds), "--annotations", annotations]


def test_caption_scores_printed_as_json(tmp_path: Path, capsys) -> None:
    results = [{"image_id": i, "caption": c} for i, c in reversed(PREDS.items())]  # any order
    metrics = main(_caption_files(tmp_path, results))
    assert json.loads(capsys.readouterr().out) == metrics
    assert metrics == compute_caption_metrics([PREDS[i] for i in REFS], list(REFS.values()))
    assert metrics["num_images"] == 3


def test_caption_annotations_as_id_to_captions(tmp_path: Path) -> None:
    """``{image_id: [captions]}``: JSON keys are strings; all-digit ones are the int ids of the results."""
    results = _write(tmp_path / "results.json", [{"image_id": i, "caption": c} for i, c in PREDS.items()])
    plain = _write(tmp_path / "plain.json", {str(i): c for i, c in REFS.items()})
    coco = main(_caption_files(tmp_path, [{"image_id": i, "caption": c} for i, c in PREDS.items()]))
    assert main(["caption", "--predictions", results, "--annotations", plain]) == coco


@pytest.mark.parametrize(
    ("results", "message"),
    [
        ([{"image_id": 1, "caption": "a"}, {"image_id": 1, "caption": "b"}, {"image_id": 2, "caption": "c"},
          {"image_id": 3, "caption": "d"}], "duplicate image_id in predictions: 1"),
        ([{"image_id": 1, "caption": "a"}], "no prediction for annotated image_id: 2, 3"),
        ([*({"image_id": i, "caption": "a"} for i in REFS), {"image_id": 7, "caption": "b"}],
         "predictions for image_id not in the annotations: 7"),
        ([{"image_id": "1", "caption": "a"}, {"image_id": 2, "caption": "b"}, {"image_id": 3, "caption": "c"}],
         "predictions for image_id not in the annotations: '1'"),  # "1" is not the dataset's id 1
        ([{"image_id": 1, "text": "a"}], "is not a results list"),
    ],
)
def test_caption_results_are_strict(tmp_path: Path, results: list[dict], message: str) -> None:
    with pytest.raises(SystemExit, match=message):
        main(_caption_files(tmp_path, results))


def _vqa_files(tmp_path: Path, answers: dict[int, str]) -> list[str]:
    refs = [
        VQAReference(10, 1, "what color?", ["red"] * 10, "what color is the", "other"),
        VQAReference(11, 1, "how many?", ["2"] * 3 + ["3"] * 7, "how many", "number"),
        VQAReference(12, 2, "is it?", ["yes"] * 10, "is the", "yes/no"),
        VQAReference(13, 2, "what?", ["ball"] * 2 + ["toy"] * 8),  # no types
    ]
    questions, annotations = vqa_references(refs)
    results = [{"question_id": q, "answer": a} for q, a in answers.items()]
    return ["vqa", "--predictions", _write(tmp_path / "r.json", results), "--questions",
            _write(tmp_path / "q.json", questions), "--annotations", _write(tmp_path / "a.json", annotations)]


def test_vqa_scores_with_breakdowns_over_typed_questions(tmp_path: Path) -> None:
    metrics = main(_vqa_files(tmp_path, {10: "red", 11: "2", 12: "no", 13: "ball"}))
    assert vqa_accuracy("2", ["2"] * 3 + ["3"] * 7) == pytest.approx(0.9)  # 3 of 10 humans: 0.9
    assert vqa_accuracy("ball", ["ball"] * 2 + ["toy"] * 8) == pytest.approx(0.6)
    assert metrics["vqa_accuracy"] == pytest.approx((1 + 0.9 + 0 + 0.6) / 4)
    assert metrics["num_questions"] == 4
    # exact_match: the prediction equals the majority answer ("3" for q11, "toy" for q13)
    assert metrics["exact_match"] == pytest.approx(1 / 4)
    # the breakdowns count only the three questions that carry types
    assert metrics["vqa_accuracy_by_type"] == pytest.approx({"what color is the": 1.0, "how many": 0.9, "is the": 0.0})
    assert metrics["vqa_accuracy_by_answer_type"] == pytest.approx({"other": 1.0, "number": 0.9, "yes/no": 0.0})


def test_vqa_results_are_strict(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="no prediction for annotated question_id: 12, 13"):
        main(_vqa_files(tmp_path, {10: "red", 11: "2"}))


@pytest.mark.skipif(shutil.which("java") is None, reason="needs Java for pycocoevalcap")
def test_official_scorer_adds_meteor_and_equals_the_default(tmp_path: Path) -> None:
    pytest.importorskip("pycocoevalcap", reason="needs the coco extra: pip install 'vlmoe[coco]'")
    results = [{"image_id": i, "caption": c} for i, c in PREDS.items()]
    official = main([*_caption_files(tmp_path, results), "--scorer", "official"])
    default = main(_caption_files(tmp_path, results))
    assert 0.0 < official.pop("meteor") < 1.0
    official.pop("spice", None)
    assert official == pytest.approx(default, abs=1e-6)


def test_eval_scores_records_through_the_same_strict_code() -> None:
    """eval.py's records: a repeated image is an error naming it; scores equal the results-file scorer's."""
    from vlmoe.evaluation.runner import compute_metrics

    records = [{"image_id": i, "prediction": PREDS[i], "references": REFS[i]} for i in REFS]
    assert compute_metrics("caption", records) == compute_caption_metrics(list(PREDS.values()), list(REFS.values()))
    with pytest.raises(ValueError, match="duplicate image_id in predictions: 2"):
        compute_metrics("caption", [*records, records[1]])
