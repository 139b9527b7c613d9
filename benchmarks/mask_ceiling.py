"""What holds a run's mask AP down: its masks against what its own boxes would allow.

Rescores a finished run's held-out detections (`detections.json` of `maskrcnn train` / `evaluate`) three times,
every detection keeping its box and score and taking another mask:

- model: its own mask (the run's mask AP, recomputed as a check);
- target MxM: the ground-truth mask of the GT box it overlaps most, cut to the detection's box at the mask head's
  M x M exactly as the training targets are (`MaskHead.targets`), and pasted back as the model's masks are
  (`paste_masks`, threshold 0.5): the best the mask head can do inside these boxes at this resolution;
- GT in box: that GT mask at full resolution, cleared outside the detection's box: the best any mask can do
  inside these boxes.

The gap model -> target MxM is the mask head's; target MxM -> GT in box is the M x M resolution's; what GT in box
misses is the boxes' (and the scores').

    python benchmarks/mask_ceiling.py /tmp/run --set data.root=../shared/data/PennFudanPed
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from torchvision.ops import box_iou

from maskrcnn.config import load_config
from maskrcnn.data import build_dataset
from maskrcnn.engine.evaluate import build_coco_ground_truth, coco_stats, masks_to_rle, targets_to_coco_annotations
from maskrcnn.model import build_model
from maskrcnn.model.poolers import image_index_rois
from maskrcnn.model.postprocess import paste_masks


def oracle_masks(detections: list[dict], target: dict, mask_head) -> tuple[list[dict], list[dict]]:
    """One image's detections with the two oracle masks (see the module docstring).

    Args:
        detections: D COCO results of one image (bbox xywh in original pixels).
        target: the data set's target of the image: "boxes" f32[N, 4] xyxy, "masks" u8[N, H, W].
        mask_head: the run's `MaskHead` (its M and RoIAlign alignment).
    Returns:
        (detections with the M x M target masks, detections with the GT masks cleared outside their boxes).
    """
    gt_masks = target["masks"].to(torch.uint8)  # (N, H, W)
    height, width = gt_masks.shape[-2:]
    if not detections or gt_masks.shape[0] == 0:
        blank = [{**d, "segmentation": rle}
                 for d, rle in zip(detections, masks_to_rle(np.zeros((len(detections), height, width), np.uint8)))]
        return blank, blank
    xywh = torch.tensor([d["bbox"] for d in detections], dtype=torch.float32)  # (D, 4)
    boxes = torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], dim=1)  # (D, 4) xyxy
    matched = box_iou(boxes, target["boxes"].float()).argmax(dim=1)  # (D,) GT row of each detection
    rois = image_index_rois(torch.zeros(boxes.shape[0], dtype=torch.int64), boxes)  # (D, 5), image 0
    cut = mask_head.targets(rois, matched, torch.ones((1, gt_masks.shape[0]), dtype=torch.bool), [gt_masks],
                            torch.ones((1, 2)))  # (D, M, M) of 0 / 1
    pasted = paste_masks(cut, boxes, [boxes.shape[0]], [(height, width)])[0][:, 0] >= 0.5  # (D, H, W)
    ys = torch.arange(height, dtype=torch.float32)[None, :, None] + 0.5  # pixel centres
    xs = torch.arange(width, dtype=torch.float32)[None, None, :] + 0.5
    inside = ((ys >= boxes[:, 1, None, None]) & (ys <= boxes[:, 3, None, None])
              & (xs >= boxes[:, 0, None, None]) & (xs <= boxes[:, 2, None, None]))  # (D, H, W)
    clipped = gt_masks[matched].bool() & inside  # (D, H, W)
    return ([{**d, "segmentation": rle} for d, rle in zip(detections, masks_to_rle(pasted.to(torch.uint8).numpy()))],
            [{**d, "segmentation": rle} for d, rle in zip(detections, masks_to_rle(clipped.to(torch.uint8).numpy()))])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="a run folder with config.yaml and detections.json")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    if not (args.run / "detections.json").is_file() or not (args.run / "config.yaml").is_file():
        parser.error(f"{args.run}: no config.yaml and detections.json there (a run folder of maskrcnn train)")
    cfg = load_config(args.run / "config.yaml", [*args.set, "model.backbone.weights=none", "model.weights=none"])
    mask_head = build_model(cfg.model).mask_head
    dataset = build_dataset(cfg.data, "val")
    detections = json.loads((args.run / "detections.json").read_text())
    by_image: dict[int, list[dict]] = {}
    for detection in detections:
        by_image.setdefault(detection["image_id"], []).append(detection)

    images, annotations, target_mxm, gt_in_box = [], [], [], []
    for index in range(len(dataset)):
        image, target = dataset[index]
        image_id = int(target["image_id"])
        images.append({"id": image_id, "height": image.shape[-2], "width": image.shape[-1]})
        annotations += targets_to_coco_annotations(target, image_id, first_id=len(annotations) + 1)
        with_mxm, with_gt = oracle_masks(by_image.get(image_id, []), target, mask_head)
        target_mxm += with_mxm
        gt_in_box += with_gt
    coco_gt = build_coco_ground_truth(images, annotations, list(dataset.class_names))
    image_ids = [record["id"] for record in images]
    mask_size = 2 * cfg.model.mask_head.pooler_size
    rescored = {"model": detections, f"target {mask_size}x{mask_size}": target_mxm, "GT in box": gt_in_box}
    figures = {name: coco_stats(coco_gt, dets, iou_type="segm", image_ids=image_ids) for name, dets in rescored.items()}
    print(f"{len(detections)} detections on {len(images)} images; mask AP with each detection's mask replaced:")
    print(f"{'mask':<12} {'AP':>6} {'AP50':>6} {'AP75':>6} {'APl':>6}")
    for name, stats in figures.items():
        large = "-" if stats["APl"] is None else f"{stats['APl']:.3f}"
        print(f"{name:<12} {stats['AP']:6.3f} {stats['AP50']:6.3f} {stats['AP75']:6.3f} {large:>6}")
    if args.json:
        args.json.write_text(json.dumps({"run": str(args.run), "num_detections": len(detections), **figures},
                                        indent=2) + "\n")


if __name__ == "__main__":
    main()
