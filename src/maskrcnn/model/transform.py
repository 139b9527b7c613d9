"""Model input preparation: normalise, resize, pad onto one canvas; and the inverse mapping of predicted boxes.

The resize reproduces torchvision's `GeneralizedRCNNTransform` numerics (normalise first, then bilinear
`interpolate` with a scale factor and `recompute_scale_factor=True`, box ratios new / old in float32), so that
converted torchvision weights see the same pixels. Unlike torchvision, masks are not resized: they stay at the
original resolution and the mask head cuts its targets from them with `ImageBatch.scales`, which is both cheaper
(no full-image mask resampling) and exact.

Shape letters: B images, H/W one image, Hp/Wp padded canvas, N objects of one image, D boxes per image.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from maskrcnn.structures import ImageBatch


class ImageTransform(nn.Module):
    """Normalises, resizes and pads a list of images into an `ImageBatch`.

    Args:
        min_size: shortest edge after resize; None keeps the size unless `max_size` requires shrinking.
        max_size: the longest edge after resize is at most this; None: no limit.
        size_divisible: the canvas height and width are rounded up to a multiple of this (the FPN needs 32).
        fixed_canvas: (H, W) to pad every batch to instead (static shapes for cudnn.benchmark), turned to (W, H)
            for portrait images (see `canvas_for`); must be a multiple of `size_divisible` and hold every resized
            image in one of its orientations.
        image_mean, image_std: per-channel normalisation of images given in 0..1.
    """

    def __init__(self, *, min_size: int | None, max_size: int | None, size_divisible: int,
                 fixed_canvas: tuple[int, int] | None, image_mean: Sequence[float],
                 image_std: Sequence[float]) -> None:
        super().__init__()
        if size_divisible < 1:
            raise ValueError(f"ImageTransform: size_divisible must be >= 1, got {size_divisible}")
        if fixed_canvas is not None and any(s % size_divisible for s in fixed_canvas):
            raise ValueError(f"ImageTransform: fixed_canvas {tuple(fixed_canvas)} must be a multiple of "
                             f"size_divisible {size_divisible} (the pyramid strides depend on it)")
        self.min_size = min_size
        self.max_size = max_size
        self.size_divisible = size_divisible
        self.fixed_canvas = tuple(fixed_canvas) if fixed_canvas is not None else None
        # buffers follow .to(device) without a host->device copy per call; not persistent, so no state-dict keys
        mean, std = torch.tensor(image_mean, dtype=torch.float32), torch.tensor(image_std, dtype=torch.float32)
        self.register_buffer("image_mean", mean[:, None, None], persistent=False)  # (3,) -> (3, 1, 1)
        self.register_buffer("image_std", std[:, None, None], persistent=False)

    def scale_factor(self, height: int, width: int) -> float:
        """The resize factor of an image of size (height, width); 1.0 means no resize."""
        short, long = min(height, width), max(height, width)
        if self.min_size is None:
            return 1.0 if self.max_size is None else min(1.0, self.max_size / long)
        scale = self.min_size / short
        return scale if self.max_size is None else min(scale, self.max_size / long)

    def resize(self, image: Tensor) -> Tensor:
        """Resizes one normalised image f32[3, H, W] -> f32[3, H', W'] as torchvision does."""
        scale = self.scale_factor(image.shape[-2], image.shape[-1])
        if scale == 1.0:
            return image
        # recompute_scale_factor=True: the output size is floor(H * scale) and the sampling grid follows the
        # actual size ratio, exactly torchvision's call
        return F.interpolate(image[None], scale_factor=scale, mode="bilinear", recompute_scale_factor=True,
                             align_corners=False)[0]

    def forward(self, images: Sequence[Tensor],
                targets: Sequence[dict] | None = None) -> tuple[ImageBatch, list[dict] | None]:
        """Prepares a batch.

        Args:
            images: B tensors f32[3, H, W] in 0..1, sizes may differ.
            targets: training only, B dicts with "boxes" f32[N, 4] in original pixels (other keys kept as given,
                masks included). Ignored in eval mode.
        Returns:
            batch: ImageBatch with tensor f32[B, 3, Hp, Wp] (zero padding bottom/right).
            targets: new dicts with "boxes" scaled to the resized images (training); None in eval mode or when
                no targets are given.
        """
        if len(images) == 0:
            raise ValueError("ImageTransform: empty list of images")
        resized_per_image = []
        for index, image in enumerate(images):
            if image.ndim != 3 or image.shape[0] != 3:
                raise ValueError(f"ImageTransform: image {index} must be [3, H, W], got {tuple(image.shape)}")
            if not image.is_floating_point():
                raise TypeError(f"ImageTransform: image {index} must be float in 0..1, got {image.dtype}")
            # normalise before resizing, in this order, to reproduce torchvision's pixels bit for bit
            mean = self.image_mean.to(device=image.device, dtype=image.dtype)
            std = self.image_std.to(device=image.device, dtype=image.dtype)
            image = (image - mean) / std
            resized_per_image.append(self.resize(image))
        original_sizes = [(int(im.shape[-2]), int(im.shape[-1])) for im in images]
        image_sizes = [(int(im.shape[-2]), int(im.shape[-1])) for im in resized_per_image]
        batch = ImageBatch(tensor=self._pad(resized_per_image, image_sizes), image_sizes=image_sizes,
                           original_sizes=original_sizes)
        if not self.training or targets is None:
            return batch, None
        if len(targets) != len(images):
            raise ValueError(f"ImageTransform: {len(images)} images but {len(targets)} targets")
        targets_out = []
        for target, original, resized in zip(targets, original_sizes, image_sizes):
            target = dict(target)
            target["boxes"] = _scale_boxes(target["boxes"], original, resized)
            targets_out.append(target)
        return batch, targets_out

    def canvas_for(self, image_sizes: Sequence[tuple[int, int]]) -> tuple[int, int]:
        """The fixed canvas (H, W) for a batch of resized images, following the batch's orientation: (H, W) when
        every image fits it, else (W, H) when every image fits that (a batch of portrait images), else the square
        (max, max) for a batch that mixes both (training batches are grouped by orientation, so only inference
        meets it). At most three shapes, so cudnn.benchmark still tunes each once.

        Raises:
            ValueError: an image is larger than the square canvas.
        """
        height, width = self.fixed_canvas
        for canvas in ((height, width), (width, height), (max(height, width),) * 2):
            if all(h <= canvas[0] and w <= canvas[1] for h, w in image_sizes):
                return canvas
        index, size = next((i, s) for i, s in enumerate(image_sizes) if max(s) > max(height, width))
        raise ValueError(f"ImageTransform: image {index} is {size} after resize, larger than fixed_canvas "
                         f"{self.fixed_canvas} in either orientation; raise fixed_canvas or lower min_size/max_size")

    def _pad(self, images: list[Tensor], image_sizes: list[tuple[int, int]]) -> Tensor:
        """B tensors f32[3, H_i, W_i] -> f32[B, 3, Hp, Wp]: one allocation, one copy per image."""
        if self.fixed_canvas is not None:
            canvas = self.canvas_for(image_sizes)
        else:
            d = self.size_divisible
            canvas = (math.ceil(max(h for h, _ in image_sizes) / d) * d,
                      math.ceil(max(w for _, w in image_sizes) / d) * d)
        batched = images[0].new_zeros((len(images), 3, *canvas))
        for padded, image in zip(batched, images):
            padded[:, : image.shape[1], : image.shape[2]].copy_(image)
        return batched

    def boxes_to_original(self, boxes: Tensor, batch: ImageBatch) -> Tensor:
        """Maps boxes from resized-image pixels back to original-image pixels.

        Args:
            boxes: f32[B, D, 4] xyxy in the resized images of `batch`.
            batch: the ImageBatch the boxes were predicted on.
        Returns:
            f32[B, D, 4] xyxy in the original images (per-dimension ratio original / resized, as torchvision).
        """
        original = sizes_tensor(batch.original_sizes, boxes.device)
        resized = sizes_tensor(batch.image_sizes, boxes.device)
        ratio_yx = (original / resized).to(boxes.dtype)  # (B, 2)
        ratio_xyxy = ratio_yx[:, [1, 0, 1, 0]]  # (B, 2) -> (B, 4) as (x, y, x, y)
        return boxes * ratio_xyxy[:, None, :]


def sizes_tensor(sizes: Sequence[tuple[int, int]], device: torch.device) -> Tensor:
    """f32[B, 2] (h, w) pairs on `device`; pinned and non-blocking on CUDA, since an ordinary host->device copy
    waits for the whole stream (a host sync in the middle of the step)."""
    sizes = torch.tensor(sizes, dtype=torch.float32).reshape(-1, 2)
    if device.type == "cuda":
        return sizes.pin_memory().to(device, non_blocking=True)
    return sizes.to(device)


def _scale_boxes(boxes: Tensor, original: tuple[int, int], resized: tuple[int, int]) -> Tensor:
    """f32[N, 4] boxes of an image of size `original` -> boxes of the same image resized to `resized`."""
    # ratios divided in float32 as torchvision does; as Python scalars they need no host->device copy
    ratio_y = float(np.float32(resized[0]) / np.float32(original[0]))
    ratio_x = float(np.float32(resized[1]) / np.float32(original[1]))
    scaled = boxes.clone()
    scaled[:, 0::2] *= ratio_x
    scaled[:, 1::2] *= ratio_y
    return scaled
