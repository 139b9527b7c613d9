"""Ours against torchvision's maskrcnn_resnet50_fpn, same weights, same images, same run.

Builds a seeded random-init torchvision model, converts it with `from_torchvision`, and times a training step
(forward + backward + SGD step) and inference for each batch size and precision, plus the backbone+FPN alone so
the table shows what the heads cost. Prints one table and writes JSON.

    python benchmarks/compare_torchvision.py                       # CPU: batch 1 and 2, fp32
    python benchmarks/compare_torchvision.py --device cuda         # GPU: batch 1 and 8, fp32 and bf16
    python benchmarks/compare_torchvision.py --without fold_batchnorm   # ours without one trick of the CPU layer
    python benchmarks/compare_torchvision.py --without all              # ours without the CPU layer

The GPU figures of RESULTS.md come from `gpu_protocol.py` (a stated number of detections per image, both cudnn.benchmark
settings, a process per case); here a GPU run has 100 detections per image and `--cudnn-benchmark` for both.

Ours runs with its CPU speed layer (`model/cpu_speedups.py`, on by default); `--without` takes parts of it away,
to measure what each is worth on the machine at hand.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torchvision.models.detection import maskrcnn_resnet50_fpn

from maskrcnn.model import from_torchvision
from maskrcnn.model.cpu_speedups import optimize_for_cpu

SPEEDUPS = ("channels_last", "measured_weight_grad", "fold_batchnorm", "nhwc_roi_align")

HEIGHT, WIDTH = 800, 1088  # the original project's canvas; the transform keeps this size at min 800 / max 1333


def pennfudan_root() -> Path | None:
    root = Path(os.environ.get("MASKRCNN_PENNFUDAN", Path(__file__).resolve().parents[1] / "../shared/data/PennFudanPed"))
    return root if (root / "PNGImages").is_dir() else None


def load_batch(batch_size: int, device: torch.device, height: int = HEIGHT,
               width: int = WIDTH) -> tuple[list[torch.Tensor], list[dict]]:
    """Penn-Fudan photos (synthetic shapes when absent) resized to height x width, with their boxes and masks."""
    from maskrcnn.config import DataConfig
    from maskrcnn.data import build_dataset

    root = pennfudan_root()
    config = DataConfig(format="pennfudan", root=str(root), num_val=0, flip_prob=0.0) if root else DataConfig(synthetic_image_size=(height, width), flip_prob=0.0)
    dataset = build_dataset(config, "train")
    images, targets = [], []
    for index in range(batch_size):
        image, target = dataset[index % len(dataset)]
        h, w = image.shape[-2:]
        image = F.interpolate(image[None].float() / 255, size=(height, width), mode="bilinear", align_corners=False)[0]
        masks = F.interpolate(target["masks"][None].float(), size=(height, width), mode="nearest")[0].to(torch.uint8)
        boxes = target["boxes"] * torch.tensor([width / w, height / h, width / w, height / h])
        images.append(image.to(device))
        targets.append({"boxes": boxes.to(device), "labels": target["labels"].to(device), "masks": masks.to(device)})
    return images, targets


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn, device: torch.device, warmup: int, iters: int) -> float:
    """Median milliseconds of `iters` calls after `warmup` calls."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def train_step_fn(model, images, targets, autocast_dtype, device):
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-4, momentum=0.9)
    model.train()

    def step():
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            losses = model(images, targets)
        total = sum(value for key, value in losses.items() if key.startswith("loss"))
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()

    return step


def inference_fn(model, images, autocast_dtype, device, counts: list):
    model.eval()

    def infer():
        with torch.inference_mode(), torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            outputs = model(images)
        counts.append(sum(len(o["boxes"]) for o in outputs) / len(outputs))

    return infer


def backbone_fn(model, images, autocast_dtype, device):
    """Backbone + FPN as each model runs it at inference (ours with its CPU speed layer: NHWC, BatchNorm folded)."""
    model.eval()
    batch = torch.stack(images)

    def run():
        with torch.inference_mode(), torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            model.backbone(batch)

    return run


def measure(name: str, device: torch.device, modes: list[str], num_classes: int, *, batch_sizes: list[int],
            dtypes: list[str], warmup: int, iters: int, without: list[str], cudnn_benchmark: bool) -> list[dict]:
    """Times one model ("torchvision" or "ours", the same seeded weights) in every mode, batch size and dtype."""
    torch.backends.cudnn.benchmark = cudnn_benchmark  # the same for both models (GPU only)
    torch.manual_seed(0)
    model = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=num_classes)
    if name == "ours":
        model = from_torchvision(model, cpu_speedups=False)
        if "all" not in without:
            optimize_for_cpu(model, **{trick: trick not in without for trick in SPEEDUPS})
    model.to(device)
    rows = []
    for mode in modes:
        for batch_size in batch_sizes:
            images, targets = load_batch(batch_size, device)
            for dtype_name in dtypes:
                autocast_dtype = torch.bfloat16 if dtype_name == "bf16" else None
                counts: list = []
                if mode == "train":
                    fn = train_step_fn(model, images, targets, autocast_dtype, device)
                elif mode == "infer":
                    fn = inference_fn(model, images, autocast_dtype, device, counts)
                else:
                    fn = backbone_fn(model, images, autocast_dtype, device)
                ms = time_call(fn, device, warmup, iters)
                row = {"mode": mode, "batch": batch_size, "dtype": dtype_name, f"{name}_ms": ms, f"{name}_img_s": 1000 * batch_size / ms}
                if counts:
                    row[f"{name}_detections"] = statistics.mean(counts)
                rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-sizes", type=int, nargs="+", help="default: 1 2 on CPU, 1 8 on GPU")
    parser.add_argument("--dtypes", nargs="+", choices=["fp32", "bf16"], help="default: fp32 on CPU, fp32 bf16 on GPU")
    parser.add_argument("--modes", nargs="+", default=["train", "infer", "backbone"], choices=["train", "infer", "backbone"])
    parser.add_argument("--warmup", type=int, default=None, help="untimed calls first (default 2 CPU, 5 GPU)")
    parser.add_argument("--iters", type=int, default=None, help="timed calls (default 5 CPU, 20 GPU)")
    parser.add_argument("--rounds", type=int, default=1, help="runs of both models, alternating their order; median")
    parser.add_argument("--keep-heap", action="store_true",
                        help="glibc malloc keeps freed memory (no mmap / trim of large blocks) in both models' processes")
    parser.add_argument("--num-classes", type=int, default=2, help="classes including background, as torchvision counts")
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/compare_torchvision.json"))
    parser.add_argument("--without", nargs="+", default=[], choices=[*SPEEDUPS, "all"],
                        help="run ours without these parts of its CPU speed layer")
    parser.add_argument("--models", nargs="+", default=["torchvision", "ours"], choices=["torchvision", "ours"],
                        help="the models to time (ratios need both)")
    parser.add_argument("--cudnn-benchmark", action="store_true",
                        help="torch.backends.cudnn.benchmark on for both models (GPU; default off, torchvision's)")
    parser.add_argument("--worker", choices=["torchvision", "ours"], help=argparse.SUPPRESS)
    args = parser.parse_args()

    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    settings = {
        "batch_sizes": args.batch_sizes or ([1, 8] if on_gpu else [1, 2]),
        "dtypes": args.dtypes or (["fp32", "bf16"] if on_gpu else ["fp32"]),
        "warmup": args.warmup if args.warmup is not None else (5 if on_gpu else 2),
        "iters": args.iters if args.iters is not None else (20 if on_gpu else 5),
    }
    if args.worker:
        print(json.dumps(measure(args.worker, device, args.modes, args.num_classes, without=args.without,
                                 cudnn_benchmark=args.cudnn_benchmark, **settings)))
        return

    # Each model and mode is measured in a fresh process of its own. Measured in one process, whatever ran before
    # changed the figures through the heap and oneDNN's primitive cache: whichever model ran second (torchvision's
    # train step 4.3-6.3 s with the order, ours 3.8-4.9 s), and torchvision's CPU inference after its training
    # steps took 1.7 s per image against 2.4-2.5 s in a process of its own. Rounds alternate the models' order and
    # each figure is the median over rounds, since the shared 2-core VM drifts by 5-10% between runs.
    # glibc hands large freed blocks back to the OS (mmap'd blocks, heap trimming), so large activations are
    # page-faulted in again on later calls (3.5 million minor faults in 7 calls of torchvision's backbone at
    # 800x1088: 1178 ms per call, 716 ms with the heap kept), by an amount that depends on what the process
    # allocated before. --keep-heap takes the allocator out of the comparison; the default shows a plain process.
    env = dict(os.environ)
    if args.keep_heap:
        env.update(MALLOC_MMAP_THRESHOLD_=str(2**34), MALLOC_TRIM_THRESHOLD_=str(2**34))
    runs: dict = {}
    for round_index in range(args.rounds):
        for mode in args.modes:
            for name in args.models[:: 1 if round_index % 2 == 0 else -1]:
                command = [sys.executable, __file__, "--worker", name, "--device", args.device,
                           "--num-classes", str(args.num_classes), "--modes", mode,
                           "--batch-sizes", *map(str, settings["batch_sizes"]), "--dtypes", *settings["dtypes"],
                           "--warmup", str(settings["warmup"]), "--iters", str(settings["iters"])]
                if args.without:
                    command += ["--without", *args.without]
                if args.cudnn_benchmark:
                    command.append("--cudnn-benchmark")
                output = subprocess.run(command, check=True, stdout=subprocess.PIPE, text=True, env=env).stdout
                for row in json.loads(output.strip().splitlines()[-1]):
                    print(json.dumps({"round": round_index, **row}), flush=True)  # kept if a later run fails
                    runs.setdefault((row["mode"], row["batch"], row["dtype"]), []).append(row)
    rows = []
    for (mode, batch, dtype), measured in runs.items():
        row = {"mode": mode, "batch": batch, "dtype": dtype}
        for key in {key for m in measured for key in m if key.startswith(("torchvision", "ours"))}:
            row[key] = statistics.median(m[key] for m in measured if key in m)
        if "ours_ms" in row and "torchvision_ms" in row:
            row["ratio"] = row["ours_ms"] / row["torchvision_ms"]
        rows.append(row)
        print(json.dumps(row), flush=True)

    device_name = torch.cuda.get_device_name(device) if on_gpu else f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"
    print(f"\n{device_name}; torch {torch.__version__}; images {HEIGHT}x{WIDTH}; {args.num_classes} classes; median of {settings['iters']} "
          f"calls, each model and mode in its own process; median of {args.rounds} round(s)"
          f"{'; heap kept (glibc malloc)' if args.keep_heap else ''}"
          f"{'; ours without ' + ', '.join(args.without) if args.without else ''}\n")
    print("| mode | batch | dtype | torchvision ms | ours ms | torchvision img/s | ours img/s | ours / torchvision |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for row in rows:
        cells = [f"{row[key]:.0f}" if key in row else "-" for key in ("torchvision_ms", "ours_ms")]
        cells += [f"{row[key]:.2f}" if key in row else "-" for key in ("torchvision_img_s", "ours_img_s", "ratio")]
        print(f"| {row['mode']} | {row['batch']} | {row['dtype']} | {' | '.join(cells)} |")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"device": device_name, "torch": torch.__version__, "rounds": args.rounds,
                                     "keep_heap": args.keep_heap, "without": args.without,
                                     "cudnn_benchmark": args.cudnn_benchmark, "rows": rows}, indent=2))
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
