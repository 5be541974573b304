"""vlmoe inside transformers: Auto classes, the image-text-to-text pipeline, the processor as a ProcessorMixin."""

from __future__ import annotations

import json
import os

import pytest
import timm.data
import torch
from transformers import (
    AutoConfig, AutoImageProcessor, AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor, pipeline,
)

from vlmoe import VLMoEConfig, VLMoEForConditionalGeneration, VLMoEImageProcessor, VLMoEProcessor
from vlmoe.tasks import generate_texts

from test_model import SLOT_PROMPT, build, images, tokenizer  # noqa: F401  (a fixture)

QUESTIONS = [None, "what color?", None, "is it round?"]
GENERATE = dict(max_new_tokens=5, min_new_tokens=5)  # every row generates: a stop would hide nothing, but be explicit


@pytest.fixture(scope="module")
def saved(tokenizer, tmp_path_factory):
    """A tiny model whose VQA prompt puts the image after the question, saved like ``runs/NAME/final``."""
    model, processor = build(tokenizer, vqa_prompt=SLOT_PROMPT)
    folder = str(tmp_path_factory.mktemp("vlmoe"))
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return model, processor, folder


def test_auto_classes_load_a_vlmoe_folder_offline(saved):
    model, processor, folder = saved
    assert isinstance(AutoConfig.from_pretrained(folder, local_files_only=True), VLMoEConfig)
    for auto in (AutoModelForImageTextToText, AutoModelForCausalLM):
        loaded = auto.from_pretrained(folder, local_files_only=True)
        assert isinstance(loaded, VLMoEForConditionalGeneration)
        for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
            assert torch.equal(a, b), name
    auto_processor = AutoProcessor.from_pretrained(folder, local_files_only=True)
    assert isinstance(auto_processor, VLMoEProcessor)
    assert isinstance(auto_processor.image_processor, VLMoEImageProcessor)
    assert isinstance(AutoImageProcessor.from_pretrained(folder, local_files_only=True), VLMoEImageProcessor)


def test_saved_processor_makes_the_same_batches(saved):
    _, processor, folder = saved
    loaded = AutoProcessor.from_pretrained(folder, local_files_only=True)
    prompts = [processor.prompt(q) for q in QUESTIONS]
    for make in ("generation_batch", "training_batch"):
        args = (images(4), prompts) + ((["a red circle", "red", "a blue square", "yes"],) if make == "training_batch" else ())
        expected, got = getattr(processor, make)(*args), getattr(loaded, make)(*args)
        assert expected.keys() == got.keys()
        for key in expected:
            assert torch.equal(expected[key], got[key]), (make, key)
    call = loaded(images=images(4), text=prompts)  # what the pipeline calls
    for key, value in processor.generation_batch(images(4), prompts).items():
        assert torch.equal(call[key], value), key


def test_saved_image_processor_reproduces_timm_eval_pixels_exactly(saved):
    model, _, folder = saved
    vision = model.config.vision
    timm_transform = timm.data.create_transform(
        input_size=(3, vision.img_size, vision.img_size), interpolation=vision.interpolation,
        mean=tuple(vision.image_mean), std=tuple(vision.image_std), crop_pct=vision.crop_pct, is_training=False,
    )
    pictures = images(3)
    expected = torch.stack([timm_transform(p.convert("RGB")) for p in pictures])
    loaded = AutoImageProcessor.from_pretrained(folder, local_files_only=True)
    assert torch.equal(loaded(pictures)["pixel_values"], expected)
    with open(os.path.join(folder, "processor_config.json")) as f:
        saved_settings = json.load(f)["image_processor"]
    assert {k: saved_settings[k] for k in ("img_size", "interpolation", "crop_pct")} == {
        "img_size": vision.img_size, "interpolation": vision.interpolation, "crop_pct": vision.crop_pct}


def test_folder_saved_without_processor_files_still_loads(saved, tmp_path):
    model, processor, _ = saved
    model.save_pretrained(tmp_path)
    processor.tokenizer.save_pretrained(tmp_path)  # what vlmoe saved before processors were saved
    assert not os.path.exists(tmp_path / "processor_config.json")
    loaded = VLMoEProcessor.from_pretrained(tmp_path)
    prompts = [processor.prompt(q) for q in QUESTIONS]
    for key, value in processor.generation_batch(images(4), prompts).items():
        assert torch.equal(loaded.generation_batch(images(4), prompts)[key], value), key


def test_pipeline_captions_and_answers_like_generate_texts(saved):
    model, processor, folder = saved
    pipe = pipeline("image-text-to-text", model=folder)
    pictures = images(4)
    expected = generate_texts(model, processor, pictures, QUESTIONS, **GENERATE)
    prompts = [processor.prompt(q) for q in QUESTIONS]
    out = pipe(images=pictures, text=prompts, return_full_text=False, **GENERATE)  # one batch
    assert [o["generated_text"] for o in out] == expected
    assert [o["input_text"] for o in out] == prompts
    one = pipe(images=pictures[1], text=prompts[1], return_full_text=False, **GENERATE)
    assert [o["generated_text"] for o in one] == expected[1:2]
    full = pipe(images=pictures[:1], text=prompts[:1], **GENERATE)
    assert full[0]["generated_text"].startswith(prompts[0]) and full[0]["generated_text"].endswith(expected[0])


def test_processor_refuses_a_prompt_count_that_differs_from_the_images(saved):
    _, processor, _ = saved
    with pytest.raises(ValueError, match=r"^2 image\(s\) and 1 prompt\(s\): give one prompt per image$"):
        processor(images=images(2), text=[processor.prompt()])
    with pytest.raises(ValueError, match="^VLMoEProcessor needs images: every prompt holds the image tokens of its image$"):
        processor(text=processor.prompt())
