"""maskrcnn: Mask R-CNN instance segmentation, correct to the paper, batched, torchvision-compatible."""

from maskrcnn.config import Config, ConfigError, DataConfig, ModelConfig, TrainConfig, load_config
from maskrcnn.model import MaskRCNN, build_model

__all__ = ["Config", "ConfigError", "DataConfig", "MaskRCNN", "ModelConfig", "TrainConfig", "build_model",
           "load_config"]
__version__ = "0.1.0"
