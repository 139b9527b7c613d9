"""maskrcnn: Mask R-CNN instance segmentation, correct to the paper, batched, torchvision-compatible."""

from maskrcnn.config import Config, ConfigError, DataConfig, ModelConfig, TrainConfig, load_config

__all__ = ["Config", "ConfigError", "DataConfig", "ModelConfig", "TrainConfig", "load_config"]
__version__ = "0.1.0"
