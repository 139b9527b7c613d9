"""The mask ceiling on hand-worked cases: each oracle's masks, their AP through COCOeval, and the report's verdict."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from maskrcnn.config import BackboneConfig, MaskHeadConfig, ModelConfig
from maskrcnn.engine.coco_results import build_coco_ground_truth, coco_stats, masks_to_rle
from maskrcnn.engine.mask_ceiling import model_target_masks, oracle_mask_ap, oracle_masks
from maskrcnn.model import build_model
from maskrcnn.viz.report import mask_ceiling_sections

HEIGHT, WIDTH = 10, 12


def _rectangle(rows: slice, cols: slice) -> np.ndarray:
    mask = np.zeros((HEIGHT, WIDTH), dtype=np.uint8)
    mask[rows, cols] = 1
    return mask


# One image with two cats (category 1): a full rectangle, rows 2-5 x cols 2-7 (box x 2-8, y 2-6), and one with
# a hole, rows 6-9 x cols 8-11 without pixel (7, 9) (box x 8-12, y 6-10).
CAT = _rectangle(slice(2, 6), slice(2, 8))
HOLED = _rectangle(slice(6, 10), slice(8, 12))
HOLED[7, 9] = 0
OBJECTS = [{"category_id": 1, "bbox": [2.0, 2.0, 6.0, 4.0]}, {"category_id": 1, "bbox": [8.0, 6.0, 4.0, 4.0]}]
# d0 the first cat's box exactly; d1 the left part of the image (x 0-5, every row): it overlaps the first cat
# only; d2 the holed cat's box; d3 a dog (category 2, no dog in the image) on the first cat.
DETECTIONS = [{"image_id": 1, "category_id": 1, "bbox": [2.0, 2.0, 6.0, 4.0], "score": 0.9},
              {"image_id": 1, "category_id": 1, "bbox": [0.0, 0.0, 5.0, 10.0], "score": 0.8},
              {"image_id": 1, "category_id": 1, "bbox": [8.0, 6.0, 4.0, 4.0], "score": 0.7},
              {"image_id": 1, "category_id": 2, "bbox": [2.0, 2.0, 6.0, 4.0], "score": 0.6}]


def _model():
    return build_model(ModelConfig(num_classes=2, backbone=BackboneConfig(depth=18, fpn_channels=16),
                                   mask_head=MaskHeadConfig(conv_channels=8, num_convs=1), cpu_speedups=False))


def test_each_oracle_keeps_the_object_inside_the_box():
    target_masks, mask_size = model_target_masks(_model())
    assert mask_size == 28
    masks = oracle_masks(DETECTIONS, OBJECTS, torch.from_numpy(np.stack([CAT, HOLED])), target_masks)
    assert list(masks) == ["target", "GT in box"]
    gt_in_box = masks["GT in box"].numpy()
    assert (gt_in_box[0] == CAT).all() and (gt_in_box[2] == HOLED).all()
    # d1's box holds the pixels whose centres lie in x 0-5: columns 0-4, so the first cat's columns 2-4
    assert (gt_in_box[1] == _rectangle(slice(2, 6), slice(2, 5))).all()
    assert not gt_in_box[3].any()  # no dog to take a mask from
    target = masks["target"].numpy()
    # a box that is its object's box exactly: the target is all ones, pasted back it is the rectangle again
    assert (target[0] == CAT).all()
    # the 28 x 28 target of the holed cat's 4 x 4 box: the hole is a 7 x 7 block of zeros (covered at 0.5 or
    # not), which the paste brings back to pixel (7, 9)
    assert (target[2] == HOLED).all()
    assert not target[3].any()


def test_model_target_masks_is_none_for_a_model_without_a_mask_head_of_ours():
    assert model_target_masks(torch.nn.Linear(2, 2)) is None


def test_the_oracles_ap_through_cocoeval():
    """The model's masks are all empty (mask AP 0). Either oracle gives d0 and d2 their objects' masks exactly (IoU
    1) and d1, scored between them, half of the first cat, which d0 already took: at every IoU threshold precision 1
    up to recall 1/2 (51 of COCO's 101 recall points), then 2/3 (50 points): AP (51 + 50 * 2/3) / 101 = 253/303."""
    annotations = [{"id": k + 1, "image_id": 1, "category_id": 1, "bbox": o["bbox"], "area": float(m.sum()),
                    "segmentation": rle, "iscrowd": 0}
                   for k, (o, m, rle) in enumerate(zip(OBJECTS, (CAT, HOLED), masks_to_rle(np.stack([CAT, HOLED]))))]
    coco_gt = build_coco_ground_truth([{"id": 1, "height": HEIGHT, "width": WIDTH}], annotations, ["cat", "dog"])
    empty = masks_to_rle(np.zeros((len(DETECTIONS), HEIGHT, WIDTH), dtype=np.uint8))
    detections = [{**d, "segmentation": rle} for d, rle in zip(DETECTIONS, empty)]

    def score(results: list[dict]) -> dict:
        return coco_stats(coco_gt, results, iou_type="segm", image_ids=[1])

    assert score(detections)["AP"] == 0.0
    target_masks, _ = model_target_masks(_model())
    ceiling = oracle_mask_ap(coco_gt, detections, image_ids=[1], target_masks=target_masks, score=score)
    assert list(ceiling) == ["target", "GT in box"]
    assert ceiling["target"]["AP"] == pytest.approx(253 / 303)
    assert ceiling["GT in box"]["AP"] == pytest.approx(253 / 303)
    assert list(oracle_mask_ap(coco_gt, detections, image_ids=[1], target_masks=None, score=score)) == ["GT in box"]


def _stats(ap: float | None) -> dict:
    return {"AP": ap, "AP50": ap, "AP75": ap}


def test_the_report_names_the_stage_that_loses_the_most():
    # Penn-Fudan's run N (benchmarks/RESULTS.md): 0.57 -> 0.86 -> 0.96: the head loses 0.29, the 28 x 28 grid 0.10,
    # the boxes 0.04
    head = {"segm": _stats(0.57), "mask_ceiling": {"mask_size": 28, "target": _stats(0.86), "GT in box": _stats(0.96)}}
    [section] = mask_ceiling_sections(head)
    assert section.tables[0][1][1][0] == "its 28x28 training targets, pasted back"
    assert [row[1] for row in section.tables[0][1]] == ["0.570", "0.860", "0.960"]
    assert "The largest loss of mask AP, 0.290, is at the mask head (" in section.text[-1]
    # the boxes lose 1 - 0.6 = 0.4 against 0.05 and 0.05
    boxes = {"segm": _stats(0.5), "mask_ceiling": {"mask_size": 14, "target": _stats(0.55), "GT in box": _stats(0.6)}}
    assert ", 0.400, is at the boxes and scores" in mask_ceiling_sections(boxes)[0].text[-1]
    resolution = {"segm": _stats(0.5), "mask_ceiling": {"mask_size": 14, "target": _stats(0.55),
                                                         "GT in box": _stats(0.9)}}
    assert ", 0.350, is at the 14x14 mask resolution" in mask_ceiling_sections(resolution)[0].text[-1]
    # a torchvision model: no target row, the masks against the ground truth in their boxes
    other = {"segm": _stats(0.5), "mask_ceiling": {"mask_size": None, "GT in box": _stats(0.9)}}
    [section] = mask_ceiling_sections(other)
    assert len(section.tables[0][1]) == 2 and ", 0.400, is at the masks" in section.text[-1]
    assert "training target" not in section.text[0]
    no_objects = {"segm": _stats(None), "mask_ceiling": {"mask_size": 28, "target": _stats(None),
                                                         "GT in box": _stats(None)}}
    assert mask_ceiling_sections(no_objects)[0].text == ["No object to score the masks against."]
    assert mask_ceiling_sections({"segm": _stats(0.5)}) == []  # eval.mask_ceiling: false
