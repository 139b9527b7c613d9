"""The job a user runs, one 800 x 1088 photo to COCO RLE results (issue 32): ours against torchvision's
maskrcnn_resnet50_fpn in fp32 plus pycocotools' RLE encoding of its masks, same weights, one run.

Paths, each warmed up, then timed in alternating rounds (cpu_limit.py's `run_alternating`: a load change on the
shared machine slows all of them alike), median over the rounds:

    torchvision fp32 + pycocotools   `tv([image])`, masks >= 0.5, `pycocotools.mask.encode`, the results dicts
    ours fp32 rle                    `model.inference([image], masks="rle")` (masks encoded box by box), dicts
    ours bf16 rle                    the same with model.precision bf16 (only where the CPU has bf16 units)
    ours fp32 dense                  `model.inference([image])` + `detections_to_coco`: the dense paste of before

The weights: export_onnxruntime.py's seeded random torchvision model (class logits scaled up so that detections
reach the mask head), score threshold 0 and 100 detections per image; ours gets them by `from_torchvision`.
The photo: export_onnxruntime.py's `images(1)` (a Penn-Fudan photo resized, or blobs). `uptime` is recorded
before and after.

    python benchmarks/rle_speed.py --repeats 5     # writes benchmarks/results/rle_speed.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the benchmarks folder is not a package
from cpu_limit import run_alternating
from export_onnxruntime import images, torchvision_model

from maskrcnn.engine.coco_results import detections_to_coco, masks_to_rle
from maskrcnn.model import from_torchvision
from maskrcnn.model.precision import cpu_has_bf16

RESULTS = Path(__file__).resolve().parent / "results"
DETECTIONS = 100
COCO_LABELS = {label: label for label in range(1, 91)}  # torchvision's 91 COCO classes: category id = label


def machine() -> dict:
    """Commit, date, CPU model, core count, torch version and load of this run (shared by the issue-32 scripts)."""
    def run(*command: str) -> str:
        return subprocess.run(command, check=False, capture_output=True, text=True).stdout.strip()

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return {"commit": run("git", "-C", str(Path(__file__).resolve().parent), "rev-parse", "HEAD"),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": {"cpu": cpu, "cores": os.cpu_count(), "bf16_units": cpu_has_bf16()},
            "torch": torch.__version__, "uptime": run("uptime")}


def coco_results(boxes: torch.Tensor, labels: torch.Tensor, scores: torch.Tensor, rles: list[dict]) -> list[dict]:
    """COCO results of one image from xyxy boxes and its RLEs (image id 1, category = label)."""
    xywh = boxes.float().clone()
    xywh[:, 2:] -= xywh[:, :2]
    return [{"image_id": 1, "category_id": label, "bbox": box, "score": score, "segmentation": rle}
            for box, label, score, rle in zip(xywh.tolist(), labels.tolist(), scores.tolist(), rles)]


def torchvision_job(model: torch.nn.Module, image: list[torch.Tensor]) -> Callable[[], list[dict]]:
    def call() -> list[dict]:
        with torch.inference_mode():
            output = model(image)[0]
        binary = (output["masks"][:, 0] >= 0.5).numpy().astype(np.uint8)  # (D, 1, H, W) -> (D, H, W)
        return coco_results(output["boxes"], output["labels"], output["scores"], masks_to_rle(binary))
    return call


def ours_job(model: torch.nn.Module, image: list[torch.Tensor], masks: str) -> Callable[[], list[dict]]:
    def call() -> list[dict]:
        with torch.inference_mode():
            output = model.inference(image, masks=masks)[0]
        if masks == "dense":
            return detections_to_coco(output, 1, COCO_LABELS)
        return coco_results(output["boxes"], output["labels"], output["scores"], output["masks"])
    return call


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (median over them)")
    parser.add_argument("--out", default=str(RESULTS / "rle_speed.json"))
    args = parser.parse_args()
    before = machine()
    tv = torchvision_model()
    tv.roi_heads.score_thresh, tv.roi_heads.detections_per_img = 0.0, DETECTIONS
    image = images(1)
    paths = {"torchvision fp32 + pycocotools": torchvision_job(tv, image),
             "ours fp32 rle": ours_job(from_torchvision(tv), image, "rle")}
    if cpu_has_bf16():
        paths["ours bf16 rle"] = ours_job(from_torchvision(tv, precision="bf16"), image, "rle")
    paths["ours fp32 dense"] = ours_job(from_torchvision(tv), image, "dense")
    times, outputs = run_alternating(paths, args.repeats)
    reference = "torchvision fp32 + pycocotools"
    medians = {name: statistics.median(t) for name, t in times.items()}
    rows = {name: {"median_s": round(medians[name], 3), "ratio_to_torchvision": round(medians[name] / medians[reference], 3),
                   "runs_s": [round(t, 3) for t in times[name]], "detections": len(outputs[name])}
            for name in paths}
    ours_rle, ours_dense = outputs["ours fp32 rle"], outputs["ours fp32 dense"]
    theirs = outputs[reference]
    same_masks = sum(a["segmentation"] == b["segmentation"] for a, b in zip(ours_rle, theirs))
    record = {"benchmark": "rle_speed", **before, "uptime_after": machine()["uptime"],
              "settings": {"image": list(image[0].shape[-2:]), "detections_per_img": DETECTIONS, "score_thresh": 0.0,
                           "repeats": args.repeats, "threads": torch.get_num_threads(),
                           "paste_mode": from_torchvision(tv).paste_mode,
                           "bf16": "run" if cpu_has_bf16() else "skipped: this CPU has no bf16 units (torch.cpu."
                                                             "get_capabilities: no avx512_bf16, no amx_bf16)"},
              "rle_equal_ours_rle_vs_dense": [d["segmentation"] for d in ours_rle] == [d["segmentation"] for d in ours_dense],
              "ours_fp32_rle_equal_to_torchvision": f"{same_masks} of {len(theirs)} detections",
              "paths": rows}
    for name, row in rows.items():
        print(f"{name:34s} {row['median_s']:7.3f} s  {row['ratio_to_torchvision']:.3f}x  ({row['detections']} detections)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
