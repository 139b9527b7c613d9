"""Geometry of COCO detections and annotations for matching: their boxes or RLE masks, and the IoU matrix of two
sets (pycocotools' `iou`, crowd regions scored as the part of a detection inside them). Shared by the per-class AP
(`metrics`) and the error analysis (`analysis`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO


def geometry(items: list[dict], iou_type: str, coco_gt: COCO | None = None) -> list:
    """Boxes [x, y, w, h] or RLE masks of detections (coco_gt None) or annotations, for `iou_matrix`."""
    if iou_type == "bbox":
        return [item["bbox"] for item in items]
    if coco_gt is None:
        return [item["segmentation"] for item in items]
    return [coco_gt.annToRLE(item) for item in items]


def iou_matrix(dets: list, gts: list, crowd: bool | Sequence[bool]) -> np.ndarray:
    """f[D, G] IoU of every detection with every ground-truth object; where `crowd` (one flag for all, or one per
    object), the part of the detection inside the region instead."""
    if not dets or not gts:
        return np.zeros((len(dets), len(gts)))
    flags = [int(crowd)] * len(gts) if isinstance(crowd, bool) else [int(flag) for flag in crowd]
    return np.asarray(mask_utils.iou(dets, gts, flags)).reshape(len(dets), len(gts))
