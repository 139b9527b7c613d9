"""Box operations shared by the RPN and the box head: clipping to the image, and the batched
"score filter -> NMS -> top-k -> pack per image" that turns scored boxes of a whole batch into padded outputs.

Shape letters: B images, N scored boxes of the whole batch (flattened), P boxes kept per image (padded).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import batched_nms

from maskrcnn.structures import pack_per_image


def clip_boxes(boxes: Tensor, image_sizes: Tensor) -> Tensor:
    """Clips xyxy boxes f32[..., 4] to [0, w] x [0, h] of their image, with sizes f32[..., 2] as (h, w)
    broadcastable to the boxes' leading dimensions (each image's own size, not the padded canvas)."""
    max_xyxy = image_sizes[..., [1, 0, 1, 0]]  # (..., 2) -> (..., 4) as (w, h, w, h)
    return torch.minimum(boxes.clamp(min=0), max_xyxy)


def nms_per_image(boxes: Tensor, scores: Tensor, keep: Tensor, image: Tensor, group: Tensor, *, num_groups: int,
                  num_images: int, iou_threshold: float, limit: int, values: tuple[Tensor, ...] = ()
                  ) -> tuple[Tensor, ...]:
    """Drops the boxes not in `keep`, runs one NMS per (image, group) for the whole batch, and keeps the `limit`
    best survivors of every image, padded.

    Args:
        boxes: f32[N, 4]; scores: f32[N]; keep: bool[N] boxes that passed the score / size filter.
        image: i64[N] image index of each box; group: i64[N] NMS group inside the image (0..num_groups-1: the
            pyramid level for proposals, the class for detections).
        num_groups, num_images: the group and image counts (group ids are image * num_groups + group).
        iou_threshold: NMS IoU threshold.
        limit: P, boxes kept per image.
        values: further tensors [N, *rest] carried along (e.g. labels).
    Returns:
        valid bool[B, P] (a prefix of every row), boxes f32[B, P, 4], scores f32[B, P], then one [B, P, *rest] per
        `values`; sorted by score inside each image, zero where not valid.
    """
    index = keep.nonzero().squeeze(1)  # (N,) -> (M,), the host sync that NMS needs anyway
    boxes, scores, image = boxes[index], scores[index], image[index]
    values = tuple(value[index] for value in values)
    kept = batched_nms(boxes, scores, image * num_groups + group[index], iou_threshold)  # decreasing score
    # the first `limit` survivors of every image: a stable sort by image keeps the score order inside it
    kept_image, order = torch.sort(image[kept], stable=True)
    kept = kept[order]
    return pack_per_image(kept_image, num_images, limit, boxes[kept], scores[kept], *(v[kept] for v in values))
