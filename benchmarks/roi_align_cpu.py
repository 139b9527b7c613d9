"""RoIAlign on the CPU: torchvision's kernel against the speed layer's `cpu_roi_align` (embedding-bag over the NHWC
map), forward and backward, on the largest FPN level of an 800 x 1088 batch of 2.

    python benchmarks/roi_align_cpu.py [--rois 700] [--repeats 5] [--threads 2]

Paths, each timed alternately in every round (median over the rounds):
    torchvision NCHW:    `torchvision.ops.roi_align` on an NCHW map (its kernel's layout; one thread whatever
                         torch's thread count)
    torchvision NHWC:    the same op given the channels_last map the speed layer's convolutions produce
    ours fp32:           `cpu_roi_align` on the channels_last map
    ours bf16 inference: `cpu_roi_align` on the bf16 map, no gradient (bf16 inference under autocast)
The RoIs are seeded random boxes of 4-154 px in the 800 x 1088 canvas, pooled 7 x 7 with 2 x 2 samples per bin
(the box head's setting); the backward gets a gradient of ones.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torchvision.ops import roi_align

from maskrcnn.model.cpu_speedups import cpu_roi_align

CHANNELS, HEIGHT, WIDTH, STRIDE, POOLED = 256, 200, 272, 4, 7


def rois(count: int) -> torch.Tensor:
    """f32[count, 5] seeded boxes (image 0 or 1) in canvas pixels."""
    generator = torch.Generator().manual_seed(0)
    corner = torch.rand(count, 2, generator=generator) * torch.tensor([WIDTH * STRIDE, HEIGHT * STRIDE])
    size = torch.rand(count, 2, generator=generator) * 150 + 4
    image = torch.randint(0, 2, (count, 1), generator=generator).float()
    return torch.cat([image, corner, corner + size], dim=1)


def timed(pool: Callable[[torch.Tensor], torch.Tensor], feature: torch.Tensor, backward: bool) -> tuple[float, float]:
    """Seconds of one forward and (when `backward`) one backward of `pool` on a fresh leaf copy of `feature`."""
    leaf = feature.detach().clone().requires_grad_(backward)
    start = time.perf_counter()
    with torch.set_grad_enabled(backward):
        pooled = pool(leaf)
    middle = time.perf_counter()
    if backward:
        pooled.backward(torch.ones_like(pooled))
    return middle - start, time.perf_counter() - middle


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rois", type=int, default=700)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    boxes = rois(args.rois)
    nchw = torch.randn(2, CHANNELS, HEIGHT, WIDTH, generator=torch.Generator().manual_seed(1))
    nhwc = nchw.contiguous(memory_format=torch.channels_last)
    settings = {"output_size": POOLED, "spatial_scale": 1 / STRIDE, "sampling_ratio": 2, "aligned": True}
    paths = {  # name: (pool, map, with a backward)
        "torchvision NCHW": (lambda x: roi_align(x, boxes, **settings), nchw, True),
        "torchvision NHWC": (lambda x: roi_align(x, boxes, **settings), nhwc, True),
        "ours fp32": (lambda x: cpu_roi_align(x, boxes, **settings), nhwc, True),
        "ours bf16 inference": (lambda x: cpu_roi_align(x, boxes, **settings), nhwc.bfloat16(), False),
    }
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in paths}
    for name, (pool, feature, backward) in paths.items():
        timed(pool, feature, backward)  # warm-up
    for _ in range(args.repeats):
        for name, (pool, feature, backward) in paths.items():
            times[name].append(timed(pool, feature, backward))
    print(f"{args.rois} RoIs, map 2 x {CHANNELS} x {HEIGHT} x {WIDTH}, {POOLED} x {POOLED} bins, "
          f"{args.threads} threads, torch {torch.__version__}, median of {args.repeats}\n")
    print("| path | forward ms | backward ms |\n| --- | --- | --- |")
    for name, (_, _, backward) in paths.items():
        forward_ms = statistics.median(t[0] for t in times[name]) * 1000
        backward_ms = f"{statistics.median(t[1] for t in times[name]) * 1000:.0f}" if backward else "-"
        print(f"| {name} | {forward_ms:.0f} | {backward_ms} |")


if __name__ == "__main__":
    main()
