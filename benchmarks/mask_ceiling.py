"""What holds a run's mask AP down: its masks against what its own boxes would allow, from a finished run's
held-out detections (`detections.json` of `maskrcnn train` / `evaluate`) without running the model again.

Rescores the detections with each one's mask replaced by an oracle's (`maskrcnn.engine.mask_ceiling`, which every
evaluation now runs for the report's "Masks against their boxes" section): "target MxM", the mask head's training
target in the detection's box, pasted back; "GT in box", the ground-truth mask cleared outside the box. The
"model" row recomputes the run's own mask AP, a check.

    python benchmarks/mask_ceiling.py /tmp/run --set data.root=../shared/data/PennFudanPed   # results/mask_ceiling.json
    python benchmarks/mask_ceiling.py --cost     # seconds per COCO-sized image: 100 detections, 7 objects, 480 x 640
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from maskrcnn.config import ModelConfig, load_config
from maskrcnn.data import build_dataset
from maskrcnn.engine.coco_results import build_coco_ground_truth, coco_stats, masks_to_rle, targets_to_coco_annotations
from maskrcnn.engine.mask_ceiling import model_target_masks, oracle_mask_ap, oracle_masks
from maskrcnn.model import build_model

RESULTS = Path(__file__).resolve().parent / "results"  # one JSON file per benchmark


def cost(calls: int = 5) -> None:
    """Times both oracles' masks and their RLEs for one 480 x 640 image with 7 rectangle objects and 100 random
    detections (a COCO image at torchvision's 100 detections), median of `calls`."""
    generator = torch.Generator().manual_seed(0)
    height, width = 480, 640

    def boxes(count: int) -> list[list[float]]:
        corners = torch.rand(count, 2, generator=generator) * 400
        sides = torch.rand(count, 2, generator=generator) * 200 + 20
        return torch.cat([corners, sides], dim=1).tolist()  # (count, 4) xywh

    objects = [{"category_id": 1, "bbox": box} for box in boxes(7)]
    object_masks = torch.zeros(len(objects), height, width, dtype=torch.uint8)
    for mask, (x, y, w, h) in zip(object_masks, (map(int, o["bbox"]) for o in objects)):
        mask[y:y + h, x:x + w] = 1
    detections = [{"category_id": 1, "bbox": box} for box in boxes(100)]
    target_masks, _ = model_target_masks(build_model(ModelConfig(num_classes=80, cpu_speedups=False)))
    seconds = []
    for _ in range(calls):
        start = time.perf_counter()
        for masks in oracle_masks(detections, objects, object_masks, target_masks).values():
            masks_to_rle(masks.to(torch.uint8).numpy())
        seconds.append(time.perf_counter() - start)
    print(f"both oracles and their RLEs, 100 detections on 480 x 640, {torch.get_num_threads()} threads: "
          f"median {statistics.median(seconds):.3f} s ({' '.join(f'{s:.3f}' for s in seconds)})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, nargs="?", help="a run folder with config.yaml and detections.json")
    parser.add_argument("--cost", action="store_true", help="time the oracles on a COCO-sized image instead")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    parser.add_argument("--json", type=Path, default=RESULTS / "mask_ceiling.json",
                        help="the figures as JSON")
    args = parser.parse_args()
    if args.cost:
        return cost()
    if args.run is None or not (args.run / "detections.json").is_file() or not (args.run / "config.yaml").is_file():
        parser.error(f"{args.run}: no config.yaml and detections.json there (a run folder of maskrcnn train)")
    cfg = load_config(args.run / "config.yaml", [*args.set, "model.backbone.weights=none", "model.weights=none"])
    target_masks, mask_size = model_target_masks(build_model(cfg.model))
    dataset = build_dataset(cfg.data, "val")
    detections = json.loads((args.run / "detections.json").read_text())
    images, annotations = [], []
    for index in range(len(dataset)):
        image, target = dataset[index]
        image_id = int(target["image_id"])
        images.append({"id": image_id, "height": image.shape[-2], "width": image.shape[-1]})
        annotations += targets_to_coco_annotations(target, image_id, first_id=len(annotations) + 1)
    coco_gt = build_coco_ground_truth(images, annotations, list(dataset.class_names))
    image_ids = [record["id"] for record in images]

    def score(results: list[dict]) -> dict:
        return coco_stats(coco_gt, results, iou_type="segm", image_ids=image_ids)

    oracles = oracle_mask_ap(coco_gt, detections, image_ids=image_ids, target_masks=target_masks, score=score)
    figures = {"model": score(detections), f"target {mask_size}x{mask_size}": oracles["target"],
               "GT in box": oracles["GT in box"]}
    print(f"{len(detections)} detections on {len(images)} images; mask AP with each detection's mask replaced:")
    print(f"{'mask':<12} {'AP':>6} {'AP50':>6} {'AP75':>6} {'APl':>6}")
    for name, stats in figures.items():
        large = "-" if stats["APl"] is None else f"{stats['APl']:.3f}"
        print(f"{name:<12} {stats['AP']:6.3f} {stats['AP50']:6.3f} {stats['AP75']:6.3f} {large:>6}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"run": str(args.run), "num_detections": len(detections), **figures},
                                    indent=2) + "\n")


if __name__ == "__main__":
    main()
