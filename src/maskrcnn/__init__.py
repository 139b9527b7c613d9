"""maskrcnn: Mask R-CNN instance segmentation, correct to the paper, batched, torchvision-compatible.

The public names are imported on first use (PEP 562 module `__getattr__`): `import maskrcnn.cli` then costs no
torch import, so `maskrcnn --help` answers at once, while `from maskrcnn import build_model` works as usual.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from maskrcnn.config import Config, ConfigError, DataConfig, ModelConfig, TrainConfig, load_config
    from maskrcnn.model import MaskRCNN, build_model

# public name -> the module that defines it
_HOMES = {
    "Config": "maskrcnn.config",
    "ConfigError": "maskrcnn.config",
    "DataConfig": "maskrcnn.config",
    "ModelConfig": "maskrcnn.config",
    "TrainConfig": "maskrcnn.config",
    "load_config": "maskrcnn.config",
    "MaskRCNN": "maskrcnn.model",
    "build_model": "maskrcnn.model",
}

__all__ = sorted(_HOMES)
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'maskrcnn' has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOMES[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_HOMES))
