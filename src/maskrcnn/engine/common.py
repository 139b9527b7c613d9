"""What training, evaluation and prediction share: the device, moving batches to it, autocast, seeding."""

from __future__ import annotations

import random

import numpy as np
import torch
from torch import Tensor


def resolve_device(name: str, key: str = "train.device") -> torch.device:
    """"auto" -> cuda when available, else cpu; other names as given (a missing GPU is an error naming `key`)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{key}: {name!r} requested but CUDA is not available")
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


def cuda_autocast(precision: str) -> bool:
    """Whether inference on CUDA runs under bf16 autocast, from model.precision (bf16, or auto: GPUs run bf16 at
    several times their fp32 rate). On the CPU the model applies model.precision itself."""
    return precision in ("bf16", "auto")


def autocast(device: torch.device, enabled: bool, *, cpu_bf16: bool = False):
    """bf16 autocast: on CUDA when `enabled` (train.amp in training, `cuda_autocast` in inference), on the CPU
    when `cpu_bf16` (train.precision; the model's inference has its own, model.precision); a no-op otherwise."""
    if device.type == "cpu":
        return torch.autocast(device_type="cpu", dtype=torch.bfloat16, enabled=cpu_bf16)
    return torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=enabled and device.type == "cuda")


def seed_iteration(seed: int, iteration: int) -> None:
    """Seeds every generator from (seed, iteration).

    Why per iteration: the RPN and RoI samplers draw from torch's global generator, and whatever else ran in
    between (a periodic evaluation, a checkpoint reload) would shift their draws. Seeding each iteration makes the
    randomness of iteration i depend on i only, and resume exact without storing any generator state in the
    checkpoint (the data's augmentations are seeded per sample by the loader).
    """
    value = (seed * 1_000_003 + iteration) % (2**31)
    random.seed(value)
    np.random.seed(value)
    torch.manual_seed(value)  # also seeds every CUDA device
