"""Linear probes on a trained model's image features: does the vision tower know what is in the image?

    python -m vlmoe.evaluation.probe --checkpoint runs/tiny/final \\
        --train "data/shapes/caption/train-*.tar" --test "data/shapes/caption/test-*.tar"

Prints JSON: per feature (``vit``: the ViT's patch tokens; ``projector``: the image tokens the
decoder receives; ``pixels``: the input image cut into the ViT's patches, the reference a tower
should beat) the test
accuracy of a linear probe for each attribute, with the majority-class rate (``chance``) beside
it. A probe near chance where the model's answers are wrong says the tower never learned the
attribute; a probe near 1 says the decoder fails to use what is there.

Notable choices:
- Labels come from each sample's ``shapes`` metadata (written by ``data_scripts/make_shapes.py``):
  ``count``, and for each shape its ``shape`` (kind), ``color``, ``size`` and ``side`` (left or
  right of the image's middle, as the position questions ask).
- ``shape`` / ``color`` / ``size`` / ``side`` probe the token of the patch under each shape's centre:
  does the tower's local feature say what is there, and where? ``count`` and ``order`` (the kinds left to right,
  e.g. ``circle,square``) probe all tokens at once, flattened with their positions.
- Features are standardised with the training images' statistics; a probe is a multinomial
  logistic regression with an L2 penalty, fitted by L-BFGS.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..data import DataSource, build_loader
from ..moe import moe_scope

ATTRIBUTES = ("shape", "color", "size", "side")
FEATURES = ("vit", "projector", "pixels")


@dataclass
class ImageLabels:
    """What the probes predict for one image: whole-image labels, and each shape's centre and attributes."""

    image: dict[str, str]
    shapes: list[tuple[float, float, dict[str, str]]]  # (x, y) as fractions of the image, attributes


def shape_labels(sample) -> ImageLabels:
    """The image's ``count`` and left-to-right ``order``, and each shape's centre and attributes."""
    shapes = sample.meta.get("shapes")
    if not shapes:
        raise ValueError(
            f"{sample.url}: sample {sample.key!r} has no 'shapes' metadata; the probe needs shards of the "
            "synthetic shapes set (data_scripts/make_shapes.py)"
        )
    width, height = sample.image.size
    ordered = sorted(shapes, key=lambda s: s["x"])
    image = {"count": str(len(ordered)), "order": ",".join(s["shape"] for s in ordered)}
    return ImageLabels(image, [(s["x"] / width, s["y"] / height, _attributes(s, width)) for s in ordered])


def _attributes(shape: dict, width: int) -> dict[str, str]:
    side = "left" if 2 * shape["x"] < width - 1 else "right"  # the middle column counts as right, as in make_shapes
    return {"shape": str(shape["shape"]), "color": str(shape["color"]), "size": str(shape["size"]), "side": side}


@torch.no_grad()
def image_features(model, processor, shards: str, limit: int, batch_size: int = 64) -> tuple[dict[str, Tensor], list[ImageLabels]]:
    """Per-patch features ``(N, P, D)`` of the first ``limit`` images (pixels cut into the ViT's patches), and their labels."""
    model.eval()
    loader = build_loader(DataSource(shards, "caption"), train=False, batch_size=batch_size)
    feats: dict[str, list[Tensor]] = {name: [] for name in FEATURES}
    labels: list[ImageLabels] = []
    for samples in loader:
        samples = samples[: limit - len(labels)]
        pixel_values = processor.pixel_values([s.image for s in samples]).to(model.device, model.dtype)
        with moe_scope(model.vision, 0):
            vit = model.vision(pixel_values)  # (B, P, Dv)
        feats["vit"].append(vit.float())
        feats["projector"].append(model.projector(vit).float())  # (B, P', D)
        patch = pixel_values.shape[-1] // _grid_side(vit.shape[1])
        feats["pixels"].append(F.unfold(pixel_values.float(), patch, stride=patch).transpose(1, 2))  # (B, P, 3*p*p)
        labels += [shape_labels(s) for s in samples]
        if len(labels) >= limit:
            break
    return {name: torch.cat(parts) for name, parts in feats.items()}, labels


def fit_probe(x_train: Tensor, y_train: Tensor, x_test: Tensor, y_test: Tensor, l2: float = 1e-3, max_iter: int = 100) -> float:
    """Test accuracy of a multinomial logistic regression fitted on standardised features."""
    mean, std = x_train.mean(0), x_train.std(0).clamp_min(1e-6)
    x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
    num_classes = int(max(y_train.max(), y_test.max())) + 1
    weight = torch.zeros(x_train.shape[1], num_classes, requires_grad=True)
    bias = torch.zeros(num_classes, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(x_train @ weight + bias, y_train) + l2 * weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        return ((x_test @ weight + bias).argmax(1) == y_test).float().mean().item()


def _grid_side(num_tokens: int) -> int:
    side = math.isqrt(num_tokens)
    if side * side != num_tokens:
        raise ValueError(f"{num_tokens} image tokens do not form a square grid")
    return side


def _examples(features: Tensor, labels: list[ImageLabels], attribute: str) -> tuple[Tensor, list[str]]:
    """One example per image (whole-image attributes, all tokens flattened) or per shape (its centre's token)."""
    if attribute in ATTRIBUTES:
        side = _grid_side(features.shape[1])
        rows, values = [], []
        for i, image in enumerate(labels):
            for x, y, attrs in image.shapes:
                rows.append(features[i, min(int(y * side), side - 1) * side + min(int(x * side), side - 1)])
                values.append(attrs[attribute])
        return torch.stack(rows), values
    return features.flatten(1), [image.image[attribute] for image in labels]


def probe(model, processor, train_shards: str, test_shards: str, num_train: int = 2000, num_test: int = 500) -> dict:
    """Probe accuracy per feature and attribute, the majority-class rate per attribute, and the counts."""
    train_x, train_labels = image_features(model, processor, train_shards, num_train)
    test_x, test_labels = image_features(model, processor, test_shards, num_test)
    result: dict = {name: {} for name in ("chance", *FEATURES)}
    for attribute in (*ATTRIBUTES, "count", "order"):
        for name in FEATURES:
            x_train, v_train = _examples(train_x[name], train_labels, attribute)
            x_test, v_test = _examples(test_x[name], test_labels, attribute)
            ids = {v: i for i, v in enumerate(sorted(set(v_train) | set(v_test)))}
            y_train, y_test = torch.tensor([ids[v] for v in v_train]), torch.tensor([ids[v] for v in v_test])
            result[name][attribute] = round(fit_probe(x_train, y_train, x_test, y_test), 4)
        result["chance"][attribute] = round(torch.bincount(y_train).argmax().eq(y_test).float().mean().item(), 4)
    result["num_train"], result["num_test"] = len(train_labels), len(test_labels)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a save_pretrained folder (e.g. runs/tiny/final)")
    parser.add_argument("--train", required=True, help="caption shards of the shapes set to fit the probes on")
    parser.add_argument("--test", required=True, help="caption shards to score the probes on")
    parser.add_argument("--num-train", type=int, default=2000)
    parser.add_argument("--num-test", type=int, default=500)
    parser.add_argument("--output", default=None, help="also write the JSON here")
    args = parser.parse_args(argv)
    from .. import VLMoEForConditionalGeneration, VLMoEProcessor

    model = VLMoEForConditionalGeneration.from_pretrained(args.checkpoint)
    processor = VLMoEProcessor.from_pretrained(args.checkpoint)
    result = probe(model, processor, args.train, args.test, args.num_train, args.num_test)
    text = json.dumps(result)
    if args.output:
        with open(args.output, "w") as f:
            f.write(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
