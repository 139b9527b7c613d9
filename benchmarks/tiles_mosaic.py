"""Tiles on held-out mosaics: AP (small objects especially) with `--tile` against without, and duplicates.

Each mosaic is a 4 x 4 grid of the checkpoint's held-out validation images (never seen in training), so the
objects are small against the whole image: predicted in one piece, the model's transform shrinks the mosaic to
its max_size (4x for the demo preset's 128 px); in tiles of the images' own size it sees them at the scale it
was trained on. The ground truth is each image's objects moved to its place in the mosaic. Reported: COCO box
and mask AP, AP small / medium, and duplicates: per ground-truth object, the detections beyond the first whose
mask has IoU >= 0.5 with it (score >= --dup-score), overall and for the objects that cross a tile border. The
reference row: the same 16 x --mosaics images predicted one by one (AP at the model's own scale, and the
duplicates its own NMS leaves).

    python benchmarks/tiles_mosaic.py --checkpoint runs/demo/best.pt            # tile 128, overlap 0.25
    python benchmarks/tiles_mosaic.py --checkpoint runs/demo/best.pt --tile 160 --overlap 0.2
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from pycocotools import mask as mask_utils

from maskrcnn.app.detectors import CheckpointDetector
from maskrcnn.app.pipeline import BatchPredictor
from maskrcnn.app.tiles import Tiling, tile_windows
from maskrcnn.data import build_dataset
from maskrcnn.engine.checkpoint import load_model
from maskrcnn.engine.coco_results import build_coco_ground_truth, coco_stats, targets_to_coco_annotations

RESULTS = Path(__file__).resolve().parent / "results" / "tiles_mosaic.json"
GRID = 4


def mosaic(dataset, first: int) -> tuple[torch.Tensor, dict]:
    """uint8[3, 4h, 4w] of images first .. first + 15 and their targets moved into it (masks u8[N, 4h, 4w])."""
    pairs = [dataset[(first + k) % len(dataset)] for k in range(GRID * GRID)]
    height, width = pairs[0][0].shape[-2:]
    image = torch.zeros(3, GRID * height, GRID * width, dtype=torch.uint8)
    boxes, labels, masks = [], [], []
    for k, (tile, target) in enumerate(pairs):
        y0, x0 = (k // GRID) * height, (k % GRID) * width
        image[:, y0:y0 + height, x0:x0 + width] = tile
        placed = torch.zeros(len(target["labels"]), GRID * height, GRID * width, dtype=torch.uint8)
        placed[:, y0:y0 + height, x0:x0 + width] = target["masks"]
        boxes.append(target["boxes"] + torch.tensor([x0, y0, x0, y0], dtype=torch.float32))
        labels.append(target["labels"])
        masks.append(placed)
    return image, {"boxes": torch.cat(boxes), "labels": torch.cat(labels), "masks": torch.cat(masks)}


def crosses_a_border(box: list[float], windows: list[tuple[int, int, int, int]]) -> bool:
    """Whether no single tile (the whole-image window aside) holds the box [x, y, w, h] entirely."""
    x, y, w, h = box
    tiles = windows[:-1] if len(windows) > 1 else windows
    return not any(x0 <= x and y0 <= y and x + w <= x1 and y + h <= y1 for x0, y0, x1, y1 in tiles)


def duplicates(detections: list[dict], annotations: list[dict], score: float, borders: set[int]) -> tuple[int, int]:
    """(duplicates of all objects, of the objects in `borders`): detections beyond the first per object."""
    total = crossing = 0
    for image_id in {a["image_id"] for a in annotations}:
        objects = [a for a in annotations if a["image_id"] == image_id]
        found = [d for d in detections if d["image_id"] == image_id and d["score"] >= score]
        if not found:
            continue
        ious = mask_utils.iou([d["segmentation"] for d in found], [a["segmentation"] for a in objects],
                              [0] * len(objects))  # (detections, objects)
        extra = np.maximum((np.asarray(ious) >= 0.5).sum(axis=0) - 1, 0)
        total += int(extra.sum())
        crossing += int(sum(e for e, a in zip(extra, objects) if a["id"] in borders))
    return total, crossing


def evaluate(predictor: BatchPredictor, images: list[torch.Tensor], gt, annotations, borders, score) -> dict:
    started = time.perf_counter()
    detections = [det for image_id, image in enumerate(images, start=1)
                  for det in predictor.predict([image])[0].to_coco(image_id)]
    seconds = time.perf_counter() - started
    ids = list(range(1, len(images) + 1))
    boxes, masks = (coco_stats(gt, detections, iou_type=kind, image_ids=ids) for kind in ("bbox", "segm"))
    total, crossing = duplicates(detections, annotations, score, borders)
    return {"box": boxes, "mask": masks, "detections": len(detections), "duplicates": total,
            "duplicates_across_borders": crossing, "seconds_per_mosaic": seconds / len(images)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--mosaics", type=int, default=6)
    parser.add_argument("--tile", type=int, help="tile side (default: the data set's image side)")
    parser.add_argument("--overlap", type=float, default=0.25)
    parser.add_argument("--dup-score", type=float, default=0.5, help="detections counted as duplicates from")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    loaded = load_model(args.checkpoint)
    dataset = build_dataset(loaded.config.data, "val")
    pairs = [mosaic(dataset, GRID * GRID * k) for k in range(args.mosaics)]
    images = [image for image, _ in pairs]
    tiling = Tiling(args.tile or int(dataset[0][0].shape[-1]), args.overlap)
    annotations = [a for image_id, (_, target) in enumerate(pairs, start=1)
                   for a in targets_to_coco_annotations(target, image_id, 1)]
    annotations = [{**a, "id": k} for k, a in enumerate(annotations, start=1)]
    height, width = images[0].shape[-2:]
    gt = build_coco_ground_truth([{"id": i, "height": height, "width": width} for i in range(1, len(images) + 1)],
                                 annotations, list(dataset.class_names))
    windows = tile_windows(height, width, tiling)
    borders = {a["id"] for a in annotations if crosses_a_border(a["bbox"], windows)}
    detector = CheckpointDetector(loaded)
    results = {
        "whole": evaluate(BatchPredictor(detector, score_thresh=0.0), images, gt, annotations, borders,
                          args.dup_score),
        "tiles": evaluate(BatchPredictor(detector, score_thresh=0.0, batch_size=8, tiling=tiling), images, gt,
                          annotations, borders, args.dup_score),
    }
    # the reference: the same images one by one, at the scale the model was trained on (its own duplicates)
    singles = [dataset[k % len(dataset)] for k in range(GRID * GRID * args.mosaics)]
    single_annotations = [{**a, "id": k} for k, a in enumerate(
        (a for image_id, (_, target) in enumerate(singles, start=1)
         for a in targets_to_coco_annotations(target, image_id, 1)), start=1)]
    single_gt = build_coco_ground_truth([{"id": i, "height": int(image.shape[-2]), "width": int(image.shape[-1])}
                                         for i, (image, _) in enumerate(singles, start=1)], single_annotations,
                                        list(dataset.class_names))
    results["images_alone"] = evaluate(BatchPredictor(detector, score_thresh=0.0), [image for image, _ in singles],
                                       single_gt, single_annotations, set(), args.dup_score)
    results.update(checkpoint=args.checkpoint, mosaics=len(images), mosaic_size=[int(height), int(width)],
                   objects=len(annotations), objects_across_borders=len(borders), tile=tiling.size,
                   overlap=tiling.overlap, windows_per_mosaic=len(windows))
    for name in ("whole", "tiles", "images_alone"):
        r = results[name]
        print(f"{name:12s}: mask AP {r['mask']['AP']:.3f} (small {r['mask']['APs']}, medium {r['mask']['APm']}), "
              f"box AP {r['box']['AP']:.3f} (small {r['box']['APs']}); {r['detections']} detections, "
              f"{r['duplicates']} duplicates ({r['duplicates_across_borders']} of objects across tile borders); "
              f"{r['seconds_per_mosaic']:.2f} s a mosaic")
    print(f"{len(images)} mosaics of {height}x{width}, {len(annotations)} objects ({len(borders)} across tile "
          f"borders), tile {tiling.size} overlap {tiling.overlap}: {len(windows)} windows a mosaic")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
