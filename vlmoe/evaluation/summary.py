"""Print the demo's summary table from evaluation folders.

    python -m vlmoe.evaluation.summary runs/tiny/final/eval_vqa runs/tiny/final/eval_caption
"""

from __future__ import annotations

import json
import os
import sys

# The figures the demo reports, with the targets the built-in demo model is expected to reach.
ROWS = (
    ("vqa", "exact_match", "VQA exact match", 0.90),
    ("vqa", "vqa_accuracy", "VQA accuracy", None),
    ("caption", "exact_match", "caption exact match", 0.80),
    ("caption", "cider_d", "caption CIDEr-D", None),
    ("caption", "bleu_4", "caption BLEU-4", None),
    ("vqa", "images_per_s", "VQA questions/s", None),
    ("caption", "images_per_s", "caption images/s", None),
)


def main(argv: list[str] | None = None) -> int:
    folders = argv if argv is not None else sys.argv[1:]
    metrics = {}
    for folder in folders:
        with open(os.path.join(folder, "metrics.json")) as f:
            data = json.load(f)
        metrics["vqa" if "vqa_accuracy" in data else "caption"] = data
    print(f"{'metric':24} {'value':>10} {'target':>8}")
    for task, key, label, target in ROWS:
        if task in metrics and key in metrics[task]:
            value = metrics[task][key]
            mark = "" if target is None else ("  ok" if value >= target else "  below")
            print(f"{label:24} {value:10.4f} {'' if target is None else f'>= {target:.2f}':>8}{mark}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
