"""Tiles on held-out mosaics: AP (small objects especially) with `--tile` against without, and duplicates.

Each mosaic is a 4 x 4 grid of the checkpoint's held-out validation images (never seen in training), so the
objects are small against the whole image: predicted in one piece, the model's transform shrinks the mosaic to
its max_size (4x for the demo preset's 128 px); in tiles of the images' own size it sees them at the scale it
was trained on. The ground truth is each image's objects moved to its place in the mosaic. Reported: COCO box
and mask AP, AP small / medium, and duplicates: per ground-truth object, the detections beyond the first whose
mask has IoU >= 0.5 with it (score >= --dup-score), of its class ("same_class") or of any ("any_class": the
model also calls one shape two names), overall and for the objects that cross a tile border (no tile holds their
box). The reference row: the same 16 x --mosaics images predicted one by one (AP at the model's own scale, and the
duplicates its own NMS leaves); "beyond_images_alone" counts, per object, only the duplicates beyond those the
model makes of it on its image alone. Target (issue 32): no same-class duplicate across a tile border.
Commit, date, machine and `uptime` go into the json.

    python benchmarks/tiles_mosaic.py --checkpoint runs/demo/best.pt            # tile 128, overlap 0.25
    python benchmarks/tiles_mosaic.py --checkpoint runs/demo/best.pt --tile 160 --overlap 0.2
"""

from __future__ import annotations

import argparse
import json
import sys
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

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the benchmarks folder is not a package
from rle_speed import machine

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


def duplicates(detections: list[dict], annotations: list[dict], score: float, same_class: bool) -> np.ndarray:
    """Per ground-truth object (in `annotations`' order), the detections beyond the first whose mask has IoU >= 0.5
    with it and score >= `score` (of its class only, with `same_class`)."""
    extra = np.zeros(len(annotations), dtype=np.int64)
    for image_id in {a["image_id"] for a in annotations}:
        rows = [k for k, a in enumerate(annotations) if a["image_id"] == image_id]
        found = [d for d in detections if d["image_id"] == image_id and d["score"] >= score]
        if not found:
            continue
        ious = np.asarray(mask_utils.iou([d["segmentation"] for d in found],
                                         [annotations[k]["segmentation"] for k in rows], [0] * len(rows)))
        match = ious >= 0.5  # (detections, objects)
        if same_class:
            match &= np.array([d["category_id"] for d in found])[:, None] == \
                np.array([annotations[k]["category_id"] for k in rows])[None]
        extra[rows] = np.maximum(match.sum(axis=0) - 1, 0)
    return extra


def evaluate(predictor: BatchPredictor, images: list[torch.Tensor], gt, annotations, score) -> dict:
    started = time.perf_counter()
    detections = [det for image_id, image in enumerate(images, start=1)
                  for det in predictor.predict([image])[0].to_coco(image_id)]
    seconds = time.perf_counter() - started
    ids = list(range(1, len(images) + 1))
    boxes, masks = (coco_stats(gt, detections, iou_type=kind, image_ids=ids) for kind in ("bbox", "segm"))
    return {"box": boxes, "mask": masks, "detections": len(detections), "seconds_per_image": seconds / len(images),
            "extra": {same: duplicates(detections, annotations, score, same) for same in (True, False)}}


def duplicate_counts(row: dict, alone: dict, borders: np.ndarray) -> dict:
    """The duplicate counts of a mosaic row against the same objects predicted alone (`alone`'s per-object
    counts), overall and for the objects across tile borders (bool per object)."""
    counts = {}
    for same, name in ((True, "same_class"), (False, "any_class")):
        extra = row["extra"][same]
        introduced = np.maximum(extra - alone["extra"][same], 0)  # beyond what the model does on the image alone
        counts[name] = {"duplicates": int(extra.sum()), "across_borders": int(extra[borders].sum()),
                        "beyond_images_alone": int(introduced.sum()),
                        "across_borders_beyond_images_alone": int(introduced[borders].sum())}
    return counts


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
    borders = np.array([crosses_a_border(a["bbox"], windows) for a in annotations])
    detector = CheckpointDetector(loaded)
    results = {
        "whole": evaluate(BatchPredictor(detector, score_thresh=0.0), images, gt, annotations, args.dup_score),
        "tiles": evaluate(BatchPredictor(detector, score_thresh=0.0, batch_size=8, tiling=tiling), images, gt,
                          annotations, args.dup_score),
    }
    # the reference: the same images one by one, at the scale the model was trained on (its own duplicates); their
    # objects are the mosaics' objects in the same order
    singles = [dataset[k % len(dataset)] for k in range(GRID * GRID * args.mosaics)]
    single_annotations = [{**a, "id": k} for k, a in enumerate(
        (a for image_id, (_, target) in enumerate(singles, start=1)
         for a in targets_to_coco_annotations(target, image_id, 1)), start=1)]
    single_gt = build_coco_ground_truth([{"id": i, "height": int(image.shape[-2]), "width": int(image.shape[-1])}
                                         for i, (image, _) in enumerate(singles, start=1)], single_annotations,
                                        list(dataset.class_names))
    results["images_alone"] = evaluate(BatchPredictor(detector, score_thresh=0.0), [image for image, _ in singles],
                                       single_gt, single_annotations, args.dup_score)
    for name in ("whole", "tiles", "images_alone"):
        results[name]["duplicates"] = duplicate_counts(results[name], results["images_alone"], borders)
    for name in ("whole", "tiles", "images_alone"):
        del results[name]["extra"]
    results = {"benchmark": "tiles_mosaic", **machine(), **results}
    results.update(checkpoint=args.checkpoint, mosaics=len(images), mosaic_size=[int(height), int(width)],
                   objects=len(annotations), objects_across_borders=int(borders.sum()), tile=tiling.size,
                   overlap=tiling.overlap, windows_per_mosaic=len(windows), dup_score=args.dup_score)
    for name in ("whole", "tiles", "images_alone"):
        r, same = results[name], results[name]["duplicates"]["same_class"]
        print(f"{name:12s}: mask AP {r['mask']['AP']:.3f} (small {r['mask']['APs']}, medium {r['mask']['APm']}), "
              f"box AP {r['box']['AP']:.3f} (small {r['box']['APs']}); {r['detections']} detections; same-class "
              f"duplicates {same['duplicates']} ({same['across_borders']} of objects across tile borders; beyond "
              f"the images alone: {same['beyond_images_alone']}, across borders "
              f"{same['across_borders_beyond_images_alone']}); {r['seconds_per_image']:.2f} s an image")
    print(f"{len(images)} mosaics of {height}x{width}, {len(annotations)} objects ({int(borders.sum())} across tile "
          f"borders), tile {tiling.size} overlap {tiling.overlap}: {len(windows)} windows a mosaic")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
