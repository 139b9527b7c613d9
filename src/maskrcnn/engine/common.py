"""What training, evaluation and the command line share: the device, moving batches to it, autocast, and masks as
COCO RLEs."""

from __future__ import annotations

import numpy as np
import torch
from pycocotools import mask as mask_utils
from torch import Tensor


def resolve_device(name: str) -> torch.device:
    """"auto" -> cuda when available, else cpu; other names as given (a missing GPU is an error)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"train.device: {name!r} requested but CUDA is not available")
    return device


def images_to_model(images: list[Tensor], device: torch.device) -> list[Tensor]:
    """uint8 [3, H, W] images -> float [3, H, W] in 0..1 on `device` (moved as uint8: 4x less to copy)."""
    for i, image in enumerate(images):
        if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(f"image {i} of the batch: expected uint8 [3, H, W] from the data set, got "
                             f"{image.dtype} {tuple(image.shape)}")
    return [image.to(device, non_blocking=True).float().div_(255.0) for image in images]


def targets_to_device(targets: list[dict], device: torch.device) -> list[dict]:
    """Every tensor of every target dict moved to `device`; other values (e.g. an int image id) as they are."""
    return [{k: (v.to(device, non_blocking=True) if isinstance(v, Tensor) else v) for k, v in t.items()} for t in targets]


def output_to_cpu(output: dict[str, Tensor]) -> dict[str, Tensor]:
    """One image's model output on the CPU, floating tensors as float32 (bf16 under autocast)."""
    return {k: v.float().cpu() if v.is_floating_point() else v.cpu() for k, v in output.items()}


def autocast(device: torch.device, enabled: bool, *, cpu_bf16: bool = False):
    """bf16 autocast: on CUDA when `enabled` (train.amp), on the CPU when `cpu_bf16` (train.precision; the
    model's inference has its own, model.precision); a no-op context otherwise."""
    if device.type == "cpu":
        return torch.autocast(device_type="cpu", dtype=torch.bfloat16, enabled=cpu_bf16)
    return torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=enabled and device.type == "cuda")


def masks_to_rle(binary_masks: np.ndarray) -> list[dict]:
    """uint8 [D, H, W] -> D COCO RLEs with str counts (JSON-ready)."""
    rles = mask_utils.encode(np.asfortranarray(binary_masks.transpose(1, 2, 0)))  # (D, H, W) -> (H, W, D)
    for rle in rles:
        rle["counts"] = rle["counts"].decode("ascii")
    return rles
