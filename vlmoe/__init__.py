"""vlmoe: vision-language models with modality-aware sparse Mixture-of-Experts layers."""

from .auto import register_auto_classes
from .image_processing import VLMoEImageProcessor
from .model.config import DecoderConfig, ProjectorConfig, VisionConfig, VLMoEConfig
from .model.modeling import VLMoEForConditionalGeneration, VLMoEOutput
from .moe import MoEConfig, MoELayer
from .processing import VLMoEProcessor, build_model, load_run, train_tokenizer

__all__ = [
    "DecoderConfig", "MoEConfig", "MoELayer", "ProjectorConfig", "VLMoEConfig", "VLMoEForConditionalGeneration",
    "VLMoEImageProcessor", "VLMoEOutput", "VLMoEProcessor", "VisionConfig", "build_model", "load_run",
    "train_tokenizer",
]

register_auto_classes()  # the Auto classes and pipelines find vlmoe folders (vlmoe/auto.py)
