"""Ours against torchvision's maskrcnn_resnet50_fpn: the same wall-clock training budget, then COCO AP.

Both train from scratch (random init, no pretrained backbone) on the Penn-Fudan split used by the reference
figures: `torch.randperm(170, generator=torch.Generator().manual_seed(1))`, the last 50 images are the test set.
Same recipe for both: SGD lr 0.02, momentum 0.9, weight decay 1e-4, linear warm-up, horizontal flip, batch 8
(2 on CPU), bf16 autocast on GPU. Each model then is COCO-evaluated on the 50 test images with the same code.
torchvision runs with cudnn.benchmark off (its default), ours on a GPU with one fixed canvas and benchmark on; the
JSON records both, the trained models' detections per image, commit, date and device, and is rewritten after each
model. `gpu_protocol.py` runs it once per model, each in a process of its own.

    python benchmarks/time_to_accuracy.py --device cuda --budget 200
    python benchmarks/time_to_accuracy.py --device cpu --budget 300 --min-size 320 --max-size 544   # CPU-sized
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import torch
from torchvision.models.detection import maskrcnn_resnet50_fpn

from gpu_protocol import device_name, run_info
from maskrcnn.config import DataConfig, ModelConfig, TransformConfig
from maskrcnn.data import build_dataset
from maskrcnn.data.loader import build_train_loader
from maskrcnn.engine.evaluate import evaluate_dataset
from maskrcnn.model import build_model


def pennfudan_root() -> str:
    root = Path(os.environ.get("MASKRCNN_PENNFUDAN", Path(__file__).resolve().parents[1] / "../shared/data/PennFudanPed"))
    if not (root / "PNGImages").is_dir():
        raise SystemExit(f"Penn-Fudan not found at {root}: set MASKRCNN_PENNFUDAN to the PennFudanPed folder")
    return str(root)


def fixed_canvas(datasets, min_size: int, max_size: int, divisible: int = 32) -> tuple[int, int]:
    """The smallest canvas (multiple of `divisible`) holding every image of `datasets` after resize, so that every
    batch, training and evaluation alike, has one static shape and cudnn.benchmark tunes once."""
    height = width = 0
    for h, w in (dataset.image_size(index) for dataset in datasets for index in range(len(dataset))):
        scale = min(min_size / min(h, w), max_size / max(h, w))
        height, width = max(height, math.floor(h * scale)), max(width, math.floor(w * scale))
    return math.ceil(height / divisible) * divisible, math.ceil(width / divisible) * divisible


def train_for(model, loader, *, budget_s: float, lr: float, warmup_iters: int, device: torch.device) -> dict:
    """Trains until `budget_s` seconds have passed or the loss is no longer finite; returns iterations run, seconds
    spent and the iteration that diverged (None if none did)."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=1e-4)
    warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: min(1.0, 0.001 + (1 - 0.001) * it / warmup_iters))
    model.train()
    start = time.perf_counter()
    iteration, diverged_at = 0, None
    for images, targets in loader:
        if time.perf_counter() - start >= budget_s:
            break
        images = [image.to(device, non_blocking=True).float().div_(255) for image in images]
        targets = [{k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in t.items()} for t in targets]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            losses = model(images, targets)
        total = sum(value for key, value in losses.items() if key.startswith("loss"))
        # one host sync per step, the same for both models: a diverged run stops instead of training on NaN
        if not math.isfinite(total.item()):
            diverged_at = iteration + 1
            break
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()
        warmup.step()
        iteration += 1
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return {"iterations": iteration, "seconds": time.perf_counter() - start, "last_loss": float(total.detach()),
            "diverged_at": diverged_at}


def build(name: str, args: argparse.Namespace, datasets: list, on_gpu: bool):
    """The seeded model to train and the fixed canvas it pads to (None: each batch to its largest image); sets
    cudnn.benchmark for it. torchvision runs at its default, benchmark off (with variable image sizes it would
    re-tune every batch); ours on a GPU with one static canvas, so that benchmark tunes once and then helps. On
    CPU padding every batch to the largest image only adds work (measured: 59 instead of 86+ iterations in 240 s
    at 320/544 px)."""
    torch.manual_seed(0)
    canvas = fixed_canvas(datasets, args.min_size, args.max_size) if name == "ours" and on_gpu else None
    torch.backends.cudnn.benchmark = canvas is not None
    if name == "torchvision":
        model = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=2, min_size=args.min_size,
                                      max_size=args.max_size)
    else:
        transform = TransformConfig(min_size=args.min_size, max_size=args.max_size, fixed_canvas=canvas)
        model = build_model(ModelConfig(num_classes=1, transform=transform))
    return model, canvas


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--budget", type=float, default=200.0, help="training seconds per model")
    parser.add_argument("--batch-size", type=int, default=None, help="default 8 on GPU, 2 on CPU")
    parser.add_argument("--lr", type=float, default=0.02)
    parser.add_argument("--warmup-iters", type=int, default=200)
    parser.add_argument("--min-size", type=int, default=800)
    parser.add_argument("--max-size", type=int, default=1333)
    parser.add_argument("--models", nargs="+", default=["torchvision", "ours"], choices=["torchvision", "ours"])
    parser.add_argument("--workers", type=int, default=None,
                        help="data loader processes, the same for both models (default 6 on GPU, 0 on CPU)")
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/time_to_accuracy.json"))
    args = parser.parse_args()

    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    batch_size = args.batch_size or (8 if device.type == "cuda" else 2)
    # Without workers the GPU would wait while the main process decodes each batch's photos.
    workers = args.workers if args.workers is not None else (6 if device.type == "cuda" else 0)
    data_config = DataConfig(format="pennfudan", root=pennfudan_root(), num_val=50, split_seed=1, flip_prob=0.5)
    train_set, test_set = build_dataset(data_config, "train"), build_dataset(data_config, "val")

    results = {}
    for name in args.models:
        model, canvas = build(name, args, [train_set, test_set], on_gpu)
        model.to(device)
        loader = build_train_loader(train_set, batch_size=batch_size, num_workers=workers, seed=0)
        trained = train_for(model, loader, budget_s=args.budget, lr=args.lr, warmup_iters=args.warmup_iters, device=device)
        evaluation = evaluate_dataset(model, test_set, batch_size=batch_size, device=device).metrics
        results[name] = {**trained, "bbox": evaluation["bbox"], "segm": evaluation["segm"],
                         "detections_per_image": evaluation["num_detections"] / evaluation["num_images"],
                         "cudnn_benchmark": torch.backends.cudnn.benchmark, "fixed_canvas": canvas}
        print(json.dumps({name: results[name]}), flush=True)
        # after each model, so that a run cut off keeps the first
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({**run_info(), "device": str(device), "device_name": device_name(device),
                                         "budget_s": args.budget, "batch_size": batch_size, "workers": workers,
                                         "min_size": args.min_size, "max_size": args.max_size, "results": results},
                                        indent=2))

    print(f"\n{device}; budget {args.budget:.0f} s; batch {batch_size}; {workers} loader workers; "
          f"min/max size {args.min_size}/{args.max_size}\n")
    print("| model | iterations | diverged at | box AP | box AP50 | mask AP | mask AP50 |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, r in results.items():
        print(f"| {name} | {r['iterations']} | {r['diverged_at'] or '-'} | {r['bbox']['AP']:.3f} | {r['bbox']['AP50']:.3f} "
              f"| {r['segm']['AP']:.3f} | {r['segm']['AP50']:.3f} |")
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
