"""The scores of an evaluation: COCO AP (`coco_results.coco_stats`), the original project's per-class AP at one
IoU threshold (PASCAL VOC's all-point interpolated AP) and the error analysis (`analysis.analyse`).

The original project reported a "mAP": per class, the area under the precision-recall curve at one IoU threshold
(0.5), all-point interpolated as in PASCAL VOC 2010+, then the mean over classes. COCO's AP instead averages
over IoU 0.5:0.95 and 101 recall points. Both are computed here from the same detections, for boxes and masks.

Shape letters: D detections of one image and class, N ground-truth objects of one image and class.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
from pycocotools.coco import COCO

from maskrcnn.engine.analysis import ErrorAnalysis, analyse, size_counts
from maskrcnn.engine.coco_results import IOU_TYPES, coco_stats
from maskrcnn.engine.geometry import geometry, iou_matrix

CONFUSION_SCORE_THRESH = 0.5  # detections in the confusion matrix score at least this (mmdetection uses 0.3)


def voc_average_precision(scores: np.ndarray, is_tp: np.ndarray, num_gt: int) -> tuple[float, np.ndarray, np.ndarray]:
    """Area under the all-point interpolated precision-recall curve (PASCAL VOC 2010+).

    Args:
        scores: f[M] detection scores (any order); ignored detections already removed.
        is_tp: bool[M], True where the detection matched a new ground-truth object.
        num_gt: ground-truth objects of the class (non-crowd), > 0.
    Returns:
        ap, precision f[M], recall f[M] (detections in descending score order; ties keep their given order).
    """
    order = np.argsort(-scores, kind="stable")
    tp = np.cumsum(is_tp[order].astype(np.float64))
    fp = np.cumsum(~is_tp[order]).astype(np.float64)
    recall = tp / num_gt
    precision = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
    # Envelope: precision at recall r is the best precision at any recall >= r; then sum over the recall steps.
    mrec = np.concatenate([[0.0], recall, [1.0]])
    mpre = np.concatenate([[0.0], precision, [0.0]])
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]
    steps = np.nonzero(mrec[1:] != mrec[:-1])[0]
    ap = float(np.sum((mrec[steps + 1] - mrec[steps]) * mpre[steps + 1]))
    return ap, precision, recall

def match_image(ious: np.ndarray, gt_crowd: np.ndarray, iou_thresh: float) -> tuple[np.ndarray, np.ndarray]:
    """Greedy VOC matching of one image and class, detections already in descending score order.

    Each detection takes the ground-truth object it overlaps most. At IoU >= iou_thresh it is a true positive
    if that object is still unmatched, a false positive if an earlier (higher-scoring) detection took it, and
    ignored if the object is a crowd region (VOC's "difficult"). Below the threshold it is a false positive.

    Args:
        ious: f[D, N] IoU of every detection with every ground-truth object.
        gt_crowd: bool[N].
        iou_thresh: IoU at which a detection can match.
    Returns:
        is_tp bool[D], ignored bool[D].
    """
    num_det = ious.shape[0]
    is_tp = np.zeros(num_det, dtype=bool)
    ignored = np.zeros(num_det, dtype=bool)
    if ious.shape[1] == 0:
        return is_tp, ignored
    taken = np.zeros(ious.shape[1], dtype=bool)
    best = ious.argmax(axis=1)  # (D, N) -> (D,)
    for d in range(num_det):  # sequential by nature: each match depends on the earlier ones
        j = best[d]
        if ious[d, j] < iou_thresh:
            continue
        if gt_crowd[j]:
            ignored[d] = True
        elif not taken[j]:
            taken[j] = True
            is_tp[d] = True
    return is_tp, ignored

def per_class_ap(
    coco_gt: COCO,
    detections: list[dict],
    *,
    iou_type: str,
    image_ids: list[int],
    category_ids: list[int],
    iou_thresh: float,
) -> dict[int, dict]:
    """The original project's metric: per-class AP at one IoU threshold from matched detections.

    Args:
        coco_gt: ground truth (crowd annotations are ignored regions).
        detections: COCO results with "bbox" and "segmentation".
        iou_type: "bbox" or "segm".
        image_ids: the images that were evaluated.
        category_ids: the categories to score.
        iou_thresh: matching IoU.
    Returns:
        category id -> {"ap": float | None (no ground truth), "precision": list, "recall": list}.
    """
    dets_by_key: dict[tuple[int, int], list[dict]] = defaultdict(list)
    for det in detections:
        dets_by_key[(det["image_id"], det["category_id"])].append(det)
    gts_by_key: dict[tuple[int, int], list[dict]] = defaultdict(list)
    for image_id in image_ids:
        for ann in coco_gt.imgToAnns.get(image_id, []):
            gts_by_key[(image_id, ann["category_id"])].append(ann)
    result = {}
    for category_id in category_ids:
        scores, tps, num_gt = [], [], 0
        for image_id in image_ids:
            gts = gts_by_key.get((image_id, category_id), [])
            crowd = np.array([bool(g.get("iscrowd", 0)) for g in gts], dtype=bool)
            num_gt += int((~crowd).sum())
            dets = sorted(dets_by_key.get((image_id, category_id), []), key=lambda d: -d["score"])
            if not dets:
                continue
            ious = iou_matrix(geometry(dets, iou_type), geometry(gts, iou_type, coco_gt), crowd.tolist())
            is_tp, ignored = match_image(ious, crowd, iou_thresh)
            scores.extend(d["score"] for d, ign in zip(dets, ignored) if not ign)
            tps.extend(is_tp[~ignored].tolist())
        if num_gt == 0:
            result[category_id] = {"ap": None, "precision": [], "recall": []}
            continue
        ap, precision, recall = voc_average_precision(np.asarray(scores, dtype=np.float64), np.asarray(tps, dtype=bool), num_gt)
        result[category_id] = {"ap": ap, "precision": precision.tolist(), "recall": recall.tolist()}
    return result

def score_detections(coco_gt: COCO, detections: list[dict], *, image_ids: list[int], class_names: list[str],
                     label_to_category_id: dict[int, int], iou_thresh: float) -> tuple[dict, dict]:
    """COCO AP and the original project's per-class AP of detections; returns (metrics, pr_curves) as described
    in `EvalResult`."""
    metrics: dict = {}
    pr_curves: dict = {}
    voc: dict = {"iou_thresh": iou_thresh}
    category_ids = [label_to_category_id[k] for k in range(1, len(class_names) + 1)]
    for iou_type in IOU_TYPES:
        metrics[iou_type] = coco_stats(coco_gt, detections, iou_type=iou_type, image_ids=image_ids)
        per_class = per_class_ap(
            coco_gt, detections, iou_type=iou_type, image_ids=image_ids, category_ids=category_ids, iou_thresh=iou_thresh
        )
        named = {name: per_class[cid] for name, cid in zip(class_names, category_ids)}
        aps = [entry["ap"] for entry in named.values() if entry["ap"] is not None]
        voc[iou_type] = {"per_class": {name: entry["ap"] for name, entry in named.items()},
                         "mAP": float(np.mean(aps)) if aps else None}
        pr_curves[iou_type] = named
    metrics["voc"] = voc
    metrics["num_images"] = len(image_ids)
    metrics["num_detections"] = len(detections)
    return metrics, pr_curves

def analyse_detections(
    coco_gt: COCO, detections: list[dict], *, image_ids: list[int], class_names: list[str],
    label_to_category_id: dict[int, int], iou_thresh: float,
) -> tuple[dict, dict[str, ErrorAnalysis]]:
    """The error analysis of boxes and masks. Returns the metrics it adds ({"errors": {"bbox" | "segm": summary with
    its "confusion"}, "object_sizes": {"small" | "medium" | "large": objects}}) and {"bbox" | "segm": ErrorAnalysis}."""
    category_ids = [label_to_category_id[k] for k in range(1, len(class_names) + 1)]
    analysis = {iou_type: analyse(coco_gt, detections, iou_type=iou_type, image_ids=image_ids,
                                  category_ids=category_ids, class_names=class_names, pos_thresh=iou_thresh,
                                  score_thresh=CONFUSION_SCORE_THRESH)
                for iou_type in IOU_TYPES}
    metrics = {"errors": {iou_type: {**a.summary, "confusion": a.confusion} for iou_type, a in analysis.items()},
               "object_sizes": size_counts(coco_gt, image_ids)}
    return metrics, analysis
