"""Why the masks are wrong: a model's mask AP against what its own boxes would allow.

The detections are rescored twice, each keeping its box, class and score and taking another mask:

- "target": the ground-truth mask of the object of its class that its box overlaps most, cut to the box at the
  mask head's M x M exactly as the head's training targets are (`MaskHead.targets`) and pasted back as the model's
  masks are: the best the mask head could do inside these boxes at this resolution;
- "GT in box": that object's mask at full resolution, cleared outside the box: the best any mask could do inside
  these boxes.

The gap from the model's mask AP to "target" is the mask head's (it has not learned its targets); from "target"
to "GT in box" the M x M resolution's; what "GT in box" misses is the boxes' and the scores'. On Penn-Fudan
(benchmarks/RESULTS.md, issue 20) a model at mask AP 0.57 had 0.86 and 0.96 there: the mask head was the lever.

A detection whose box overlaps no object of its class takes an empty mask (it is a false positive whatever its
mask). Crowd regions are not objects here; COCOeval still ignores the detections on them.

Shape letters: D detections of one image, N objects of one image, H/W the image size.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable

import numpy as np
import torch
from pycocotools.coco import COCO
from torch import Tensor, nn
from torchvision.ops import box_convert, box_iou

from maskrcnn.engine.coco_results import masks_to_rle
from maskrcnn.model.poolers import image_index_rois
from maskrcnn.model.postprocess import paste_masks

# (object masks u8[N, H, W], boxes f32[D, 4] xyxy, matched i64[D] row of each box's object) -> bool[D, H, W]:
# each box's M x M training target pasted back into the image
TargetMasks = Callable[[Tensor, Tensor, Tensor], Tensor]
ORACLES = ("target", "GT in box")


def model_target_masks(model: nn.Module) -> tuple[TargetMasks, int] | None:
    """The "target" oracle of a model of this package (its mask head's targets, its paste mode) and the head's M;
    None for other models (e.g. torchvision's), which have no `mask_head.targets`."""
    mask_head = getattr(model, "mask_head", None)
    if not callable(getattr(mask_head, "targets", None)):
        return None

    def target_masks(object_masks: Tensor, boxes: Tensor, matched: Tensor) -> Tensor:
        count, (height, width) = boxes.shape[0], object_masks.shape[-2:]
        rois = image_index_rois(torch.zeros(count, dtype=torch.int64), boxes)  # (D, 5), all of image 0
        every_object = torch.ones((1, object_masks.shape[0]), dtype=torch.bool)
        cut = mask_head.targets(rois, matched, every_object, [object_masks], torch.ones((1, 2)))  # (D, M, M)
        pasted = paste_masks(cut, boxes, [count], [(height, width)], mode=getattr(model, "paste_mode", "exact"))[0]
        return pasted[:, 0] >= 0.5

    return target_masks, mask_head.mask_size


def oracle_masks(detections: list[dict], objects: list[dict], object_masks: Tensor,
                 target_masks: TargetMasks | None) -> dict[str, Tensor]:
    """The oracles' masks of one image's detections.

    Args:
        detections: D COCO results ("bbox" xywh, "category_id").
        objects: N COCO annotations, not crowds ("bbox" xywh, "category_id").
        object_masks: u8[N, H, W] their masks.
        target_masks: the "target" oracle; None: "target" is left out.
    Returns:
        {"target" (when asked), "GT in box"}: bool[D, H, W] each.
    """
    count, (height, width) = len(detections), object_masks.shape[-2:]
    if count == 0 or not objects:
        return {name: torch.zeros((count, height, width), dtype=torch.bool) for name in _oracles(target_masks)}
    boxes, object_boxes = (box_convert(torch.tensor([item["bbox"] for item in items], dtype=torch.float32),
                                       "xywh", "xyxy") for items in (detections, objects))  # (D, 4), (N, 4)
    same_class = (torch.tensor([d["category_id"] for d in detections])[:, None]
                  == torch.tensor([o["category_id"] for o in objects])[None, :])  # (D, N)
    overlap, matched = (box_iou(boxes, object_boxes) * same_class).max(dim=1)  # (D,) each
    found = (overlap > 0)[:, None, None]  # (D, 1, 1): the box overlaps an object of its class
    ys = torch.arange(height, dtype=torch.float32)[None, :, None] + 0.5  # pixel centres
    xs = torch.arange(width, dtype=torch.float32)[None, None, :] + 0.5
    inside = ((ys >= boxes[:, 1, None, None]) & (ys <= boxes[:, 3, None, None])
              & (xs >= boxes[:, 0, None, None]) & (xs <= boxes[:, 2, None, None]))  # (D, H, W)
    masks = {"GT in box": object_masks[matched].bool() & inside & found}
    if target_masks is not None:
        masks = {"target": target_masks(object_masks, boxes, matched) & found, **masks}
    return masks


def oracle_mask_ap(coco_gt: COCO, detections: list[dict], *, image_ids: list[int],
                   target_masks: TargetMasks | None, score: Callable[[list[dict]], dict]) -> dict[str, dict]:
    """The detections' mask AP with each oracle's masks (module docstring).

    Args:
        coco_gt: the ground truth; detections: COCO results (boxes, classes and scores are kept).
        image_ids: the evaluated images.
        target_masks: the "target" oracle (`model_target_masks`); None: "GT in box" only.
        score: COCO results with masks -> mask AP stats ({"AP", "AP50", ...}), e.g. `coco_results.coco_stats`.
    Returns:
        {"target" (when asked) | "GT in box": stats}.
    """
    per_image = defaultdict(list)
    for detection in detections:
        per_image[detection["image_id"]].append(detection)
    rescored: dict[str, list[dict]] = {name: [] for name in _oracles(target_masks)}
    for image_id in image_ids:
        if not per_image[image_id]:
            continue
        image = coco_gt.imgs[image_id]
        objects = [ann for ann in coco_gt.imgToAnns.get(image_id, []) if not ann.get("iscrowd", 0)]
        object_masks = torch.from_numpy(np.stack([coco_gt.annToMask(ann) for ann in objects])) if objects \
            else torch.zeros((0, image["height"], image["width"]), dtype=torch.uint8)  # (N, H, W)
        for name, masks in oracle_masks(per_image[image_id], objects, object_masks, target_masks).items():
            rles = masks_to_rle(masks.to(torch.uint8).numpy())
            rescored[name] += [{**d, "segmentation": rle} for d, rle in zip(per_image[image_id], rles)]
    return {name: score(results) for name, results in rescored.items()}


def _oracles(target_masks: TargetMasks | None) -> tuple[str, ...]:
    return ORACLES if target_masks is not None else ORACLES[1:]
