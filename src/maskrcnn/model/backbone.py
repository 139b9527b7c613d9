"""ResNet trunk + feature pyramid network (Lin et al. 2017): levels p2..p6 at strides 4..64.

Parameter names equal torchvision's `resnet_fpn_backbone` (`body.conv1`, `body.layer1..4`, `fpn.inner_blocks.*`,
`fpn.layer_blocks.*`), so torchvision Mask R-CNN weights convert by a key prefix at most.

Shape letters: B images, Hp/Wp padded canvas, C FPN channels.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn
from torchvision import models
from torchvision.ops import FeaturePyramidNetwork, FrozenBatchNorm2d
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

LEVELS = ("p2", "p3", "p4", "p5", "p6")

_RESNETS = {
    18: (models.resnet18, models.ResNet18_Weights.IMAGENET1K_V1),
    34: (models.resnet34, models.ResNet34_Weights.IMAGENET1K_V1),
    50: (models.resnet50, models.ResNet50_Weights.IMAGENET1K_V1),
    101: (models.resnet101, models.ResNet101_Weights.IMAGENET1K_V1),
}
# stages that stay trainable for a given `trainable_layers`, last stage first (torchvision's rule)
_STAGES = ("layer4", "layer3", "layer2", "layer1", "conv1")


class ResNetTrunk(nn.Module):
    """A torchvision ResNet without its classifier, returning the outputs of its four stages.

    Args:
        resnet: a torchvision `ResNet`; its stem and stages are adopted under their own names.
    """

    def __init__(self, resnet: models.ResNet) -> None:
        super().__init__()
        self.conv1, self.bn1, self.relu, self.maxpool = resnet.conv1, resnet.bn1, resnet.relu, resnet.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = resnet.layer1, resnet.layer2, resnet.layer3, resnet.layer4

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        """f32[B, 3, Hp, Wp] -> {"c2".."c5"} at strides 4, 8, 16, 32."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        c2 = self.layer1(x)
        c3 = self.layer2(c2)
        c4 = self.layer3(c3)
        c5 = self.layer4(c4)
        return OrderedDict(c2=c2, c3=c3, c4=c4, c5=c5)


class Backbone(nn.Module):
    """ResNet trunk `body` + `fpn` (torchvision's FeaturePyramidNetwork, p6 by max-pooling p5).

    Args:
        body: a `ResNetTrunk`.
        in_channels: channels of c2..c5.
        out_channels: C, channels of every pyramid level.
        fpn_norm: normalisation layer inside the FPN (None: plain convs, torchvision's layout).
    """

    def __init__(self, body: ResNetTrunk, in_channels: list[int], out_channels: int,
                 fpn_norm: Callable[[int], nn.Module] | None = None) -> None:
        super().__init__()
        self.body = body
        self.fpn = FeaturePyramidNetwork(in_channels_list=in_channels, out_channels=out_channels,
                                         extra_blocks=LastLevelMaxPool(), norm_layer=fpn_norm)
        self.out_channels = out_channels

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        """f32[B, 3, Hp, Wp] -> {"p2".."p6": f32[B, C, Hi, Wi]} at strides 4, 8, 16, 32, 64."""
        pyramid = self.fpn(self.body(x))  # keys c2..c5 + "pool" from LastLevelMaxPool
        return OrderedDict(zip(LEVELS, pyramid.values()))


def _group_norm(num_channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, num_channels)


def build_backbone(*, depth: int, weights: str = "none", norm: str = "batch", trainable_layers: int = 3,
                   out_channels: int = 256) -> Backbone:
    """Builds a ResNet-FPN backbone.

    Args:
        depth: 18, 34, 50 or 101.
        weights: "none" (from scratch), "imagenet" (torchvision's ImageNet weights, downloaded or found in the
            torch hub cache) or a path to a file saved with `torch.save`: either a torchvision ResNet state dict
            (`conv1.weight`, ..., `fc.*` is ignored) or a whole backbone state dict (`body.*`, `fpn.*`).
        norm: normalisation of a backbone trained from scratch: "batch" (BatchNorm2d) or "group" (GroupNorm of
            32 groups, also in the FPN). "frozen" gives the pretrained layout (FrozenBatchNorm2d and frozen early
            stages) without loading anything, for a model whose whole weights are loaded afterwards.
            With `weights`, "batch" means FrozenBatchNorm2d: pretrained statistics stay fixed (fine-tuning BN with
            2 images per GPU hurts, Mask R-CNN sec. 3.1); "group" cannot load BatchNorm weights and is an error.
        trainable_layers: with pretrained weights (or norm="frozen"), how many ResNet stages counted from the
            last stay trainable, 0..5 (3: layer2..layer4 train, stem and layer1 frozen). From scratch every layer
            trains.
        out_channels: C, channels of p2..p6.
    Returns:
        Backbone with `out_channels` and forward f32[B, 3, Hp, Wp] -> {"p2".."p6"}.
    """
    if depth not in _RESNETS:
        raise ValueError(f"backbone depth must be one of {sorted(_RESNETS)}, got {depth}")
    if norm not in ("batch", "group", "frozen"):
        raise ValueError(f"backbone norm must be batch, group or frozen, got {norm!r}")
    if not 0 <= trainable_layers <= 5:
        raise ValueError(f"backbone trainable_layers must be in 0..5, got {trainable_layers}")
    if norm == "group" and weights != "none":
        raise ValueError(f"backbone norm 'group' is for training from scratch; weights {weights!r} carry BatchNorm "
                         f"statistics (loaded as FrozenBatchNorm2d): use norm 'batch' with them")
    constructor, imagenet = _RESNETS[depth]
    frozen = weights != "none" or norm == "frozen"
    if frozen:
        norm_layer, fpn_norm = FrozenBatchNorm2d, None
    elif norm == "group":
        norm_layer, fpn_norm = _group_norm, _group_norm
    else:
        norm_layer, fpn_norm = nn.BatchNorm2d, None
    body = ResNetTrunk(constructor(weights=None, norm_layer=norm_layer))
    expansion = 4 if depth >= 50 else 1  # bottleneck blocks widen their output 4x
    backbone = Backbone(body, [64 * expansion * 2**i for i in range(4)], out_channels, fpn_norm)

    if weights == "imagenet":
        _load_resnet(body, _download(imagenet), f"torchvision {imagenet}")
    elif weights != "none":
        _load_file(backbone, Path(weights))
    if frozen:
        stages = _STAGES[:trainable_layers]
        for name, parameter in body.named_parameters():
            if not name.startswith(stages):
                parameter.requires_grad_(False)
    return backbone


def _download(imagenet: models.WeightsEnum) -> dict[str, Tensor]:
    try:
        return imagenet.get_state_dict(progress=False)
    except Exception as error:  # URLError, socket and SSL errors, HTTP errors: all mean "could not fetch"
        raise RuntimeError(
            f"downloading the ImageNet weights {imagenet} from {imagenet.url} failed ({error}). Without network, "
            f"fetch that file elsewhere and give its local path as the backbone weights instead of 'imagenet'"
        ) from error


def _load_file(backbone: Backbone, path: Path) -> None:
    """Loads a ResNet or whole-backbone state dict from `path`, detecting which by its keys."""
    if not path.is_file():
        raise FileNotFoundError(f"backbone weights file not found: {path} (give 'none', 'imagenet' or a path)")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{path}: expected a state dict of tensors (ResNet or backbone), got {type(state).__name__}")
    if any(key.startswith("body.") for key in state):
        _load_state(backbone, state, str(path))
    elif "conv1.weight" in state:
        _load_resnet(backbone.body, state, str(path))
    else:
        raise ValueError(f"{path}: neither a ResNet state dict (conv1.weight, layer1.*) nor a backbone state dict "
                         f"(body.*, fpn.*); first keys: {list(state)[:5]}")


def _load_resnet(body: ResNetTrunk, state: dict[str, Tensor], source: str) -> None:
    """Loads a torchvision ResNet state dict into the trunk; the classifier `fc.*` is dropped."""
    _load_state(body, {key: value for key, value in state.items() if not key.startswith("fc.")}, source)


def _load_state(module: nn.Module, state: dict[str, Tensor], source: str) -> None:
    """Strict `load_state_dict` whose errors name the weights' source."""
    try:
        missing, unexpected = module.load_state_dict(state, strict=False)
    except RuntimeError as error:  # shape mismatches
        raise ValueError(f"{source}: weights do not fit this backbone (wrong depth?): {error}") from None
    if missing or unexpected:
        raise ValueError(f"{source}: weights do not fit this backbone (wrong depth or layout?); "
                         f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                         f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
