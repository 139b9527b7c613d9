"""The error analysis on hand-worked cases: every error type, every dAP, the confusion matrix, object sizes, the
worst images, and the same numbers for boxes and masks (rectangle masks) and through `evaluate`."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from maskrcnn.engine.analysis import ERROR_TYPES, analyse, class_ap, size_counts, worst_images
from maskrcnn.engine.coco_results import build_coco_ground_truth
from maskrcnn.engine.evaluate import evaluate

SIDE = 100  # images are SIDE x SIDE


def rect_rle(x: float, y: float, w: float, h: float) -> dict:
    mask = np.zeros((SIDE, SIDE), dtype=np.uint8)
    mask[int(y): int(y + h), int(x): int(x + w)] = 1
    rle = mask_utils.encode(np.asfortranarray(mask))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def ground_truth(objects_per_image: dict[int, list[tuple[int, list[float]]]], crowd: dict | None = None):
    """COCO ground truth from {image id: [(category, [x, y, w, h]), ...]}; crowd: {image id: (category, box)}."""
    annotations = []
    for image_id, objects in objects_per_image.items():
        for category, box in objects:
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": category,
                                "bbox": box, "area": float(box[2] * box[3]), "segmentation": rect_rle(*box),
                                "iscrowd": 0})
    for image_id, (category, box) in (crowd or {}).items():
        annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": category, "bbox": box,
                            "area": float(box[2] * box[3]), "segmentation": rect_rle(*box), "iscrowd": 1})
    images = [{"id": image_id, "height": SIDE, "width": SIDE} for image_id in objects_per_image]
    return build_coco_ground_truth(images, annotations, ["cat", "dog"])


def detection(image_id: int, category: int, box: list[float], score: float) -> dict:
    return {"image_id": image_id, "category_id": category, "bbox": box, "score": score, "segmentation": rect_rle(*box)}


# One image, cat (1) and dog (2). g0..g4 are objects; d0..d6 detections in descending score:
#   d0 cat on g0 (tp), d1 cat on g0 again (duplicate), d2 cat on the dog g2 (classification), d3 cat at IoU 1/3
#   with the cat g1 (localisation), d4 dog on nothing (background), d5 dog at IoU 1/3 with the cat g1 only (both),
#   d6 dog on g4 (tp). The dog g3 is missed; g1 and g2 are "near" (an error points at them).
OBJECTS = {1: [(1, [0, 0, 10, 10]), (1, [20, 0, 10, 10]), (2, [0, 20, 10, 10]), (2, [40, 40, 10, 10]),
               (2, [60, 0, 10, 10])]}
DETECTIONS = [detection(1, 1, [0, 0, 10, 10], 0.9), detection(1, 1, [0, 0, 10, 10], 0.8),
              detection(1, 1, [0, 20, 10, 10], 0.7), detection(1, 1, [25, 0, 10, 10], 0.6),
              detection(1, 2, [60, 60, 10, 10], 0.5), detection(1, 2, [25, 0, 10, 10], 0.4),
              detection(1, 2, [60, 0, 10, 10], 0.3)]
# TIDE's AP (101 recall points k/100). cat: 2 objects, d0 finds one first: recall 0.5 at precision 1 -> 51/101.
# dog: 3 objects, d4, d5 false, d6 true: recall 1/3 at precision 1/3 for the 34 points k <= 33 -> 34/303.
AP50 = (51 / 101 + 34 / 303) / 2  # 187/606
EXPECTED_DAP = {
    # d2 becomes a dog match at 0.7: dog precision 1 to recall 1/3 (34 points), 1/2 to 2/3 (33 points) -> 1/2;
    # cat keeps 51/101.
    "cls": (51 / 101 + 1 / 2) / 2 - AP50,  # 235/1212
    # d3 becomes the cat match of g1 at 0.6: cat precision 1 to recall 1/2 (51 points), then 2/4 (50 points).
    "loc": (76 / 101 + 34 / 303) / 2 - AP50,  # 25/202
    "both": (51 / 101 + 17 / 101) / 2 - AP50,  # d5 dropped: dog precision 1/2 to recall 1/3 -> 17/101
    "dupe": 0.0,  # d1 dropped: no cat match comes after it, the cat AP stays 51/101
    "bkg": (51 / 101 + 17 / 101) / 2 - AP50,  # d4 dropped: as "both"
    "missed": (51 / 101 + 17 / 101) / 2 - AP50,  # g3 removed: dog recall 1/2 at precision 1/3 (51 points)
}


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_every_error_type_and_its_dap(iou_type):
    coco = ground_truth(OBJECTS)
    analysis = analyse(coco, DETECTIONS, iou_type=iou_type, image_ids=[1], category_ids=[1, 2],
                       class_names=["cat", "dog"])
    assert analysis.kind_names() == ["tp", "dupe", "cls", "loc", "bkg", "both", "tp"]
    assert [analysis.object_kinds[i] for i in range(1, 6)] == [0, 2, 2, 1, 0]  # tp, near, near, missed, tp
    summary = analysis.summary
    assert summary["ap50"] == pytest.approx(187 / 606)
    assert summary["dap"] == pytest.approx(EXPECTED_DAP)
    assert list(summary["dap"]) == list(ERROR_TYPES)
    assert summary["counts"] == dict.fromkeys(ERROR_TYPES, 1)
    # Every false positive scored below every match: cat 51/101, dog finds d6 first: recall 1/3 at 1 -> 34/101.
    assert summary["dap_false_positives"] == pytest.approx((51 / 101 + 34 / 101) / 2 - AP50)
    # Every unmatched object (g1, g2, g3) removed: cat 1 object found first -> 1; dog 1 object at precision 1/3.
    assert summary["dap_false_negatives"] == pytest.approx((1 + 1 / 3) / 2 - AP50)
    # Confusion at score >= 0.5, class-agnostic: d0 finds g0, d2 the dog g2; d1, d3 (IoU 1/3), d4 find nothing;
    # g1, g3, g4 are not found (d5, d6 score below 0.5). Rows ground truth, columns predictions.
    assert analysis.confusion["classes"] == ["cat", "dog", "background"]
    assert analysis.confusion["matrix"] == [[1, 0, 1], [1, 0, 2], [2, 1, 0]]


def test_duplicate_before_a_match_costs_ap():
    # One class, two objects: a match, its duplicate, then the second match. Precision 1, 1/2, 2/3 at recall
    # 1/2, 1/2, 1: 51 points at 1 and 50 at 2/3 -> 253/303; without the duplicate (or scored last) 1.
    coco = ground_truth({1: [(1, [0, 0, 10, 10]), (1, [20, 0, 10, 10])]})
    dets = [detection(1, 1, [0, 0, 10, 10], 0.9), detection(1, 1, [1, 0, 10, 10], 0.8),
            detection(1, 1, [20, 0, 10, 10], 0.7)]
    summary = analyse(coco, dets, iou_type="bbox", image_ids=[1], category_ids=[1]).summary
    assert summary["ap50"] == pytest.approx(253 / 303)
    assert summary["dap"]["dupe"] == pytest.approx(50 / 303)
    assert summary["dap_false_positives"] == pytest.approx(50 / 303)
    assert summary["dap_false_negatives"] == 0.0
    assert summary["counts"] == {"cls": 0, "loc": 0, "both": 0, "dupe": 1, "bkg": 0, "missed": 0}


def test_only_the_highest_scoring_error_of_a_free_object_becomes_its_match():
    # The dog g0 draws a classification error d1 (cat, 0.8) and a localisation error d2 (dog, 0.7, IoU 1/3); the
    # cat g1 is found by d0. Before: cat AP 1, dog AP 0. Fixing cls turns d1 into the dog's match: dog AP 1.
    # Fixing loc only drops d2 (d1 outranks it for g0): the dog keeps AP 0.
    coco = ground_truth({1: [(2, [0, 0, 10, 10]), (1, [50, 0, 10, 10])]})
    dets = [detection(1, 1, [50, 0, 10, 10], 0.9), detection(1, 1, [0, 0, 10, 10], 0.8),
            detection(1, 2, [5, 0, 10, 10], 0.7)]
    analysis = analyse(coco, dets, iou_type="bbox", image_ids=[1], category_ids=[1, 2])
    assert analysis.kind_names() == ["tp", "cls", "loc"]
    assert analysis.summary["ap50"] == pytest.approx(0.5)
    assert analysis.summary["dap"]["cls"] == pytest.approx(0.5)
    assert analysis.summary["dap"]["loc"] == 0.0
    assert analysis.summary["counts"]["missed"] == 0  # g0 is "near", not missed


def test_a_localisation_error_of_a_taken_object_is_dropped_when_fixed():
    # d1 overlaps g0 (found by d0) at IoU 1/3: a localisation error that cannot become a match. Before: recall
    # 1/2 at precision 1 (51 of 101 points); d2 then finds g1: precision 2/3 at recall 1 (50 points).
    # Fixing loc drops d1: precision 1 throughout, AP 1.
    coco = ground_truth({1: [(1, [0, 0, 10, 10]), (1, [50, 0, 10, 10])]})
    dets = [detection(1, 1, [0, 0, 10, 10], 0.9), detection(1, 1, [5, 0, 10, 10], 0.8),
            detection(1, 1, [50, 0, 10, 10], 0.7)]
    analysis = analyse(coco, dets, iou_type="bbox", image_ids=[1], category_ids=[1])
    assert analysis.kind_names() == ["tp", "loc", "tp"]
    assert analysis.summary["ap50"] == pytest.approx((51 + 50 * 2 / 3) / 101)
    assert analysis.summary["dap"]["loc"] == pytest.approx(1 - (51 + 50 * 2 / 3) / 101)


def test_crowd_regions_and_max_dets_ignore_detections():
    coco = ground_truth({1: [(1, [0, 0, 10, 10])]}, crowd={1: (1, [50, 50, 40, 40])})
    dets = [detection(1, 1, [0, 0, 10, 10], 0.9), detection(1, 1, [60, 60, 10, 10], 0.8),
            detection(1, 2, [20, 20, 10, 10], 0.7), detection(1, 1, [30, 0, 10, 10], 0.1)]
    analysis = analyse(coco, dets, iou_type="segm", image_ids=[1], category_ids=[1, 2], max_dets=3)
    # d1 lies in a crowd region of its class; d3 is the 4th of an image that keeps 3.
    assert analysis.kind_names() == ["tp", "ignored", "bkg", "ignored"]
    assert analysis.object_kinds == {1: 0, 2: 3}  # tp, crowd
    # cat AP 1; dog has no object but a detection: TIDE counts it with AP 0 -> mAP 1/2. Dropping d2 gives 1.
    assert analysis.summary["ap50"] == pytest.approx(0.5)
    assert analysis.summary["dap"]["bkg"] == pytest.approx(0.5)


def test_an_image_without_detections_or_objects():
    coco = ground_truth({1: [(1, [0, 0, 10, 10])], 2: []})
    analysis = analyse(coco, [detection(2, 1, [0, 0, 10, 10], 0.9)], iou_type="bbox", image_ids=[1, 2],
                       category_ids=[1])
    assert analysis.kind_names() == ["bkg"]  # image 2 has no object
    assert analysis.object_kinds == {1: 1}  # missed: image 1 has no detection
    assert analysis.summary["ap50"] == 0.0
    assert analysis.summary["dap"]["missed"] == 0.0  # no object left: the class has AP 0 from its detection


def test_class_ap_reads_the_envelope_at_101_points():
    # 4 objects; precision 1, 1/2, 2/3 at recall 1/4, 1/4, 1/2: 26 points at 1, 25 at 2/3 -> (26 + 50/3) / 101.
    ap = class_ap(np.array([0.9, 0.8, 0.7]), np.array([True, False, True]), num_gt=4)
    assert ap == pytest.approx((26 + 50 / 3) / 101)
    assert class_ap(np.array([0.5]), np.array([True]), num_gt=0) == 0.0
    assert class_ap(np.array([]), np.array([], dtype=bool), num_gt=2) == 0.0


def test_size_counts_use_cocos_area_ranges():
    coco = ground_truth({1: [(1, [0, 0, 10, 10]), (1, [0, 0, 32, 32]), (1, [0, 0, 96, 96]), (2, [0, 0, 31, 33])]},
                        crowd={1: (1, [0, 0, 5, 5])})
    assert size_counts(coco, [1]) == {"small": 2, "medium": 1, "large": 1}  # 100, 1023 small; 1024 medium; 9216


def test_worst_images_by_missed_objects_and_confident_false_positives():
    coco = ground_truth({1: [(1, [0, 0, 10, 10])], 2: [(1, [0, 0, 10, 10]), (1, [50, 50, 10, 10])],
                         3: [(1, [0, 0, 10, 10])]})
    dets = [detection(1, 1, [0, 0, 10, 10], 0.9), detection(1, 1, [70, 70, 10, 10], 0.4),
            detection(3, 1, [0, 0, 10, 10], 0.8), detection(3, 1, [70, 70, 10, 10], 0.6)]
    analysis = analyse(coco, dets, iou_type="bbox", image_ids=[1, 2, 3], category_ids=[1])
    worst = worst_images(analysis, dets, coco, [1, 2, 3], count=5)
    assert worst == {"missed": [2], "false_positive": [3, 1]}
    assert worst_images(analysis, dets, coco, [1, 2], count=5) == {"missed": [2], "false_positive": [1]}


class Replay(torch.nn.Module):
    """A model that returns fixed outputs, one list per call."""

    def __init__(self, outputs):
        super().__init__()
        self.outputs = list(outputs)

    def forward(self, images):
        return self.outputs.pop(0)


def test_evaluate_reports_the_analysis_in_metrics_json(tmp_path):
    # The 7 detections of OBJECTS as model output: same kinds and dAP, written machine-readable.
    coco = ground_truth(OBJECTS)
    boxes = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (d["bbox"] for d in DETECTIONS)], dtype=torch.float32)
    masks = torch.zeros(len(DETECTIONS), 1, SIDE, SIDE)
    for i, (x, y, w, h) in enumerate(d["bbox"] for d in DETECTIONS):
        masks[i, 0, y: y + h, x: x + w] = 1.0
    output = {"boxes": boxes, "labels": torch.tensor([d["category_id"] for d in DETECTIONS]),
              "scores": torch.tensor([d["score"] for d in DETECTIONS]), "masks": masks}
    image = torch.zeros(3, SIDE, SIDE, dtype=torch.uint8)
    result = evaluate(Replay([[output]]), [([image], [{"image_id": 1}])], class_names=["cat", "dog"],
                      device=torch.device("cpu"), coco_gt=coco, out_dir=tmp_path, num_vis=1)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    # a model without our mask head: the ground truth in the boxes is the only mask oracle
    assert metrics["mask_ceiling"]["mask_size"] is None and list(metrics["mask_ceiling"]) == ["mask_size", "GT in box"]
    without = evaluate(Replay([[output]]), [([image], [{"image_id": 1}])], class_names=["cat", "dog"],
                       device=torch.device("cpu"), coco_gt=coco, mask_ceiling=False)
    assert "mask_ceiling" not in without.metrics and without.metrics["segm"] == metrics["segm"]
    for iou_type in ("bbox", "segm"):
        assert metrics["errors"][iou_type]["dap"] == pytest.approx(EXPECTED_DAP)
        assert metrics["errors"][iou_type]["confusion"]["matrix"] == [[1, 0, 1], [1, 0, 2], [2, 1, 0]]
    assert metrics["object_sizes"] == {"small": 5, "medium": 0, "large": 0}
    assert metrics["worst_images"] == {"missed": [1], "false_positive": [1]}
    view = result.views[1]
    assert [d["kind"]["segm"] for d in view.detections] == ["tp", "dupe", "cls", "loc", "bkg", "both", "tp"]
    assert [o["kind"]["bbox"] for o in view.objects] == ["tp", "near", "near", "missed", "tp"]
    assert view.objects[1]["box"] == [20, 0, 30, 10] and view.detections[6]["label"] == 2
