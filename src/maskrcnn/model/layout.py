"""Memory-layout helpers for channels_last (NHWC) models on CPU, where oneDNN's speed depends on the layout.

- `nchw_copy`: an NCHW-contiguous copy of an NHWC tensor, as one 2-D transpose per image. torch's generic
  4-D permuted copy (`x.contiguous()`) is about 3x slower: 1 x 256 x 200 x 272, 31-40 ms against 11 ms.
- `LayoutConv2d`: an `nn.Conv2d` whose weight gradient is computed from NCHW copies where oneDNN's NHWC weight
  gradient is slow. Forward and input gradient stay NHWC, where they are fastest.

Measured on the project's 2-core AVX-512 VM (torch 2.14, fp32), weight gradient of a 3x3 convolution,
NHWC / NCHW + the two copies, batch 1 (batch 2):
- stride 2, 128 ch at 200 x 272: 49 / 18 + 8 ms (108 / 29 + 15 ms);
- stride 2, 256 ch at 100 x 136: 53 / 14 + 3 ms (96 / 27 + 7 ms);
- stride 1, 256 ch at 200 x 272 (FPN and RPN at p2): 238 / 159 + 27 ms (452 / 322 + 49 ms);
- stride 1, 256 ch at 100 x 136: 57 / 40 + 5 ms;
- stride 1 below 256 channels or 10^4 positions (ResNet stages, mask head): equal or worse once copied.

Shape letters: B images, C channels, H, W height and width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

# stride-1 3x3 convolutions take the NCHW weight gradient from this many channels and positions (see above)
_MIN_CHANNELS = 256
_MIN_POSITIONS = 10_000


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
        for image in range(batch):
            out[image].view(channels, height * width).copy_(rows[image].t())
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return grad


class LayoutConv2d(nn.Conv2d):
    """`nn.Conv2d` that, training on CPU in float32 with an NHWC input, computes the weight gradient of the
    3x3 convolutions listed in the module docstring from NCHW copies of the input and the output gradient.

    Same parameters and state dict as `nn.Conv2d`; outputs are identical and gradients differ only by float
    summation order. Everywhere else (GPU, autocast, inference, other shapes) it is `nn.Conv2d`.
    """

    def _conv_forward(self, input: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        if self._nchw_weight_grad(input, weight):
            return _NCHWWeightGradConv.apply(input, weight, bias, self.stride, self.padding, self.dilation)
        return super()._conv_forward(input, weight, bias)

    def _nchw_weight_grad(self, input: Tensor, weight: Tensor) -> bool:
        if not (weight.requires_grad and torch.is_grad_enabled() and input.device.type == "cpu"
                and input.dtype == torch.float32 and not torch.is_autocast_enabled("cpu")
                and input.dim() == 4 and input.is_contiguous(memory_format=torch.channels_last)
                and self.kernel_size == (3, 3) and self.groups == 1 and self.padding_mode == "zeros"
                and isinstance(self.padding, tuple)):
            return False
        if self.stride != (1, 1):
            return True
        return input.shape[1] >= _MIN_CHANNELS and input.shape[2] * input.shape[3] >= _MIN_POSITIONS

    @classmethod
    def from_conv(cls, conv: nn.Conv2d) -> LayoutConv2d:
        """A LayoutConv2d sharing `conv`'s parameters (so optimizers and state dicts see the same tensors)."""
        layout_conv = cls(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
                          padding=conv.padding, dilation=conv.dilation, groups=conv.groups,
                          bias=conv.bias is not None, padding_mode=conv.padding_mode,
                          device="meta")  # no throwaway initialisation: the parameters are replaced below
        layout_conv.weight = conv.weight
        layout_conv.bias = conv.bias
        layout_conv.train(conv.training)
        return layout_conv


def use_layout_convs(module: nn.Module) -> None:
    """Replaces every plain 3x3 `nn.Conv2d` inside `module` by a `LayoutConv2d` sharing its parameters."""
    for parent in list(module.modules()):
        for name, child in parent.named_children():
            if type(child) is nn.Conv2d and child.kernel_size == (3, 3):
                setattr(parent, name, LayoutConv2d.from_conv(child))


class _NCHWWeightGradConv(torch.autograd.Function):
    """conv2d with the NHWC forward and input gradient, and the weight gradient from NCHW copies."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, stride: tuple[int, int],
                padding: tuple[int, int], dilation: tuple[int, int]) -> Tensor:
        """f32[B, Cin, H, W] NHWC, f32[Cout, Cin, 3, 3], f32[Cout] or None -> f32[B, Cout, H', W'] NHWC."""
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
            return torch.ops.aten.convolution_backward(
                grad, input, kernel, [weight.shape[0]] if has_bias else None, stride, padding, dilation,
                False, [0, 0], 1, output_mask)

        grad_input = grad_weight = grad_bias = None
        if need_input:
            grad_input, _, _ = convolution_backward(grad_output, x, weight, [True, False, False])
        if need_weight or need_bias:
            # the bias gradient comes with the weight gradient's pass: asked of the input-gradient call, it made
            # that call 2.8x slower (p2 of the FPN: 121 -> 343 ms)
            _, grad_weight, grad_bias = convolution_backward(nchw_copy(grad_output), nchw_copy(x), weight.contiguous(),
                                                             [False, need_weight, need_bias])
        return grad_input, grad_weight, grad_bias, None, None, None
