"""Evaluation of a model on a data set: the inference loop (`inference`), COCO AP and the original project's
per-class AP@0.5 (`metrics`), the error analysis (TIDE's error types, a confusion matrix, object sizes;
`analysis`), the masks against what their boxes allow (`mask_ceiling`), the report's views of the pictured and
the worst images (`views`); written as metrics.json, detections.json and pr_curves.json.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from pycocotools.coco import COCO
from torch import Tensor
from torch.utils.data import Subset

from maskrcnn.data import build_eval_loader
from maskrcnn.engine import distributed
from maskrcnn.engine.analysis import ErrorAnalysis, worst_images
from maskrcnn.engine.coco_results import build_coco_ground_truth, coco_stats
from maskrcnn.engine.inference import InferencePass, Picture, gather, infer
from maskrcnn.engine.mask_ceiling import model_target_masks, oracle_mask_ap
from maskrcnn.engine.metrics import analyse_detections, score_detections
from maskrcnn.engine.run_folder import RunFolder
from maskrcnn.engine.views import ImageView, image_views
from maskrcnn.fileio import write_text_atomic

log = logging.getLogger(__name__)
NUM_WORST = 6  # images in each list of the worst images (most missed objects, most confident false positives)


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
        amp: bf16 autocast on CUDA (model.precision bf16 or auto).
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
        run = infer(model, batches, device=device, amp=amp, max_images=max_images,
                    label_to_category_id=label_to_category_id, gt_from_targets=coco_gt is None, num_vis=num_vis)
    finally:
        model.train(was_training)
    if sharded and distributed.get_world_size() > 1:
        log.info(f"evaluate: gathering the {distributed.get_world_size()} processes' shares on rank 0")
        run = gather(run)
        if run is None:
            return None
    if coco_gt is None:
        coco_gt = build_coco_ground_truth(run.gt_images, run.gt_annotations, class_names)
    result = score_inference(model, run, coco_gt, class_names=class_names, iou_thresh=iou_thresh,
                             label_to_category_id=label_to_category_id, load_image=load_image,
                             mask_ceiling=mask_ceiling)
    if out_dir is not None:
        write_eval_files(result, out_dir)
    return result


def score_inference(model: torch.nn.Module, run: InferencePass, coco_gt: COCO, *, class_names: list[str],
                    iou_thresh: float, label_to_category_id: dict[int, int],
                    load_image: Callable[[int], Tensor] | None, mask_ceiling: bool) -> EvalResult:
    """The scores, error analysis, worst images, mask ceiling and views of one inference pass (see `evaluate`)."""
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
    return EvalResult(metrics=metrics, pr_curves=pr_curves, detections=run.detections,
                      class_names=list(class_names), pictures=run.pictures, analysis=analysis,
                      views=image_views(images, coco_gt, run.detections, analysis, label_to_category_id),
                      worst=worst)


def mask_ceiling_metrics(model: torch.nn.Module, coco_gt: COCO, detections: list[dict], image_ids: list[int]) -> dict:
    """{"mask_size": the mask head's M or None, "target" (a model of this package only), "GT in box": COCO mask AP
    stats of the detections with each oracle's masks} (`mask_ceiling.py`)."""
    oracle = model_target_masks(model)
    target_masks, mask_size = oracle if oracle is not None else (None, None)
    stats = oracle_mask_ap(coco_gt, detections, image_ids=image_ids, target_masks=target_masks,
                           score=lambda results: coco_stats(coco_gt, results, iou_type="segm", image_ids=image_ids))
    return {"mask_size": mask_size, **stats}

def write_eval_files(result: EvalResult, out_dir: str | Path) -> None:
    """metrics.json, detections.json (COCO results) and pr_curves.json into `out_dir`, each written atomically."""
    folder = RunFolder(out_dir)
    write_text_atomic(folder.metrics, json.dumps(result.metrics, indent=2))
    write_text_atomic(folder.detections, json.dumps(result.detections))
    write_text_atomic(folder.pr_curves, json.dumps(result.pr_curves))

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
