"""Shared conventions, asserted in one place.

Shape letters used across the package:
    B images in a batch, H/W image height/width, Hp/Wp padded batch canvas, N objects of one image,
    G ground-truth boxes per image after padding (max N over the batch), K foreground classes.

- Boxes are xyxy, absolute float pixels of the image they belong to. Image sizes are (height, width).
- Labels: 0 is background, foreground classes are 1..K.
- Ground-truth masks are uint8/bool [N, H, W]; predicted masks are float [D, 1, H, W] probabilities.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class ImageBatch:
    """Images normalised, resized and padded onto one canvas.

    Attributes:
        tensor: f32[B, 3, Hp, Wp], zero padding at the bottom and right.
        image_sizes: f32[B, 2] (h, w) of every image after resize, before padding, on the batch's device.
        original_sizes: f32[B, 2] (h, w) of every image as given to the model.
    """

    tensor: Tensor
    image_sizes: Tensor
    original_sizes: Tensor

    def __len__(self) -> int:
        return self.tensor.shape[0]

    @property
    def scales(self) -> Tensor:
        """f32[B, 2]: (resized / original) for (y, x) of every image."""
        return self.image_sizes / self.original_sizes


def pad_per_image(tensors_per_image: list[Tensor], pad_value: float = 0) -> tuple[Tensor, Tensor]:
    """Stacks per-image tensors of uneven length along a new batch dimension.

    Args:
        tensors_per_image: B tensors of shape [N_i, *rest] (same rest, dtype and device).
        pad_value: fill for the padded rows.
    Returns:
        padded: [B, G, *rest] with G = max N_i (at least 0).
        valid: bool[B, G], True for real rows.
    """
    lengths = torch.tensor([t.shape[0] for t in tensors_per_image])
    padded = torch.nn.utils.rnn.pad_sequence(tensors_per_image, batch_first=True, padding_value=pad_value)
    valid = torch.arange(padded.shape[1]) < lengths[:, None]
    return padded, valid.to(padded.device)


def check_targets(targets: Sequence[dict], image_sizes: Sequence[tuple[int, int]]) -> None:
    """Asserts the target conventions for a batch of images of sizes (h, w); errors name the target's index.

    Shapes and dtypes are checked target by target; label values once for the whole batch, because reading
    a value back from the device waits for it (on CUDA one host sync per image otherwise).
    """
    for index, (target, image_size) in enumerate(zip(targets, image_sizes)):
        boxes, labels = target["boxes"], target["labels"]
        if boxes.dtype != torch.float32 or boxes.ndim != 2 or boxes.shape[-1] != 4:
            raise ValueError(f"target {index}: boxes must be float32 [N, 4], got {boxes.dtype} {tuple(boxes.shape)}")
        if labels.dtype != torch.int64 or labels.shape != boxes.shape[:1]:
            raise ValueError(f"target {index}: labels must be int64 [N], got {labels.dtype} {tuple(labels.shape)}")
        if "masks" in target and target["masks"].shape != (boxes.shape[0], *image_size):
            raise ValueError(f"target {index}: masks must be [N, H, W] = {(boxes.shape[0], *image_size)}, "
                             f"got {tuple(target['masks'].shape)}")
    labels = torch.cat([target["labels"] for target in targets]) if targets else torch.zeros(0)
    if labels.numel() and bool((labels < 1).any()):
        index = next(i for i, target in enumerate(targets) if (target["labels"] < 1).any())
        raise ValueError(f"target {index}: labels must be 1..K (0 is background)")
