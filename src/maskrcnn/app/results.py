"""The detections of one image or video frame as prediction returns them: boxes, labels, class names, scores and
COCO RLE masks in the image's pixels, with dense masks decoded on demand, polygons, COCO results, drawing.

Masks are kept as RLE from the start: a model's box-relative M x M masks are pasted into their boxes and encoded
directly (`model.mask_rle.paste_masks_rle`), so no [D, H, W] float mask of a large photo is ever held.

Shape letters: D detections, M mask size, H/W the image's size.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from pycocotools import mask as mask_utils
from torch import Tensor

from maskrcnn.errors import UserError
from maskrcnn.viz.draw import draw_rle_detections, rle_pixels, save_png

FORMATS = ("rle", "polygons")  # the "segmentation" of COCO results: RLE, or polygons from the mask's outlines


@dataclass
class BoxedDetections:
    """A model's detections of one image before the paste: masks relative to their boxes (on the CPU).

    Attributes:
        boxes: f32[D, 4] xyxy in the image's pixels. labels: i64[D] in 1..K. scores: f32[D].
        masks: f32[D, M, M] probabilities inside each box.
        paste_mode: how the masks are pasted ("exact" or "torchvision", `postprocess.paste_masks`).
    """

    boxes: Tensor
    labels: Tensor
    scores: Tensor
    masks: Tensor
    paste_mode: str = "exact"

    def select(self, keep: Tensor) -> BoxedDetections:
        """The detections where bool[D] `keep` is True (or at the i64 indices `keep`)."""
        return BoxedDetections(self.boxes[keep], self.labels[keep], self.scores[keep], self.masks[keep],
                               self.paste_mode)


@dataclass
class Result:
    """Detections of one image (or video frame), in its pixels, masks as COCO RLE.

    Attributes:
        boxes: f32[D, 4] xyxy. labels: i64[D] in 1..K. scores: f32[D], highest first.
        rles: D COCO RLEs {"size": [H, W], "counts": str}.
        image_size: (H, W).
        class_names: the model's K class names (label k is class_names[k - 1]).
        source: the image or video file (or URL) it came from; None for an image given as an array.
        frame: the frame's index in its video (counting every decoded frame), None for an image.
        timestamp: the frame's presentation time in seconds, None for an image.
        image: uint8[3, H, W] the detections were made on, kept for `plot` (None when not kept).
    """

    boxes: Tensor
    labels: Tensor
    scores: Tensor
    rles: list[dict]
    image_size: tuple[int, int]
    class_names: list[str]
    source: str | None = None
    frame: int | None = None
    timestamp: float | None = None
    image: Tensor | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.rles)

    @property
    def names(self) -> list[str]:
        """The class name of every detection."""
        return [self.class_names[int(label) - 1] for label in self.labels]

    @property
    def masks(self) -> Tensor:
        """bool[D, H, W], decoded from the RLEs on every access (D x H x W bytes: mind large photos)."""
        if not self.rles:
            return torch.zeros((0, *self.image_size), dtype=torch.bool)
        return torch.from_numpy(mask_utils.decode(self.rles)).permute(2, 0, 1).bool()  # (H, W, D) -> (D, H, W)

    @property
    def polygons(self) -> list[list[list[float]]]:
        """Per detection, COCO polygons [[x1, y1, x2, y2, ...], ...] of the outlines of its mask (one per part)."""
        return [mask_polygons(rle) for rle in self.rles]

    def to_coco(self, image_id: object = 1, label_to_category_id: dict[int, int] | None = None, *,
                format: str = "rle") -> list[dict]:
        """COCO results {"image_id", "category_id", "bbox" [x, y, w, h], "score", "segmentation"}, the
        segmentation as RLE or polygons (`format`); category id = label unless `label_to_category_id` maps it."""
        if format not in FORMATS:
            raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
        segmentations = self.rles if format == "rle" else self.polygons
        xywh = self.boxes.clone()
        xywh[:, 2:] -= xywh[:, :2]
        ids = label_to_category_id or {}
        return [{"image_id": image_id, "category_id": ids.get(label, label), "bbox": box, "score": score,
                 "segmentation": segmentation}
                for label, box, score, segmentation in zip(self.labels.tolist(), xywh.tolist(), self.scores.tolist(),
                                                           segmentations)]

    def plot(self, image: Tensor | None = None, *, alpha: float = 0.5) -> Tensor:
        """uint8[3, H, W]: the image (`image`, else the one kept) with the masks, boxes and "name score" labels."""
        image = self.image if image is None else image
        if image is None:
            raise ValueError("Result.plot: no image kept with this result; pass the image")
        return draw_rle_detections(image, self.boxes, self.labels, self.scores, self.rles,
                                   class_names=self.class_names, alpha=alpha)

    def save(self, path: str | Path) -> Path:
        """Writes `plot()` as a PNG; returns the path."""
        return save_png(self.plot(), path)


def require_opencv():
    """The `cv2` module, or a UserError with the install command (polygons need OpenCV)."""
    try:
        import cv2
    except ImportError:
        raise UserError("polygon outlines of masks need OpenCV: pip install maskrcnn[polygons]") from None
    return cv2


def mask_polygons(rle: dict) -> list[list[float]]:
    """COCO polygons of one RLE mask: the outer outline of every part (OpenCV's findContours), as flat
    [x1, y1, x2, y2, ...] lists in pixel-corner coordinates; parts smaller than a triangle are left out."""
    cv2 = require_opencv()
    rows, cols = rle_pixels(rle)
    if len(rows) == 0:
        return []
    y, x = int(rows.min()), int(cols.min())
    crop = np.zeros((int(rows.max()) - y + 1, int(cols.max()) - x + 1), dtype=np.uint8)  # the mask's box only
    crop[rows - y, cols - x] = 1
    contours, _ = cv2.findContours(crop, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    # findContours follows pixel centres; +0.5 puts them on the pixel grid COCO's polygons use
    return [(contour[:, 0, :] + np.array([x, y]) + 0.5).ravel().tolist() for contour in contours if len(contour) >= 3]
