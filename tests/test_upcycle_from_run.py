"""Starting from a vlmoe checkpoint: dense MLPs upcycled, the rest loaded, clear errors, stage options."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
from PIL import Image

import train
from vlmoe import VLMoEConfig, VLMoEForConditionalGeneration, build_model, load_run, train_tokenizer
from vlmoe.model.config import DecoderConfig, VisionConfig
from vlmoe.model.upcycle import max_logit_difference
from vlmoe.moe import MoELayer, SharedMoE
from vlmoe.training import load_config
from vlmoe.training.config import ModelConfig, OptimConfig, TokenizerConfig
from vlmoe.training.optim import build_optimizer, param_group_of

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXTS = ["a large red circle left of a small blue square", "Question: what color is it? Answer: red", "yes no 1 2 3"]
# mlp_ratio 2 gives the ViT MLP the decoder's widths (32 -> 64), so layers could be shared.
VISION = dict(model_name="vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2,
              mlp_ratio=2.0, crop_pct=1.0)
TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
            max_position_embeddings=128)
MOE = {"num_experts": 4, "top_k": 2, "modality_mode": "per_modality"}


def config(moe_every: int = 1, share: bool = False, text: dict | None = None, **overrides) -> VLMoEConfig:
    return VLMoEConfig(
        vision={**VISION, "moe_every": moe_every}, decoder={"text_config": text or dict(TEXT), "moe_every": moe_every},
        moe=overrides.pop("moe", MOE), share_moe_layers=share, **overrides,
    )


def images(n: int = 2) -> list[Image.Image]:
    return [Image.new("RGB", (40 + 5 * i, 36), [(255, 0, 0), (0, 0, 255)][i % 2]) for i in range(n)]


@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory) -> str:
    """A tiny dense vlmoe model in save_pretrained form, as a run's final/ folder holds it."""
    torch.manual_seed(0)
    model, processor = build_model(config(moe_every=0), train_tokenizer(TEXTS * 10, vocab_size=300))
    path = str(tmp_path_factory.mktemp("dense") / "final")
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def upcycle(parent, processor, cfg: VLMoEConfig, noise: float = 0.0):
    torch.manual_seed(1)
    return build_model(cfg, processor.tokenizer, parent=parent, upcycle_noise=noise)[0].eval()


def logits(model, processor) -> torch.Tensor:
    batch = processor.generation_batch(images(), [processor.prompt(), processor.prompt("what color?")])
    with torch.no_grad():
        return model(**batch).logits


@pytest.mark.parametrize("moe", [MOE, {"num_experts": 4, "top_k": 1, "modality_mode": "shared"},
                                 {"num_experts": 4, "top_k": 2, "modality_mode": "partitioned",
                                  "experts_per_modality": [1, 1], "num_shared_experts": 1}])
def test_upcycled_from_a_dense_run_computes_what_the_parent_did(dense_dir, moe, tmp_path):
    parent, processor = load_run(dense_dir)
    model = upcycle(parent, processor, config(moe=moe))
    layers = model.moe_layers()
    assert len(layers["vision"]) == 2 and len(layers["decoder"]) == 2
    assert {layer.config.expert_type for layer in layers["vision"]} == {"gelu"}  # the timm MLP's kind
    assert {layer.config.expert_type for layer in layers["decoder"]} == {"swiglu"}
    for i, layer in enumerate(layers["vision"]):  # every expert a copy of the dense MLP
        fc1 = parent.vision.blocks[i].mlp.fc1.weight
        assert all(torch.equal(layer.experts.in_proj[e], fc1) for e in range(moe["num_experts"]))
    # Everything that is not an MLP is the parent's, bit for bit.
    assert torch.equal(model.projector.fc1.weight, parent.projector.fc1.weight)
    assert torch.equal(model.language_model.model.embed_tokens.weight, parent.language_model.model.embed_tokens.weight)
    torch.testing.assert_close(logits(model, processor), logits(parent, processor), rtol=1e-5, atol=1e-5)
    # The saved model names its experts' kind, so it reloads as it is.
    model.save_pretrained(tmp_path)
    reloaded = VLMoEForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert reloaded.config.vision.expert_type == "gelu" and reloaded.config.decoder.expert_type == "swiglu"
    torch.testing.assert_close(logits(reloaded, processor), logits(model, processor))


def test_noise_moves_the_experts_and_no_noise_does_not(dense_dir):
    parent, processor = load_run(dense_dir)
    batch = processor.training_batch(images(), [processor.prompt(), processor.prompt()], ["a red circle", "blue"])
    exact = max_logit_difference(upcycle(parent, processor, config(), noise=0.0), parent, batch)
    noisy_model = upcycle(parent, processor, config(), noise=0.05)
    noisy = max_logit_difference(noisy_model, parent, batch)
    assert exact < 1e-5 and noisy > 1e-3
    experts = noisy_model.moe_layers()["decoder"][0].experts.in_proj
    assert not torch.equal(experts[0], experts[1])  # each copy has its own noise


def test_a_moe_checkpoint_loads_its_moe_layers_as_they_are(dense_dir, tmp_path):
    """A MoE run (here: upcycled, its ViT experts GELU) started from again with the same layers."""
    parent, processor = load_run(dense_dir)
    upcycle(parent, processor, config()).save_pretrained(tmp_path / "moe")
    processor.save_pretrained(tmp_path / "moe")
    moe_parent, _ = load_run(tmp_path / "moe")
    with torch.no_grad():  # routers trained away from their initialisation
        for layer in moe_parent.moe_layers()["vision"] + moe_parent.moe_layers()["decoder"]:
            layer.router.weight.add_(1.0)
    model = upcycle(moe_parent, processor, config())
    for mine, theirs in zip(model.moe_layers()["decoder"], moe_parent.moe_layers()["decoder"]):
        assert torch.equal(mine.router.weight, theirs.router.weight)
    assert torch.equal(logits(model, processor), logits(moe_parent, processor))


def _equal_parents(parent: VLMoEForConditionalGeneration) -> VLMoEForConditionalGeneration:
    """The parent with each ViT block's MLP a copy of the decoder layer's (a Llama MLP takes ``x`` as
    timm's does). A saved vlmoe model never has them: its ViT MLPs are timm GELU MLPs."""
    parent = copy.deepcopy(parent)
    for block, layer in zip(parent.vision.blocks, parent.language_model.model.layers):
        block.mlp = copy.deepcopy(layer.mlp)
    return parent


def test_shared_layers_upcycled_from_equal_parents(dense_dir):
    parent, processor = load_run(dense_dir)
    parent = _equal_parents(parent)
    model = upcycle(parent, processor, config(share=True))
    assert len(model.shared_moe) == 2
    assert all(isinstance(block.mlp, SharedMoE) for block in model.vision.blocks)
    assert model.vision.blocks[0].mlp.layer is model.language_model.model.layers[0].mlp.layer
    torch.testing.assert_close(logits(model, processor), logits(parent, processor), rtol=1e-5, atol=1e-5)


def test_shared_layers_from_parents_that_differ_are_refused(dense_dir):
    parent, processor = load_run(dense_dir)
    refused = r"shared layer 0 would be upcycled from ViT block 0.*differ.*share_moe_layers=false"
    with pytest.raises(ValueError, match=refused):
        upcycle(parent, processor, config(share=True))
    unequal = _equal_parents(parent)
    with torch.no_grad():
        unequal.vision.blocks[1].mlp.up_proj.weight.add_(1e-3)  # block 0 equal, block 1 not
    with pytest.raises(ValueError, match=r"shared layer 1 would be upcycled from ViT block 1"):
        upcycle(unequal, processor, config(share=True))


def test_unmatched_parameters_are_named(dense_dir):
    parent, processor = load_run(dense_dir)
    wider = config(text={**TEXT, "hidden_size": 48}, moe_every=0)  # another decoder width, no MoE
    mismatch = r"shape mismatch .*language_model\.model\.embed_tokens\.weight \(\d+, 32\) -> \(\d+, 48\)"
    with pytest.raises(ValueError, match=mismatch):
        upcycle(parent, processor, wider)
    with pytest.raises(ValueError, match=r"missing in the checkpoint: \['pixel_head\.bias', 'pixel_head\.weight'\]"):
        upcycle(parent, processor, config(pixel_loss_weight=1.0))
    narrower = config(text={**TEXT, "intermediate_size": 48})  # upcycled experts keep the parent's width
    wider_experts = r"decoder layer 0: the dense MLP to upcycle from has \(in, hidden\)=\(32, 64\)"
    with pytest.raises(ValueError, match=wider_experts):
        upcycle(parent, processor, narrower)


def _model_config(path: str, **overrides) -> ModelConfig:
    parts = {"vision": VisionConfig(**{**VISION, "moe_every": 1}),
             "decoder": DecoderConfig(text_config=dict(TEXT), moe_every=1)}
    return ModelConfig(**{**parts, **overrides}, init_from=path)


def test_init_from_is_checked_with_the_config(dense_dir, tmp_path):
    _model_config(dense_dir)  # matches
    (tmp_path / "empty").mkdir()
    cases = [
        (str(tmp_path / "missing"), {}, "model.init_from=.*missing.*is not a folder"),
        (str(tmp_path / "empty"), {}, "model.init_from=.*empty.*holds no config.json"),
        (dense_dir, {"decoder": DecoderConfig(text_config={**TEXT, "num_hidden_layers": 3})},
         r"model.init_from=.*model\.decoder\.text_config\.num_hidden_layers=3 differs from the checkpoint's 2"),
        (dense_dir, {"vision": VisionConfig(**{**VISION, "embed_dim": 64})},
         r"model\.vision\.embed_dim=64 differs from the checkpoint's 32"),
        (dense_dir, {"tokenizer": TokenizerConfig(path=dense_dir)},
         r"model.init_from and model.tokenizer.path are both set"),
        (dense_dir, {"upcycle_noise": -0.1}, r"model.upcycle_noise must be >= 0"),
    ]
    for path, overrides, match in cases:
        with pytest.raises(ValueError, match=match):
            _model_config(path, **overrides)


def test_stage_three_trains_only_the_moe_layers(dense_dir):
    """MoE-LLaVA's third stage: towers and projector frozen, experts and routers trained."""
    parent, processor = load_run(dense_dir)
    model = upcycle(parent, processor, config()).train()
    optimizer = build_optimizer(model, OptimConfig(freeze=["vision", "decoder", "projector"], warmup_steps=0))
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all(param_group_of(n) in ("experts", "routers") for n in trained)
    assert {n for n in trained if ".router." in n} and {n for n in trained if ".experts." in n}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    batch = processor.training_batch(images(), [processor.prompt(), processor.prompt()], ["a red circle", "blue"])
    model(**batch).loss.backward()
    optimizer.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= trained


def test_train_py_starts_from_a_dense_run(shapes, tmp_path):
    """A 2-step dense run, then the upcycle config from its final/ folder: logs a logit difference of
    about 0 at step 0, trains with the parent's tokenizer, and saves a model that reloads."""
    tiny = [
        "model.vision.img_size=32", "model.vision.embed_dim=32", "model.vision.depth=2", "model.vision.num_heads=2",
        "model.vision.mlp_ratio=2.0", "model.decoder.text_config.hidden_size=32",
        "model.decoder.text_config.intermediate_size=64", "model.decoder.text_config.num_hidden_layers=2",
        "model.decoder.text_config.num_attention_heads=2", "model.decoder.text_config.num_key_value_heads=2",
        "data.num_workers=0", "data.shuffle_buffer=20", "data.batch_size=4", "data.eval_batch_size=8",
        "train.log_every=1", "train.steps=2", "optim.warmup_steps=1",
        f"data.train=[{{pattern: '{shapes}/caption/train-*.tar', task: caption}}, "
        f"{{pattern: '{shapes}/vqa/train-*.tar', task: vqa}}]",
        f"data.val=[{{pattern: '{shapes}/vqa/val-*.tar', task: vqa}}]", f"train.output_dir={tmp_path}",
    ]
    train.main(["--config", os.path.join(ROOT, "configs/tiny-dense.yaml"), *tiny, "train.name=dense",
                "model.tokenizer.vocab_size=300", "model.tokenizer.train_samples=200"])
    parent = str(tmp_path / "dense" / "final")
    upcycled = [*tiny, "train.name=moe", f"model.init_from={parent}", "model.moe.num_experts=4"]
    train.main(["--config", os.path.join(ROOT, "configs/tiny-upcycle.yaml"), *upcycled])
    records = [json.loads(line) for line in (tmp_path / "moe" / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["step"] == 0 and records[0]["upcycle/max_logit_diff"] < 1e-4
    assert {r["step"] for r in records if "loss" in r} == {1, 2}
    assert not (tmp_path / "moe" / "tokenizer").exists()  # none trained: the parent's is used
    final = tmp_path / "moe" / "final"
    assert (final / "tokenizer.json").read_text() == (tmp_path / "dense" / "final" / "tokenizer.json").read_text()
    model, _ = load_run(final)
    assert len(model.moe_layers()["vision"]) == 2 and isinstance(model.moe_layers()["vision"][0], MoELayer)
    with pytest.raises(ValueError, match=r"model.init_from=.*model\.vision\.embed_dim=64 differs"):
        load_config(os.path.join(ROOT, "configs/tiny-upcycle.yaml"), [*upcycled, "model.vision.embed_dim=64"])


def test_expert_spread_is_zero_right_after_upcycling_and_grows_with_noise(dense_dir):
    """benchmarks/expert_spread.py: experts upcycled without noise sit at their mean; noise of
    relative std s puts each about s from it; the image/text distance is half the L1 of the loads."""
    from benchmarks.expert_spread import expert_spread, image_text_distance

    parent, processor = load_run(dense_dir)
    exact = expert_spread(upcycle(parent, processor, config()).state_dict())
    noisy = expert_spread(upcycle(parent, processor, config(), noise=0.05).state_dict())
    assert len(exact) == 4 and set(exact.values()) == {0.0}  # 2 ViT + 2 decoder layers
    assert set(noisy) == set(exact) and all(0.02 < spread < 0.08 for spread in noisy.values()), noisy
    routing = {"vision.0": {"image": {"load": [0.5, 0.5]}},
               "decoder.0": {"image": {"load": [0.75, 0.25]}, "text": {"load": [0.25, 0.75]}}}
    assert image_text_distance(routing) == {"decoder.0": 0.5}
