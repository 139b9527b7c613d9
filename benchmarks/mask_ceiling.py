"""What holds a run's mask AP down: its masks against what its own boxes would allow, from a finished run's
held-out detections (`detections.json` of `maskrcnn train` / `evaluate`) without running the model again.

Rescores the detections with each one's mask replaced by an oracle's (`maskrcnn.engine.mask_ceiling`, which every
evaluation now runs for the report's "Masks against their boxes" section): "target MxM", the mask head's training
target in the detection's box, pasted back; "GT in box", the ground-truth mask cleared outside the box. The
"model" row recomputes the run's own mask AP, a check.

    python benchmarks/mask_ceiling.py /tmp/run --set data.root=../shared/data/PennFudanPed
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from maskrcnn.config import load_config
from maskrcnn.data import build_dataset
from maskrcnn.engine.evaluate import build_coco_ground_truth, coco_stats, targets_to_coco_annotations
from maskrcnn.engine.mask_ceiling import model_target_masks, oracle_mask_ap
from maskrcnn.model import build_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="a run folder with config.yaml and detections.json")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    if not (args.run / "detections.json").is_file() or not (args.run / "config.yaml").is_file():
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
    if args.json:
        args.json.write_text(json.dumps({"run": str(args.run), "num_detections": len(detections), **figures},
                                        indent=2) + "\n")


if __name__ == "__main__":
    main()
