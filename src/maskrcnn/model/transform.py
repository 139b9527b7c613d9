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

from maskrcnn.errors import UserError
from maskrcnn.structures import ImageBatch


class ImageTooThinError(UserError, ValueError):
    """An image whose resize for the model has a side of zero pixels; the message names its id."""


class ImageTransform(nn.Module):
    """Normalises, resizes and pads a list of images into an `ImageBatch`.

    Args:
        min_size: shortest edge after resize; None keeps the size unless `max_size` requires shrinking.
        max_size: the longest edge after resize is at most this; None: no limit.
        size_divisible: the canvas height and width are rounded up to a multiple of this (the FPN needs 32).
        fixed_canvas: (H, W) to pad every batch to instead (static shapes for cudnn.benchmark), turned to (W, H)
            for portrait images (see `canvas_size`); must be a multiple of `size_divisible` and hold every resized
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

    def resized_size(self, height, width):
        """(h, w) of an image of size (height, width) after the resize; ints, or symbolic sizes when exported.

        The scale is min_size / short side, capped so the long side is at most max_size, computed in Python floats
        (float64) as torchvision; the size is floor(side * scale), as `interpolate(recompute_scale_factor=True)`.
        """
        if self.min_size is None and self.max_size is None:
            return height, width
        short, long = torch.sym_min(height, width), torch.sym_max(height, width)
        if self.min_size is None:
            scale = torch.sym_min(1.0, self.max_size / long)
        else:
            scale = self.min_size / short
            if self.max_size is not None:
                scale = torch.sym_min(scale, self.max_size / long)
        # trunc is floor for these positive sizes; math.floor of a symbolic size cannot be saved in a .pt2
        return math.trunc(height * scale), math.trunc(width * scale)

    def canvas_size(self, height, width):
        """The padded (Hp, Wp) of a batch whose resized images are at most (height, width); symbolic when exported.

        Without a fixed canvas: the sizes rounded up to a multiple of `size_divisible`. With one, (H, W) of
        `fixed_canvas` follows the batch's orientation: (H, W) when every image fits it, else (W, H) when every
        image fits that (a batch of portrait images), else the square (max, max) for a batch that mixes both
        (training batches are grouped by orientation, so only inference meets it). At most three shapes, so
        cudnn.benchmark still tunes each once.

        Raises:
            ValueError: an image is larger than the square canvas.
        """
        if self.fixed_canvas is None:
            d = self.size_divisible
            return (height + d - 1) // d * d, (width + d - 1) // d * d
        canvas_h, canvas_w = self.fixed_canvas
        side = max(canvas_h, canvas_w)
        torch._check_with(ValueError, torch.sym_max(height, width) <= side, lambda: (
            f"ImageTransform: an image is {height}x{width} after resize, larger than fixed_canvas "
            f"{self.fixed_canvas} in either orientation; raise fixed_canvas or lower min_size/max_size"))
        fits = (height <= canvas_h) & (width <= canvas_w)
        turned = torch.sym_not(fits) & (height <= canvas_w) & (width <= canvas_h)
        # sym_ite: a choice the exported graph makes at run time, for every image size. The square is (side, side),
        # so one of its sides is always the canvas's longer one: each side is a choice between two numbers
        if canvas_h >= canvas_w:
            return torch.sym_ite(turned, canvas_w, canvas_h), torch.sym_ite(fits, canvas_w, canvas_h)
        return torch.sym_ite(fits, canvas_h, canvas_w), torch.sym_ite(turned, canvas_h, canvas_w)

    def forward(self, images: Tensor | Sequence[Tensor],
                targets: Sequence[dict] | None = None) -> tuple[ImageBatch, list[dict] | None]:
        """Prepares a batch.

        Args:
            images: f32[B, 3, H, W] in 0..1 (one size, e.g. an exported graph's input), or B tensors
                f32[3, H, W] whose sizes may differ.
            targets: training only, B dicts with "boxes" f32[N, 4] in original pixels (other keys kept as given,
                masks included). Ignored in eval mode.
        Returns:
            batch: ImageBatch with tensor f32[B, 3, Hp, Wp] (zero padding bottom/right).
            targets: new dicts with "boxes" scaled to the resized images (training); None in eval mode or when
                no targets are given.
        """
        # images of one size go through every step together; a list goes image by image, as each has its own size
        groups = [images] if isinstance(images, Tensor) else [image[None] for image in images]
        if len(groups) == 0 or groups[0].shape[0] == 0:
            raise ValueError("ImageTransform: empty batch of images")
        for index, group in enumerate(groups):
            if group.ndim != 4 or group.shape[1] != 3:
                raise ValueError(f"ImageTransform: image {index} must be [3, H, W], got {tuple(group.shape[1:])}")
            if not group.is_floating_point():
                raise TypeError(f"ImageTransform: image {index} must be float in 0..1, got {group.dtype}")
        self._check_resizable(groups, targets)
        resized = [self._resize(self._normalise(group)) for group in groups]  # each f32[b, 3, h, w]
        canvas_h, canvas_w = self.canvas_size(max(r.shape[-2] for r in resized), max(r.shape[-1] for r in resized))
        padded = [F.pad(r, (0, canvas_w - r.shape[-1], 0, canvas_h - r.shape[-2])) for r in resized]
        batch = ImageBatch(tensor=torch.cat(padded), image_sizes=torch.cat([_size_rows(r) for r in resized]),
                           original_sizes=torch.cat([_size_rows(g) for g in groups]))
        if not self.training or targets is None:
            return batch, None
        # (original, resized) size of every image, in order
        sizes = [(tuple(g.shape[-2:]), tuple(r.shape[-2:])) for g, r in zip(groups, resized) for _ in range(len(g))]
        if len(targets) != len(sizes):
            raise ValueError(f"ImageTransform: {len(sizes)} images but {len(targets)} targets")
        targets_out = []
        for target, (original, resized_size) in zip(targets, sizes):
            target = dict(target)
            target["boxes"] = _scale_boxes(target["boxes"], original, resized_size)
            targets_out.append(target)
        return batch, targets_out

    def _check_resizable(self, groups: list[Tensor], targets: Sequence[dict] | None) -> None:
        """Raises an ImageTooThinError for an image whose resize has a side of zero pixels (2 x 3000 at max_size
        1333), named by its target's "image_id" (training) or its place in the batch. Concrete sizes only: an
        exported graph's symbolic sizes take no Python branch."""
        position = 0
        for group in groups:
            height, width = group.shape[-2], group.shape[-1]
            resized = self.resized_size(height, width)
            if all(isinstance(side, int) for side in resized) and min(resized) < 1:
                image_id = targets[position].get("image_id") if targets is not None and len(targets) > position \
                    else None
                which = f"image id {image_id}" if image_id is not None else f"image {position} of the batch"
                raise ImageTooThinError(f"{which}: {width} x {height} pixels resizes to {resized[1]} x {resized[0]} "
                                        f"for the model (model.transform min_size / max_size): too thin; remove or "
                                        f"crop it")
            position += group.shape[0]

    def _normalise(self, images: Tensor) -> Tensor:
        """f32[b, 3, H, W] in 0..1 -> normalised by the channel mean and std. The division in place: one copy of
        the full-size images instead of two (144 MB less at the peak of a 4000 x 3000 photo's prediction, the same
        bits: both steps are single IEEE operations)."""
        return torch.sub(images, self.image_mean.to(images.dtype)).div_(self.image_std.to(images.dtype))

    def _resize(self, images: Tensor) -> Tensor:
        """Resizes normalised images f32[b, 3, H, W] -> f32[b, 3, h, w] as torchvision does (normalised first,
        bilinear, the sampling grid following the actual size ratio), to reproduce its pixels bit for bit."""
        height, width = self.resized_size(images.shape[-2], images.shape[-1])
        return F.interpolate(images, size=(height, width), mode="bilinear", align_corners=False)

    @staticmethod
    def boxes_to_original(boxes: Tensor, batch: ImageBatch) -> Tensor:
        """Maps boxes from resized-image pixels back to original-image pixels.

        Args:
            boxes: f32[B, D, 4] xyxy in the resized images of `batch`.
            batch: the ImageBatch the boxes were predicted on.
        Returns:
            f32[B, D, 4] xyxy in the original images (per-dimension ratio original / resized, as torchvision).
        """
        ratio_yx = (batch.original_sizes / batch.image_sizes).to(boxes.dtype)  # (B, 2)
        ratio_xyxy = ratio_yx[:, [1, 0, 1, 0]]  # (B, 2) -> (B, 4) as (x, y, x, y)
        return boxes * ratio_xyxy[:, None, :]


def _size_rows(images: Tensor) -> Tensor:
    """f32[b, 2]: (h, w) of images f32[b, 3, h, w] on their device, for every image; made on the device from the
    shape (no host->device copy, which on CUDA would wait for the stream; symbolic sizes when exported)."""
    b, _, height, width = images.shape
    return torch.stack([images.new_full((b,), height), images.new_full((b,), width)], dim=1)


def _scale_boxes(boxes: Tensor, original: tuple[int, int], resized: tuple[int, int]) -> Tensor:
    """f32[N, 4] boxes of an image of size `original` -> boxes of the same image resized to `resized`."""
    # ratios divided in float32 as torchvision does; as Python scalars they need no host->device copy
    ratio_y = float(np.float32(resized[0]) / np.float32(original[0]))
    ratio_x = float(np.float32(resized[1]) / np.float32(original[1]))
    scaled = boxes.clone()
    scaled[:, 0::2] *= ratio_x
    scaled[:, 1::2] *= ratio_y
    return scaled
