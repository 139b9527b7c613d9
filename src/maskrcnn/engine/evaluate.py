"""Evaluation: batched inference, COCO results, COCOeval (bbox, segm), the original project's per-class AP@0.5 and
the error analysis (TIDE's error types, a confusion matrix, object sizes; `maskrcnn.engine.analysis`) and the
masks against what their boxes allow (`maskrcnn.engine.mask_ceiling`).

The original project reported a "mAP": per class, the area under the precision-recall curve at one IoU threshold
(0.5), all-point interpolated as in PASCAL VOC 2010+, then the mean over classes. COCO's AP instead averages
over IoU 0.5:0.95 and 101 recall points. Both are computed here from the same detections, for boxes and masks.

Shape letters: D detections of one image, N ground-truth objects of one image, H/W original image size.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from faster_coco_eval import COCOeval_faster
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from torch import Tensor
from torch.utils.data import Subset

from maskrcnn.data import build_eval_loader
from maskrcnn.engine import distributed
from maskrcnn.engine.analysis import DETECTION_KINDS, OBJECT_KINDS, ErrorAnalysis, analyse, size_counts, worst_images
from maskrcnn.engine.common import autocast, images_to_model, masks_to_rle, output_to_cpu
from maskrcnn.engine.mask_ceiling import model_target_masks, oracle_mask_ap
from maskrcnn.fileio import write_text_atomic

log = logging.getLogger(__name__)
PROGRESS_SECONDS = 10.0  # at most one progress line per this many seconds, plus one when inference is done
# COCOeval.stats indices 0..5 and their usual names.
COCO_STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")
IOU_TYPES = ("bbox", "segm")
CONFUSION_SCORE_THRESH = 0.5  # detections in the confusion matrix score at least this (mmdetection uses 0.3)
NUM_WORST = 6  # images in each list of the worst images (most missed objects, most confident false positives)


@dataclass
class Picture:
    """One evaluated image as the report draws it, on the CPU.

    Attributes:
        image: uint8 [3, H, W] as the data set gave it.
        target: its ground truth {"boxes" f32[N, 4], "labels" i64[N], "masks" u8[N, H, W], ...}.
        output: the model's output {"boxes" f32[D, 4], "labels" i64[D], "scores" f32[D], "masks" bool[D, H, W]
            (probability >= 0.5, as drawn and scored)} plus, from a model with `inference(images,
            return_proposals=True)`, "proposals" f32[P, 4] and "proposal_scores" f32[P].
    """

    image: Tensor
    target: dict
    output: dict


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


@dataclass
class EvalResult:
    """What one evaluation produced.

    Attributes:
        metrics: {"bbox": {AP..APl}, "segm": {AP..APl}, "voc": {"iou_thresh", "bbox": {"per_class", "mAP"},
            "segm": {...}}, "num_images", "num_detections"}; COCO stats that do not exist (no object of that
            size) are None, per-class AP of a class without ground truth is None and left out of the mean.
        pr_curves: {"bbox" | "segm": {class_name: {"precision": [...], "recall": [...], "ap": float | None}}}.
        detections: COCO-format results, one dict per detection with both "bbox" and "segmentation".
        class_names: the K foreground names; label k is class_names[k-1].
        pictures: the first `num_vis` images with their outputs, for the report.
        analysis: {"bbox" | "segm": ErrorAnalysis}; its summaries and confusion matrices are also in metrics["errors"].
        views: the pictured images and the worst images as `ImageView`s, by image id.
        worst: {"missed" | "false_positive": image ids}, the worst images by the mask analysis (`worst_images`).
    """

    metrics: dict
    pr_curves: dict
    detections: list[dict]
    class_names: list[str]
    pictures: list[Picture]
    analysis: dict[str, ErrorAnalysis] = field(default_factory=dict)
    views: dict[int, ImageView] = field(default_factory=dict)
    worst: dict[str, list[int]] = field(default_factory=dict)


def _xywh(boxes: Tensor) -> list[list[float]]:
    """f32 [D, 4] xyxy -> D lists [x, y, w, h] (COCO)."""
    xywh = boxes.clone()
    xywh[:, 2:] -= xywh[:, :2]
    return xywh.tolist()


def detections_to_coco(output: dict, image_id: int, label_to_category_id: dict[int, int]) -> list[dict]:
    """One image's model output -> COCO results.

    Args:
        output: {"boxes" f32[D,4] xyxy, "labels" i64[D], "scores" f32[D], "masks" f32[D,1,H,W] probabilities}.
        image_id: the image's id in the ground truth.
        label_to_category_id: model label 1..K -> COCO category id.
    Returns:
        D dicts {"image_id", "category_id", "bbox" [x,y,w,h], "score", "segmentation" RLE}; masks binarised at 0.5.
    """
    if output["boxes"].shape[0] == 0:
        return []
    binary = (output["masks"][:, 0] >= 0.5).to("cpu", torch.uint8).numpy()  # (D, 1, H, W) -> (D, H, W)
    rles = masks_to_rle(binary)
    boxes = _xywh(output["boxes"].float().cpu())
    labels = output["labels"].tolist()
    scores = output["scores"].float().tolist()
    return [
        {"image_id": image_id, "category_id": label_to_category_id[label], "bbox": box, "score": score, "segmentation": rle}
        for box, label, score, rle in zip(boxes, labels, scores, rles)
    ]


def targets_to_coco_annotations(target: dict, image_id: int, first_id: int) -> list[dict]:
    """One image's target -> COCO ground-truth annotations (category id = label, RLE masks, mask areas)."""
    masks = target["masks"].to(torch.uint8).numpy()  # (N, H, W)
    if masks.shape[0] == 0:
        return []
    rles = masks_to_rle(masks)
    areas = mask_utils.area(rles).tolist()
    boxes = _xywh(target["boxes"].float())
    return [
        {"id": first_id + i, "image_id": image_id, "category_id": int(label), "bbox": box, "area": float(area),
         "segmentation": rle, "iscrowd": 0}
        for i, (box, label, area, rle) in enumerate(zip(boxes, target["labels"].tolist(), areas, rles))
    ]


def build_coco_ground_truth(images: list[dict], annotations: list[dict], class_names: list[str]) -> COCO:
    """A pycocotools COCO from image records {"id","height","width"} and annotations; category k = label k."""
    coco = COCO()
    coco.dataset = {
        "images": images,
        "annotations": annotations,
        "categories": [{"id": k, "name": name} for k, name in enumerate(class_names, start=1)],
    }
    with contextlib.redirect_stdout(io.StringIO()):  # createIndex prints progress lines
        coco.createIndex()
    return coco


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
            ious = np.zeros((len(dets), len(gts)))
            if gts:
                if iou_type == "bbox":
                    dt_geo, gt_geo = [d["bbox"] for d in dets], [g["bbox"] for g in gts]
                else:
                    dt_geo, gt_geo = [d["segmentation"] for d in dets], [coco_gt.annToRLE(g) for g in gts]
                ious = np.asarray(mask_utils.iou(dt_geo, gt_geo, crowd.astype(np.uint8).tolist())).reshape(len(dets), len(gts))
            is_tp, ignored = match_image(ious, crowd, iou_thresh)
            scores.extend(d["score"] for d, ign in zip(dets, ignored) if not ign)
            tps.extend(is_tp[~ignored].tolist())
        if num_gt == 0:
            result[category_id] = {"ap": None, "precision": [], "recall": []}
            continue
        ap, precision, recall = voc_average_precision(np.asarray(scores, dtype=np.float64), np.asarray(tps, dtype=bool), num_gt)
        result[category_id] = {"ap": ap, "precision": precision.tolist(), "recall": recall.tolist()}
    return result


def coco_stats(coco_gt: COCO, detections: list[dict], *, iou_type: str, image_ids: list[int]) -> dict:
    """COCOeval AP, AP50, AP75, APs, APm, APl for one IoU type (0 when there is no detection, None where
    COCO reports -1 because no object of that size exists)."""
    if not detections:
        return {name: 0.0 for name in COCO_STAT_NAMES}
    # loadRes takes the bbox branch (area = box area) whenever "bbox" is present: give segm results masks only.
    key = "bbox" if iou_type == "bbox" else "segmentation"
    results = [{"image_id": d["image_id"], "category_id": d["category_id"], "score": d["score"], key: d[key]} for d in detections]
    with contextlib.redirect_stdout(io.StringIO()):  # loadRes prints progress, COCOeval its tables
        coco_dt = coco_gt.loadRes(results)
        # faster-coco-eval: pycocotools' numbers (to 1e-16 on a generated 500-image set), 2.3-3.5x faster
        evaluator = COCOeval_faster(coco_gt, coco_dt, iouType=iou_type)
        evaluator.params.imgIds = image_ids
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return {name: (None if value < 0 else float(value)) for name, value in zip(COCO_STAT_NAMES, evaluator.stats[:6])}


def detect_batch(model: torch.nn.Module, images: list[Tensor], *, device: torch.device, amp: bool,
                 with_proposals: bool = False) -> list[dict]:
    """The inference step of evaluation and prediction: the model's outputs (on `device`, in each image's
    coordinates) for uint8 [3, H, W] images; with the RPN proposals when asked and the model can return them.
    Call it under `torch.no_grad()` with the model in eval mode."""
    inputs = images_to_model(images, device)
    with autocast(device, amp):
        if with_proposals and callable(getattr(model, "inference", None)):
            return model.inference(inputs, return_proposals=True)
        return model(inputs)


def _picture(image: Tensor, target: dict, output: dict) -> Picture:
    output = output_to_cpu(output)
    output["masks"] = output["masks"][:, 0] >= 0.5  # (D, 1, H, W) -> (D, H, W), 1 byte a pixel instead of 4
    return Picture(image=image, target=target, output=output)


@dataclass
class _Inference:
    """What one pass over the batches collected (see `_infer`)."""

    image_ids: list[int] = field(default_factory=list)
    detections: list[dict] = field(default_factory=list)
    gt_images: list[dict] = field(default_factory=list)  # filled when the ground truth comes from the targets
    gt_annotations: list[dict] = field(default_factory=list)
    pictures: list[Picture] = field(default_factory=list)


def _infer(model: torch.nn.Module, batches: Iterable, *, device: torch.device, amp: bool, max_images: int | None,
           label_to_category_id: dict[int, int], gt_from_targets: bool, num_vis: int) -> _Inference:
    """Runs the model (in the mode it is in) over the batches; see `evaluate` for the arguments. Logs progress
    every PROGRESS_SECONDS and when done."""
    run = _Inference()
    total = _count(batches, max_images)
    started = last_line = time.perf_counter()
    for images, targets in batches:
        if max_images is not None and len(run.image_ids) >= max_images:
            break
        if max_images is not None:
            images, targets = images[: max_images - len(run.image_ids)], targets[: max_images - len(run.image_ids)]
        outputs = detect_batch(model, images, device=device, amp=amp, with_proposals=len(run.pictures) < num_vis)
        for image, target, output in zip(images, targets, outputs):
            image_id = int(target["image_id"])
            run.image_ids.append(image_id)
            run.detections.extend(detections_to_coco(output, image_id, label_to_category_id))
            if len(run.pictures) < num_vis:
                run.pictures.append(_picture(image, target, output))
            if gt_from_targets:
                run.gt_images.append({"id": image_id, "height": int(image.shape[-2]), "width": int(image.shape[-1])})
                run.gt_annotations.extend(targets_to_coco_annotations(target, image_id, len(run.gt_annotations) + 1))
        if time.perf_counter() - last_line >= PROGRESS_SECONDS:
            last_line = time.perf_counter()
            log.info(_progress_line(len(run.image_ids), total, last_line - started))
    seconds = time.perf_counter() - started
    log.info(f"evaluate: {len(run.image_ids)} images in {seconds:.1f} s "
             f"({len(run.image_ids) / max(seconds, 1e-9):.1f} images/s)")
    return run


def _gather(run: _Inference) -> _Inference | None:
    """On rank 0, the inference of the whole data set from every rank's share (images rank, rank + world_size,
    ...; see `distributed.shard`), in data-set order, annotation ids renumbered; None on the other ranks. The
    pictures stay rank 0's own (its first images)."""
    detections_per_image: dict[int, list[dict]] = defaultdict(list)
    for det in run.detections:
        detections_per_image[det["image_id"]].append(det)
    annotations_per_image: dict[int, list[dict]] = defaultdict(list)
    for ann in run.gt_annotations:
        annotations_per_image[ann["image_id"]].append(ann)
    gt_images = run.gt_images or [None] * len(run.image_ids)
    records = distributed.gather_shards([(image_id, detections_per_image[image_id], gt_image,
                                          annotations_per_image[image_id])
                                         for image_id, gt_image in zip(run.image_ids, gt_images)])
    if records is None:
        return None
    annotations = (ann for _, _, _, anns in records for ann in anns)
    return _Inference(image_ids=[image_id for image_id, _, _, _ in records],
                      detections=[det for _, dets, _, _ in records for det in dets],
                      gt_images=[gt_image for _, _, gt_image, _ in records if gt_image is not None],
                      gt_annotations=[{**ann, "id": number} for number, ann in enumerate(annotations, start=1)],
                      pictures=run.pictures)


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
                "box": _xyxy(ann["bbox"]), "label": label_of[ann["category_id"]],
                "mask": {"size": list(rle["size"]), "counts": _counts_str(rle["counts"])},
                "kind": {iou_type: OBJECT_KINDS[a.object_kinds.get(ann["id"], OBJECT_KINDS.index("crowd"))]
                         for iou_type, a in analysis.items()},
            })
    for index, det in enumerate(detections):
        view = views.get(det["image_id"])
        if view is None:
            continue
        view.detections.append({
            "box": _xyxy(det["bbox"]), "label": label_of[det["category_id"]], "score": det["score"],
            "mask": det["segmentation"],
            "kind": {iou_type: DETECTION_KINDS[a.detection_kinds[index]] for iou_type, a in analysis.items()},
        })
    return views


def _xyxy(box: list[float]) -> list[float]:
    """COCO [x, y, w, h] -> [x1, y1, x2, y2]."""
    return [box[0], box[1], box[0] + box[2], box[1] + box[3]]


def _counts_str(counts: bytes | str | list) -> str | list:
    """RLE counts as JSON takes them (pycocotools returns compressed counts as bytes)."""
    return counts.decode("ascii") if isinstance(counts, bytes) else counts


@torch.no_grad()  # not inference_mode: tensors the model caches here (anchors) are reused in training
def evaluate(
    model: torch.nn.Module,
    batches: Iterable[tuple[list[Tensor], list[dict]]],
    *,
    class_names: list[str],
    device: torch.device,
    coco_gt: COCO | None = None,
    label_to_category_id: dict[int, int] | None = None,
    iou_thresh: float = 0.5,
    max_images: int | None = None,
    amp: bool = True,
    out_dir: str | Path | None = None,
    num_vis: int = 0,
    sharded: bool = False,
    load_image: Callable[[int], Tensor] | None = None,
    mask_ceiling: bool = True,
) -> EvalResult | None:
    """Runs the model over batches of a data set (in eval mode; its mode is restored after) and scores the
    detections.

    Args:
        model: torchvision calling convention; in eval mode `model(images)` -> per image {boxes, labels, scores, masks}.
        batches: (images uint8 [3,H,W] list, targets list) in data-set order; targets carry "image_id" and, when
            `coco_gt` is None, "boxes", "labels", "masks" to build the ground truth from.
        class_names: K foreground names; label k is class_names[k-1].
        device: where the model runs.
        coco_gt: ground truth of the data set (e.g. the dataset's `coco`); None builds it from the targets.
        label_to_category_id: label -> category id of `coco_gt`; None: identity.
        iou_thresh: IoU of the per-class AP (the original project's metric).
        max_images: stop after this many images; None: all.
        amp: bf16 autocast on CUDA.
        out_dir: where to write metrics.json, detections.json and pr_curves.json; None writes nothing.
        num_vis: keep the first num_vis images with their outputs (and proposals) in `EvalResult.pictures`.
        sharded: `batches` hold this rank's share of the data set (images rank, rank + world_size, ...; see
            `distributed.shard`): the per-image results are gathered on rank 0 and scored there.
        load_image: the uint8 [3, H, W] image of the i-th evaluated image (data-set order), to picture the worst
            images; None: the worst images are looked for among the pictured ones only.
        mask_ceiling: also the mask AP with each detection's mask replaced by an oracle's (`mask_ceiling.py`),
            in metrics["mask_ceiling"].
    Returns:
        EvalResult with the metrics, PR curves, COCO results, pictures and error analysis; None on the ranks other
        than 0 when sharded.

    Progress goes to the `maskrcnn` logger: images done, images/s and the time left, every PROGRESS_SECONDS.
    """
    label_to_category_id = label_to_category_id or {k: k for k in range(1, len(class_names) + 1)}
    was_training = model.training
    model.eval()
    try:
        run = _infer(model, batches, device=device, amp=amp, max_images=max_images,
                     label_to_category_id=label_to_category_id, gt_from_targets=coco_gt is None, num_vis=num_vis)
    finally:
        model.train(was_training)
    if sharded and distributed.get_world_size() > 1:
        log.info(f"evaluate: gathering the {distributed.get_world_size()} processes' shares on rank 0")
        run = _gather(run)
        if run is None:
            return None
    if coco_gt is None:
        coco_gt = build_coco_ground_truth(run.gt_images, run.gt_annotations, class_names)
    log.info(f"evaluate: scoring {len(run.detections)} detections on {len(run.image_ids)} images (COCOeval, "
             f"per-class AP, error analysis{', mask ceiling' if mask_ceiling else ''})")
    started = time.perf_counter()
    metrics, pr_curves = score_detections(coco_gt, run.detections, image_ids=run.image_ids, class_names=class_names,
                                          label_to_category_id=label_to_category_id, iou_thresh=iou_thresh)
    scored = time.perf_counter()
    analysis_metrics, analysis = analyse_detections(coco_gt, run.detections, image_ids=run.image_ids,
                                                    class_names=class_names, label_to_category_id=label_to_category_id,
                                                    iou_thresh=iou_thresh)
    pictured = {int(p.target["image_id"]): p.image for p in run.pictures}
    # The worst images of the whole set when they can be loaded again, else of the pictured ones.
    candidates = run.image_ids if load_image is not None else list(pictured)
    worst = worst_images(analysis["segm"], run.detections, coco_gt, candidates, NUM_WORST)
    position = {image_id: i for i, image_id in enumerate(run.image_ids)}
    images = dict(pictured)
    for image_id in (*worst["missed"], *worst["false_positive"]):
        if image_id not in images:
            images[image_id] = load_image(position[image_id])
    metrics.update(analysis_metrics, worst_images=worst)
    analysed = time.perf_counter()
    if mask_ceiling:
        metrics["mask_ceiling"] = mask_ceiling_metrics(model, coco_gt, run.detections, run.image_ids)
    log.info(f"evaluate: scored in {time.perf_counter() - started:.1f} s (COCOeval and per-class AP "
             f"{scored - started:.1f} s, error analysis {analysed - scored:.1f} s"
             + (f", mask ceiling {time.perf_counter() - analysed:.1f} s)" if mask_ceiling else ")"))
    result = EvalResult(metrics=metrics, pr_curves=pr_curves, detections=run.detections,
                        class_names=list(class_names), pictures=run.pictures, analysis=analysis,
                        views=image_views(images, coco_gt, run.detections, analysis, label_to_category_id),
                        worst=worst)
    if out_dir is not None:
        write_eval_files(result, out_dir)
    return result


def mask_ceiling_metrics(model: torch.nn.Module, coco_gt: COCO, detections: list[dict], image_ids: list[int]) -> dict:
    """{"mask_size": the mask head's M or None, "target" (a model of this package only), "GT in box": COCO mask AP
    stats of the detections with each oracle's masks} (`mask_ceiling.py`)."""
    oracle = model_target_masks(model)
    target_masks, mask_size = oracle if oracle is not None else (None, None)
    stats = oracle_mask_ap(coco_gt, detections, image_ids=image_ids, target_masks=target_masks,
                           score=lambda results: coco_stats(coco_gt, results, iou_type="segm", image_ids=image_ids))
    return {"mask_size": mask_size, **stats}


def _count(batches: Iterable, max_images: int | None) -> int | None:
    """Images `evaluate` will see: a DataLoader's data set length, capped by max_images (None when unknown)."""
    dataset = getattr(batches, "dataset", None)
    count = len(dataset) if dataset is not None else None
    return max_images if count is None else min(count, max_images if max_images is not None else count)


def _progress_line(done: int, total: int | None, seconds: float) -> str:
    """'evaluate: 96/200 images, 12.3 images/s, 8 s left' (this process's images in a sharded evaluation)."""
    speed = done / max(seconds, 1e-9)
    if total is None:
        return f"evaluate: {done} images, {speed:.1f} images/s"
    return f"evaluate: {done}/{total} images, {speed:.1f} images/s, {(total - done) / max(speed, 1e-9):.0f} s left"


def write_eval_files(result: EvalResult, out_dir: str | Path) -> None:
    """metrics.json, detections.json (COCO results) and pr_curves.json into `out_dir`, each written atomically."""
    out = Path(out_dir)
    write_text_atomic(out / "metrics.json", json.dumps(result.metrics, indent=2))
    write_text_atomic(out / "detections.json", json.dumps(result.detections))
    write_text_atomic(out / "pr_curves.json", json.dumps(result.pr_curves))


def evaluate_dataset(
    model: torch.nn.Module,
    dataset,
    *,
    batch_size: int,
    device: torch.device,
    num_workers: int = 0,
    max_images: int | None = None,
    **kwargs,
) -> EvalResult | None:
    """`evaluate` over a data set of the package, sharded across the ranks of a distributed run (every rank must
    call it; rank 0 returns the result, the others None): batches from `build_eval_loader`; the dataset's `coco`
    and `label_to_category_id` (COCO format) are the ground truth when present. `max_images` keeps the data set's
    first images; other keyword arguments go to `evaluate`."""
    count = len(dataset) if max_images is None else min(len(dataset), max_images)
    loader = build_eval_loader(Subset(dataset, distributed.shard(count)), batch_size=batch_size,
                               num_workers=num_workers)
    return evaluate(
        model,
        loader,
        class_names=list(dataset.class_names),
        device=device,
        coco_gt=getattr(dataset, "coco", None),
        label_to_category_id=getattr(dataset, "label_to_category_id", None),
        sharded=True,
        load_image=lambda index: dataset[index][0],
        **kwargs,
    )
