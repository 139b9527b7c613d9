"""What is left between ours in bf16 and the issue's 0.35x of torchvision's fp32 time (issue 22): two changes tried
on the convolutions, and the page faults of the mask paste's output.

- weights: ours bf16 at batch 1, 800 x 1088, as shipped, against two variants patched in for this run only:
  "cached": each convolution's BatchNorm-folded weight cast to bf16 once per weight version instead of at every
  call; "prepacked": that weight also reordered once into oneDNN's blocked layout and run by the fused op that
  torch.compile's CPU backend uses (`torch.ops.mkldnn._convolution_pointwise`). Alternating, median of --calls.
- profile: the torch profile of one call of ours in bf16 as shipped, ops by their own time.
- paste: 100 masks pasted into 800 x 1088 (the paste's product and its 348 MB float32 output, the format
  torchvision's API returns) into a fresh tensor, as every call does, and into one already written once.

    python benchmarks/bf16_last_steps.py weights --calls 7
    python benchmarks/bf16_last_steps.py paste
    python benchmarks/bf16_last_steps.py profile
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).parent))
from export_onnxruntime import images, torchvision_model

from maskrcnn.model import cpu_speedups, from_torchvision

SHIPPED = cpu_speedups.SpeedConv2d._conv_forward


def _versions(*tensors: Tensor | None) -> tuple:
    return tuple((t._version, t.data_ptr()) for t in tensors if t is not None)


def patched_conv_forward(prepacked: bool) -> Callable:
    """`SpeedConv2d._conv_forward` with its eval-mode bf16 weight made once per weight version."""

    def conv_forward(self, input: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        if self.training or input.device.type != "cpu" or not torch.is_autocast_enabled("cpu"):
            return SHIPPED(self, input, weight, bias)
        norm = self.folded_norm
        key = _versions(weight, bias, *((norm.weight, norm.bias, norm.running_mean, norm.running_var)
                                        if norm is not None else ()))
        if getattr(self, "bf16_cache", (None,))[0] != key:
            with torch.autocast("cpu", enabled=False):
                folded, folded_bias = cpu_speedups._fold(weight, bias, norm) if norm is not None else (weight, bias)
                folded = folded.to(torch.bfloat16)
                folded_bias = folded_bias.to(torch.bfloat16) if folded_bias is not None else None
                if prepacked:
                    folded = torch.ops.mkldnn._reorder_convolution_weight(
                        folded, self.padding, self.stride, self.dilation, self.groups, input.shape)
            self.bf16_cache = (key, folded, folded_bias)
        _, folded, folded_bias = self.bf16_cache
        if not prepacked:
            return nn.Conv2d._conv_forward(self, input, folded, folded_bias)
        with torch.autocast("cpu", enabled=False):
            return torch.ops.mkldnn._convolution_pointwise(input.to(torch.bfloat16), folded, folded_bias,
                                                           self.padding, self.stride, self.dilation, self.groups,
                                                           "none", [], "")

    return conv_forward


def weights(calls: int) -> None:
    model = from_torchvision(torchvision_model(), precision="bf16")
    image = images(1)
    variants = {"shipped": SHIPPED, "cached": patched_conv_forward(False), "prepacked": patched_conv_forward(True)}
    times: dict[str, list[float]] = {name: [] for name in variants}
    for round_ in range(calls + 1):  # round 0 warms each variant up (oneDNN primitives, the caches)
        for name, forward in variants.items():
            cpu_speedups.SpeedConv2d._conv_forward = forward
            start = time.perf_counter()
            with torch.inference_mode():
                model(image)
            if round_ > 0:
                times[name].append(time.perf_counter() - start)
    cpu_speedups.SpeedConv2d._conv_forward = SHIPPED
    for name, seconds in times.items():
        print(f"{name:<10} median {statistics.median(seconds):.3f} s  ({' '.join(f'{s:.3f}' for s in seconds)})")


def profile(calls: int) -> None:
    model = from_torchvision(torchvision_model(), precision="bf16")
    image = images(1)
    with torch.inference_mode():
        for _ in range(calls):  # warm-up: oneDNN primitives, the speed layer's measured choices
            model(image)
        with torch.profiler.profile() as profiler:
            model(image)
    print(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=20, max_name_column_width=40))


def paste(calls: int) -> None:
    wy, product = torch.rand(100, 800, 28), torch.rand(100, 28, 1088)  # (D, h, M), (D, M, w)
    touched = torch.zeros(100, 800, 1088)

    def median(compute: Callable[[], object]) -> float:
        seconds = []
        for _ in range(calls):
            start = time.perf_counter()
            compute()
            seconds.append(time.perf_counter() - start)
        return statistics.median(seconds)

    def fresh() -> Tensor:
        return torch.empty(100, 800, 1088)

    print(f"paste product into a fresh output   {median(lambda: torch.bmm(wy, product, out=fresh())):.3f} s")
    print(f"paste product into a written output {median(lambda: torch.bmm(wy, product, out=touched)):.3f} s")
    print(f"zero-fill a fresh output            {median(lambda: fresh().fill_(0)):.3f} s")
    print(f"zero-fill a written output          {median(lambda: touched.fill_(0)):.3f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=("weights", "paste", "profile"))
    parser.add_argument("--calls", type=int, default=7, help="timed calls of each variant (profile: warm-up calls)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    {"weights": weights, "paste": paste, "profile": profile}[args.what](args.calls)


if __name__ == "__main__":
    main()
