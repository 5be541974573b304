"""Images and text to model inputs, and the tokenizer a from-scratch decoder starts with.

Notable choices:
- ``VLMoEProcessor`` is a transformers ``ProcessorMixin``: an image processor (timm's eval
  transform with the preprocessing recorded in ``VLMoEConfig.vision``: size, mean, std,
  interpolation, crop; ``image_processing.py``) and the tokenizer, plus the prompt settings of the
  config. Training, evaluation, the caption script and ``pipeline("image-text-to-text")`` see
  identical pixels and token ids, and a saved processor carries its own settings; a folder saved
  without one (before processors were saved) gets one made from its ``config.json``.
- A sequence is ``[bos] [image] * P  prompt  target [eos]``; labels cover ``target [eos]`` only.
  A prompt template may place the image itself with ``{image}`` (``config.IMAGE_SLOT``), e.g.
  ``"Question: {question} {image} Answer:"``: the image tokens then follow the question, and,
  the decoder being causal, each of them can look at what is asked about it.
  Training batches pad on the right; generation batches pad on the left, so every prompt ends
  where generation starts.
- A from-scratch decoder gets a byte-level BPE tokenizer trained with the ``tokenizers`` library
  on the training texts, saved as a transformers fast tokenizer beside the model.
"""

from __future__ import annotations

import copy
import os
from typing import Iterable, Sequence

import torch
from PIL import Image
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from torch import Tensor
from transformers import AutoTokenizer, BatchFeature, PreTrainedTokenizerFast, ProcessorMixin
from transformers.utils import PROCESSOR_NAME

from .image_processing import VLMoEImageProcessor
from .model.config import CAPTION_PROMPT, IMAGE_SLOT, VQA_PROMPT, VLMoEConfig, check_prompts, task_prompt
from .model.modeling import VLMoEForConditionalGeneration
from .model.upcycle import load_parent, load_parent_config

SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}


def train_tokenizer(texts: Iterable[str], vocab_size: int = 1024, image_token: str = "<image>") -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with pad/bos/eos/unk and the image placeholder token."""
    tokenizer = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk_token"]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    specials = list(SPECIAL_TOKENS.values()) + [image_token]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, extra_special_tokens={"image_token": image_token}, **SPECIAL_TOKENS)


class VLMoEProcessor(ProcessorMixin):
    """Turns PIL images and prompts/targets into ``pixel_values``, ``input_ids``, ``attention_mask``, ``labels``.

    A transformers processor: an image processor (timm's eval transform) and the tokenizer, plus the
    prompt settings of the model's config; ``save_pretrained`` / ``from_pretrained`` /
    ``AutoProcessor`` handle it like any other. ``processor(images=..., text=prompts)`` makes a
    generation batch (what ``pipeline("image-text-to-text")`` calls).
    """

    def __init__(
        self,
        image_processor: VLMoEImageProcessor,
        tokenizer,
        num_image_tokens: int = 1,
        image_token: str = "<image>",
        caption_prompt: str = CAPTION_PROMPT,
        vqa_prompt: str = VQA_PROMPT,
        max_text_length: int = 64,
        **kwargs,
    ):
        super().__init__(image_processor, tokenizer, **kwargs)
        check_prompts(caption_prompt, vqa_prompt)
        self.num_image_tokens = num_image_tokens
        self.image_token = image_token
        self.caption_prompt = caption_prompt
        self.vqa_prompt = vqa_prompt
        self.max_text_length = max_text_length
        self.image_token_id = tokenizer.convert_tokens_to_ids(image_token)
        # Batches that transformers pads itself (a pipeline with batch_size) are generation batches.
        tokenizer.padding_side = "left"

    @classmethod
    def from_config(cls, config: VLMoEConfig, tokenizer) -> "VLMoEProcessor":
        """The processor of a built model: image settings and prompts from its (resolved) config."""
        return cls(
            VLMoEImageProcessor.from_vision_config(config.vision), tokenizer, num_image_tokens=config.num_image_tokens,
            image_token=config.image_token, caption_prompt=config.caption_prompt, vqa_prompt=config.vqa_prompt,
            max_text_length=config.max_text_length,
        )

    # --- text ----------------------------------------------------------------------------

    def prompt(self, question: str | None = None) -> str:
        """The prompt for captioning (no question) or VQA; it keeps the template's ``{image}`` slot, if any."""
        return task_prompt(self.caption_prompt, self.vqa_prompt, question)

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _prefix(self, prompt: str) -> list[int]:
        """``[bos]``, the image tokens where the prompt's ``{image}`` slot is (first without one), the prompt."""
        before, slot, after = prompt.partition(IMAGE_SLOT)
        if not slot:
            before, after = "", prompt
        image = [self.image_token_id] * self.num_image_tokens
        return [self.tokenizer.bos_token_id] + self._ids(before.strip()) + image + self._ids(after.strip())

    # --- images --------------------------------------------------------------------------

    def pixel_values(self, images: Sequence[Image.Image]) -> Tensor:
        return self.image_processor.pixel_values(images)  # (B, 3, H, W)

    # --- batches -------------------------------------------------------------------------

    def __call__(
        self, images: Image.Image | Sequence[Image.Image] | None = None, text: str | Sequence[str] | None = None,
        return_tensors: str | None = "pt", **kwargs,
    ) -> BatchFeature:
        """A generation batch: one prompt per image (``prompt()`` / ``prompt(question)`` make them;
        ``None``: captions). Other tokenizer options (``padding``) do not apply: prompts are
        always left-padded to the longest."""
        if images is None:
            raise ValueError("VLMoEProcessor needs images: every prompt holds the image tokens of its image")
        images = [images] if isinstance(images, Image.Image) else list(images)
        prompts = [self.prompt()] * len(images) if text is None else [text] if isinstance(text, str) else list(text)
        if len(prompts) != len(images):
            raise ValueError(f"{len(images)} image(s) and {len(prompts)} prompt(s): give one prompt per image")
        return BatchFeature(self.generation_batch(images, prompts), tensor_type=return_tensors)

    @property
    def max_length(self) -> int:
        """The longest training sequence: bos, the image tokens and ``max_text_length`` text tokens."""
        return 1 + self.num_image_tokens + self.max_text_length

    def _turns(self, prompt: str | Sequence[str], target: str | Sequence[str]) -> list[tuple[list[int], list[int]]]:
        """Each turn's (prompt ids, target ids and eos); the first prompt holds the image tokens."""
        turns = [(prompt, target)] if isinstance(prompt, str) else list(zip(prompt, target, strict=True))
        return [
            (self._prefix(p) if turn == 0 else self._ids(p.replace(IMAGE_SLOT, "").strip()),
             self._ids(" " + t.strip()) + [self.tokenizer.eos_token_id])
            for turn, (p, t) in enumerate(turns)
        ]

    def turns_that_fit(self, prompt: str | Sequence[str], target: str | Sequence[str]) -> int:
        """How many turns of a training sample, from the first, fit in ``max_length`` tokens."""
        length = 0
        for fitting, (prefix, answer) in enumerate(self._turns(prompt, target)):
            length += len(prefix) + len(answer)
            if length > self.max_length:
                return fitting
        return 1 if isinstance(prompt, str) else len(prompt)

    def training_batch(
        self, images: Sequence[Image.Image], prompts: Sequence[str | Sequence[str]], targets: Sequence[str | Sequence[str]],
    ) -> dict[str, Tensor]:
        """Right-padded inputs with labels on the targets (and eos) only.

        A sample's prompt and target may be lists, one per turn of a conversation: the image comes
        with the first prompt, every target ends with eos, and the labels cover each target. A
        sample longer than ``max_length`` is an error (nothing is cut silently).
        """
        rows, label_rows = [], []
        for i, (prompt, target) in enumerate(zip(prompts, targets, strict=True)):
            ids, labels = [], []
            for prefix, answer in self._turns(prompt, target):
                ids += prefix + answer
                labels += [-100] * len(prefix) + answer
            if len(ids) > self.max_length:
                raise ValueError(
                    f"sample {i} of the batch is {len(ids)} tokens long, more than max_length={self.max_length} "
                    f"(bos, {self.num_image_tokens} image tokens, model.max_text_length={self.max_text_length}): "
                    "raise model.max_text_length, or keep the turns that fit (turns_that_fit)"
                )
            rows.append(ids)
            label_rows.append(labels)
        batch = self._pad(rows, "right")
        labels = torch.full_like(batch["input_ids"], -100)
        for i, row in enumerate(label_rows):
            labels[i, : len(row)] = torch.tensor(row)
        return {**batch, "labels": labels, "pixel_values": self.pixel_values(images)}

    def generation_batch(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> dict[str, Tensor]:
        """Left-padded prompts for ``model.generate``."""
        batch = self._pad([self._prefix(p) for p in prompts], "left")
        return {**batch, "pixel_values": self.pixel_values(images)}

    def _pad(self, rows: list[list[int]], side: str) -> dict[str, Tensor]:
        length = max(len(r) for r in rows)
        ids = torch.full((len(rows), length), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), length), dtype=torch.long)
        for i, row in enumerate(rows):
            span = slice(length - len(row), length) if side == "left" else slice(0, len(row))
            ids[i, span] = torch.tensor(row)
            mask[i, span] = 1
        return {"input_ids": ids, "attention_mask": mask}

    def decode(self, generated: Tensor, prompt_length: int) -> list[str]:
        """The text generated after a left-padded prompt of ``prompt_length`` positions."""
        texts = self.tokenizer.batch_decode(generated[:, prompt_length:], skip_special_tokens=True)
        return [t.strip() for t in texts]

    # --- persistence ---------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, **kwargs) -> "VLMoEProcessor":
        """A saved processor; a folder saved before processors were (config and tokenizer only)
        gets one made from its ``config.json``."""
        kwargs.setdefault("local_files_only", True)
        if os.path.isfile(os.path.join(directory, PROCESSOR_NAME)):
            return super().from_pretrained(directory, **kwargs)
        config = VLMoEConfig.from_pretrained(directory)
        tokenizer = AutoTokenizer.from_pretrained(directory, config=config.get_text_config(), local_files_only=True)
        return cls.from_config(config, tokenizer)


def prepare_tokenizer(config: VLMoEConfig, tokenizer=None):
    """The tokenizer for ``config``: given, or the pretrained decoder's; with the image token and a pad token."""
    if tokenizer is None:
        if config.decoder.pretrained_path is None:
            raise ValueError(
                "decoder.pretrained_path is not set, so a tokenizer must be given: train one with "
                "vlmoe.processing.train_tokenizer(texts)"
            )
        tokenizer = AutoTokenizer.from_pretrained(config.decoder.pretrained_path, local_files_only=True)
    if config.image_token not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [config.image_token]})
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def build_model(
    config: VLMoEConfig, tokenizer=None, parent: VLMoEForConditionalGeneration | None = None, upcycle_noise: float = 0.0
) -> tuple[VLMoEForConditionalGeneration, VLMoEProcessor]:
    """A new model and its processor: towers from local weights (upcycled) or from scratch, or from
    ``parent`` (a vlmoe model, ``load_run``): its dense MLPs upcycled where ``config`` puts MoE
    layers, everything else loaded (``vlmoe.model.upcycle``); give it the parent's tokenizer.

    A from-scratch decoder takes its vocabulary and special token ids from ``tokenizer``. ``config``
    is left as it is (the model resolves a copy), so the same config builds the same model again.
    ``upcycle_noise``: Gaussian noise added to each upcycled expert, relative to each dense weight's std.
    """
    tokenizer = prepare_tokenizer(config, tokenizer)
    config = copy.deepcopy(config)
    config.image_token_id = tokenizer.convert_tokens_to_ids(config.image_token)
    if config.decoder.pretrained_path is None:
        config.decoder.text_config = {
            **config.decoder.text_config, "vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id,
            "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
        }
    model = VLMoEForConditionalGeneration(config, parent=parent, upcycle_noise=upcycle_noise)
    if parent is not None:
        load_parent(model, parent)
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.language_model.resize_token_embeddings(len(tokenizer))
        model.config.decoder.text_config["vocab_size"] = len(tokenizer)
    generation = model.generation_config
    generation.bos_token_id, generation.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    generation.pad_token_id = tokenizer.pad_token_id
    return model, VLMoEProcessor.from_config(model.config, tokenizer)


def load_run(path: str | os.PathLike) -> tuple[VLMoEForConditionalGeneration, VLMoEProcessor]:
    """A saved vlmoe model and its processor, to start a new model from (``build_model(parent=...)``)."""
    load_parent_config(str(path))  # a clear error when the folder is not a vlmoe one
    return VLMoEForConditionalGeneration.from_pretrained(path).eval(), VLMoEProcessor.from_pretrained(path)
