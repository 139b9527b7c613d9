"""The inference loop of evaluation: batches through the model, each image's detections as COCO results, the
ground truth collected from the targets when the data set has no COCO json, the first images kept with their
outputs for the report; and its distributed gather. Prediction (app/detectors.py) calls the model's
`MaskRCNN.detect` itself, on images it has read and resized in its own pipeline.

Shape letters: D detections of one image, N ground-truth objects, P proposals, H/W original image size.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from maskrcnn.engine import distributed
from maskrcnn.engine.coco_results import detections_to_coco, targets_to_coco_annotations
from maskrcnn.engine.common import autocast, images_to_model, output_to_cpu

log = logging.getLogger(__name__)

PROGRESS_SECONDS = 10.0  # at most one progress line per this many seconds, plus one when inference is done


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
class InferencePass:
    """What one pass over the batches collected (see `infer`)."""

    image_ids: list[int] = field(default_factory=list)
    detections: list[dict] = field(default_factory=list)
    gt_images: list[dict] = field(default_factory=list)  # filled when the ground truth comes from the targets
    gt_annotations: list[dict] = field(default_factory=list)
    pictures: list[Picture] = field(default_factory=list)

def infer(model: torch.nn.Module, batches: Iterable, *, device: torch.device, amp: bool, max_images: int | None,
           label_to_category_id: dict[int, int], gt_from_targets: bool, num_vis: int) -> InferencePass:
    """Runs the model (in the mode it is in) over the batches; see `evaluate.evaluate` for the arguments. Logs progress
    every PROGRESS_SECONDS and when done."""
    run = InferencePass()
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

def gather(run: InferencePass) -> InferencePass | None:
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
    return InferencePass(image_ids=[image_id for image_id, _, _, _ in records],
                      detections=[det for _, dets, _, _ in records for det in dets],
                      gt_images=[gt_image for _, _, gt_image, _ in records if gt_image is not None],
                      gt_annotations=[{**ann, "id": number} for number, ann in enumerate(annotations, start=1)],
                      pictures=run.pictures)

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
