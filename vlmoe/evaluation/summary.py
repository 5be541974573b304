"""Print the demo's summary table from evaluated models, side by side.

    python -m vlmoe.evaluation.summary runs/tiny/final                            # one model
    python -m vlmoe.evaluation.summary runs/tiny/final runs/tiny-dense/final      # side by side
    python -m vlmoe.evaluation.summary --markdown runs/tiny/final runs/tiny-dense/final   # README table
    python -m vlmoe.evaluation.summary runs/tiny/final/eval_vqa runs/tiny/final/eval_caption

Each model is a folder holding ``eval_vqa/``, ``eval_caption/`` (eval.py's outputs) and
optionally ``probe.json`` (``vlmoe.evaluation.probe``; its rows are the probes on the image tokens
the decoder reads, the projector's output); eval folders given one by one make one
model together. Figures come from those files only, so a table printed from them cannot drift
from the run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

QUESTION_TYPES = ("color", "count", "position", "shape", "yes/no")
PROBE_ATTRIBUTES = ("shape", "color", "size", "side", "count", "order")
TYPE_TARGET = 0.80

# (file, keys, label, target): the figures the demo reports, with the demo model's targets.
ROWS = (
    ("vqa", ("exact_match",), "VQA exact match", 0.90),
    *(("vqa", ("vqa_accuracy_by_type", t), f"  {t}", TYPE_TARGET) for t in QUESTION_TYPES),
    ("vqa", ("vqa_accuracy",), "VQA accuracy", None),
    ("caption", ("exact_match",), "caption exact match", 0.80),
    ("caption", ("cider_d",), "caption CIDEr-D", None),
    ("caption", ("bleu_4",), "caption BLEU-4", None),
    *(("probe", ("projector", a), f"probe {a}", None) for a in PROBE_ATTRIBUTES),
    *(("probe", ("chance", a), f"  chance {a}", None) for a in PROBE_ATTRIBUTES),
    ("vqa", ("images_per_s",), "VQA questions/s", None),
    ("caption", ("images_per_s",), "caption images/s", None),
)


def _read(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def load_model(folders: list[str]) -> dict[str, dict]:
    """``{"vqa": metrics, "caption": metrics, "probe": probe}`` from a run folder or eval folders."""
    found: dict[str, dict] = {}
    for folder in folders:
        for name in ("", "eval_vqa", "eval_caption"):
            path = os.path.join(folder, name, "metrics.json")
            if os.path.isfile(path):
                data = _read(path)
                found["vqa" if "vqa_accuracy" in data else "caption"] = data
        probe = os.path.join(folder, "probe.json")
        if os.path.isfile(probe):
            found["probe"] = _read(probe)
    if not found:
        raise ValueError(f"{folders}: no metrics.json (eval.py) or probe.json found")
    return found


def _value(model: dict[str, dict], task: str, keys: tuple[str, ...]) -> float | None:
    value = model.get(task)
    for part in keys:
        value = value.get(part) if isinstance(value, dict) else None
    return value


def _name(folder: str) -> str:
    folder = os.path.normpath(folder)
    base = os.path.basename(folder)
    if base.startswith("eval_"):
        folder, base = os.path.dirname(folder), os.path.basename(os.path.dirname(folder))
    return os.path.basename(os.path.dirname(folder)) if base == "final" else base


def table(models: dict[str, dict[str, dict]], markdown: bool = False) -> str:
    names = list(models)
    lines = []
    if markdown:
        lines += ["| metric | " + " | ".join(names) + " | target |", "|---" * (len(names) + 2) + "|"]
    else:
        lines.append(f"{'metric':24}" + "".join(f"{n:>16}" for n in names) + f"{'target':>10}")
    for task, keys, label, target in ROWS:
        values = [_value(models[n], task, keys) for n in names]
        if all(v is None for v in values):
            continue
        goal = "" if target is None else f">= {target:.2f}"
        cells = []
        for v in values:
            mark = "" if v is None or target is None else (" ok" if v >= target else " below")
            cells.append("-" if v is None else f"{v:.4f}{mark}" if v < 10 else f"{v:.1f}")
        if markdown:
            lines.append(f"| {label.strip()} | " + " | ".join(cells) + f" | {goal} |")
        else:
            lines.append(f"{label:24}" + "".join(f"{c:>16}" for c in cells) + f"{goal:>10}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", nargs="+", help="run folders (e.g. runs/tiny/final) or eval folders of one model")
    parser.add_argument("--markdown", action="store_true", help="print a markdown table")
    args = parser.parse_args(argv)
    if all(os.path.isfile(os.path.join(f, "metrics.json")) for f in args.folders):
        groups = {_name(args.folders[0]): args.folders}  # the eval folders of one model
    else:
        groups = {_name(f): [f] for f in args.folders}
    print(table({name: load_model(folders) for name, folders in groups.items()}, args.markdown))
    return 0


if __name__ == "__main__":
    sys.exit(main())
