"""The report's view of evaluated images: each with its ground truth and detections, marked with what the error
analysis made of them (`analysis.ErrorAnalysis`). The gallery and the browsable page (`maskrcnn.viz`) draw these.
"""

from __future__ import annotations

from dataclasses import dataclass

from pycocotools.coco import COCO
from torch import Tensor

from maskrcnn.engine.analysis import DETECTION_KINDS, OBJECT_KINDS, ErrorAnalysis
from maskrcnn.engine.coco_results import counts_str, xyxy


@dataclass
class ImageView:
    """One image with its ground truth and detections, each marked with what the error analysis made of it (the
    report's gallery and browsable pages draw these).

    Attributes:
        image_id: the image's id in the ground truth.
        image: uint8 [3, H, W].
        objects: ground truth, {"box": [x1, y1, x2, y2], "label": 1..K, "mask": COCO RLE (str counts),
            "kind": {"bbox" | "segm": one of OBJECT_KINDS}}.
        detections: {"box", "label", "score", "mask", "kind": {"bbox" | "segm": one of DETECTION_KINDS}}, in the
            model's order.
    """

    image_id: int
    image: Tensor
    objects: list[dict]
    detections: list[dict]

def image_views(images: dict[int, Tensor], coco_gt: COCO, detections: list[dict], analysis: dict[str, ErrorAnalysis],
                label_to_category_id: dict[int, int]) -> dict[int, ImageView]:
    """`ImageView`s of the given images (image id -> uint8 [3, H, W]) from the COCO ground truth and results."""
    label_of = {category_id: label for label, category_id in label_to_category_id.items()}
    views = {image_id: ImageView(image_id=image_id, image=image, objects=[], detections=[])
             for image_id, image in images.items()}
    for image_id, view in views.items():
        for ann in coco_gt.imgToAnns.get(image_id, []):
            if ann["category_id"] not in label_of:
                continue
            rle = coco_gt.annToRLE(ann)
            view.objects.append({
                "box": xyxy(ann["bbox"]), "label": label_of[ann["category_id"]],
                "mask": {"size": list(rle["size"]), "counts": counts_str(rle["counts"])},
                "kind": {iou_type: OBJECT_KINDS[a.object_kinds.get(ann["id"], OBJECT_KINDS.index("crowd"))]
                         for iou_type, a in analysis.items()},
            })
    for index, det in enumerate(detections):
        view = views.get(det["image_id"])
        if view is None:
            continue
        view.detections.append({
            "box": xyxy(det["bbox"]), "label": label_of[det["category_id"]], "score": det["score"],
            "mask": det["segmentation"],
            "kind": {iou_type: DETECTION_KINDS[a.detection_kinds[index]] for iou_type, a in analysis.items()},
        })
    return views
