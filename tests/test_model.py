"""The VLMoE model: losses, generation with the cache, persistence, upcycling, sharing, errors."""

from __future__ import annotations

import contextlib
import json
import os

import pytest
import timm
import torch
from PIL import Image
from safetensors import safe_open
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedModel

from vlmoe import VLMoEConfig, VLMoEForConditionalGeneration, VLMoEProcessor, build_model, train_tokenizer
from vlmoe.model.modeling import shared_image_position_ids, target_weights
from vlmoe.model.towers import decoder_layers

TEXTS = ["a large red circle left of a small blue square", "Question: what color is it? Answer: red", "yes no 1 2 3"]
VISION = dict(model_name="vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, crop_pct=1.0)
TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
            max_position_embeddings=128)


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(TEXTS * 10, vocab_size=300)


def tiny_config(share: bool = True, **overrides) -> VLMoEConfig:
    # mlp_ratio 2 gives the ViT MLP the decoder's widths (32 -> 64), so layers can be shared.
    parts = dict(
        vision={**VISION, "mlp_ratio": 2.0, "moe_every": 1},
        decoder={"text_config": dict(TEXT), "moe_every": 1},
        moe={"num_experts": 4, "top_k": 2, "modality_mode": "per_modality"},
        share_moe_layers=share,
    )
    return VLMoEConfig(**{**parts, **overrides})


def images(n: int = 2) -> list[Image.Image]:
    colors = [(255, 0, 0), (0, 0, 255), (0, 255, 0)]
    return [Image.new("RGB", (40 + 5 * i, 36), colors[i % 3]) for i in range(n)]


def build(tokenizer, **kwargs):
    torch.manual_seed(0)
    model, processor = build_model(tiny_config(**kwargs), tokenizer)
    return model.eval(), processor


def test_forward_backward_and_loss_covers_targets_only(tokenizer):
    model, processor = build(tokenizer)
    model.train()
    batch = processor.training_batch(images(), [processor.prompt(), processor.prompt("what color?")], ["a red circle", "blue"])
    labels = batch["labels"]
    prompt_len = 1 + processor.num_image_tokens
    assert (labels[:, :prompt_len] == -100).all()  # bos and image positions
    assert (labels[batch["input_ids"] == processor.image_token_id] == -100).all()
    out = model(**batch)
    manual = torch.nn.functional.cross_entropy(out.logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
    torch.testing.assert_close(out.lm_loss, manual)
    torch.testing.assert_close(out.loss, out.lm_loss + out.aux_loss + out.z_loss)
    # Changing what is predicted at image/prompt positions must not change the loss.
    masked = batch["labels"] == -100
    logits = out.logits.detach().clone()
    logits[:, :-1][masked[:, 1:]] += 5.0 * torch.randn_like(logits[:, :-1][masked[:, 1:]])
    again = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
    torch.testing.assert_close(again, manual.detach())
    out.loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "experts" in n or "router" in n)
    assert len(out.routing) == 4 and {r.tower for r in out.routing} == {"vision", "decoder"}
    for record in out.routing:
        present = record.output.tokens > 0
        torch.testing.assert_close(record.output.load[present].sum(-1), torch.ones(int(present.sum())))


def test_a_conversation_is_its_questions_in_turn_with_labels_on_every_answer(tokenizer):
    """The first turn is the very sequence a lone question is (so the model reads it as at
    evaluation); each later turn adds its prompt and its answer + eos; labels cover the answers."""
    model, processor = build(tokenizer)
    questions, answers = ["what color?", "what shape?"], ["red", "circle"]
    conversation = processor.training_batch(images(1), [[processor.prompt(q) for q in questions]], [answers])
    alone = processor.training_batch(images(1), [processor.prompt(questions[0])], [answers[0]])
    n = alone["input_ids"].shape[1]
    assert conversation["input_ids"][0, :n].tolist() == alone["input_ids"][0].tolist()
    second = processor._ids(processor.prompt(questions[1]).strip())
    answer = processor._ids(" " + answers[1]) + [tokenizer.eos_token_id]
    assert conversation["input_ids"][0, n:].tolist() == second + answer
    assert conversation["labels"][0].tolist() == alone["labels"][0].tolist() + [-100] * len(second) + answer
    with torch.no_grad():
        torch.testing.assert_close(model(**conversation).logits[:, :n], model(**alone).logits)


def test_nothing_is_cut_silently_fit_keeps_the_turns_within_max_length_and_counts_the_rest(tokenizer):
    """``training_batch`` refuses a sequence past ``max_length``; ``TrainingCollate.fit`` keeps the
    turns that fit (the batch is the one made of them alone) and skips each other turn as too_long,
    the whole sample when its first turn does not fit."""
    from vlmoe.data import Sample
    from vlmoe.tasks import TrainingCollate

    _, processor = build(tokenizer)
    collate = TrainingCollate(processor)
    questions, answers = ["what color?", "what shape?", "what color is it?"], ["red", "circle", "blue"]

    def conversation() -> Sample:
        return Sample("k", "shard.tar", images(1)[0], "vqa", question=questions[0], answers=[answers[0]],
                      followups=[(q, [a]) for q, a in zip(questions[1:], answers[1:])])

    turns = processor._turns([processor.prompt(q) for q in questions], answers)
    processor.max_text_length = sum(len(p) + len(a) for p, a in turns[:2]) - 1 - processor.num_image_tokens
    with pytest.raises(ValueError, match=r"sample 0 of the batch .* model\.max_text_length=" + str(processor.max_text_length)):
        collate([conversation()])
    *skipped, fitted = collate.fit(conversation())
    assert [(s.reason, s.url, s.key) for s in skipped] == [("too_long", "shard.tar", "k")]
    assert "question 3" in skipped[0].detail and "model.max_text_length" in skipped[0].detail
    assert fitted.followups == [(questions[1], [answers[1]])]
    alone = processor.training_batch(images(1), [[processor.prompt(q) for q in questions[:2]]], [answers[:2]])
    assert all(torch.equal(collate([fitted])[k], alone[k]) for k in alone)
    processor.max_text_length = 1
    assert [(s.reason, s.count) for s in collate.fit(conversation())] == [("too_long", 3)]


@pytest.mark.parametrize("power", [0.0, 0.5, 1.0])
def test_label_weights_average_per_token_per_sample_or_between(tokenizer, power):
    """``target_weights(labels, p)``: each sample of n target tokens weighs n ** (1 - p) in the LM
    loss; p = 1 is the mean over samples of each sample's mean token loss."""
    model, processor = build(tokenizer)
    batch = processor.training_batch(images(), [processor.prompt(), processor.prompt("what color?")], ["a red circle", "blue"])
    with torch.no_grad():
        out = model(**batch, label_weights=target_weights(batch["labels"], power))
    token_losses = torch.nn.functional.cross_entropy(
        out.logits[:, :-1].transpose(1, 2), batch["labels"][:, 1:], ignore_index=-100, reduction="none")  # (B, T-1)
    counts = (batch["labels"][:, 1:] != -100).sum(-1).float()
    assert counts[0] != counts[1]
    per_sample = token_losses.sum(-1) / counts
    weights = counts.pow(1 - power)
    torch.testing.assert_close(out.lm_loss, (per_sample * weights).sum() / weights.sum())


SLOT_PROMPT = "Question: {question} {image} Answer:"


def test_image_slot_puts_the_image_tokens_where_the_prompt_says(tokenizer):
    _, processor = build(tokenizer, vqa_prompt=SLOT_PROMPT)
    batch = processor.training_batch(images(1), [processor.prompt("what color?")], ["red"])
    ids = lambda text: processor.tokenizer(text, add_special_tokens=False)["input_ids"]
    question, image = ids("Question: what color?"), [processor.image_token_id] * processor.num_image_tokens
    answer = ids(" red") + [processor.tokenizer.eos_token_id]
    expected = [processor.tokenizer.bos_token_id] + question + image + ids("Answer:") + answer
    assert batch["input_ids"][0].tolist() == expected
    assert batch["labels"][0].tolist() == [-100] * (len(expected) - len(answer)) + answer
    caption = processor.generation_batch(images(1), [processor.prompt()])  # no slot: the image comes first
    assert caption["input_ids"][0, 1 : 1 + len(image)].tolist() == image


@pytest.mark.parametrize("template,positions", [("default", "sequential"), ("slot", "sequential"), ("default", "shared"),
                                                ("slot", "shared")])
def test_generate_with_cache_equals_uncached_greedy(tokenizer, template, positions):
    model, processor = build(tokenizer, image_position_ids=positions,
                             **({"vqa_prompt": SLOT_PROMPT} if template == "slot" else {}))
    batch = processor.generation_batch(images(3), [processor.prompt(), processor.prompt("what color?"), processor.prompt()])
    generated = model.generate(**batch, max_new_tokens=6, do_sample=False, use_cache=True, min_new_tokens=6)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        for _ in range(6):
            logits = model(input_ids=ids, attention_mask=mask, pixel_values=batch["pixel_values"]).logits
            next_token = logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, next_token], dim=1)
            mask = torch.cat([mask, torch.ones_like(next_token)], dim=1)
    assert torch.equal(generated, ids)


@pytest.mark.parametrize("batch_size", [1, 3])
def test_generate_under_autocast_casts_each_expert_parameter_once(tokenizer, monkeypatch, batch_size):
    """``generate`` keeps the experts' bf16 casts for the call (``reused_casts``): the same tokens as
    casting at every step, and no cast made again after the prefill."""
    from vlmoe.moe import experts as experts_module

    model, processor = build(tokenizer)
    batch = processor.generation_batch(images(batch_size), [processor.prompt()] * batch_size)
    kept = []  # at each decoder forward, after its first MoE layer
    decoder_layers(model.language_model)[0].mlp.register_forward_hook(
        lambda *_: kept.append(set(experts_module._casts or ()))
    )

    def generate():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return model.generate(**batch, max_new_tokens=4, min_new_tokens=4, do_sample=False)

    reused = generate()
    # The prefill casts every layer's experts, each parameter once; the steps after it cast nothing more.
    layers = {id(layer): layer for layers in model.moe_layers().values() for layer in layers}.values()
    assert kept[1] == {id(p) for layer in layers for p in layer.experts.parameters()}
    assert len(kept) == 4 and kept[0] and kept[0] <= kept[1] == kept[2] == kept[3] and experts_module._casts is None
    monkeypatch.setattr("vlmoe.model.modeling.reused_casts", contextlib.nullcontext)
    assert torch.equal(generate(), reused)


@pytest.mark.parametrize("positions", ["shared", "sequential"])
def test_shared_image_positions_find_image_tokens_by_what_they_hold(tokenizer, positions):
    """With shared positions, the order of an image's tokens in the sequence changes nothing at the text
    positions of a one-layer decoder (attention tells them apart by content only; deeper, causal
    attention among the image tokens depends on their order); with sequential ones it does."""
    one_layer = {"text_config": {**TEXT, "num_hidden_layers": 1}, "moe_every": 1}
    model, processor = build(tokenizer, image_position_ids=positions, decoder=one_layer, share=False)
    batch = processor.training_batch(images(2), [processor.prompt("what color?")] * 2, ["red", "blue"])
    ids, n = batch["input_ids"], processor.num_image_tokens
    is_image = ids == processor.image_token_id
    assert is_image[:, 1 : 1 + n].all()  # bos, then the image
    assert shared_image_position_ids(is_image)[0, : n + 3].tolist() == [0] + [1] * n + [2, 3]
    with torch.no_grad():
        text_embeds = model.get_input_embeddings()(ids.masked_fill(is_image, 0))
        embeds = model._merge_image_embeds(text_embeds, model.encode_images(batch["pixel_values"])[0], is_image)
        shuffled = embeds.clone()
        shuffled[:, 1 : 1 + n] = embeds[:, 1 + torch.randperm(n, generator=torch.Generator().manual_seed(0))]
        logits = [model(input_ids=ids, attention_mask=batch["attention_mask"], inputs_embeds=e).logits[~is_image]
                  for e in (embeds, shuffled)]
    difference = (logits[0] - logits[1]).abs().max()
    if positions == "shared":
        assert difference < 1e-6
    else:
        assert difference > 1e-5


def test_image_position_ids_must_be_known():
    with pytest.raises(ValueError, match="image_position_ids='rows' is not one of"):
        tiny_config(image_position_ids="rows")


def _padded_pair(processor, side: str) -> dict[str, torch.Tensor]:
    """A short sample and a long one in one batch: the short one padded on ``side`` (as the
    processor pads training batches on the right and generation batches on the left), with labels
    on every position after bos that is not padding, and positions counted from bos."""
    prompts = [processor.prompt(), processor.prompt("what color is the large circle left of the small square?")]
    if side == "right":
        batch = processor.training_batch(images(2), prompts, ["red", "a blue square right of a red circle"])
    else:
        batch = processor.generation_batch(images(2), prompts)
    mask = batch["attention_mask"]
    assert mask[0].sum() < mask.shape[1] and mask[1].all() and mask[0, 0 if side == "left" else -1] == 0
    ids = batch["input_ids"]
    batch["labels"] = ids.masked_fill((mask == 0) | (ids == processor.tokenizer.bos_token_id), -100)
    batch["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
    return batch


def _sample(batch: dict[str, torch.Tensor], i: int, drop_padding: bool = False) -> dict[str, torch.Tensor]:
    sample = {k: v[i : i + 1] for k, v in batch.items()}
    if drop_padding:
        data = sample["attention_mask"][0].bool()
        sample = {k: v if k == "pixel_values" else v[:, data] for k, v in sample.items()}
        sample["position_ids"] = torch.arange(int(data.sum()))[None]
    return sample


def _routing_counts(out) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per MoE call: positions per modality, and assignments per modality and expert."""
    return [(r.output.tokens, r.output.load * r.output.tokens[:, None]) for r in out.routing]


@pytest.mark.parametrize("side", ["right", "left"])
def test_padding_changes_nothing_at_real_positions(tokenizer, side):
    """A sample alone and the same sample padded (alone or beside a longer one): the same outputs at
    its positions, the same losses and routing statistics; padding is counted nowhere."""
    model, processor = build(tokenizer)
    batch = _padded_pair(processor, side)
    data = batch["attention_mask"][0].bool()
    with torch.no_grad():
        short, long = model(**_sample(batch, 0, drop_padding=True)), model(**_sample(batch, 1))
        padded = model(**_sample(batch, 0))
        pair = model(**batch)
    tol = {"atol": 1e-5, "rtol": 1e-5}
    for out in (padded, pair):
        torch.testing.assert_close(out.logits[0, data], short.logits[0], **tol)
    torch.testing.assert_close(pair.logits[1], long.logits[0], **tol)
    for name in ("lm_loss", "aux_loss", "z_loss"):
        torch.testing.assert_close(getattr(padded, name), getattr(short, name), **tol, msg=name)
    for p, s in zip(padded.routing, short.routing):
        assert torch.equal(p.output.tokens, s.output.tokens)
        for name in ("load", "load_balance", "entropy", "dropped"):
            torch.testing.assert_close(getattr(p.output, name), getattr(s.output, name), **tol, msg=name)
    # Beside a longer sample, the counts are the two samples' own counts added: no padding among them.
    for (tokens, counts), (t_short, c_short), (t_long, c_long) in zip(*map(_routing_counts, (pair, short, long))):
        assert torch.equal(tokens, t_short + t_long)
        torch.testing.assert_close(counts, c_short + c_long, **tol)
    # Padding is read off a (batch, positions) mask; any other mask is refused, not ignored.
    with pytest.raises(ValueError, match=r"attention_mask must be \(batch, positions\)"):
        model(**{**batch, "attention_mask": batch["attention_mask"][:, None, None, :]})


def test_beam_search_and_sampling_run(tokenizer):
    model, processor = build(tokenizer)
    batch = processor.generation_batch(images(2), [processor.prompt()] * 2)
    beams = model.generate(**batch, max_new_tokens=4, num_beams=3, do_sample=False)
    torch.manual_seed(0)
    sampled = model.generate(**batch, max_new_tokens=4, do_sample=True, top_k=5)
    assert beams.shape[0] == 2 and sampled.shape[0] == 2
    assert torch.equal(beams[:, : batch["input_ids"].shape[1]], batch["input_ids"])


def test_save_load_bit_identical_and_shared_stored_once(tokenizer, tmp_path):
    model, processor = build(tokenizer)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    with safe_open(os.path.join(tmp_path, "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    expert_keys = [k for k in keys if "experts.in_proj" in k]
    assert expert_keys == ["shared_moe.0.experts.in_proj", "shared_moe.1.experts.in_proj"]
    assert len(keys) == len(model.state_dict())
    assert len({id(p) for p in model.parameters()}) == len(list(model.parameters()))
    loaded = VLMoEForConditionalGeneration.from_pretrained(tmp_path).eval()
    loaded_processor = VLMoEProcessor.from_pretrained(tmp_path)
    prompts = [processor.prompt(), processor.prompt("what color?")]
    batch = processor.generation_batch(images(), prompts)
    batch2 = loaded_processor.generation_batch(images(), prompts)
    assert all(torch.equal(batch[k], batch2[k]) for k in batch)
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, loaded(**batch2).logits)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["decoder"]["pretrained_path"] is None and config["decoder"]["text_config"]["hidden_size"] == 32


def test_shared_layer_gets_gradients_from_both_towers(tokenizer):
    model, processor = build(tokenizer)
    layer = model.shared_moe[0]
    batch = processor.training_batch(images(), [processor.prompt()] * 2, ["a red circle", "a blue circle"])
    image_embeds, _ = model.encode_images(batch["pixel_values"])
    image_embeds.square().sum().backward()
    from_vision = layer.experts.in_proj.grad.clone()
    model.zero_grad()
    text_only = {k: v for k, v in batch.items() if k != "pixel_values"}
    text_only["input_ids"] = text_only["input_ids"].masked_fill(text_only["input_ids"] == processor.image_token_id, 5)
    model(**text_only).loss.backward()
    from_decoder = layer.experts.in_proj.grad.clone()
    model.zero_grad()
    model(**batch).loss.backward()
    assert from_vision.abs().sum() > 0 and from_decoder.abs().sum() > 0
    assert layer.router.weight.grad[0].abs().sum() > 0 and layer.router.weight.grad[1].abs().sum() > 0  # per modality


def _dense_towers(tmp_path, tokenizer):
    """A tiny timm ViT weights file and a tiny Llama folder, as a user would have them."""
    torch.manual_seed(1)
    vit = timm.create_model(VISION["model_name"], num_classes=0, **{k: v for k, v in VISION.items() if k not in ("model_name", "crop_pct")})
    vit_file = tmp_path / "vit.pth"
    torch.save(vit.state_dict(), vit_file)
    llama = LlamaForCausalLM(LlamaConfig(**TEXT, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id))
    llama_dir = tmp_path / "llama"
    llama.save_pretrained(llama_dir)
    tokenizer.save_pretrained(llama_dir)
    return str(vit_file), str(llama_dir)


def test_upcycled_model_equals_dense_composite_at_init(tokenizer, tmp_path):
    vit_file, llama_dir = _dense_towers(tmp_path, tokenizer)

    def config(moe_every: int) -> VLMoEConfig:
        return VLMoEConfig(
            vision={**VISION, "pretrained_file": vit_file, "moe_every": moe_every},
            decoder={"pretrained_path": llama_dir, "moe_every": moe_every},
            moe={"num_experts": 4, "top_k": 2, "modality_mode": "partitioned", "experts_per_modality": [1, 1],
                 "num_shared_experts": 1},
        )

    dense, processor = build_model(config(0))
    moe, _ = build_model(config(1))
    moe.projector.load_state_dict(dense.projector.state_dict())  # the only part built at random in both
    assert len(moe.moe_layers()["vision"]) == 2 and len(moe.moe_layers()["decoder"]) == 2
    batch = processor.generation_batch(images(), [processor.prompt(), processor.prompt("what color?")])
    with torch.no_grad():
        torch.testing.assert_close(moe.eval()(**batch).logits, dense.eval()(**batch).logits, rtol=1e-5, atol=1e-5)
    counts = moe.parameter_counts()
    assert counts["vision_active"] < counts["vision_total"] and counts["decoder_active"] < counts["decoder_total"]
    # The config records the experts' kind (GELU from the timm MLP), so the saved model reloads as it is.
    moe.save_pretrained(tmp_path / "moe")
    reloaded = VLMoEForConditionalGeneration.from_pretrained(tmp_path / "moe").eval()
    assert reloaded.config.vision.expert_type == "gelu" and reloaded.config.decoder.expert_type == "swiglu"
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, moe(**batch).logits)


def test_building_twice_from_one_config_loads_the_pretrained_towers_both_times(tokenizer, tmp_path):
    """build_model resolves a copy: the caller's config still names the local towers afterwards."""
    vit_file, llama_dir = _dense_towers(tmp_path, tokenizer)
    config = VLMoEConfig(
        vision={**VISION, "pretrained_file": vit_file}, decoder={"pretrained_path": llama_dir},
        moe={"num_experts": 4, "top_k": 2},
    )
    before = config.to_dict()
    first, _ = build_model(config)
    assert config.to_dict() == before
    second, _ = build_model(config)
    pretrained = LlamaForCausalLM.from_pretrained(llama_dir, use_kernels=False).state_dict()
    for model in (first, second):
        decoder = model.language_model.state_dict()
        assert all(torch.equal(decoder[k], v) for k, v in pretrained.items()), "decoder not loaded from llama_dir"
        assert torch.equal(model.vision.vit.pos_embed, torch.load(vit_file, weights_only=True)["pos_embed"])
        assert model.config.decoder.pretrained_path is None and model.config.vision.pretrained_file is None
    assert first.config.to_dict() == second.config.to_dict()


def test_loading_asks_for_no_hub_kernels_unless_told(tokenizer, tmp_path, monkeypatch):
    """transformers >= 5.25 kernelizes every loaded model with kernels from the Hub unless told not to."""
    vit_file, llama_dir = _dense_towers(tmp_path, tokenizer)
    asked = []
    monkeypatch.setattr(PreTrainedModel, "set_use_kernels", lambda self, use_kernels, *a, **k: asked.append(use_kernels))
    model, _ = build_model(VLMoEConfig(vision={**VISION, "pretrained_file": vit_file}, decoder={"pretrained_path": llama_dir}))
    model.save_pretrained(tmp_path / "saved")
    VLMoEForConditionalGeneration.from_pretrained(tmp_path / "saved")
    assert asked == [False, False]  # the decoder tower from its folder, then the saved vlmoe model
    VLMoEForConditionalGeneration.from_pretrained(tmp_path / "saved", use_kernels=True)
    assert asked[-1] is True


def test_parameter_counts_dense_model_active_equals_total(tokenizer):
    model, _ = build(tokenizer, share=False, vision={**VISION, "mlp_ratio": 2.0}, decoder={"text_config": dict(TEXT)})
    counts = model.parameter_counts()
    assert counts["vision_active"] == counts["vision_total"] and counts["decoder_active"] == counts["decoder_total"]
    assert counts["total"] == counts["vision_total"] + counts["decoder_total"] + counts["projector"]


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"vision": {**VISION, "model_name": "hf-hub:timm/vit_base_patch16_224", "mlp_ratio": 2.0, "moe_every": 1}},
         "vision.model_name"),
        ({"vision": {**VISION, "pretrained_file": "/nonexistent/vit.safetensors"}}, "vision.pretrained_file"),
        ({"decoder": {"pretrained_path": "meta-llama/Llama-3.2-1B"}}, "decoder.pretrained_path"),
        ({"vision": {**VISION, "mlp_ratio": 4.0, "moe_every": 1}}, "share_moe_layers"),
        ({"vision": {**VISION, "moe_layers": [5]}}, "vision.moe_layers"),
        ({"moe": {"router": "expert_choice"}}, "expert_choice"),
        ({"moe": {"capacity_factor": 1.0}}, r"moe\.capacity_factor=1\.0 is not allowed in a causal layer"),
        # 36 px in 8 px patches: timm would crop 4 px; with timm's default patch (16 px), found once built
        ({"vision": {**VISION, "img_size": 36, "mlp_ratio": 2.0, "moe_every": 1}}, "vision.img_size=36"),
        ({"vision": {**VISION, "img_size": 40, "patch_size": None, "mlp_ratio": 2.0, "moe_every": 1}},
         "vision.img_size=40 is not a multiple of the patch .vision.patch_size=16"),
        ({"decoder": {"text_config": {**TEXT, "hiden_size": 32}, "moe_every": 1}}, "hiden_size.*did you mean 'hidden_size'"),
        ({"vqa_prompt": "Q: {image} {question} {image}"}, r"vqa_prompt .*\{image\} may appear once"),
        ({"vqa_prompt": "Question: {image} Answer:"}, r"vqa_prompt .* must contain \{question\}"),
    ],
)
def test_clear_errors(tokenizer, overrides, match):
    with pytest.raises(ValueError, match=match):
        build_model(tiny_config(**overrides), tokenizer)


def test_from_scratch_decoder_needs_a_tokenizer():
    with pytest.raises(ValueError, match="tokenizer"):
        build_model(tiny_config())


def test_pixel_loss_is_the_mean_squared_error_to_each_tokens_block_and_trains_the_vision_tower(tokenizer):
    model, processor = build(tokenizer, pixel_loss_weight=0.5, pixel_loss_size=2)
    model.train()
    batch = processor.training_batch(images(), [processor.prompt(), processor.prompt()], ["a red circle", "a blue square"])
    out = model(**batch)
    assert out.loss.item() == pytest.approx((out.lm_loss + out.aux_loss + out.z_loss + out.pixel_loss).item(), rel=1e-6)
    out.pixel_loss.backward()
    assert model.vision.vit.patch_embed.proj.weight.grad.abs().sum() > 0
    with torch.no_grad():  # a head that always says 0: the loss is the mean square of the (one-colour) images
        model.pixel_head.weight.zero_()
        model.pixel_head.bias.zero_()
    expected = batch["pixel_values"].pow(2).mean()
    assert model(**batch).pixel_loss.item() == pytest.approx(0.5 * expected.item(), rel=1e-5)
    assert model.pixel_head.out_features == 3 * 2 * 2
    whole_blocks, _ = build(tokenizer, pixel_loss_weight=0.5)  # default: 32 px images, 8 px patches
    assert whole_blocks.pixel_head.out_features == 3 * 8 * 8
    assert build(tokenizer)[0].pixel_head is None  # off by default: no head, no term


def test_shuffle_projector_keeps_what_average_pooling_loses():
    from vlmoe.model.config import ProjectorConfig
    from vlmoe.model.towers import Projector

    torch.manual_seed(0)
    x = torch.randn(1, 16, 8)  # a 4 x 4 grid of patches
    swapped = x.clone()
    swapped[:, [0, 1]] = x[:, [1, 0]]  # two patches of the top-left 2 x 2 block trade places
    outside = x.clone()
    outside[:, 2] += 1.0  # a patch of the top-right block
    for merge, changes_within_block in (("avg", False), ("shuffle", True)):
        projector = Projector(8, 16, (4, 4), ProjectorConfig(pool=2, merge=merge))
        out = projector(x)
        assert out.shape == (1, 4, 16)
        assert (not torch.allclose(projector(swapped)[:, 0], out[:, 0])) == changes_within_block
        torch.testing.assert_close(projector(swapped)[:, 1:], out[:, 1:])  # other blocks unchanged
        moved = projector(outside)
        torch.testing.assert_close(moved[:, [0, 2, 3]], out[:, [0, 2, 3]])
        assert not torch.allclose(moved[:, 1], out[:, 1])


def test_projector_positions_tell_image_tokens_apart_and_survive_save_load(tokenizer, tmp_path):
    from vlmoe.model.config import ProjectorConfig
    from vlmoe.model.towers import Projector

    torch.manual_seed(0)
    same = torch.randn(1, 1, 8).expand(2, 16, 8)  # every patch of a 4 x 4 grid alike
    other = torch.randn(2, 16, 8)
    plain = Projector(8, 16, (4, 4), ProjectorConfig())
    placed = Projector(8, 16, (4, 4), ProjectorConfig(positions=True))
    placed.load_state_dict(plain.state_dict())  # the positions are not weights
    assert torch.equal(plain(same), plain(same)[:, :1].expand(2, 16, 16))  # alike without positions
    offsets = placed(same) - plain(same)
    assert len({tuple(t.tolist()) for t in offsets[0]}) == 16  # every grid position its own
    torch.testing.assert_close(placed(other) - plain(other), offsets)  # whatever the image, whichever sample
    assert set(placed.state_dict()) == set(plain.state_dict())

    model, processor = build(tokenizer, projector={"positions": True})
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded = VLMoEForConditionalGeneration.from_pretrained(tmp_path).eval()
    batch = processor.generation_batch(images(), [processor.prompt(), processor.prompt("what color?")])
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, loaded(**batch).logits)
        assert not torch.equal(model(**batch).logits, build(tokenizer)[0](**batch).logits)


def test_conv_stem_sets_the_grid_and_keeps_each_image_independent_of_its_batch():
    from vlmoe.model.config import VisionConfig
    from vlmoe.model.towers import VisionTower

    torch.manual_seed(0)
    config = VisionConfig(img_size=32, patch_size=1, embed_dim=32, depth=1, num_heads=2, conv_stem=[8, 16, 32])
    tower = VisionTower(config).eval()  # BatchNorm's running statistics: no batch dependence
    assert tower.grid_size == (4, 4)  # 32 px / 2**3
    x = torch.randn(3, 3, 32, 32)
    features = tower(x)
    assert features.shape == (3, 16, 32)
    torch.testing.assert_close(tower(x[1:2]), features[1:2])
    patched = VisionTower(VisionConfig(img_size=32, patch_size=2, embed_dim=32, depth=1, num_heads=2, conv_stem=[8, 16, 32]))
    assert patched.grid_size == (2, 2)  # patch_size counts stem output pixels


def test_image_placeholders_and_images_that_disagree_name_both_counts(tokenizer):
    model, processor = build(tokenizer)
    batch = processor.training_batch(images(), [processor.prompt(), processor.prompt("what color?")], ["a red circle", "blue"])
    tokens = int((batch["input_ids"] == model.config.image_token_id).sum()) // 2
    with pytest.raises(ValueError, match=rf"input_ids hold {2 * tokens} image placeholder tokens but pixel_values give 1 images x {tokens} tokens"):
        model(**{**batch, "pixel_values": batch["pixel_values"][:1]})


def test_compiled_model_trains_like_the_eager_one(tokenizer):
    """``torch.compile`` captures the model around its data-dependent steps (padding lookup, the experts'
    group sizes run eagerly): loss and every gradient equal the eager model's. ``aot_eager`` traces
    forward and backward as inductor would, without generating code (seconds, not minutes)."""
    torch._dynamo.reset()
    model, processor = build(tokenizer)
    model.train()
    batch = processor.training_batch(images(), [processor.prompt(), processor.prompt("what color?")], ["a red circle", "blue"])
    eager = model(**batch)
    eager.loss.backward()
    expected = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    compiled = torch.compile(model, backend="aot_eager")(**batch)
    compiled.loss.backward()
    torch.testing.assert_close(compiled.loss, eager.loss)
    assert {name for name, p in model.named_parameters() if p.grad is not None} == set(expected)
    for name, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(p.grad, expected[name], msg=name)
    torch._dynamo.reset()
