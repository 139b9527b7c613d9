"""Paired image + target transforms: every transform maps (image, target) -> (image, target) and keeps the
image, its boxes and its masks consistent.

Shape letters: N objects, H/W image size before, H'/W' after the transform.
Images are uint8[3, H, W]; targets follow the data convention (boxes f32[N, 4] xyxy px, labels i64[N],
masks u8[N, H, W], image_id). Transforms return new tensors and never modify their inputs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

Sample = tuple[Tensor, dict]


class Compose:
    """Applies transforms in order.

    Args:
        transforms: callables (image, target) -> (image, target).
    """

    def __init__(self, transforms: Sequence[Callable[[Tensor, dict], Sample]]):
        self.transforms = list(transforms)

    def __call__(self, image: Tensor, target: dict) -> Sample:
        for transform in self.transforms:
            image, target = transform(image, target)
        return image, target

    def __repr__(self) -> str:
        return f"Compose({self.transforms})"


class RandomHorizontalFlip:
    """Mirrors image, boxes and masks left-right with probability `p`.

    The coin is drawn from torch's global generator, which the DataLoader seeds per worker.

    Args:
        p: flip probability in [0, 1].
    """

    def __init__(self, p: float = 0.5):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"flip probability must be in [0, 1], got {p}")
        self.p = p

    def __call__(self, image: Tensor, target: dict) -> Sample:
        if self.p == 0.0 or (self.p < 1.0 and torch.rand(()).item() >= self.p):
            return image, target
        width = image.shape[-1]
        target = dict(target)
        boxes = target["boxes"]
        # Pixel-edge coordinates: column x maps to W - x, so x1' = W - x2 and x2' = W - x1.
        target["boxes"] = torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], dim=1)
        if "masks" in target:
            target["masks"] = target["masks"].flip(-1)
        return image.flip(-1), target

    def __repr__(self) -> str:
        return f"RandomHorizontalFlip(p={self.p})"


class ResizeShortestEdge:
    """Resizes so that the shorter side is `min_size`, unless the longer side would then exceed `max_size`, in
    which case the longer side becomes `max_size` (the rule of torchvision and detectron2).

    Images are resampled bilinearly with antialiasing; masks with 'nearest-exact' (the source pixel whose centre is
    nearest), so every resized mask pixel centre lies inside the scaled box of its object; boxes are scaled.

    Args:
        min_size: target length of the shorter side, pixels.
        max_size: cap on the longer side, pixels; None: no cap.
    """

    def __init__(self, min_size: int, max_size: int | None = None):
        if min_size < 1 or (max_size is not None and max_size < min_size):
            raise ValueError(f"need 1 <= min_size <= max_size, got min_size={min_size}, max_size={max_size}")
        self.min_size = min_size
        self.max_size = max_size

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """(H', W') for an input of (height, width)."""
        scale = self.min_size / min(height, width)
        if self.max_size is not None and max(height, width) * scale > self.max_size:
            scale = self.max_size / max(height, width)
        return max(1, round(height * scale)), max(1, round(width * scale))

    def __call__(self, image: Tensor, target: dict) -> Sample:
        height, width = image.shape[-2:]
        new_h, new_w = self.output_size(height, width)
        if (new_h, new_w) == (height, width):
            return image, target
        resized = F.interpolate(image[None].float(), size=(new_h, new_w), mode="bilinear", antialias=True,
                                align_corners=False)  # (1, 3, H, W) -> (1, 3, H', W')
        image = resized[0].round_().clamp_(0, 255).to(torch.uint8)
        target = dict(target)
        scale = torch.tensor([new_w / width, new_h / height, new_w / width, new_h / height])
        target["boxes"] = target["boxes"] * scale
        if "masks" in target:
            masks = target["masks"]
            if masks.shape[0]:
                # interpolate needs a float (N, 1, H, W) input; 0/1 values survive nearest sampling exactly.
                masks = F.interpolate(masks[:, None].float(), size=(new_h, new_w), mode="nearest-exact")
                masks = masks[:, 0].to(torch.uint8)  # (N, 1, H', W') -> (N, H', W')
            else:
                masks = masks.new_zeros((0, new_h, new_w))
            target["masks"] = masks
        return image, target

    def __repr__(self) -> str:
        return f"ResizeShortestEdge(min_size={self.min_size}, max_size={self.max_size})"
