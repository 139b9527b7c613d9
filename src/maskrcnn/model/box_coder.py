"""Box <-> delta encoding of Faster R-CNN (Ren et al. 2015, eq. 2), with per-coordinate weights.

Numerics follow torchvision's `BoxCoder` exactly (widths are x2 - x1 without +1, centres at x1 + w/2, the
log-size deltas clamped before `exp`), so converted torchvision weights decode to the same boxes.
Shape letters: `...` any leading dims (broadcast between the two arguments).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


class BoxCoder:
    """Encodes target boxes as deltas relative to reference boxes and decodes them back.

    Args:
        weights: (wx, wy, ww, wh) multipliers of the four deltas; (10, 10, 5, 5) in the box head brings the
            regression targets to roughly unit variance, (1, 1, 1, 1) in the RPN.
        clamp: upper bound of dw, dh before `exp`, so that a wild prediction cannot overflow
            (log(1000/16): a box can grow at most 62.5x per side).
    """

    def __init__(self, weights: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0),
                 clamp: float = math.log(1000.0 / 16)) -> None:
        self.weights = tuple(float(w) for w in weights)
        self.clamp = float(clamp)

    def encode(self, gt_boxes: Tensor, boxes: Tensor) -> Tensor:
        """Deltas that move `boxes` onto `gt_boxes`.

        Args:
            gt_boxes: [..., 4] xyxy targets.
            boxes: [..., 4] xyxy reference boxes (anchors or proposals), broadcastable with `gt_boxes`.
        Returns:
            [..., 4] deltas (dx, dy, dw, dh), already multiplied by the weights.
        """
        wx, wy, ww, wh = self.weights
        widths = boxes[..., 2] - boxes[..., 0]
        heights = boxes[..., 3] - boxes[..., 1]
        ctr_x = boxes[..., 0] + 0.5 * widths
        ctr_y = boxes[..., 1] + 0.5 * heights
        gt_widths = gt_boxes[..., 2] - gt_boxes[..., 0]
        gt_heights = gt_boxes[..., 3] - gt_boxes[..., 1]
        gt_ctr_x = gt_boxes[..., 0] + 0.5 * gt_widths
        gt_ctr_y = gt_boxes[..., 1] + 0.5 * gt_heights
        dx = wx * (gt_ctr_x - ctr_x) / widths
        dy = wy * (gt_ctr_y - ctr_y) / heights
        dw = ww * torch.log(gt_widths / widths)
        dh = wh * torch.log(gt_heights / heights)
        return torch.stack((dx, dy, dw, dh), dim=-1)

    def decode(self, deltas: Tensor, boxes: Tensor) -> Tensor:
        """Applies `deltas` to `boxes`.

        Args:
            deltas: [..., 4] (dx, dy, dw, dh) as produced by `encode` (weights included).
            boxes: [..., 4] xyxy reference boxes, broadcastable with `deltas`.
        Returns:
            [..., 4] xyxy decoded boxes in the dtype of `deltas`.
        """
        boxes = boxes.to(deltas.dtype)
        wx, wy, ww, wh = self.weights
        widths = boxes[..., 2] - boxes[..., 0]
        heights = boxes[..., 3] - boxes[..., 1]
        ctr_x = boxes[..., 0] + 0.5 * widths
        ctr_y = boxes[..., 1] + 0.5 * heights
        dx = deltas[..., 0] / wx
        dy = deltas[..., 1] / wy
        # clamp before exp: the original project decoded without it and overflowed on early iterations
        dw = torch.clamp(deltas[..., 2] / ww, max=self.clamp)
        dh = torch.clamp(deltas[..., 3] / wh, max=self.clamp)
        pred_ctr_x = dx * widths + ctr_x
        pred_ctr_y = dy * heights + ctr_y
        half_w = 0.5 * (torch.exp(dw) * widths)
        half_h = 0.5 * (torch.exp(dh) * heights)
        return torch.stack((pred_ctr_x - half_w, pred_ctr_y - half_h, pred_ctr_x + half_w, pred_ctr_y + half_h), dim=-1)
