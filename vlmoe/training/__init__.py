"""Training: the config schema, optimizer groups, atomic checkpoints and the Accelerate loop."""

from .config import Config, load_config
from .trainer import Trainer, train

__all__ = ["Config", "Trainer", "load_config", "train"]
