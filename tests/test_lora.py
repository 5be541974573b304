"""LoRA through PEFT: attention, projector and the 3-D expert weights; identity at init, adapters-only
gradients, merge equals the adapted model, and a train.py run that saves the adapter alone."""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("peft", reason="needs the peft extra: pip install 'vlmoe[peft]'")

import train  # noqa: E402
from vlmoe import VLMoEForConditionalGeneration  # noqa: E402
from vlmoe.lora import LoRAConfig, attach_lora, merge_lora  # noqa: E402
from vlmoe.training.optim import build_optimizer  # noqa: E402
from vlmoe.training.config import OptimConfig  # noqa: E402

from test_model import build, images, tokenizer  # noqa: E402,F401  (a fixture)
from test_training import ROOT, overrides  # noqa: E402

LORA = LoRAConfig(rank=4, alpha=8.0)


def _batch(processor):
    prompts = [processor.prompt(), processor.prompt("what color?")]
    return processor.training_batch(images(2), prompts, ["a red circle", "blue"])


def _perturb_adapters(model) -> None:
    torch.manual_seed(1)
    for name, param in model.named_parameters():
        if "lora_" in name:
            torch.nn.init.normal_(param, std=0.2)


@pytest.mark.parametrize("implementation", ["grouped", "loop"])
def test_adapters_reach_attention_projector_and_every_expert_and_start_as_the_identity(tokenizer, implementation):
    model, processor = build(tokenizer, moe={"num_experts": 4, "top_k": 2, "modality_mode": "per_modality",
                                             "implementation": implementation})
    batch = _batch(processor)
    with torch.no_grad():
        expected = model(**batch).logits
    adapted = attach_lora(model, LORA).eval()
    wrapped = {name.rsplit(".lora_A", 1)[0] for name, _ in adapted.named_parameters() if ".lora_A." in name}
    assert any(n.endswith("attn.qkv") for n in wrapped) and any(n.endswith("self_attn.q_proj") for n in wrapped)
    assert any(n.endswith("projector.fc1") for n in wrapped)
    expert_adapters = [n for n in wrapped if ".experts" in n]
    assert len(expert_adapters) == 2 * len(adapted.shared_moe)  # in_proj and out_proj of each MoE layer
    with torch.no_grad():
        assert torch.equal(adapted(**batch).logits, expected)


def test_only_adapter_parameters_get_gradients_and_the_optimizer_holds_only_them(tokenizer):
    model, processor = build(tokenizer)
    adapted = attach_lora(model, LORA).train()
    adapted(**_batch(processor)).loss.backward()
    with_grad = {n for n, p in adapted.named_parameters() if p.grad is not None}
    assert with_grad and all(".lora_A." in n or ".lora_B." in n for n in with_grad)
    expert_grads = [n for n in with_grad if ".experts." in n]
    assert expert_grads and all(adapted.get_parameter(n).grad.abs().sum() > 0 for n in with_grad if "lora_B" in n)
    optimizer = build_optimizer(adapted, OptimConfig())
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert in_optimizer == {id(p) for p in adapted.parameters() if p.requires_grad}
    assert {g["name"] for g in optimizer.param_groups} == {"decoder", "experts", "projector", "vision"}


def test_merged_model_equals_the_adapted_one(tokenizer, tmp_path):
    model, processor = build(tokenizer)
    model.save_pretrained(tmp_path / "base")
    adapted = attach_lora(model, LORA).eval()
    adapted.peft_config["default"].base_model_name_or_path = str(tmp_path / "base")
    _perturb_adapters(adapted)
    batch = _batch(processor)
    with torch.no_grad():
        expected = adapted(**batch).logits
        base = VLMoEForConditionalGeneration.from_pretrained(tmp_path / "base").eval()(**batch).logits
    assert not torch.allclose(expected, base, atol=1e-3)  # the perturbed adapters do change the model
    adapted.save_pretrained(tmp_path / "adapter")
    processor.save_pretrained(tmp_path / "adapter")
    merged = VLMoEForConditionalGeneration.from_pretrained(merge_lora(str(tmp_path / "adapter"), str(tmp_path / "merged")))
    assert not any("lora" in name for name in merged.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(merged.eval()(**batch).logits, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("overrides_, match", [
    (dict(rank=-1), r"^train\.lora\.rank must be >= 0 \(0: no LoRA\), got -1$"),
    (dict(targets=["mlp"]), r"^train\.lora\.targets=\['mlp'\]: give one or more of \['attention', 'projector', 'experts'\]$"),
    (dict(rank=4, dropout=0.1), r"^train\.lora\.dropout=0\.1 with 'experts' in train\.lora\.targets: PEFT's adapters"),
])
def test_lora_config_errors_name_the_field(overrides_, match):
    with pytest.raises(ValueError, match=match):
        LoRAConfig(**overrides_)


def test_lora_run_through_train_py_saves_the_adapter_alone_and_a_merged_model(shapes, tmp_path):
    args = overrides(shapes, str(tmp_path), "lora", "train.steps=2", "train.lora.rank=4",
                     "train.lora.targets=[attention,projector,experts]")
    train.main(["--config", os.path.join(ROOT, "configs/tiny.yaml"), *args])
    run = tmp_path / "lora"
    final = sorted(os.listdir(run / "final"))
    assert "adapter_config.json" in final and "adapter_model.safetensors" in final and "model.safetensors" not in final
    base = VLMoEForConditionalGeneration.from_pretrained(run / "base")
    merged = VLMoEForConditionalGeneration.from_pretrained(run / "merged")
    changed = {n for n, p in merged.state_dict().items() if not torch.equal(p, base.state_dict()[n])}
    assert changed and all(".experts" in n or "attn" in n or "projector" in n for n in changed)
    assert any(".experts.in_proj" in n for n in changed)
