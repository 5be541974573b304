"""Captioning and VQA: what the model is asked and what it should answer, and batched generation.

Notable choices:
- A conversation (a sample with ``followups``) trains as one sequence: each question's prompt
  and answer in turn (``VLMoEProcessor.training_batch``).
- A caption sample trains on its canonical caption (``captions[0]``) or, with
  ``caption_target="random"``, on one of its references drawn anew each epoch (a hash of the
  sample's shard, key and epoch: the same draw on a resumed run, in any worker); a VQA sample on
  its most frequent reference answer (the first of the most frequent on ties).
- The collates are small picklable classes, so DataLoader worker processes can run them.
- ``generate_texts`` is the one generation path that evaluation, validation during training
  and the caption script share: left-padded prompts, the KV cache, transformers' ``generate``.
"""

from __future__ import annotations

import zlib
from collections import Counter
from typing import Iterator, Sequence

import torch
from PIL import Image

from .data import Sample, Skipped
from .processing import VLMoEProcessor


CAPTION_TARGETS = ("canonical", "random")


def answer_target(answers: Sequence[str]) -> str:
    """The answer a VQA question trains on: the most frequent reference (the first of them on ties)."""
    return Counter(answers).most_common(1)[0][0]


def training_target(sample: Sample, caption_target: str = "canonical") -> str:
    if sample.task == "vqa":
        return answer_target(sample.answers)
    if caption_target == "canonical":
        return sample.captions[0]
    draw = zlib.crc32(f"{sample.url}/{sample.key}/{sample.epoch}".encode())
    return sample.captions[draw % len(sample.captions)]


def question_of(sample: Sample) -> str | None:
    return sample.question if sample.task == "vqa" else None


class TrainingCollate:
    """Samples -> a training batch (prompt, target, labels on the target); a conversation
    (``Sample.followups``) is one sequence of turns. ``fit`` is the loader's transform that keeps
    every sequence within the processor's ``max_length``."""

    def __init__(self, processor: VLMoEProcessor, caption_target: str = "canonical"):
        self.processor = processor
        self.caption_target = caption_target

    def turns(self, sample: Sample) -> tuple[list[str], list[str]]:
        """The prompts and targets of the sample's turns: its own, then each follow-up question's."""
        prompt = self.processor.prompt
        return ([prompt(question_of(sample))] + [prompt(q) for q, _ in sample.followups],
                [training_target(sample, self.caption_target)] + [answer_target(a) for _, a in sample.followups])

    def fit(self, sample: Sample) -> Iterator[Sample | Skipped]:
        """The sample with the turns that fit in ``max_length`` tokens; each turn that does not is
        skipped and counted as ``too_long`` (the whole conversation, every question counted, when its
        first turn does not fit)."""
        prompts, targets = self.turns(sample)
        fitting = self.processor.turns_that_fit(prompts, targets)
        limit = (f"{self.processor.max_length} tokens with the image: raise model.max_text_length "
                 f"(now {self.processor.max_text_length}) to keep it")
        if fitting == 0:
            yield Skipped("too_long", sample.url, sample.key, f"longer than {limit}", count=len(prompts))
            return
        for turn in range(fitting, len(prompts)):
            yield Skipped("too_long", sample.url, sample.key, f"question {turn + 1} of its conversation ends past {limit}")
        sample.followups = sample.followups[: fitting - 1]
        yield sample

    def __call__(self, samples: list[Sample]) -> dict[str, torch.Tensor]:
        prompts, targets = zip(*(self.turns(s) for s in samples))
        return self.processor.training_batch([s.image for s in samples], prompts, targets)


class GenerationCollate:
    """Samples -> (left-padded generation inputs, the samples without their images)."""

    def __init__(self, processor: VLMoEProcessor):
        self.processor = processor

    def __call__(self, samples: list[Sample]) -> tuple[dict[str, torch.Tensor], list[Sample]]:
        prompts = [self.processor.prompt(question_of(s)) for s in samples]
        batch = self.processor.generation_batch([s.image for s in samples], prompts)
        for sample in samples:
            sample.image = None  # keep what crosses process boundaries small
        return batch, samples


@torch.no_grad()
def generate_from_batch(model, processor: VLMoEProcessor, batch: dict[str, torch.Tensor], **generate_kwargs) -> list[str]:
    """Texts generated for a ``generation_batch``; greedy with 24 new tokens unless told otherwise."""
    generate_kwargs = {"max_new_tokens": 24, "do_sample": False, **generate_kwargs}
    batch = {k: v.to(model.device) for k, v in batch.items()}
    generated = model.generate(**batch, **generate_kwargs)
    return processor.decode(generated, batch["input_ids"].shape[1])


def generate_texts(
    model, processor: VLMoEProcessor, images: Sequence[Image.Image], questions: Sequence[str | None] | None = None,
    **generate_kwargs,
) -> list[str]:
    """Captions (question None) or answers for PIL images, in one batch."""
    questions = list(questions) if questions is not None else [None] * len(images)
    batch = processor.generation_batch(images, [processor.prompt(q) for q in questions])
    return generate_from_batch(model, processor, batch, **generate_kwargs)
