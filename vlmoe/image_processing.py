"""``VLMoEImageProcessor``: timm's eval transform as a transformers image processor.

Notable choices:
- The settings are the preprocessing fields of ``VLMoEConfig.vision`` (size, mean, std,
  interpolation, crop), and the pixels come from ``timm.data.create_transform`` itself, so a
  saved ``preprocessor_config.json`` reproduces exactly the pixels that training saw; no
  transformers resize/normalise code is re-implemented here.
- It subclasses ``BaseImageProcessor`` only so that ``AutoImageProcessor`` accepts it; the
  preprocessing path of that class (backends, ``ImagesKwargs``) is not used.
"""

from __future__ import annotations

from typing import Any, Sequence

import timm.data
import torch
from PIL import Image
from torch import Tensor
from transformers.image_processing_utils import BaseImageProcessor, BatchFeature

from .model.config import VisionConfig

SETTINGS = ("img_size", "image_mean", "image_std", "interpolation", "crop_pct")


class VLMoEImageProcessor(BaseImageProcessor):
    """PIL images -> ``pixel_values`` ``(B, 3, H, W)`` through timm's eval transform."""

    model_input_names = ["pixel_values"]

    def __init__(
        self,
        img_size: int = 224,
        image_mean: Sequence[float] = (0.5, 0.5, 0.5),
        image_std: Sequence[float] = (0.5, 0.5, 0.5),
        interpolation: str = "bicubic",
        crop_pct: float = 0.9,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.img_size = img_size
        self.image_mean = list(image_mean)
        self.image_std = list(image_std)
        self.interpolation = interpolation
        self.crop_pct = crop_pct
        self._transform = timm.data.create_transform(
            input_size=(3, img_size, img_size), interpolation=interpolation, mean=tuple(self.image_mean),
            std=tuple(self.image_std), crop_pct=crop_pct, is_training=False,
        )

    @classmethod
    def from_vision_config(cls, vision: VisionConfig) -> "VLMoEImageProcessor":
        """The settings a built model resolved into its vision config (``VisionTower.resolve``)."""
        return cls(**{name: getattr(vision, name) for name in SETTINGS})

    def pixel_values(self, images: Sequence[Image.Image]) -> Tensor:
        return torch.stack([self._transform(image.convert("RGB")) for image in images])  # (B, 3, H, W)

    def __call__(self, images: Image.Image | Sequence[Image.Image], return_tensors: str | None = "pt", **kwargs) -> BatchFeature:
        return self.preprocess(images, return_tensors=return_tensors)

    def preprocess(self, images: Image.Image | Sequence[Image.Image], return_tensors: str | None = "pt", **kwargs) -> BatchFeature:
        images = [images] if isinstance(images, Image.Image) else list(images)
        return BatchFeature({"pixel_values": self.pixel_values(images)}, tensor_type=return_tensors)

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out.pop("_transform", None)  # rebuilt from the settings
        return out
