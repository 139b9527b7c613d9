"""Mask R-CNN model: `build_model(cfg)` from a config, `from_torchvision(model)` from torchvision's weights."""

from maskrcnn.model.build import build_model, from_torchvision
from maskrcnn.model.maskrcnn import MaskRCNN

__all__ = ["MaskRCNN", "build_model", "from_torchvision"]
