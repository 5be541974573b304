"""vlmoe: vision-language models with modality-aware sparse Mixture-of-Experts layers."""

from .model.config import DecoderConfig, ProjectorConfig, VisionConfig, VLMoEConfig
from .model.modeling import VLMoEForConditionalGeneration, VLMoEOutput
from .moe import MoEConfig, MoELayer
from .processing import VLMoEProcessor, build_model, train_tokenizer

__all__ = [
    "DecoderConfig", "MoEConfig", "MoELayer", "ProjectorConfig", "VLMoEConfig", "VLMoEForConditionalGeneration",
    "VLMoEOutput", "VLMoEProcessor", "VisionConfig", "build_model", "train_tokenizer",
]
