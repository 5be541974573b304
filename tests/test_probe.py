"""The linear probe: labels from the shapes metadata, the probe's fit, and the command on a tiny model."""

from __future__ import annotations

import json

import pytest
import torch

from vlmoe import VLMoEConfig, build_model, train_tokenizer
from vlmoe.data import DataSource, build_dataset
from vlmoe.evaluation.probe import fit_probe, main as probe_main, shape_labels

VISION = dict(model_name="vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, crop_pct=1.0)
DECODER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
               max_position_embeddings=128)


def first_samples(shapes: str, n: int) -> list:
    dataset = build_dataset(DataSource(f"{shapes}/caption/test-*.tar", "caption"), train=False, batch_size=n)
    return next(iter(dataset)).data


def test_labels_follow_the_shapes_left_to_right(shapes):
    for sample in first_samples(shapes, 8):
        labels = shape_labels(sample)
        assert labels.image["count"] == str(len(labels.shapes))
        assert [x for x, _, _ in labels.shapes] == sorted(x for x, _, _ in labels.shapes)
        assert all(0 <= x < 1 and 0 <= y < 1 for x, y, _ in labels.shapes)
        assert labels.image["order"] == ",".join(attrs["shape"] for _, _, attrs in labels.shapes)
        assert [a["side"] for x, _, a in labels.shapes] == ["left" if x < 0.5 else "right" for x, _, _ in labels.shapes]
        described = " ".join(f"{a['size']} {a['color']} {a['shape']}" for _, _, a in labels.shapes)
        words = sample.captions[0].replace(",", "").split()  # the canonical caption names them left to right
        assert [w for w in words if w not in ("a", "an", "and", "left", "of", "from", "to", "right")] == described.split()


def test_labels_without_shapes_metadata_name_the_sample(shapes):
    sample = first_samples(shapes, 1)[0]
    sample.meta.pop("shapes")
    with pytest.raises(ValueError, match=sample.key):
        shape_labels(sample)


def test_probe_separates_a_linear_attribute_and_not_noise():
    torch.manual_seed(0)
    x = torch.randn(600, 20)
    y = (x @ torch.randn(20, 3)).argmax(1)  # 3 classes, linearly separable
    assert fit_probe(x[:400], y[:400], x[400:], y[400:]) > 0.9
    noise = torch.randint(0, 3, (600,))
    assert fit_probe(x[:400], noise[:400], x[400:], noise[400:]) < 0.5


def test_probe_command_smoke(shapes, tmp_path, capsys):
    """Smoke: the command runs on a tiny random model and reports every attribute with its chance rate."""
    config = VLMoEConfig(vision=dict(VISION, moe_every=1), decoder={"text_config": dict(DECODER), "moe_every": 1},
                         moe={"num_experts": 4, "top_k": 2})
    model, processor = build_model(config, train_tokenizer(["a small red circle"] * 10, vocab_size=300))
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    caption = f"{shapes}/caption"
    assert probe_main(["--checkpoint", str(tmp_path / "model"), "--train", f"{caption}/train-*.tar",
                       "--test", f"{caption}/test-*.tar", "--num-train", "64", "--output", str(tmp_path / "p.json")]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result == json.loads((tmp_path / "p.json").read_text())
    assert result["num_train"] == 64 and result["num_test"] == 24
    for name in ("vit", "projector", "pixels", "chance"):
        assert set(result[name]) == {"count", "order", "shape", "color", "size", "side"}
        assert all(0 <= v <= 1 for v in result[name].values())
