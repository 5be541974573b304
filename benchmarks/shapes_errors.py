"""Where a model's VQA answers on the shapes set go wrong, below the question types.

    python benchmarks/shapes_errors.py runs/tiny runs/tiny-dense     # after `make evaluate RUN=...`

Reads each run's test-split answers (``final/eval_vqa/predictions.json``) beside the scenes the
questions were asked about (``data/shapes/vqa/test-*.tar``: every shape with its centre) and prints
one JSON line per run, counts as ``[right, of]`` pairs:
- ``relational``: "is the A left or right of the B?"; ``lone``: "is the A on the left or the
  right?"; ``absent``: count questions whose answer is 0;
- ``relational_by_distance``: the comparisons by the horizontal distance of the two centres, px;
- ``relational_across_halves``: the comparisons whose A and B lie on different halves of the
  image, where the answer is A's side: ``[answered A's side, answered B's side, of]``. A model
  that sees where each shape is but loses which of the two is asked about answers B's side.
"""

from __future__ import annotations

import argparse
import json
import re
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COMPARISON = re.compile(r"is the (.+) left or right of the (.+)\?")
DISTANCES = ((0, 8), (8, 16), (16, 32), (32, 64))


def test_questions(shards: str) -> dict[int, dict]:
    questions = {}
    for path in sorted(ROOT.glob(shards)):
        with tarfile.open(path) as tar:
            for member in tar:
                if member.name.endswith(".json"):
                    record = json.load(tar.extractfile(member))
                    questions[record["question_id"]] = record
    return questions


def referent(description: str, shapes: list[dict]) -> dict:
    """The one shape a description ("small red circle", "square", "blue shape") names."""
    words = set(description.split()) - {"shape"}
    named = [s for s in shapes if words <= {s["size"], s["color"], s["shape"]}]
    if len(named) != 1:
        raise ValueError(f"{description!r} names {len(named)} of the scene's shapes {shapes}, not one: "
                         "are these the shapes set's test shards (data_scripts/make_shapes.py)?")
    return named[0]


def side(shape: dict, image_size: int = 64) -> str:
    return "left" if 2 * shape["x"] < image_size - 1 else "right"


def errors(run: Path, questions: dict[int, dict]) -> dict[str, list[int]]:
    keys = ["relational", *(f"relational_by_distance/{low}-{high}" for low, high in DISTANCES), "lone", "absent"]
    counts = {key: [0, 0] for key in keys}
    across = [0, 0, 0]

    def tally(key: str, right: bool) -> None:
        counts[key][0] += right
        counts[key][1] += 1

    for prediction in json.loads((run / "final" / "eval_vqa" / "predictions.json").read_text()):
        question = questions[prediction["question_id"]]
        answer, truth = prediction["answer"], question["answers"][0]
        comparison = COMPARISON.fullmatch(question["question"])
        if comparison:
            a, b = (referent(d, question["shapes"]) for d in comparison.groups())
            tally("relational", answer == truth)
            distance = abs(a["x"] - b["x"])
            low, high = next(bounds for bounds in DISTANCES if bounds[0] <= distance < bounds[1])
            tally(f"relational_by_distance/{low}-{high}", answer == truth)
            if side(a) != side(b):
                across = [across[0] + (answer == side(a)), across[1] + (answer == side(b)), across[2] + 1]
        elif question["question_type"] == "position":
            tally("lone", answer == truth)
        elif question["question_type"] == "count" and truth == "0":
            tally("absent", answer == truth)
    return {**counts, "relational_across_halves": across}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="run folders evaluated on the test split")
    parser.add_argument("--questions", default="data/shapes/vqa/test-*.tar", help="the test split's VQA shards")
    args = parser.parse_args(argv)
    questions = test_questions(args.questions)
    for run in args.runs:
        print(json.dumps({"run": str(run), **errors(run, questions)}))


if __name__ == "__main__":
    main()
