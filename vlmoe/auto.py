"""vlmoe in transformers' Auto classes, so a vlmoe folder loads like any transformers model.

After ``import vlmoe``, ``AutoConfig``, ``AutoModelForImageTextToText``, ``AutoModelForCausalLM``,
``AutoImageProcessor``, ``AutoProcessor`` and ``pipeline("image-text-to-text")`` load a vlmoe
``save_pretrained`` folder from the library's own classes: no ``trust_remote_code``, no network.
Registration is what transformers' ``register`` APIs do for an out-of-tree model (the mapping
entries for ``model_type`` "vlmoe"); ``exist_ok`` makes a second import harmless.
"""

from __future__ import annotations

from transformers import (
    AutoConfig, AutoImageProcessor, AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor,
)

from .image_processing import VLMoEImageProcessor
from .model.config import VLMoEConfig
from .model.modeling import VLMoEForConditionalGeneration
from .processing import VLMoEProcessor


def register_auto_classes() -> None:
    AutoConfig.register(VLMoEConfig.model_type, VLMoEConfig, exist_ok=True)
    AutoModelForImageTextToText.register(VLMoEConfig, VLMoEForConditionalGeneration, exist_ok=True)
    # The model runs on text alone too (no image tokens in input_ids, no pixel_values).
    AutoModelForCausalLM.register(VLMoEConfig, VLMoEForConditionalGeneration, exist_ok=True)
    AutoImageProcessor.register(VLMoEConfig, image_processor_classes={"torchvision": VLMoEImageProcessor}, exist_ok=True)
    AutoProcessor.register(VLMoEConfig, VLMoEProcessor, exist_ok=True)
