"""Times the error analysis (`maskrcnn.engine.analysis.analyse`, boxes and masks) on a generated COCO-sized set.

The set has COCO val2017's size: 5,000 images of 640x480, 80 classes, about 7.3 objects an image (36,781 in
val2017), and `--dets` detections an image (100 is what a Mask R-CNN with detections_per_img=100 writes at score
threshold 0.05). Detections are made from the ground truth with every kind of error the analysis separates:
well-placed ones, shifted boxes, wrong classes, duplicates, boxes on the background, and missed objects. Every
object and detection is an octagon inside its box, so masks and boxes differ.

    PYTHONPATH=src python benchmarks/error_analysis.py [--images 5000] [--dets 100] [--tidecv]

The timings go to benchmarks/results/error_analysis.json (--json elsewhere).

`--tidecv` also times the `tidecv` package (pip install tidecv; it needs opencv, seaborn and pandas) on the same
set, boxes only, and prints its dAP next to ours.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import time
from pathlib import Path

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

RESULTS = Path(__file__).resolve().parent / "results"  # one JSON file per benchmark

WIDTH, HEIGHT, NUM_CLASSES = 640, 480, 80


def octagon(box: np.ndarray) -> list[float]:
    """[x, y, w, h] -> an octagon polygon [x1, y1, ..., x8, y8] touching the box's sides."""
    x, y, w, h = box
    fx = np.array([0.3, 0.7, 1.0, 1.0, 0.7, 0.3, 0.0, 0.0])
    fy = np.array([0.0, 0.0, 0.3, 0.7, 1.0, 1.0, 0.7, 0.3])
    return np.stack([x + fx * w, y + fy * h], axis=1).reshape(-1).tolist()


def random_boxes(rng: np.random.Generator, count: int) -> np.ndarray:
    """count [x, y, w, h] boxes inside the image, sizes spread over COCO's small / medium / large."""
    side = np.exp(rng.uniform(np.log(12), np.log(400), size=(count, 1))) * rng.uniform(0.6, 1.4, size=(count, 2))
    side = np.minimum(side, [WIDTH - 1, HEIGHT - 1])
    corner = rng.uniform(0, 1, size=(count, 2)) * ([WIDTH, HEIGHT] - side)
    return np.concatenate([corner, side], axis=1)


def generate(num_images: int, dets_per_image: int, seed: int = 0) -> tuple[COCO, list[dict]]:
    """A COCO ground truth and COCO results with every kind of error; see the module docstring."""
    rng = np.random.default_rng(seed)
    images, annotations, detections = [], [], []
    for image_id in range(1, num_images + 1):
        images.append({"id": image_id, "width": WIDTH, "height": HEIGHT})
        gt_boxes = random_boxes(rng, rng.poisson(7.3))
        gt_labels = rng.integers(1, NUM_CLASSES + 1, size=len(gt_boxes))
        for box, label in zip(gt_boxes, gt_labels):
            polygon = [octagon(box)]
            area = float(mask_utils.area(mask_utils.merge(mask_utils.frPyObjects(polygon, HEIGHT, WIDTH))))
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": int(label),
                                "bbox": box.tolist(), "area": area, "segmentation": polygon, "iscrowd": 0})
        boxes, labels, scores = [], [], []
        for box, label in zip(gt_boxes, gt_labels):
            kind = rng.choice(["good", "loc", "cls", "dupe", "missed"], p=[0.55, 0.15, 0.1, 0.1, 0.1])
            if kind == "missed":
                continue
            jitter = 0.05 if kind in ("good", "cls", "dupe") else 0.35
            moved = box + rng.normal(0, jitter, size=4) * np.repeat(box[2:], 2)
            moved[2:] = np.maximum(moved[2:], 2)
            wrong = rng.integers(1, NUM_CLASSES + 1)
            boxes.append(moved)
            labels.append(wrong if kind == "cls" else label)
            scores.append(rng.uniform(0.3, 1.0))
            if kind == "dupe":
                boxes.append(moved + rng.normal(0, 0.03, size=4) * np.repeat(box[2:], 2))
                labels.append(label)
                scores.append(rng.uniform(0.05, 0.6))
        count = max(dets_per_image - len(boxes), 0)
        boxes += list(random_boxes(rng, count))
        labels += list(rng.integers(1, NUM_CLASSES + 1, size=count))
        scores += list(rng.uniform(0.05, 0.5, size=count))
        for box, label, score in list(zip(boxes, labels, scores))[:dets_per_image]:
            rle = mask_utils.merge(mask_utils.frPyObjects([octagon(box)], HEIGHT, WIDTH))
            rle["counts"] = rle["counts"].decode("ascii")
            detections.append({"image_id": image_id, "category_id": int(label), "bbox": [float(v) for v in box],
                               "score": float(score), "segmentation": rle})
    coco = COCO()
    coco.dataset = {"images": images, "annotations": annotations,
                    "categories": [{"id": k, "name": f"class{k}"} for k in range(1, NUM_CLASSES + 1)]}
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco, detections


def time_tidecv(coco: COCO, detections: list[dict]) -> float:
    """tidecv's box analysis of the same set (its dAP are percentages; ours are fractions); returns its seconds."""
    from tidecv import TIDE
    from tidecv.data import Data

    gt, preds = Data("gt"), Data("preds")
    for ann in coco.dataset["annotations"]:
        gt.add_ground_truth(ann["image_id"], ann["category_id"], ann["bbox"], None)
    for det in detections:
        preds.add_detection(det["image_id"], det["category_id"], det["score"], det["bbox"], None)
    started = time.perf_counter()
    tide = TIDE()
    tide.evaluate(gt, preds, mode=TIDE.BOX)
    errors = tide.get_all_errors()
    seconds = time.perf_counter() - started
    print(f"tidecv boxes: {seconds:.1f} s; dAP (%): "
          + ", ".join(f"{name} {value:.2f}" for name, value in errors["main"]["preds"].items()))
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--dets", type=int, default=100, help="detections per image")
    parser.add_argument("--tidecv", action="store_true", help="also time the tidecv package, boxes only")
    parser.add_argument("--json", type=Path, default=RESULTS / "error_analysis.json",
                        help="the timings as JSON")
    args = parser.parse_args()
    from maskrcnn.engine.analysis import analyse

    started = time.perf_counter()
    coco, detections = generate(args.images, args.dets)
    print(f"generated {args.images} images, {len(coco.anns)} objects, {len(detections)} detections "
          f"in {time.perf_counter() - started:.1f} s")
    timings = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "load_average_before": os.getloadavg(),
               "images": args.images, "objects": len(coco.anns), "detections": len(detections)}
    image_ids = sorted(coco.imgs)
    for iou_type in ("bbox", "segm"):
        started = time.perf_counter()
        analysis = analyse(coco, detections, iou_type=iou_type, image_ids=image_ids,
                           category_ids=list(range(1, NUM_CLASSES + 1)))
        seconds = time.perf_counter() - started
        timings[f"{iou_type}_seconds"] = round(seconds, 2)
        timings[f"{iou_type}_dap"] = {name: round(value, 4) for name, value in analysis.summary["dap"].items()}
        print(f"analyse {iou_type}: {seconds:.1f} s; AP50 {analysis.summary['ap50']:.3f}, dAP: "
              + ", ".join(f"{name} {value:.3f}" for name, value in analysis.summary["dap"].items()))
    print(f"both: {timings['bbox_seconds'] + timings['segm_seconds']:.1f} s")
    if args.tidecv:
        timings["tidecv_bbox_seconds"] = round(time_tidecv(coco, detections), 2)
    timings["load_average_after"] = os.getloadavg()
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(timings, indent=2))


if __name__ == "__main__":
    main()
