"""How far a run's experts have moved apart, and how differently its routers treat image and text.

    python benchmarks/expert_spread.py runs/tiny-upcycle runs/tiny ...

Prints one JSON line per run, per MoE layer (as the saved weights name it):

- ``spread``: each expert's distance from the mean of the layer's experts, relative to that
  mean's norm, averaged over experts and over the layer's weight matrices. Experts upcycled from
  one dense MLP start at 0 (without ``model.upcycle_noise``); from-scratch experts start apart.
- and per MoE call of the test-split VQA evaluation (``final/eval_vqa/routing.json``, written by
  ``eval.py``) where both modalities are routed: ``image_text_tv``, the total-variation distance
  between the expert loads of image positions and of text positions (0: the same experts in the
  same shares; 1: disjoint experts).
"""

from __future__ import annotations

import argparse
import json
import re
from collections import defaultdict
from pathlib import Path

import torch
from safetensors.torch import load_file

EXPERT_WEIGHT = re.compile(r"^(.*)\.experts\.(in_proj|out_proj)$")


def expert_spread(weights: dict[str, torch.Tensor]) -> dict[str, float]:
    """Per MoE layer: the mean relative distance of its experts from their mean."""
    by_layer: dict[str, list[float]] = defaultdict(list)
    for name, weight in weights.items():
        match = EXPERT_WEIGHT.match(name)
        if not match:
            continue
        experts = weight.float().flatten(1)  # (E, parameters)
        mean = experts.mean(0)
        by_layer[match.group(1)].append(((experts - mean).norm(dim=1) / mean.norm()).mean().item())
    return {layer: round(sum(values) / len(values), 4) for layer, values in sorted(by_layer.items())}


def image_text_distance(routing: dict) -> dict[str, float]:
    """Per MoE call routing both modalities: total-variation distance of the two load vectors."""
    return {
        call: round(0.5 * sum(abs(a - b) for a, b in zip(stats["image"]["load"], stats["text"]["load"])), 4)
        for call, stats in routing.items() if {"image", "text"} <= set(stats)
    }


def describe(run: Path) -> dict:
    final = run / "final"
    weights: dict[str, torch.Tensor] = {}
    for file in sorted(final.glob("*.safetensors")):
        weights.update(load_file(file))
    out = {"run": str(run), "spread": expert_spread(weights)}
    routing = final / "eval_vqa" / "routing.json"
    if routing.is_file():
        out["image_text_tv"] = image_text_distance(json.loads(routing.read_text()))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="run folders (each with final/)")
    for run in parser.parse_args(argv).runs:
        print(json.dumps(describe(run)))


if __name__ == "__main__":
    main()
