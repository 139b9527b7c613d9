"""The optional CPU speed layer: `optimize_for_cpu(model)`. The model is correct without it; a reader of the
algorithm can skip this file. Everything here keeps the state dict (same keys, same values) and changes results
only by float rounding.

What it does, and why (measured on the project's 2-core VM, torch 2.14, fp32; see benchmarks/RESULTS.md):
- channels_last (NHWC) convolutions: oneDNN's NHWC kernels are faster on CPU (backbone at 800x1088, 1 thread:
  2.18 -> 1.89 s per image at inference).
- the weight gradient of 3x3 convolutions, from NHWC tensors as they are or from NCHW copies, whichever measures
  faster for that shape on this machine (`MeasuredChoice`, as `cudnn.benchmark`): oneDNN's NHWC weight gradient
  is slow for some shapes (stride 2, 128 ch at 200 x 272: 49 ms against 18 + 8 ms for the copies) and not others.
- BatchNorm folded into the convolution before it in eval mode, recomputed from the current weights at every call
  (no cache: weights changed by training or load_state_dict are always used).
- RoIAlign read from the NHWC maps as a weighted sum of map rows (`F.embedding_bag`), on torch's threads and in
  the map's dtype: torchvision's CPU kernels use one thread whatever torch's thread count and read one NCHW plane
  per channel (700 RoIs on a 2 x 256 x 200 x 272 map, 2 threads, forward / backward: torchvision 290 / 696 ms,
  here 27 / 66 ms; `benchmarks/roi_align_cpu.py`).

Each applies only where it can (CPU, float32, no autocast; RoIAlign and the folding also under bf16 autocast);
elsewhere the plain torch / torchvision op runs.
Private calls, each with its reason: `nn.Conv2d._conv_forward` (overridden: the one place where a conv's weight
and bias meet its input), `torch.ops.aten.convolution_backward` (the input and weight gradients of a convolution
as two separate calls).

Shape letters: B images, C channels, H, W height and width, R RoIs, S pooled size.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Hashable
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable
from torchvision.ops import FrozenBatchNorm2d
from torchvision.ops import roi_align as torchvision_roi_align

T = TypeVar("T")


def optimize_for_cpu(model: nn.Module, *, channels_last: bool = True, measured_weight_grad: bool = True,
                     fold_batchnorm: bool = True, nhwc_roi_align: bool = True) -> nn.Module:
    """Applies the speed layer to `model` in place and returns it; the state dict is unchanged.

    Args:
        model: a MaskRCNN (any module without `nhwc_roi_align`), in any mode, on any device (the tricks
            check the device at every call).
        channels_last: NHWC memory layout for every 4-D weight, hence for the activations of the convolutions.
        measured_weight_grad: 3x3 convolutions take their weight gradient from NHWC or NCHW, whichever is faster.
        fold_batchnorm: in eval mode, BatchNorm after a convolution is folded into that convolution's weights.
        nhwc_roi_align: the poolers of both heads run `cpu_roi_align` (NHWC maps as they are, torch's threads).
    Returns:
        the same model object.
    """
    if channels_last:
        model.to(memory_format=torch.channels_last)
    for parent in list(model.modules()):
        children = list(parent.children())
        for conv, norm in zip(children, [*children[1:], None]):
            if type(conv) is not nn.Conv2d:
                continue
            conv.__class__ = SpeedConv2d  # the same object and parameters: the state dict does not change
            conv.measured_weight_grad = measured_weight_grad and conv.kernel_size == (3, 3)
            conv.folded_norm = None
            if fold_batchnorm and type(norm) in _FOLDED_NORMS:
                norm.__class__ = _FOLDED_NORMS[type(norm)]
                # a plain attribute, not a submodule: the norm stays registered (and saved) where it is
                object.__setattr__(conv, "folded_norm", norm)
    if nhwc_roi_align:
        model.box_head.pooler.roi_align = cpu_roi_align
        model.mask_head.pooler.roi_align = cpu_roi_align
    return model


# ------------------------------------------------------------------------------------ measured choice


class MeasuredChoice:
    """Runs each of several equivalent computations once per key and remembers the fastest, as `cudnn.benchmark`
    does for convolution algorithms; later calls with that key run only the remembered one.

    Args:
        timer: seconds as a float (`time.perf_counter`); tests put a fake one here.
    """

    def __init__(self, timer: Callable[[], float] = time.perf_counter) -> None:
        self.timer = timer
        self.choices: dict[Hashable, str] = {}

    def __call__(self, key: Hashable, candidates: dict[str, Callable[[], T]]) -> T:
        """The result of the remembered candidate for `key`; on first use, of the fastest of them all."""
        if key in self.choices:
            return candidates[self.choices[key]]()
        results, seconds = {}, {}
        for name, compute in candidates.items():
            compute()  # untimed first: one-off costs (oneDNN builds a primitive per shape) are not the path's
            start = self.timer()
            results[name] = compute()
            seconds[name] = self.timer() - start
        self.choices[key] = min(seconds, key=seconds.get)
        return results[self.choices[key]]


# one per process: the weight-gradient layout of every 3x3 convolution shape seen so far
weight_grad_layout = MeasuredChoice()


# ------------------------------------------------------------------------------------ convolutions


class SpeedConv2d(nn.Conv2d):
    """`nn.Conv2d` (same parameters, same state dict) with two CPU paths, set up by `optimize_for_cpu`:
    - eval mode with `folded_norm`: the BatchNorm after it folded into its weight and bias, at every call;
    - training on CPU in float32 with an NHWC input (3x3 only): the weight gradient from the layout that
      `weight_grad_layout` measured faster for this shape.
    """

    folded_norm: nn.Module | None
    measured_weight_grad: bool

    # the private hook of nn.Conv2d where weight, bias and input meet; overriding it keeps forward() as torch's
    def _conv_forward(self, input: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        if self.folded_norm is not None and _folds(self, input):
            weight, bias = _fold(weight, bias, self.folded_norm)
        elif self.measured_weight_grad and _nhwc_float32_training_on_cpu(input, weight) and self.groups == 1 \
                and self.padding_mode == "zeros" and isinstance(self.padding, tuple):
            return _MeasuredWeightGradConv.apply(input, weight, bias, self.stride, self.padding, self.dilation)
        return super()._conv_forward(input, weight, bias)


def _folds(module: nn.Module, input: Tensor) -> bool:
    """Whether the folding applies: eval mode on the CPU. On a GPU the fold's nine small ops per convolution at every
    call are launches where the norm is one kernel, and GPU inference waits on the host (batch 8 on an H200: 48 ms
    of kernels in a 106 ms profiled call; benchmarks/RESULTS.md)."""
    return not module.training and input.device.type == "cpu"


def _nhwc_float32_training_on_cpu(input: Tensor, weight: Tensor) -> bool:
    return (weight.requires_grad and torch.is_grad_enabled() and input.device.type == "cpu"
            and input.dtype == torch.float32 and not torch.is_autocast_enabled("cpu") and input.dim() == 4
            and input.is_contiguous(memory_format=torch.channels_last))


def _fold(weight: Tensor, bias: Tensor | None, norm: nn.Module) -> tuple[Tensor, Tensor]:
    """conv(x) * s + t == conv'(x) with w' = w * s, b' = (b - mean) * s + beta, s = gamma / sqrt(var + eps)
    (the order of `torch.nn.utils.fusion.fuse_conv_bn_weights`)."""
    scale = torch.rsqrt(norm.running_var + norm.eps) * norm.weight  # (Cout,)
    folded_bias = (bias if bias is not None else torch.zeros_like(norm.running_mean)) - norm.running_mean
    return weight * scale[:, None, None, None], folded_bias * scale + norm.bias


class _FoldedFrozenBatchNorm2d(FrozenBatchNorm2d):
    """FrozenBatchNorm2d whose eval-mode work the convolution before it does (`SpeedConv2d`)."""

    def forward(self, x: Tensor) -> Tensor:
        return x if _folds(self, x) else super().forward(x)


class _FoldedBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose eval-mode work the convolution before it does (`SpeedConv2d`)."""

    def forward(self, x: Tensor) -> Tensor:
        return x if _folds(self, x) else super().forward(x)


# norms that fold: affine with running statistics (BatchNorm2d's defaults; optimize_for_cpu checks nothing else)
_FOLDED_NORMS = {FrozenBatchNorm2d: _FoldedFrozenBatchNorm2d, nn.BatchNorm2d: _FoldedBatchNorm2d}


class _MeasuredWeightGradConv(torch.autograd.Function):
    """conv2d with the NHWC forward and input gradient, and the weight gradient from whichever layout measured
    faster for the shape."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, stride: tuple[int, int],
                padding: tuple[int, int], dilation: tuple[int, int]) -> Tensor:
        """f32[B, Cin, H, W] NHWC, f32[Cout, Cin, k, k], f32[Cout] or None -> f32[B, Cout, H', W'] NHWC."""
        ctx.save_for_backward(x, weight)
        ctx.settings = (stride, padding, dilation, bias is not None)
        return F.conv2d(x, weight, bias, stride, padding, dilation)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output: Tensor):
        x, weight = ctx.saved_tensors
        stride, padding, dilation, has_bias = ctx.settings
        need_input, need_weight, need_bias = ctx.needs_input_grad[:3]

        def convolution_backward(grad: Tensor, input: Tensor, kernel: Tensor, output_mask: list[bool]):
            # aten's op, not autograd's: it computes the input and the weight gradients in separate calls
            return torch.ops.aten.convolution_backward(
                grad, input, kernel, [weight.shape[0]] if has_bias else None, stride, padding, dilation,
                False, [0, 0], 1, output_mask)

        grad_input = grad_weight = grad_bias = None
        if need_input:
            grad_input, _, _ = convolution_backward(grad_output, x, weight, [True, False, False])
        if need_weight or need_bias:
            # the bias gradient comes with the weight gradient's pass: asked of the input-gradient call, it made
            # that call 2.8x slower (p2 of the FPN: 121 -> 343 ms)
            mask = [False, need_weight, need_bias]
            batch, channels, height, width = x.shape
            # positions bucketed by powers of 2: canvases of similar size share one measurement
            key = (batch, channels, tuple(weight.shape), stride, round(math.log2(height * width)), x.dtype)
            _, grad_weight, grad_bias = weight_grad_layout(key, {
                "nhwc": lambda: convolution_backward(grad_output, x, weight, mask),
                "nchw": lambda: convolution_backward(nchw_copy(grad_output), nchw_copy(x), weight.contiguous(), mask),
            })
        return grad_input, grad_weight, grad_bias, None, None, None


# ------------------------------------------------------------------------------------ layout copies


def nchw_copy(x: Tensor) -> Tensor:
    """f32[B, C, H, W] in any layout -> the same values NCHW-contiguous (x itself when it already is);
    differentiable, its gradient passes through unchanged, as that of `x.contiguous()`."""
    if x.is_contiguous() or not x.is_contiguous(memory_format=torch.channels_last):
        return x.contiguous()
    return _NCHWCopy.apply(x)


class _NCHWCopy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        """f32[B, C, H, W] NHWC -> NCHW-contiguous copy."""
        batch, channels, height, width = x.shape
        out = x.new_empty((batch, channels, height, width))
        rows = x.permute(0, 2, 3, 1).reshape(batch, height * width, channels)  # a view: (B, H*W, C)
        # a 2-D transpose per image: torch's 3-D and 4-D permuted copies of the same data are about 3x slower
        # (1 x 256 x 200 x 272: 31-40 ms against 11 ms)
        for image in range(batch):
            out[image].view(channels, height * width).copy_(rows[image].t())
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return grad


# ------------------------------------------------------------------------------------ RoIAlign


def cpu_roi_align(input: Tensor, boxes: Tensor, output_size: int, spatial_scale: float = 1.0,
                  sampling_ratio: int = -1, aligned: bool = False) -> Tensor:
    """`torchvision.ops.roi_align` (same signature, same values up to float rounding) that reads the map in its
    NHWC layout, on torch's threads, in the map's dtype.

    RoIAlign is linear in the map: every output bin is the mean of sampling_ratio**2 bilinear samples, each a
    weighted sum of 4 pixels, so a bin is a weighted sum of 4 * sampling_ratio**2 rows of C channels of the map seen
    as a (B*H*W, C) table, which is what `F.embedding_bag(mode="sum")` computes; its backward scatters the same
    rows. torchvision's CPU kernel instead runs on one thread and reads one NCHW plane per channel per sample (700
    RoIs on a 2 x 256 x 200 x 272 map, 2 threads, forward / backward: 290 / 696 ms, here 27 / 66 ms, 13 ms forward
    in bf16; `benchmarks/roi_align_cpu.py`). Under bf16 autocast at inference the map
    stays bf16 (torchvision's autocast rule would pool a float32 copy of it) and so does the result; a bf16 map that
    needs a gradient is pooled in float32.
    Off the CPU, when traced for export, or with adaptive sampling (sampling_ratio <= 0: a count per RoI):
    torchvision's op as it is.

    Args:
        input: f32[B, C, H, W] (bf16 under autocast; any float dtype), NHWC or not (NCHW is copied to NHWC once).
        boxes: f32[R, 5] (image index, x1, y1, x2, y2).
    Returns:
        [R, C, S, S] in input's dtype (float32 for a bf16 / fp16 map that needs a gradient), NHWC (channels_last)
        strides.
    """
    if torch.compiler.is_compiling() or input.device.type != "cpu" or sampling_ratio <= 0:
        return torchvision_roi_align(input, boxes, output_size, spatial_scale=spatial_scale,
                                     sampling_ratio=sampling_ratio, aligned=aligned)
    if input.dtype in (torch.bfloat16, torch.float16) and input.requires_grad and torch.is_grad_enabled():
        # training: the backward sums each pixel's gradient over all the bins that sample it, which in bf16 drifts
        # (512 RoIs on a 64 x 50 x 68 map: 1.5 % relative error of the map's gradient, 0.2 % summed in float32)
        input = input.float()
    batch, channels, height, width = input.shape
    rois = boxes.shape[0]
    with torch.no_grad():  # the sample weights depend on the boxes only, which get no gradient, as in torchvision
        # coordinates in float32 at least (torchvision's autocast rule pools bf16 maps in float32)
        corners = boxes[:, 1:].to(torch.promote_types(input.dtype, torch.float32)) * spatial_scale
        if aligned:
            corners = corners - 0.5
        sizes = corners[:, 2:] - corners[:, :2]  # (R, 2) width, height in map pixels
        if not aligned:
            sizes = sizes.clamp(min=1.0)  # torchvision v1 pools at least a 1 x 1 pixel box
        rows, row_weights = _bilinear_taps(corners[:, 1], sizes[:, 1], output_size, sampling_ratio, height)
        columns, column_weights = _bilinear_taps(corners[:, 0], sizes[:, 0], output_size, sampling_ratio, width)
        image = boxes[:, 0].to(torch.int64)
        # dims (R, bin row, bin column, sample row, sample column, row tap, column tap): one bag per bin
        index = ((image[:, None, None, None, None, None, None] * height + rows[:, :, None, :, None, :, None]) * width
                 + columns[:, None, :, None, :, None, :])
        weight = (row_weights[:, :, None, :, None, :, None] * column_weights[:, None, :, None, :, None, :]
                  / sampling_ratio**2)  # the mean over the bin's samples
        bag = (rois * output_size * output_size, 4 * sampling_ratio**2)  # (bins, taps per bin)
    table = input.permute(0, 2, 3, 1).reshape(batch * height * width, channels)  # a view of an NHWC map
    pooled = F.embedding_bag(index.reshape(bag), table, per_sample_weights=weight.reshape(bag).to(table.dtype),
                             mode="sum")  # (R * S * S, C)
    return pooled.view(rois, output_size, output_size, channels).permute(0, 3, 1, 2)


def _bilinear_taps(start: Tensor, size: Tensor, bins: int, sampling_ratio: int, length: int) -> tuple[Tensor, Tensor]:
    """The two pixels and their weights of every sample along one axis, by torchvision's RoIAlign rules.

    Args:
        start, size: f32[R] box start and extent in map pixels along the axis.
        bins: S bins per side; sampling_ratio: s samples per bin side; length: map size along the axis.
    Returns:
        pixel indices i64[R, S, s, 2] (lower, upper) and their weights f32[R, S, s, 2], zero for a sample more
        than one pixel outside the map.
    """
    bin_size = (size / bins)[:, None, None]
    bin_index = torch.arange(bins, dtype=start.dtype)[:, None]
    sample = torch.arange(sampling_ratio, dtype=start.dtype) + 0.5
    # in torchvision's order of operations, so that the coordinates round alike
    coord = start[:, None, None] + bin_index * bin_size + sample * bin_size / sampling_ratio  # (R, S, s)
    inside = (coord >= -1.0) & (coord <= length)
    coord = coord.clamp(min=0)
    lower = coord.floor().clamp(max=length - 1)
    coord = torch.where(lower >= length - 1, lower, coord)  # at the last pixel both taps are that pixel
    fraction = coord - lower
    lower = lower.to(torch.int64)
    upper = (lower + 1).clamp(max=length - 1)
    weights = torch.stack([1 - fraction, fraction], dim=-1) * inside[..., None]
    return torch.stack([lower, upper], dim=-1), weights
