"""Where a GPU step of ours goes: torch.profiler over a few training steps and inference calls, batch 8, bf16.

The weights, D detections per image and Penn-Fudan images of `gpu_protocol.py`. For each mode prints the ops with
the most CUDA time and the wall time per call against the GPU's busy time per call: a wide gap means the GPU waits
on the host (Python, kernel launches, host-device synchronisation), a narrow one that the kernels themselves are the
cost.

    python benchmarks/gpu_profile.py --device cuda                 # batch 8, bf16, cudnn.benchmark on
    python benchmarks/gpu_profile.py --device cpu --batch 1 --steps 1 --height 64 --width 96   # the script, on a CPU
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from compare_torchvision import HEIGHT, WIDTH, inference_fn, load_batch, synchronize, train_step_fn
from gpu_protocol import build_models, device_name, run_info


def profile_calls(fn, device: torch.device, steps: int, rows: int) -> dict:
    """Profiles `steps` calls of `fn` after 3 warm-up calls; returns wall and device milliseconds per call."""
    for _ in range(3):
        fn()
    synchronize(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            fn()
        synchronize(device)
        wall_ms = 1000 * (time.perf_counter() - start) / steps
    events = prof.key_averages()
    sort_key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(events.table(sort_by=sort_key, row_limit=rows), flush=True)
    # the kernels' own events, summed as the table's total does (CPU-side ops carry the same time again)
    kernels = [e for e in events if e.device_type == DeviceType.CUDA and not e.is_user_annotation]
    device_ms = sum(e.self_device_time_total for e in kernels) / 1000 / steps
    return {"wall_ms_per_call": wall_ms, "device_busy_ms_per_call": device_ms}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5, help="profiled calls per mode")
    parser.add_argument("--rows", type=int, default=25, help="ops printed per mode")
    parser.add_argument("--height", type=int, default=HEIGHT)
    parser.add_argument("--width", type=int, default=WIDTH)
    parser.add_argument("--detections", type=int, default=8, help="D, detections per image (gpu_protocol.py's)")
    parser.add_argument("--cudnn-benchmark", choices=["on", "off"], default="on")
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/gpu_profile.json"))
    args = parser.parse_args()

    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = args.cudnn_benchmark == "on"
    model = build_models(args.detections, args.height, args.width)["ours"].to(device)
    images, targets = load_batch(args.batch, device, args.height, args.width)
    results = {}
    for mode in ("train", "infer"):
        print(f"\n## ours, {mode}, batch {args.batch}, bf16 autocast\n", flush=True)
        fn = (train_step_fn(model, images, targets, torch.bfloat16, device) if mode == "train"
              else inference_fn(model, images, torch.bfloat16, device, []))
        results[mode] = profile_calls(fn, device, args.steps, args.rows)
        print(json.dumps({mode: results[mode]}), flush=True)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    settings = {key: getattr(args, key)
                for key in ("batch", "steps", "height", "width", "detections", "cudnn_benchmark")}
    args.json.write_text(json.dumps({**run_info(), "device": device_name(device), "settings": settings, **results},
                                    indent=2))
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
