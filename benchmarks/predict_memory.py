"""Peak resident memory of predicting one 4000 x 3000 photo with 100 detections (issue 32): the masks encoded box
by box to COCO RLE (`model.mask_rle.paste_masks_rle`) against today's dense paste of every mask into the image.

Each path is one process under `/usr/bin/time -v` (its "Maximum resident set size", the whole process):

    predict cli        `maskrcnn predict CKPT photo.jpg --out DIR --score-thresh 0 --set ...=100 --set ...=0`
                       (overlay drawn and written; the command a user runs)
    predict cli, no overlays   the same with --no-overlays
    job rle            load_model, read the photo, `model.inference([image], masks="rle")`, COCO results, json
    job dense          the same with masks="dense" + `detections_to_coco` (the paste + threshold + pycocotools)

The checkpoint: the pennfudan preset's model (ResNet-50 FPN, min 800 / max 1333) with seeded random weights; at
score threshold 0 every image gets its 100 detections. The photo: a Penn-Fudan photo (synthetic blobs without the
data) resized to 4000 x 3000. The RLEs of every path are compared with the dense job's.

    python benchmarks/predict_memory.py                  # writes benchmarks/results/predict_memory.json
    python benchmarks/predict_memory.py --skip-dense     # without the dense job (about 9 GB)
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the benchmarks folder is not a package
from export_onnxruntime import PENNFUDAN
from rle_speed import machine

RESULTS = Path(__file__).resolve().parent / "results"
PHOTO_SIZE = (3000, 4000)  # (H, W): a 12-megapixel photo
OVERRIDES = ["model.box_head.detections_per_img=100", "model.box_head.score_thresh=0"]


def write_checkpoint(path: Path) -> None:
    """The pennfudan preset's model with seeded random weights, as a checkpoint `maskrcnn predict` loads."""
    from maskrcnn.config import config_to_dict, load_config
    from maskrcnn.model.build import build_model

    cfg = load_config("pennfudan", ["model.backbone.weights=none"])
    torch.manual_seed(0)
    model = build_model(dataclasses.replace(cfg.model, weights="none"))
    torch.save({"config": config_to_dict(cfg), "model": model.state_dict(),
                "categories": [{"id": 1, "name": "person"}]}, path)


def write_photo(path: Path) -> None:
    """A Penn-Fudan photo (smooth random blobs without the data) resized to PHOTO_SIZE, as JPEG."""
    files = sorted((PENNFUDAN / "PNGImages").glob("*.png"))
    if files:
        image = Image.open(files[0]).convert("RGB")
    else:
        blobs = np.random.default_rng(0).integers(0, 256, (PHOTO_SIZE[0] // 100, PHOTO_SIZE[1] // 100, 3))
        image = Image.fromarray(blobs.astype(np.uint8))
    image.resize(PHOTO_SIZE[::-1], Image.BILINEAR).save(path, quality=90)


def job(checkpoint: str, photo: str, masks: str, out: str) -> None:
    """One photo to COCO results in this process (the child of a `job` path)."""
    from maskrcnn.engine.checkpoint import load_model
    from maskrcnn.engine.coco_results import detections_to_coco
    from maskrcnn.engine.common import images_to_model

    loaded = load_model(checkpoint, overrides=OVERRIDES)
    image = torch.from_numpy(np.array(Image.open(photo).convert("RGB"))).permute(2, 0, 1).contiguous()
    output = loaded.model.inference(images_to_model([image], loaded.device), masks=masks)[0]
    if masks == "dense":
        results = detections_to_coco(output, 1, {1: 1})
    else:
        boxes = output["boxes"].clone()
        boxes[:, 2:] -= boxes[:, :2]  # xyxy -> xywh
        results = [{"image_id": 1, "category_id": int(label), "bbox": box, "score": score, "segmentation": rle}
                   for box, label, score, rle in zip(boxes.tolist(), output["labels"].tolist(),
                                                     output["scores"].tolist(), output["masks"])]
    Path(out).write_text(json.dumps(results))


def measured(command: list[str]) -> dict:
    """Runs `command` under /usr/bin/time -v: its peak resident memory (MB), wall seconds and exit status."""
    started = time.perf_counter()
    process = subprocess.run(["/usr/bin/time", "-v", *command], check=False, capture_output=True, text=True)
    peak_kb = re.search(r"Maximum resident set size \(kbytes\): (\d+)", process.stderr)
    if process.returncode != 0:
        print(process.stderr[-3000:], flush=True)
    return {"command": " ".join(command), "returncode": process.returncode,
            "peak_rss_mb": int(peak_kb.group(1)) / 1024 if peak_kb else None,
            "wall_s": round(time.perf_counter() - started, 1)}


def segmentations(path: Path) -> list:
    return [(d["score"], d["segmentation"]["counts"]) for d in json.loads(path.read_text())]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--skip-dense", action="store_true", help="without the dense job")
    parser.add_argument("--job", nargs=4, metavar=("CKPT", "PHOTO", "MASKS", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(RESULTS / "predict_memory.json"))
    args = parser.parse_args()
    if args.job:
        return job(*args.job)
    folder = Path(tempfile.mkdtemp(prefix="predict_memory_"))
    checkpoint, photo = folder / "model.pt", folder / "photo.jpg"
    write_checkpoint(checkpoint)
    write_photo(photo)
    cli = [sys.executable, "-m", "maskrcnn", "predict", str(checkpoint), str(photo), "--score-thresh", "0",
           *(item for override in OVERRIDES for item in ("--set", override))]
    me = [sys.executable, str(Path(__file__).resolve()), "--job", str(checkpoint), str(photo)]
    paths = {"predict cli": (cli + ["--out", str(folder / "cli")], folder / "cli" / "predictions.json"),
             "predict cli, no overlays": (cli + ["--out", str(folder / "cli_no_overlays"), "--no-overlays"],
                                          folder / "cli_no_overlays" / "predictions.json"),
             "job rle": (me + ["rle", str(folder / "rle.json")], folder / "rle.json")}
    if not args.skip_dense:
        paths["job dense"] = (me + ["dense", str(folder / "dense.json")], folder / "dense.json")
    rows = {}
    for name, (command, result) in paths.items():
        rows[name] = measured(command)
        rows[name]["detections"] = len(segmentations(result)) if result.is_file() else None
        print(f"{name}: {rows[name]}", flush=True)
    if not args.skip_dense:
        dense = segmentations(folder / "dense.json")
        for name, (_, result) in paths.items():
            rows[name]["rle_equal_to_dense"] = result.is_file() and segmentations(result) == dense
    record = {"benchmark": "predict_memory", **machine(), "photo": {"height": PHOTO_SIZE[0], "width": PHOTO_SIZE[1],
              "source": "Penn-Fudan FudanPed00001 resized" if PENNFUDAN.is_dir() else "random blobs"},
              "settings": {"checkpoint": "pennfudan preset, ResNet-50 FPN, seeded random weights",
                           "overrides": OVERRIDES, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")},
              "paths": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.out} ({datetime.datetime.now(datetime.timezone.utc):%H:%M} UTC)")


if __name__ == "__main__":
    main()
