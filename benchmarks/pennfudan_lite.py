"""The `pennfudan-lite` preset against a ResNet-50 trained from scratch with the same budget, on Penn-Fudan.

Both runs are `maskrcnn train configs/pennfudan-lite.yaml`, one after the other in fresh processes: the preset as it
is (EfficientNet-Lite0 with its packaged ImageNet weights), then the same config with the backbone swapped for a
ResNet-50 from random initialisation (GroupNorm, the repository's from-scratch setting, and the ImageNet input
normalisation). Same image size, FPN and head widths, schedule, iterations, time cap (`train.max_minutes`), data
split (the last 50 of `torch.randperm(170, seed 1)` are the test images) and evaluation.

    MASKRCNN_PENNFUDAN=/path/to/PennFudanPed python benchmarks/pennfudan_lite.py --out runs/pennfudan-lite-bench

Writes benchmarks/results/pennfudan_lite.json and prints a Markdown table. With `--inference` instead, times CPU
inference at 800x1088 of the preset and of the same model on a ResNet-50 trunk (BatchNorm, folded into the
convolutions at inference like the Lite's): median of 5 calls after 2 warm-up calls each, the models called in turn, 100
detections per image forced by a zero score threshold, random weights (the time does not depend on them); wall-clock
ms and the CPU ms of the process (with `--threads 1`, a figure that a loaded machine inflates little). With
`--picture CHECKPOINT IMAGE PNG`, draws the masks a trained run predicts on one (held-out) photo, one colour per
pedestrian.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PRESET = ROOT / "src" / "maskrcnn" / "configs" / "pennfudan-lite.yaml"
MODELS = {
    "efficientnet_lite0 (ImageNet, the preset)": [],
    "resnet50 (from scratch)": [
        "model.backbone.name=resnet", "model.backbone.depth=50", "model.backbone.weights=none",
        "model.backbone.norm=group", "model.transform.image_mean=[0.485,0.456,0.406]",
        "model.transform.image_std=[0.229,0.224,0.225]",
    ],
}
INFERENCE = {
    "efficientnet_lite0 (the preset)": [],
    "resnet50 (the preset's FPN and heads)": ["model.backbone.name=resnet", "model.backbone.depth=50"],
}


def train_run(out: Path, overrides: list[str]) -> dict:
    """Runs `maskrcnn train` on the preset with `overrides` into `out`; returns iterations, minutes, final metrics."""
    command = [sys.executable, "-m", "maskrcnn", "train", str(PRESET), "--out", str(out)]
    for override in overrides:
        command += ["--set", override]
    print("$", " ".join(command), flush=True)
    started = time.perf_counter()
    subprocess.run(command, check=True)
    minutes = (time.perf_counter() - started) / 60
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if "loss" in r]
    evaluation = [r for r in records if "eval" in r][-1]
    return {"command": " ".join(command[1:]).replace(f"{ROOT}/", ""), "iterations": evaluation["iteration"],
            "total_minutes": minutes,
            "train_minutes": train_records[-1]["time"] / 60, "last_loss": train_records[-1]["loss"],
            "bbox": evaluation["eval"]["bbox"], "segm": evaluation["eval"]["segm"]}


def inference_ms(models: dict[str, list[str]], *, threads: int, rounds: int = 5) -> dict[str, dict[str, float]]:
    """Median wall-clock and process-CPU ms of one 800x1088 image through each model in eval mode: 2 warm-up calls
    each, then `rounds` rounds that call every model once in turn, so that a change of machine load touches all
    models alike."""
    import torch

    from maskrcnn.config import load_config
    from maskrcnn.model import build_model

    torch.set_num_threads(threads)
    built = {}
    for name, overrides in models.items():
        cfg = load_config(PRESET, [*overrides, "model.backbone.weights=none", "model.box_head.score_thresh=0.0",
                                   "model.transform.min_size=800", "model.transform.max_size=1088"])
        built[name] = build_model(cfg.model).eval()
    image = torch.rand(3, 800, 1088, generator=torch.Generator().manual_seed(0))
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in built}
    with torch.no_grad():
        for model in built.values():
            for _ in range(2):
                model([image])
        for _ in range(rounds):
            for name, model in built.items():
                started, started_cpu = time.perf_counter(), time.process_time()
                model([image])
                times[name].append(((time.perf_counter() - started) * 1000, (time.process_time() - started_cpu) * 1000))
    return {name: {"wall_ms": statistics.median(wall for wall, _ in values),
                   "cpu_ms": statistics.median(cpu for _, cpu in values)} for name, values in times.items()}


def picture(checkpoint: Path, image_file: Path, png: Path, *, score_thresh: float = 0.7) -> None:
    """Writes the masks (and boxes) that `checkpoint` predicts on `image_file` with score >= `score_thresh` to `png`,
    as a 64-colour palette PNG (small enough for docs/). They are drawn on a grey canvas of the photo's size, not on
    the photo: Penn-Fudan's licence forbids reposting its images, and a picture for the repository would be one."""
    from dataclasses import replace

    import torch
    from matplotlib import colormaps
    from PIL import Image
    from torchvision.io import ImageReadMode, decode_image
    from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

    from maskrcnn.config import config_from_dict
    from maskrcnn.engine.checkpoint import load_checkpoint
    from maskrcnn.model import build_model

    state = load_checkpoint(checkpoint)
    cfg = config_from_dict(state["config"]).model
    model = build_model(replace(cfg, backbone=replace(cfg.backbone, weights="none")))  # weights from the checkpoint
    model.load_state_dict(state["model"])
    image = decode_image(str(image_file), mode=ImageReadMode.RGB)
    with torch.no_grad():
        (detections,) = model.eval()([image.float() / 255])
    keep = detections["scores"] >= score_thresh
    masks = detections["masks"][keep, 0] >= 0.5  # (D, 1, H, W) probabilities -> (D, H, W) binary
    colors = [tuple(int(255 * c) for c in rgb) for rgb in colormaps["tab10"].colors[: int(keep.sum())]]
    canvas = torch.full_like(image, 200)
    drawn = draw_segmentation_masks(canvas, masks, alpha=0.8, colors=colors)
    drawn = draw_bounding_boxes(drawn, detections["boxes"][keep], colors=colors, width=2)
    rgb = Image.fromarray(drawn.permute(1, 2, 0).numpy())  # (3, H, W) -> (H, W, 3)
    rgb.quantize(colors=64).save(png, optimize=True)
    print(f"{int(keep.sum())} pedestrians drawn; wrote {png} ({png.stat().st_size // 1024} KB)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/pennfudan-lite-bench"), help="run directories")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS), help="training runs")
    parser.add_argument("--inference", action="store_true", help="only time inference at 800x1088")
    parser.add_argument("--threads", type=int, default=2, help="torch threads for --inference")
    parser.add_argument("--picture", nargs=3, type=Path, metavar=("CHECKPOINT", "IMAGE", "PNG"),
                        help="only draw the masks CHECKPOINT predicts on IMAGE into PNG")
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "pennfudan_lite.json")
    args = parser.parse_args()

    if args.picture:
        picture(*args.picture)
        return
    results = json.loads(args.json.read_text()) if args.json.is_file() else {}
    if args.inference:
        measured = results.setdefault("inference_800x1088", {})
        measured[f"{args.threads} threads"] = inference_ms(INFERENCE, threads=args.threads)
        for name, ms in measured[f"{args.threads} threads"].items():
            print(f"{name}, {args.threads} threads: {ms['wall_ms']:.0f} ms wall, {ms['cpu_ms']:.0f} ms CPU "
                  "per 800x1088 image")
    else:
        if not os.environ.get("MASKRCNN_PENNFUDAN") and not (ROOT.parent / "shared/data/PennFudanPed").is_dir():
            raise SystemExit("Penn-Fudan not found: set MASKRCNN_PENNFUDAN to the PennFudanPed folder")
        runs = results.setdefault("training", {})
        for name in args.models:
            runs[name] = train_run(args.out / name.split()[0], MODELS[name])
            args.json.write_text(json.dumps(results, indent=2))
        print("\n| model | iterations | train min | total min | box AP | box AP50 | mask AP | mask AP50 |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- |")
        for name, r in runs.items():
            boxes, masks = r["bbox"], r["segm"]
            print(f"| {name} | {r['iterations']} | {r['train_minutes']:.1f} | {r['total_minutes']:.1f} "
                  f"| {boxes['AP']:.3f} | {boxes['AP50']:.3f} | {masks['AP']:.3f} | {masks['AP50']:.3f} |")
    args.json.write_text(json.dumps(results, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
