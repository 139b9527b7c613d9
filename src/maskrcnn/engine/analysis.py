"""Why a model is wrong: TIDE's error types with the AP each would add back, a confusion matrix, object sizes.

TIDE (Bolya et al., "TIDE: A General Toolbox for Identifying Object Detection Errors", ECCV 2020) gives every
false positive and missed object one type, at a foreground IoU of 0.5 and a background IoU of 0.1:

- classification (cls): IoU >= 0.5 with an object of another class;
- localisation (loc): IoU in [0.1, 0.5] with an object of its class;
- both: IoU in [0.1, 0.5] with an object of another class only;
- duplicate (dupe): IoU >= 0.5 with an object of its class that a higher-scoring detection already took;
- background (bkg): IoU <= 0.1 with every object;
- missed: an object no detection found, not even a classification or localisation error.

The tests are applied in TIDE's order (loc, cls, dupe, bkg, both). The AP an error type costs (dAP) is the AP@0.5
after fixing every error of that type minus the AP before: a classification or localisation error becomes the
true positive of its object (only the highest-scoring one per object; the others are dropped), duplicates,
background and "both" errors are dropped, and missed objects are removed from the ground truth. AP here is
TIDE's: per class, 101-point interpolated at IoU 0.5, the mean over classes with objects or detections. This
module follows the `tidecv` package (1.0.1) step by step and gives its numbers on the same input; it is a
vectorised rewrite because `tidecv` takes about 45 s for the boxes alone of a 5,000-image set (masks twice that)
and needs opencv, seaborn and pandas (benchmarks/error_analysis.py). One deliberate difference: detections that
fall in a crowd region are ignored, as COCOeval does; `tidecv` still gives them an error type.

Shape letters: M detections in all, D detections of one image, G objects of one image, C crowd regions of one
image, K classes.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np
from pycocotools.coco import COCO

from maskrcnn.engine.geometry import geometry, iou_matrix

# Error types in TIDE's order of its summary, with the names the report prints.
ERROR_TYPES = ("cls", "loc", "both", "dupe", "bkg", "missed")
ERROR_NAMES = {"cls": "classification", "loc": "localisation", "both": "both (cls + loc)", "dupe": "duplicate",
               "bkg": "background", "missed": "missed"}
# What a detection turned out to be: a true positive, a false positive of one type, or ignored (in a crowd
# region, or beyond the `max_dets` highest-scoring of its image, as in COCOeval).
DETECTION_KINDS = ("tp", "cls", "loc", "both", "dupe", "bkg", "ignored")
# What became of a ground-truth object: found (tp), missed, blamed on a classification / localisation error
# ("near": a detection was there, with the wrong class or box), or a crowd region.
OBJECT_KINDS = ("tp", "missed", "near", "crowd")
# COCO's object sizes by area in pixels (COCOeval's areaRng).
SIZE_RANGES = {"small": (0.0, 32.0**2), "medium": (32.0**2, 96.0**2), "large": (96.0**2, float("inf"))}
RECALL_POINTS = np.arange(101) / 100  # TIDE's 101 recall points, k / 100 exactly as it computes them
_KIND = {name: code for code, name in enumerate(DETECTION_KINDS)}
_OBJECT = {name: code for code, name in enumerate(OBJECT_KINDS)}


@dataclass
class ErrorAnalysis:
    """The error analysis of one IoU type.

    Attributes:
        summary: {"ap50": TIDE's AP@0.5 before fixing, "dap": {error type: AP added back by fixing it},
            "counts": {error type: how many}, "dap_false_positives": AP with every false positive scored below
            every true positive, minus ap50, "dap_false_negatives": AP with every unmatched object removed, minus
            ap50, "pos_thresh", "bg_thresh"}.
        confusion: {"classes": K names + "background", "matrix": (K+1) x (K+1) counts, rows ground truth, columns
            predictions, "iou_thresh", "score_thresh"}: class-agnostic matching of the detections scoring at least
            score_thresh; row "background" counts detections that matched no object, column "background" the
            objects no detection matched.
        detection_kinds: int8 [M], index into DETECTION_KINDS of every detection, in the given order.
        object_kinds: annotation id -> index into OBJECT_KINDS, for every annotation of the evaluated images.
    """

    summary: dict
    confusion: dict
    detection_kinds: np.ndarray
    object_kinds: dict[int, int]

    def kind_names(self) -> list[str]:
        """The detection kinds as names, in the order of the detections."""
        return [DETECTION_KINDS[code] for code in self.detection_kinds]


def size_counts(coco_gt: COCO, image_ids: list[int]) -> dict[str, int]:
    """Non-crowd objects per COCO size (by the annotation's "area", as COCOeval sizes them)."""
    counts = dict.fromkeys(SIZE_RANGES, 0)
    for image_id in image_ids:
        for ann in coco_gt.imgToAnns.get(image_id, []):
            if ann.get("iscrowd", 0):
                continue
            for name, (low, high) in SIZE_RANGES.items():
                if low <= ann["area"] < high:
                    counts[name] += 1
    return counts


def class_ap(scores: np.ndarray, is_tp: np.ndarray, num_gt: int) -> float:
    """TIDE's AP of one class: the precision envelope read at 101 recall points (the nearest recall at or above
    each point, as COCOeval), averaged.

    Args:
        scores: f[P] detection scores; is_tp: bool[P]; num_gt: objects of the class.
    Returns:
        AP in [0, 1]; 0 when there is no object or no detection.
    """
    if num_gt <= 0 or len(scores) == 0:
        return 0.0
    order = np.argsort(-scores, kind="stable")
    true_positives = np.cumsum(is_tp[order])
    precision = true_positives / np.arange(1, len(order) + 1)
    recall = true_positives / num_gt
    precision = np.maximum.accumulate(precision[::-1])[::-1]
    index = np.searchsorted(recall, RECALL_POINTS, side="left")  # (101,) first detection reaching each recall
    reached = index < len(order)
    return float(np.where(reached, precision[np.minimum(index, len(order) - 1)], 0.0).sum() / len(RECALL_POINTS))


def mean_ap(classes: np.ndarray, scores: np.ndarray, is_tp: np.ndarray, num_gt: np.ndarray) -> float:
    """TIDE's mAP: `class_ap` averaged over the classes with objects or detections.

    Args:
        classes: i[P] class index 0..K-1 of every scored detection; scores f[P]; is_tp bool[P].
        num_gt: i[K] objects per class.
    """
    order = np.argsort(classes, kind="stable")
    classes, scores, is_tp = classes[order], scores[order], is_tp[order]
    bounds = np.searchsorted(classes, np.arange(len(num_gt) + 1))  # (K+1,) start of each class's detections
    aps = [class_ap(scores[start:end], is_tp[start:end], int(num_gt[k]))
           for k, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])) if end > start or num_gt[k] > 0]
    return float(np.mean(aps)) if aps else 0.0


@dataclass
class _Image:
    """TIDE's verdict on one image's detections (score order) and objects; see `_judge_image`."""

    kinds: np.ndarray  # int8 [D] index into DETECTION_KINDS
    target: np.ndarray  # i64 [D] the object a cls / loc error would have found (index into the image's objects), -1
    fixer: np.ndarray  # bool [D] the highest-scoring cls / loc error of its object, which a fix turns into a match
    object_kinds: np.ndarray  # int8 [G] index into OBJECT_KINDS
    confusion_pairs: list[tuple[int, int]]  # (object class, detection class), -1 for background


def _greedy_match(ious: np.ndarray, thresh: float) -> tuple[np.ndarray, np.ndarray]:
    """Detections (rows, descending score) take, in turn, the still-free object (column) they overlap most if that
    IoU is >= thresh. Returns matched object per detection i64[D] (-1: none) and taken bool[G]."""
    matched = np.full(ious.shape[0], -1, dtype=np.int64)
    taken = np.zeros(ious.shape[1], dtype=bool)
    if ious.shape[1] == 0:
        return matched, taken
    free = ious.copy()
    for d in np.nonzero(ious.max(axis=1) >= thresh)[0]:  # sequential by nature: each match depends on the earlier
        g = int(free[d].argmax())
        if free[d, g] >= thresh:
            matched[d], taken[g] = g, True
            free[:, g] = 0.0
    return matched, taken


def _judge_image(ious: np.ndarray, crowd_ious: np.ndarray, det_classes: np.ndarray, det_scores: np.ndarray,
                 gt_classes: np.ndarray, crowd_classes: np.ndarray, *, pos_thresh: float, bg_thresh: float,
                 score_thresh: float) -> _Image:
    """Matches one image's detections to its objects and gives every false positive its TIDE type.

    Args:
        ious: f[D, G] IoU of the detections (descending score) with the non-crowd objects.
        crowd_ious: f[D, C] the part of each detection inside each crowd region (COCO's crowd IoU).
        det_classes: i[D]; det_scores: f[D]; gt_classes: i[G]; crowd_classes: i[C].
        pos_thresh, bg_thresh: TIDE's foreground and background IoU.
        score_thresh: detections scoring at least this enter the confusion matrix.
    """
    num_det, num_gt = ious.shape
    same_class = det_classes[:, None] == gt_classes[None, :]  # (D, G)
    class_ious = ious * same_class
    matched, taken = _greedy_match(class_ious, pos_thresh)
    kinds = np.where(matched >= 0, _KIND["tp"], _KIND["bkg"]).astype(np.int8)
    in_crowd = (crowd_ious * (det_classes[:, None] == crowd_classes[None, :]) > pos_thresh).any(axis=1)
    kinds[(matched < 0) & in_crowd] = _KIND["ignored"]
    target = np.full(num_det, -1, dtype=np.int64)
    fixer = np.zeros(num_det, dtype=bool)
    object_kinds = np.where(taken, _OBJECT["tp"], _OBJECT["missed"]).astype(np.int8)
    if num_gt > 0 and num_det > 0:
        open_ = kinds == _KIND["bkg"]  # false positives still to type
        best_same, best_same_gt = class_ious.max(axis=1), class_ious.argmax(axis=1)
        other_ious = ious * ~same_class
        best_other, best_other_gt = other_ious.max(axis=1), other_ious.argmax(axis=1)
        is_loc = open_ & (best_same >= bg_thresh) & (best_same <= pos_thresh)
        is_cls = open_ & ~is_loc & (best_other >= pos_thresh)
        is_dupe = open_ & ~is_loc & ~is_cls & ((class_ious * taken[None, :]).max(axis=1) >= pos_thresh)
        is_both = open_ & ~is_loc & ~is_cls & ~is_dupe & (ious.max(axis=1) > bg_thresh)
        for name, mask in (("loc", is_loc), ("cls", is_cls), ("dupe", is_dupe), ("both", is_both)):
            kinds[mask] = _KIND[name]
        target = np.where(is_loc, best_same_gt, np.where(is_cls, best_other_gt, -1))
        # An error can only be fixed into a free object, and only the highest-scoring one per object is.
        can_fix = (target >= 0) & ~taken[np.maximum(target, 0)]
        rows = np.nonzero(can_fix)[0]
        _, first = np.unique(target[rows], return_index=True)
        fixer[rows[first]] = True
        object_kinds[target[rows]] = _OBJECT["near"]
    confident = det_scores >= score_thresh
    confusion_pairs = _confusion_pairs(ious[confident], det_classes[confident], gt_classes, in_crowd[confident],
                                       pos_thresh)
    return _Image(kinds=kinds, target=target, fixer=fixer, object_kinds=object_kinds, confusion_pairs=confusion_pairs)


def _confusion_pairs(ious: np.ndarray, det_classes: np.ndarray, gt_classes: np.ndarray, in_crowd: np.ndarray,
                     thresh: float) -> list[tuple[int, int]]:
    """(object class, detection class) of one image's class-agnostic matches at IoU >= thresh; -1 stands for
    background (a detection without object, an object without detection). Detections in a crowd region of their
    class that match no object are left out, as in the AP. Args as `_judge_image`, for the detections counted."""
    matched, taken = _greedy_match(ious, thresh)
    pairs = [(int(gt_classes[g]), int(c)) for g, c in zip(matched, det_classes) if g >= 0]
    pairs += [(-1, int(c)) for g, c, crowd in zip(matched, det_classes, in_crowd) if g < 0 and not crowd]
    pairs += [(int(c), -1) for c in gt_classes[~taken]]
    return pairs


def _detection_arrays(detections: list[dict], class_of: dict[int, int],
                      evaluated: set[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(class index i64[D] (-1: not scored), score f64[D], image id i64[D] (-1: not evaluated)) of COCO results."""
    det_classes = np.array([class_of.get(d["category_id"], -1) for d in detections], dtype=np.int64)
    det_scores = np.array([d["score"] for d in detections], dtype=np.float64)
    det_images = np.array([d["image_id"] if d["image_id"] in evaluated else -1 for d in detections], dtype=np.int64)
    return det_classes, det_scores, det_images


def _image_ious(dets: list[dict], objects: list[dict], crowds: list[dict], iou_type: str,
                coco_gt: COCO) -> tuple[np.ndarray, np.ndarray]:
    """(IoU f[D, N] with the objects, f[D, C] part of each detection inside each crowd region) of one image."""
    det_geometry = geometry(dets, iou_type)
    return (iou_matrix(det_geometry, geometry(objects, iou_type, coco_gt), crowd=False),
            iou_matrix(det_geometry, geometry(crowds, iou_type, coco_gt), crowd=True))


def analyse(
    coco_gt: COCO,
    detections: list[dict],
    *,
    iou_type: str,
    image_ids: list[int],
    category_ids: list[int],
    class_names: list[str] | None = None,
    pos_thresh: float = 0.5,
    bg_thresh: float = 0.1,
    score_thresh: float = 0.5,
    max_dets: int = 100,
) -> ErrorAnalysis:
    """TIDE's error analysis and a confusion matrix of COCO results.

    Args:
        coco_gt: ground truth (crowd annotations are regions where detections are ignored).
        detections: COCO results with "image_id", "category_id", "score" and "bbox" or "segmentation".
        iou_type: "bbox" or "segm".
        image_ids: the evaluated images; detections on other images are ignored.
        category_ids: the K categories scored, in label order; detections of other categories are ignored.
        class_names: their names for the confusion matrix; None: the category ids.
        pos_thresh: IoU at which a detection finds an object (TIDE's foreground threshold).
        bg_thresh: IoU at or below which a detection is on the background.
        score_thresh: detections scoring at least this enter the confusion matrix.
        max_dets: only the highest-scoring detections of each image count (COCOeval's maxDets).
    Returns:
        ErrorAnalysis.
    """
    num_classes = len(category_ids)
    class_of = {category_id: k for k, category_id in enumerate(category_ids)}
    det_classes, det_scores, det_images = _detection_arrays(detections, class_of, set(image_ids))
    kinds = np.full(len(detections), _KIND["ignored"], dtype=np.int8)
    fix_class = np.full(len(detections), -1, dtype=np.int64)  # class a fixed cls / loc error becomes a match of
    fixer = np.zeros(len(detections), dtype=bool)
    num_gt = np.zeros(num_classes, dtype=np.int64)
    missed = np.zeros(num_classes, dtype=np.int64)
    unmatched = np.zeros(num_classes, dtype=np.int64)
    confusion = np.zeros((num_classes + 1, num_classes + 1), dtype=np.int64)  # background last
    object_kinds: dict[int, int] = {}

    order = np.lexsort((-det_scores, det_images))  # by image, then descending score
    order = order[(det_images[order] >= 0) & (det_classes[order] >= 0)]
    starts = np.searchsorted(det_images[order], image_ids, side="left")
    ends = np.searchsorted(det_images[order], image_ids, side="right")
    for image_id, start, end in zip(image_ids, starts, ends):
        rows = order[start:end][:max_dets]  # (D,) indices into `detections`
        anns = [a for a in coco_gt.imgToAnns.get(image_id, []) if a["category_id"] in class_of]
        objects = [a for a in anns if not a.get("iscrowd", 0)]
        crowds = [a for a in anns if a.get("iscrowd", 0)]
        gt_classes = np.array([class_of[a["category_id"]] for a in objects], dtype=np.int64)
        num_gt += np.bincount(gt_classes, minlength=num_classes)
        judged = _judge_image(
            *_image_ious([detections[i] for i in rows], objects, crowds, iou_type, coco_gt),
            det_classes[rows], det_scores[rows], gt_classes,
            np.array([class_of[a["category_id"]] for a in crowds], dtype=np.int64),
            pos_thresh=pos_thresh, bg_thresh=bg_thresh, score_thresh=score_thresh)
        kinds[rows] = judged.kinds
        fixer[rows] = judged.fixer
        has_target = judged.target >= 0
        fix_class[rows[has_target]] = np.where(judged.kinds[has_target] == _KIND["cls"],
                                               gt_classes[judged.target[has_target]], det_classes[rows[has_target]])
        missed += np.bincount(gt_classes[judged.object_kinds == _OBJECT["missed"]], minlength=num_classes)
        unmatched += np.bincount(gt_classes[judged.object_kinds != _OBJECT["tp"]], minlength=num_classes)
        object_kinds.update({a["id"]: int(k) for a, k in zip(objects, judged.object_kinds)})
        object_kinds.update({a["id"]: _OBJECT["crowd"] for a in crowds})
        for gt_class, det_class in judged.confusion_pairs:
            confusion[gt_class, det_class] += 1  # -1 (background) indexes the last row / column

    summary = _summary(kinds, det_classes, det_scores, fix_class, fixer, num_gt, missed, unmatched)
    summary.update(pos_thresh=pos_thresh, bg_thresh=bg_thresh)
    names = list(class_names) if class_names is not None else [str(c) for c in category_ids]
    return ErrorAnalysis(
        summary=summary,
        confusion={"classes": [*names, "background"], "matrix": confusion.tolist(), "iou_thresh": pos_thresh,
                   "score_thresh": score_thresh},
        detection_kinds=kinds,
        object_kinds=object_kinds,
    )


def _summary(kinds: np.ndarray, classes: np.ndarray, scores: np.ndarray, fix_class: np.ndarray, fixer: np.ndarray,
             num_gt: np.ndarray, missed: np.ndarray, unmatched: np.ndarray) -> dict:
    """AP@0.5, dAP of every error type and of all false positives / negatives, error counts; see ErrorAnalysis."""
    scored = kinds != _KIND["ignored"]
    is_tp = kinds == _KIND["tp"]
    base = mean_ap(classes[scored], scores[scored], is_tp[scored], num_gt)
    dap: dict[str, float] = {}
    for name in ERROR_TYPES:
        if name == "missed":
            fixed = mean_ap(classes[scored], scores[scored], is_tp[scored], num_gt - missed)
        else:
            of_type = kinds == _KIND[name]
            becomes_tp = of_type & fixer  # cls / loc only: the others have no fixer
            keep = scored & (~of_type | becomes_tp)
            fixed_classes = np.where(becomes_tp, fix_class, classes)
            fixed = mean_ap(fixed_classes[keep], scores[keep], (is_tp | becomes_tp)[keep], num_gt)
        dap[name] = max(fixed - base, 0.0)  # as TIDE: a negative dAP is an artefact of the 101 recall points
    fp_last = np.where(is_tp, 1.0, 0.0)
    counts = {name: int((kinds == _KIND[name]).sum()) for name in ERROR_TYPES if name != "missed"}
    counts["missed"] = int(missed.sum())
    return {
        "ap50": base,
        "dap": dap,
        "counts": counts,
        "dap_false_positives": mean_ap(classes[scored], fp_last[scored], is_tp[scored], num_gt) - base,
        "dap_false_negatives": mean_ap(classes[scored], scores[scored], is_tp[scored], num_gt - unmatched) - base,
    }


def worst_images(analysis: ErrorAnalysis, detections: list[dict], coco_gt: COCO, image_ids: list[int],
                 count: int) -> dict[str, list[int]]:
    """The images with the most missed objects and those with the most confident false positives, among image_ids.

    Returns:
        {"missed": up to `count` image ids with at least one missed object, most first (ties: in the given order),
         "false_positive": up to `count` image ids by their highest-scoring false positive, highest first}.
    """
    missed_per_image: dict[int, int] = defaultdict(int)
    for image_id in image_ids:
        for ann in coco_gt.imgToAnns.get(image_id, []):
            if analysis.object_kinds.get(ann["id"]) == _OBJECT["missed"]:
                missed_per_image[image_id] += 1
    position = {image_id: i for i, image_id in enumerate(image_ids)}
    worst_fp: dict[int, float] = {}
    false_positive = (analysis.detection_kinds != _KIND["tp"]) & (analysis.detection_kinds != _KIND["ignored"])
    for det, is_fp in zip(detections, false_positive):
        if is_fp and det["image_id"] in position:
            worst_fp[det["image_id"]] = max(worst_fp.get(det["image_id"], 0.0), det["score"])
    by_missed = sorted(missed_per_image, key=lambda i: (-missed_per_image[i], position[i]))
    by_fp = sorted(worst_fp, key=lambda i: (-worst_fp[i], position[i]))
    return {"missed": by_missed[:count], "false_positive": by_fp[:count]}
